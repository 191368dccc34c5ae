"""Which model each worker holds, and every change of it: the one owner of residency on the coordinator.

Workers report what they hold (registration, heartbeats, load replies); this module turns those reports
into the ledger's lines and makes every change the coordinator asks for: the pipeline's swaps, the
prefetcher's preloads, a reload after a host restarted. A swap happens only under `lock`, only when the
ledger allows it, and is counted by where its weights came from.
"""

from __future__ import annotations

import logging
import threading
import time

from services.coordinator.counters import Counters
from services.coordinator.ledger import OverBudget, VramLedger, split_estimate
from services.coordinator.workers import StageError, WorkerRegistry
from shared.config.schema import LyraConfig
from shared.wire.messages import ErrorCode, LoadReply, LoadRequest, MemoryReading, UnloadRequest
from shared.wire.names import SPECIALIST_HOST

log = logging.getLogger(__name__)

HOST = SPECIALIST_HOST  # the service whose models are swapped


class Residency:
    """Residency, swaps, preloads and the ledger lines they move."""

    def __init__(self, config: LyraConfig, registry: WorkerRegistry, ledger: VramLedger, counters: Counters) -> None:
        self.config = config
        self.registry = registry
        self.ledger = ledger
        self.counters = counters
        self.lock = threading.Lock()  # held while deciding on and making a swap: the pipeline's or a preload's
        self.preloaded: str | None = None  # loaded ahead of the request that needs it

    def resident(self) -> str | None:
        """The specialist the host holds now, if any."""
        held = self.registry.resident(HOST)
        return held[0] if held else None

    def estimates(self, service: str, model: str) -> dict[int, int]:
        """Bytes per physical GPU of `model` in `service`: the worker's estimate, else the config's memory_gb."""
        return self.registry.estimate(service, model) or split_estimate(self.config.models_of(service)[model],
                                                                        self.config.gpus_of(service))

    def reported(self, service: str, resident: list[str], memory: list[MemoryReading]) -> None:
        """A worker (re)registered holding `resident`: its ledger lines, then its measured memory."""
        known = self.config.models_of(service)
        total: dict[int, int] = {}
        for name in (n for n in resident if n in known):
            for gpu, size in self.estimates(service, name).items():
                total[gpu] = total.get(gpu, 0) + size
        self.ledger.set_resident(service, resident, total)
        self.measured(service, memory)

    def measured(self, service: str, memory: list[MemoryReading]) -> None:
        """Reconcile the ledger with what a worker measured; log estimates more than 10% off."""
        for warning in self.ledger.measure(service, memory):
            log.warning("estimate off by more than 10%%: %s", warning)

    # ------------------------------------------------------------ changes (callers hold `lock`)

    def claim(self, specialist: str) -> bool:
        """Whether `specialist` is already resident for the request that needs it (counted as such)."""
        if self.resident() != specialist:
            return False
        self.counters.bump("preload_hits" if specialist == self.preloaded else "already_resident")
        self.preloaded = None
        return True

    def swap_to(self, specialist: str, parent_id: str, cancel: threading.Event) -> float:
        """Unload whatever the host holds and load `specialist` if the ledger allows; returns seconds.

        Raises StageError(over_budget) with the arithmetic, loading nothing.
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
            self.registry.call_reply(HOST, UnloadRequest(parent_id=parent_id, model=name), deadline, cancel, "load",
                                     wait)
            self.ledger.set_resident(HOST, [], {})
            if name == self.preloaded:
                self.counters.bump("wasted_preloads")
                self.preloaded = None
        reply = self.registry.call_reply(HOST, LoadRequest(parent_id=parent_id, model=specialist), deadline, cancel,
                                         "load", wait)
        if not isinstance(reply, LoadReply):
            raise StageError(ErrorCode.worker_error, f"{HOST} answered {reply.type} "  # type: ignore[attr-defined]
                             "where LoadReply was expected", HOST)
        self.ledger.set_resident(HOST, reply.resident, estimates)
        self.measured(HOST, reply.memory)
        self.registry.set_resident(HOST, reply.resident, reply.placement)
        seconds = time.monotonic() - begun
        self.counters.swapped(previous[0] if previous else None, specialist, reply.source, seconds)
        return seconds

    def restore(self, specialist: str, parent_id: str, cancel: threading.Event) -> None:
        """Before a stage re-runs on a restarted host (which holds nothing): load `specialist` again."""
        with self.lock:
            if self.resident() != specialist:
                log.info("request %s: reloading %s into the restarted specialist host", parent_id, specialist)
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
            self.preloaded = specialist
            self.counters.bump("preloads")
        return seconds

