"""`lyra doctor`'s question for a voice over several GPUs: tensor ranks or pipeline placement on this box?

Tensor ranks all-reduce twice per layer per token, so they pay only where the GPUs reach each other's
memory directly (NVLink, or PCIe peer-to-peer): the doctor measures a peer copy between the voice's GPUs
and recommends `parallel = "tensor"` there, `"pipeline"` otherwise (and for a bitsandbytes-quantized voice,
which tensor ranks cannot split).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from shared.config.schema import LyraConfig
from shared.config.units import GB
from shared.wire.names import VOICE

PROBE_BYTES = 256 * 1024**2
REPEATS = 5
TENSOR_MIN_GB_S = 20.0  # below this a peer copy is going through host memory: ranks would wait on it


@dataclass(frozen=True)
class PeerLink:
    """What the voice's first two GPUs offer each other."""

    source: int
    target: int
    peer_access: bool
    gb_per_s: float


def measure_link(source: int, target: int) -> PeerLink:
    """Peer access and the median copy bandwidth from relative GPU `source` to `target` (GB/s)."""
    import torch

    access = bool(torch.cuda.can_device_access_peer(source, target))
    sent = torch.empty(PROBE_BYTES, dtype=torch.uint8, device=f"cuda:{source}")
    received = torch.empty(PROBE_BYTES, dtype=torch.uint8, device=f"cuda:{target}")
    received.copy_(sent)  # warm up: peer mapping and copy engines
    torch.cuda.synchronize(source)
    torch.cuda.synchronize(target)
    timings = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        received.copy_(sent)
        torch.cuda.synchronize(source)
        torch.cuda.synchronize(target)
        timings.append(time.perf_counter() - started)
    return PeerLink(source, target, access, PROBE_BYTES / sorted(timings)[REPEATS // 2] / GB)


def recommend(link: PeerLink | None, quantization: str) -> tuple[str, str]:
    """("tensor" | "pipeline", why) for a voice over these GPUs."""
    if quantization != "none":
        return "pipeline", f"a {quantization} voice cannot be split into tensor ranks (quantized ranks are not offered)"
    if link is None:
        return "pipeline", "the voice has fewer than two GPUs"
    if link.peer_access and link.gb_per_s >= TENSOR_MIN_GB_S:
        return "tensor", f"GPUs {link.source} and {link.target} copy peer to peer at {link.gb_per_s:.0f} GB/s"
    why = "no peer access" if not link.peer_access else f"only {link.gb_per_s:.0f} GB/s"
    return "pipeline", f"GPUs {link.source} and {link.target}: {why}; tensor ranks would wait on every all-reduce"


def voice_parallel_check(config: LyraConfig, has_cuda: bool) -> tuple[str, str, str, str]:
    """(status, name, detail, fix) of the doctor's line about the voice's parallel mode."""
    gpus = config.gpus_of(VOICE)
    if len(gpus) < 2:
        return "info", "voice parallel", "the voice has one GPU or none: nothing to split", ""
    if not has_cuda:
        return "info", "voice parallel", "no CUDA: peer bandwidth not measured", ""
    import torch

    if torch.cuda.device_count() <= max(gpus):
        return "warn", "voice parallel", f"voice GPUs {gpus} are not all visible", "run it with every GPU visible"
    link = measure_link(gpus[0], gpus[1])
    mode, why = recommend(link, config.voice.quantization)
    configured = config.voice.parallel
    status = "pass" if configured == mode else "warn"
    fix = "" if configured == mode else f"set parallel = \"{mode}\" in [voice]"
    return status, "voice parallel", f"use {mode}: {why} (configured: {configured})", fix
