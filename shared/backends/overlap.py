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
LYRA_PDL=0 turns it off (an A/B run, or a driver that mishandles it).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

ENV = "LYRA_PDL"
_verdicts: dict[torch.device, bool] = {}


def enabled(device: torch.device) -> bool:
    """True where kernels on `device` may be launched with programmatic dependent launch."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get(ENV, "1") == "0":
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _verdicts:
        _verdicts[device] = torch.cuda.get_device_capability(device)[0] >= 9 and _triton_has_it()
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
