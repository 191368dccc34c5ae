"""What each worker tells the coordinator's ledger at registration: estimated bytes per GPU per model."""

from __future__ import annotations

import logging

from shared.config.schema import ModelEntry
from shared.planning.estimate import estimate_model
from shared.planning.layout import place_model

log = logging.getLogger(__name__)


def estimate_per_gpu(entry: ModelEntry, gpus: list[int]) -> dict[str, int]:
    """The planner's estimate of `entry` split over the process's physical GPUs ({} on CPU or on failure)."""
    if not gpus:
        return {}
    try:
        split = place_model(entry, estimate_model(entry), gpus)
    except Exception as exc:  # an estimate is advice: a missing file must not stop the worker
        log.warning("no memory estimate for %s (%s); the ledger falls back to memory_gb", entry.name, exc)
        return {}
    return {str(gpu): size for gpu, size in split.per_gpu.items()}


def estimates_for(entries: dict[str, ModelEntry], gpus: list[int]) -> dict[str, dict[str, int]]:
    """`estimate_per_gpu` for every model a worker can run."""
    return {name: found for name, entry in entries.items() if (found := estimate_per_gpu(entry, gpus))}
