"""Measure what this process holds: torch's allocator and NVML per GPU, resident set size on the CPU.

Every backend reports through these helpers so the coordinator's ledger compares like with like. torch and
pynvml are imported lazily: a CPU-only process without them still gets its RSS.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

from shared.wire.messages import MemoryReading

logger = logging.getLogger(__name__)


def process_rss_bytes() -> int:
    """Resident set size of this process in bytes (psutil if installed, else /proc/self/statm)."""
    if importlib.util.find_spec("psutil") is not None:
        import psutil

        return int(psutil.Process().memory_info().rss)
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def cpu_reading() -> MemoryReading:
    """One "cpu" reading: RSS as both allocated and reserved."""
    rss = process_rss_bytes()
    return MemoryReading(device="cpu", allocated_bytes=rss, reserved_bytes=rss)


def gpu_readings(physical_gpus: list[int]) -> list[MemoryReading]:
    """One reading per GPU this process is pinned to, named by physical index (relative i -> physical_gpus[i])."""
    import torch

    readings = []
    for relative, physical in enumerate(physical_gpus):
        readings.append(MemoryReading(
            device=f"gpu:{physical}",
            allocated_bytes=int(torch.cuda.memory_allocated(relative)),
            reserved_bytes=int(torch.cuda.memory_reserved(relative)),
            nvml_used_bytes=nvml_process_bytes(relative),
        ))
    return readings


def readings(physical_gpus: list[int]) -> list[MemoryReading]:
    """What this process holds: per GPU when it has GPUs and CUDA works, else one CPU reading."""
    if physical_gpus and _cuda_ready():
        return gpu_readings(physical_gpus)
    return [cpu_reading()]


def _cuda_ready() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def nvml_process_bytes(relative: int) -> int | None:
    """This process's memory on relative CUDA device `relative` as NVML sees it, or None if unknowable.

    NVML numbers devices ignoring CUDA_VISIBLE_DEVICES (and maybe in another order), so the device is found
    by its UUID. Inside a container NVML may not list our pid at all; that reads as None, not as zero.
    """
    if importlib.util.find_spec("pynvml") is None:
        return None
    try:
        return _nvml_lookup(relative)
    except Exception as exc:  # NVML errors are many and driver-specific; a missing number is not fatal
        logger.debug("NVML reading for cuda:%d failed: %s", relative, exc)
        return None


def _nvml_lookup(relative: int) -> int | None:
    import pynvml
    import torch

    pynvml.nvmlInit()
    try:
        uuid = str(torch.cuda.get_device_properties(relative).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        return _used_by_pid(pynvml.nvmlDeviceGetComputeRunningProcesses(handle), os.getpid())
    finally:
        pynvml.nvmlShutdown()


def _used_by_pid(processes: list[Any], pid: int) -> int | None:
    for process in processes:
        if process.pid == pid and process.usedGpuMemory is not None:
            return int(process.usedGpuMemory)
    return None
