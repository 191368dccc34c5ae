"""Work done for the next request while the current one is in its voice stage.

While voice speaks, the router and the specialist host are idle. The prefetcher uses them: it routes
the next few waiting requests early (their routing is reused, never run twice) and, with
`scheduling.preload`, swaps in the specialist the next request needs, only when the ledger allows it
(the same check as any swap; an over-budget preload is skipped, not an error).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from services.coordinator.requests import Job, RequestQueue
from services.coordinator.swap import Residency
from services.coordinator.workers import StageError
from shared.config.schema import LyraConfig

log = logging.getLogger(__name__)


class Prefetcher:
    """A background thread woken when a request's voice stage starts."""

    def __init__(self, config: LyraConfig, queue: RequestQueue, residency: Residency,
                 route_early: Callable[[Job], None]) -> None:
        self.config = config
        self.queue = queue
        self.residency = residency
        self.route_early = route_early  # decides a waiting job's specialist (the pipeline's routing)
        self.wake = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        self.stop = threading.Event()

    def kick(self) -> None:
        """Start prefetching (called on the pipeline thread when voice starts)."""
        self.idle.clear()
        self.wake.set()

    def wait_idle(self, timeout_s: float) -> None:
        """Block (bounded) until the prefetcher is done touching workers."""
        self.idle.wait(timeout_s)

    def run(self) -> None:
        """Thread body."""
        while not self.stop.is_set():
            if not self.wake.wait(0.1):
                continue
            self.wake.clear()
            try:
                self._prefetch()
            except Exception:  # a prefetch failure must never hurt a request: it routes normally later
                log.exception("prefetch failed")
            finally:
                self.idle.set()

    def _prefetch(self) -> None:
        for job in self.queue.peek(self.config.scheduling.lookahead):
            if job.route is None and not job.cancel.is_set():
                try:
                    self.route_early(job)
                    log.info("request %s routed early to %s", job.id, job.route.specialist)  # type: ignore[union-attr]
                except StageError as exc:
                    log.warning("early routing of %s failed (%s); it will route in its turn", job.id, exc.message)
                    return
        if self.config.scheduling.preload:
            self._preload()

    def _preload(self) -> None:
        upcoming = self.queue.upcoming(self.residency.resident())
        if upcoming is None or upcoming.route is None:
            return
        specialist = upcoming.route.specialist
        seconds = self.residency.preload(specialist, upcoming.id, upcoming.cancel)
        if seconds is not None:
            log.info("preloaded %s for request %s in %.2fs", specialist, upcoming.id, seconds)
