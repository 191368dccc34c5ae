"""This process's share of its GPUs, enforced: torch's allocator capped at what the plan gives the process.

The share itself is planning's arithmetic (shared.planning.shares); setting the cap is this process's own
business at start, before any model loads.
"""

from __future__ import annotations

import logging

from shared.config.schema import LyraConfig
from shared.config.units import GB
from shared.planning.shares import process_shares

log = logging.getLogger(__name__)


def cap_this_process(config: LyraConfig, service: str, physical_gpus: list[int]) -> dict[int, float]:
    """Cap torch's allocator on each visible GPU to this process's share; returns the fractions set."""
    if not physical_gpus or all(e.backend == "fake" for e in config.models_of(service).values()):
        return {}  # the fake backend allocates nothing (and need not import torch)
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    shares = process_shares(config, service)
    fractions = {}
    for relative, gpu in enumerate(physical_gpus):
        if gpu not in shares or relative >= torch.cuda.device_count():
            continue
        total = torch.cuda.get_device_properties(relative).total_memory
        fraction = min(1.0, shares[gpu] / total)
        torch.cuda.set_per_process_memory_fraction(fraction, relative)
        fractions[gpu] = fraction
        log.info("GPU %d: %s may allocate %.1f GB (%.0f%% of the card)", gpu, service, shares[gpu] / GB,
                 fraction * 100)
    return fractions
