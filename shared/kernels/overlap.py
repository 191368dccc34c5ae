"""Programmatic dependent launch: a decode step's next kernel starts while the one before it finishes.

A decode step is a chain of small kernels, each reading what the one before wrote. In plain stream order
a kernel's programs are scheduled only after every program of the one before has ended and its writes
are flushed: a few microseconds per kernel in which the GPU reads nothing, and a decoder layer runs 7-9
kernels. On compute capability 9.0 and later, a kernel launched with programmatic dependent launch may
start as soon as every program of the kernel before it has signalled (`gdc_launch_dependents`); it then
reads what does not depend on that kernel (its weights) and waits (`gdc_wait`) before it reads anything
that might (activations, the cache, the step's position) and before its first store. A captured CUDA
graph keeps these launches as programmatic edges, so a replayed step overlaps the same way.

Every kernel launched this way waits in every program before its first store and before it ends, so a
kernel's end still means every kernel before it has ended: kernels that wait on it see all their inputs.
Lyra's decode kernels (`gemv`, `decode_attention`, `peer_reduce`) follow that rule when `enabled()`.
The first call per device tries it (two kernels chained, eagerly and replayed from a graph) and logs why
where it does not work; LYRA_PDL=0 turns it off (an A/B run, or a driver that mishandles it).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import torch

ENV = "LYRA_PDL"
logger = logging.getLogger(__name__)
_verdicts: dict[torch.device, bool] = {}


def enabled(device: torch.device) -> bool:
    """True where kernels on `device` may be launched with programmatic dependent launch."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get(ENV, "1") == "0":
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _verdicts:
        if torch.cuda.is_current_stream_capturing():  # no trial inside a capture: plain launches this time
            return False
        reason = ""
        if torch.cuda.get_device_capability(device)[0] < 9:
            reason = "compute capability below 9.0"
        elif not _triton_has_it():
            reason = "this Triton has no gdc_wait"
        else:
            reason = trial(device)
        if reason and torch.cuda.get_device_capability(device)[0] >= 9:
            logger.warning("programmatic dependent launch not used on %s: %s", device, reason)
        _verdicts[device] = not reason
    return _verdicts[device]


def options(device: torch.device) -> dict[str, Any]:
    """The launch keyword for a Triton kernel on `device`: {"launch_pdl": True}, or nothing."""
    return {"launch_pdl": True} if enabled(device) else {}


def _triton_has_it() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import triton.language as tl

    cuda = getattr(getattr(tl, "extra", None), "cuda", None)
    return hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents")


def trial(device: torch.device) -> str:
    """"" if two chained kernels launched this way give the right sums, eagerly and from a replayed graph."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(source, target, count, BLOCK: tl.constexpr):
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        tl.store(target + offsets, tl.load(source + offsets, mask=inside) + 1.0, mask=inside)

    try:
        with torch.cuda.device(device):
            first = torch.zeros(1 << 16, device=device)
            second = torch.empty_like(first)

            def chain() -> None:
                for source, target in ((first, second), (second, first)):
                    add_one[(first.numel() // 256,)](source, target, first.numel(), BLOCK=256, launch_pdl=True)

            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                chain()  # 2
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    for _ in range(3):
                        chain()
                graph.replay()  # 8
                graph.replay()  # 14
            stream.synchronize()
            if not bool((first == 14.0).all()):
                return f"chained kernels summed to {first.min().item()}..{first.max().item()}, not 14"
    except Exception as exc:  # a driver or Triton that cannot launch or capture it: say why, launch plainly
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return ""
