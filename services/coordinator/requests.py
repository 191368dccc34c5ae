"""The bounded FIFO of chat requests and the job each accepted request becomes."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from services.coordinator.lifecycle import JobLifecycle
from services.coordinator.policy import pick_next
from shared.wire.messages import ChatRequest, ErrorCode, RouteEvidence


@dataclass(frozen=True)
class Route:
    """A routing decision made for a job (early, while another request's voice ran, or in its turn)."""

    specialist: str
    scores: dict[str, float]
    forced: bool  # the router did not run: the client chose, or the image rule did (`kind` says which)
    kind: str = "routed"  # "routed", "forced" or "image_rule" (shared.wire.messages.RouteKind)
    fallback: bool = False  # the router's best score was below routing.min_confidence
    evidence: RouteEvidence | None = None


@dataclass
class Job:
    """An accepted chat request: who asked, when, whether it should stop, and how it talks to its client."""

    request: ChatRequest
    peer: bytes  # the client's routing identity
    life: JobLifecycle  # every event to the client, the terminal one included, goes through it
    accepted_at: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""
    cancel_code: ErrorCode = ErrorCode.cancelled  # shutting_down when a drain ran out of time
    ticket: int = 0
    overtaken: int = 0  # how many later requests ran before this one (grouping by specialist)
    route: Route | None = None

    def known_specialist(self) -> str | None:
        """The specialist this job needs, if already decided."""
        return self.route.specialist if self.route else None

    @property
    def id(self) -> str:
        return self.request.id

    def stop(self, reason: str, code: ErrorCode = ErrorCode.cancelled) -> None:
        """Ask the pipeline to abandon this job; it ends with `code` and `reason`."""
        if not self.cancel.is_set():
            self.cancel_reason, self.cancel_code = reason, code
            self.cancel.set()


class QueueFull(Exception):
    """The queue holds `size` waiting requests already."""


class RequestQueue:
    """Bounded FIFO; thread-safe; the pipeline thread takes, the I/O thread offers and cancels."""

    def __init__(self, size: int, max_overtakes: int = 0) -> None:
        self.size = size
        self.max_overtakes = max_overtakes
        self.waiting: deque[Job] = deque()
        self.running: Job | None = None
        self.closed = False
        self.tickets = 0
        self.cond = threading.Condition()

    def offer(self, job: Job) -> int:
        """Queue a job; returns how many requests are ahead of it (the running one included)."""
        with self.cond:
            if len(self.waiting) >= self.size:
                raise QueueFull()
            self.tickets += 1
            job.ticket = self.tickets
            self.waiting.append(job)
            self.cond.notify_all()
            return len(self.waiting) - 1 + (1 if self.running else 0)

    def take(self, timeout_s: float, resident: str | None = None) -> Job | None:
        """Block up to `timeout_s` for the next job (chosen by the policy) and mark it running."""
        with self.cond:
            if not self.waiting:
                self.cond.wait(timeout_s)
            if not self.waiting or self.closed:
                return None
            index = pick_next(list(self.waiting), resident, self.max_overtakes)
            for passed in list(self.waiting)[:index]:
                passed.overtaken += 1
            job = self.waiting[index]
            del self.waiting[index]
            self.running = job
            return job

    def peek(self, limit: int) -> list[Job]:
        """The first `limit` waiting jobs, in queue order (for early routing)."""
        with self.cond:
            return list(self.waiting)[:limit]

    def upcoming(self, resident: str | None) -> Job | None:
        """The job the policy would run next, without taking it."""
        with self.cond:
            if not self.waiting:
                return None
            return self.waiting[pick_next(list(self.waiting), resident, self.max_overtakes)]

    def finish(self, job: Job) -> None:
        """The running job ended (either way)."""
        with self.cond:
            if self.running is job:
                self.running = None
            self.cond.notify_all()

    def remove(self, request_id: str) -> Job | None:
        """Take a waiting job out of the queue (cancel before it ran)."""
        with self.cond:
            for job in self.waiting:
                if job.id == request_id:
                    self.waiting.remove(job)
                    return job
            return None

    def find(self, request_id: str) -> Job | None:
        """The running or waiting job with this id."""
        with self.cond:
            if self.running and self.running.id == request_id:
                return self.running
            return next((j for j in self.waiting if j.id == request_id), None)

    def drain(self) -> list[Job]:
        """Close the queue and return every waiting job (shutdown)."""
        with self.cond:
            self.closed = True
            jobs = list(self.waiting)
            self.waiting.clear()
            self.cond.notify_all()
            return jobs

    def depth(self) -> int:
        with self.cond:
            return len(self.waiting)

    def outstanding(self) -> list[tuple[Job, int | None]]:
        """Every job not yet ended, with its position: None for the running one, else how many are ahead."""
        with self.cond:
            ahead = 1 if self.running else 0
            jobs: list[tuple[Job, int | None]] = [(self.running, None)] if self.running else []
            return jobs + [(job, ahead + i) for i, job in enumerate(self.waiting)]
