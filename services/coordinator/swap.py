"""Every change of which specialist the host holds, and what is derived from the registry's record of it.

The worker registry is the one record of what each worker holds (registrations, heartbeats and load
replies replace it). This module reads it: `footprints` turns it into the ledger's input, and `Residency`
makes every change the coordinator asks for: the pipeline's swaps, the prefetcher's preloads, a reload
into a restarted host. A swap happens only under `lock`, only when the ledger allows it, and is counted
by where its weights came from. A preload is remembered by the registry's residency epoch it produced, so
a restart or any other change of what the host holds retires it without anyone having to say so.
"""

from __future__ import annotations

import logging
import threading
import time

from services.coordinator.counters import Counters
from services.coordinator.ledger import Footprint, OverBudget, VramLedger, split_estimate
from services.coordinator.workers import Holding, StageError, WorkerRegistry
from shared.config.schema import LyraConfig
from shared.wire.messages import ErrorCode, LoadReply, LoadRequest, UnloadRequest
from shared.wire.names import SPECIALIST_HOST

log = logging.getLogger(__name__)

HOST = SPECIALIST_HOST  # the service whose models are swapped


def model_estimate(config: LyraConfig, holding: Holding, model: str) -> dict[int, int]:
    """Bytes per physical GPU of `model` in a worker: the worker's own estimate, else the config's memory_gb."""
    return holding.estimates.get(model) or split_estimate(config.models_of(holding.service)[model],
                                                          config.gpus_of(holding.service))


def footprints(config: LyraConfig, registry: WorkerRegistry) -> list[Footprint]:
    """The ledger's input: each worker's held models (those the config knows), their estimates, its readings."""
    out = []
    for holding in registry.holdings():
        known = config.models_of(holding.service)
        total: dict[int, int] = {}
        for name in (n for n in holding.resident if n in known):
            for gpu, size in model_estimate(config, holding, name).items():
                total[gpu] = total.get(gpu, 0) + size
        out.append(Footprint(holding.service, holding.resident, total, holding.memory))
    return out


class Residency:
    """Swaps, preloads and reloads of the specialist host, decided against the ledger."""

    def __init__(self, config: LyraConfig, registry: WorkerRegistry, ledger: VramLedger, counters: Counters) -> None:
        self.config = config
        self.registry = registry
        self.ledger = ledger
        self.counters = counters
        self.lock = threading.Lock()  # held while deciding on and making a swap: the pipeline's or a preload's
        # (specialist, the host's residency epoch once the preload had loaded it): a preload still in place
        # iff the registry's epoch for the host is that one.
        self.preloaded: tuple[str, int] | None = None
        self.warned: dict[str, list[str]] = {}  # service -> the estimate warnings last logged for it

    def resident(self) -> str | None:
        """The specialist the host holds now, if any."""
        held = self.registry.resident(HOST)
        return held[0] if held else None

    def estimates(self, service: str, model: str) -> dict[int, int]:
        """Bytes per physical GPU of `model` in `service`: the worker's estimate, else the config's memory_gb."""
        return model_estimate(self.config, self.registry.holding(service), model)

    def reported(self, service: str) -> None:
        """A worker reported what it holds (the registry has it): log estimates more than 10% off, once each."""
        warnings = self.ledger.estimate_warnings(service)
        for warning in warnings:
            if warning not in self.warned.get(service, []):
                log.warning("estimate off by more than 10%%: %s", warning)
        self.warned[service] = warnings

    def _from_preload(self, specialist: str) -> bool:
        """Whether `specialist` is resident because a preload put it there (nothing changed since)."""
        return self.preloaded is not None and self.preloaded == (specialist, self.registry.holding(HOST).epoch)

    # ------------------------------------------------------------ changes (callers hold `lock`)

    def claim(self, specialist: str) -> bool:
        """Whether `specialist` is already resident for the request that needs it (counted as such)."""
        if self.resident() != specialist:
            return False
        self.counters.bump("preload_hits" if self._from_preload(specialist) else "already_resident")
        self.preloaded = None
        return True

    def swap_to(self, specialist: str, parent_id: str, cancel: threading.Event) -> float:
        """Unload whatever the host holds and load `specialist` if the ledger allows; returns seconds.

        Raises StageError(over_budget) with the arithmetic, loading nothing. The host's replies update the
        registry as they arrive (the I/O thread records them), so nothing here writes down what it holds.
        """
        estimates = self.estimates(HOST, specialist)
        try:
            self.ledger.check(HOST, specialist, estimates)
        except OverBudget as exc:
            raise StageError(ErrorCode.over_budget, str(exc), HOST) from None
        begun = time.monotonic()
        wait, deadline = self.config.runtime.heartbeat_timeout_s, self.config.deadlines.load
        previous = self.registry.resident(HOST)
        for name in previous:
            wasted = self._from_preload(name)
            self.registry.call_reply(HOST, UnloadRequest(parent_id=parent_id, model=name), deadline, cancel, "load",
                                     wait)
            if wasted:
                self.counters.bump("wasted_preloads")
                self.preloaded = None
        reply = self.registry.call_reply(HOST, LoadRequest(parent_id=parent_id, model=specialist), deadline, cancel,
                                         "load", wait)
        if not isinstance(reply, LoadReply):
            raise StageError(ErrorCode.worker_error, f"{HOST} answered {reply.type} "  # type: ignore[attr-defined]
                             "where LoadReply was expected", HOST)
        seconds = time.monotonic() - begun
        self.counters.swapped(previous[0] if previous else None, specialist, reply.source, seconds)
        return seconds

    def restore(self, specialist: str, parent_id: str, cancel: threading.Event) -> None:
        """Before a call that needs `specialist` goes to a host that does not hold it (it restarted): load it."""
        with self.lock:
            if self.resident() != specialist:
                log.info("request %s: reloading %s into the specialist host, which holds %s", parent_id, specialist,
                         self.resident() or "nothing")
                self.swap_to(specialist, parent_id, cancel)

    def preload(self, specialist: str, parent_id: str, cancel: threading.Event) -> float | None:
        """Load `specialist` ahead of the request that needs it; seconds, or None when not done (logged)."""
        with self.lock:
            if self.resident() == specialist:
                return None
            try:
                seconds = self.swap_to(specialist, parent_id, cancel)
            except StageError as exc:
                log.info("no preload of %s: %s", specialist, exc.message)
                return None
            held = self.registry.holding(HOST)
            self.preloaded = (specialist, held.epoch) if specialist in held.resident else None
            self.counters.bump("preloads")
        return seconds
