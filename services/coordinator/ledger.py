"""The per-GPU VRAM ledger: what each worker process holds on each physical GPU, estimated and measured.

Every line is one worker process on one GPU. A line's bytes are the measured usage once the worker has
reported it, else the estimate; each process also pays a CUDA-context reserve on every GPU it touches.
A load is admitted only when the GPU's total after the load stays inside its budget.

The ledger keeps no record of who holds what: its lines are derived, each time they are read, from the
footprints it is given (the worker registry's record of what each worker reported holding, and its latest
readings), so a registration, a heartbeat and a load reply all show in it at once and can never disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from shared.config.schema import GpuEntry, LyraConfig, ModelEntry
from shared.config.units import GB
from shared.wire.messages import GpuSnapshot, MemoryReading


@dataclass
class LedgerLine:
    """One worker process's footprint on one GPU."""

    models: list[str] = field(default_factory=list)
    estimated: int = 0
    measured: int | None = None

    def bytes(self) -> int:
        return self.measured if self.measured is not None else self.estimated


@dataclass(frozen=True)
class Footprint:
    """What one worker process occupies: the models it holds, their estimate per GPU, its latest readings."""

    service: str
    models: tuple[str, ...]
    estimated: dict[int, int]  # physical GPU -> bytes, for `models`
    readings: tuple[MemoryReading, ...] = ()


def measured_on(readings: tuple[MemoryReading, ...], gpu: int) -> int | None:
    """What a process measured on `gpu` (torch's reserve or NVML's count, the larger), if it reported it."""
    found = None
    for reading in readings:
        if reading.device == f"gpu:{gpu}":
            found = max(reading.reserved_bytes, reading.nvml_used_bytes or 0)
    return found


class OverBudget(Exception):
    """A load would exceed a GPU's budget; the message carries the arithmetic."""


def split_estimate(entry: ModelEntry, gpus: list[int]) -> dict[int, int]:
    """Fallback when a worker sent no estimate: the declared `memory_gb`, spread evenly over its GPUs."""
    if not gpus:
        return {}
    return {gpu: int(entry.memory_gb * GB) // len(gpus) for gpu in gpus}


class VramLedger:
    """Budget per physical GPU, and who holds what on it (derived from `footprints` whenever it is read)."""

    def __init__(self, config: LyraConfig, footprints: Callable[[], list[Footprint]] = list) -> None:
        self.gpus: dict[int, GpuEntry] = {g.index: g for g in config.gpus}
        self.footprints = footprints  # the worker registry's record, as footprints

    def budget(self, gpu: int) -> int:
        return int(self.gpus[gpu].budget_gb * GB)

    def reserve(self, gpu: int) -> int:
        return int(self.gpus[gpu].context_reserve_gb * GB)

    def lines(self) -> dict[tuple[int, str], LedgerLine]:
        """(GPU, service) -> that process's line, for every GPU its held models are estimated on."""
        lines = {}
        for footprint in self.footprints():
            for gpu, size in footprint.estimated.items():
                if gpu in self.gpus:
                    lines[(gpu, footprint.service)] = LedgerLine(list(footprint.models), size,
                                                                 measured_on(footprint.readings, gpu))
        return lines

    def used(self, gpu: int, without: str | None = None) -> int:
        """Bytes in use on `gpu`, optionally leaving one service's line out."""
        return sum(line.bytes() + self.reserve(gpu) for (g, svc), line in self.lines().items()
                   if g == gpu and svc != without)

    def estimate_warnings(self, service: str) -> list[str]:
        """Lines of `service` whose measurement is more than 10% off the estimate."""
        return [f"{service} on GPU {gpu}: estimated {line.estimated / GB:.2f} GB, measured {line.measured / GB:.2f} GB"
                for (gpu, svc), line in self.lines().items()
                if svc == service and line.measured is not None and line.estimated
                and abs(line.measured - line.estimated) > 0.1 * line.estimated]

    def check(self, service: str, model: str, estimates: dict[int, int]) -> None:
        """Raise OverBudget unless `service` can hold `model` (replacing what it holds) on every GPU."""
        for gpu, size in estimates.items():
            if gpu not in self.gpus:
                continue
            others = self.used(gpu, without=service)
            after = others + size + self.reserve(gpu)
            if after > self.budget(gpu):
                raise OverBudget(
                    f"loading {model} needs {size / GB:.2f} GB + {self.reserve(gpu) / GB:.2f} GB context on GPU {gpu}, "
                    f"which already holds {others / GB:.2f} GB: {after / GB:.2f} GB > budget "
                    f"{self.budget(gpu) / GB:.2f} GB (over by {(after - self.budget(gpu)) / GB:.2f} GB). "
                    "Quantize the model, lower its context, or move it to another GPU (see `lyra plan`)."
                )

    def snapshot(self) -> list[GpuSnapshot]:
        """One line per GPU for status and done events."""
        out, every = [], self.lines()
        for gpu in sorted(self.gpus):
            lines = {svc: line for (g, svc), line in every.items() if g == gpu}
            measured = [line.measured for line in lines.values() if line.measured is not None]
            out.append(GpuSnapshot(
                gpu=gpu, budget_bytes=self.budget(gpu),
                estimated_bytes=sum(line.estimated + self.reserve(gpu) for line in lines.values() if line.models),
                measured_bytes=sum(measured) if measured else None,
                resident=[f"{svc}:{m}" for svc, line in lines.items() for m in line.models],
                by_service={svc: {"estimated": line.estimated, **({"measured": line.measured}
                                                                  if line.measured is not None else {})}
                            for svc, line in lines.items()},
            ))
        return out
