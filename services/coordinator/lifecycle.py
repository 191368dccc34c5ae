"""How an accepted request talks to its client, from acceptance to its one terminal event.

`JobLifecycle` is the only way a request reports progress or ends: the pipeline, the queue's cancel and
the SIGTERM drain all go through it, so "exactly one terminal event per accepted request" is enforced in
one place instead of being a convention across call sites. It may be used from the I/O thread and the
pipeline thread at once; a lock orders the terminal event after everything sent before it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from shared.wire.messages import (
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    ImageEvent,
    ImagePayload,
    Message,
    ProgressEvent,
    RouteEvent,
    RouteEvidence,
    RouteKind,
    StageFinishedEvent,
    StageRestartedEvent,
    StageStartedEvent,
    TokenEvent,
)

log = logging.getLogger(__name__)

Send = Callable[[Message], None]
Outcome = Callable[[str], None]  # told "completed", "cancelled" or "failed" once, when the request ends


class JobLifecycle:
    """Stage events, progress and the single terminal event of one accepted request."""

    def __init__(self, request_id: str, send: Send, coordinator: str, on_end: Outcome = lambda _: None,
                 answer_only: bool = False) -> None:
        self.request_id = request_id
        self.answer_only = answer_only  # the client asked for events="answer": no stage events, voice tokens only
        self.coordinator = coordinator  # stamped on every event so the client notices a restarted coordinator
        self._send = send
        self._on_end = on_end
        self._lock = threading.Lock()
        self.terminal: Message | None = None
        self.stage: str | None = None  # the stage running now, for progress events
        self.last_sent = time.monotonic()

    @property
    def ended(self) -> bool:
        return self.terminal is not None

    # ------------------------------------------------------------ progress

    def started(self, stage: str, service: str, model: str | None) -> None:
        self.stage = stage
        if not self.answer_only:
            self._emit(StageStartedEvent(parent_id=self.request_id, coordinator=self.coordinator, stage=stage,
                                         service=service, model=model))

    def finished(self, stage: str, service: str, seconds: float, model: str | None) -> None:
        if not self.answer_only:
            self._emit(StageFinishedEvent(parent_id=self.request_id, coordinator=self.coordinator, stage=stage,
                                          service=service, seconds=seconds, model=model))

    def restarted(self, stage: str, service: str, attempt: int, reason: str) -> None:
        """The stage runs again: the client drops what it streamed so far."""
        self._emit(StageRestartedEvent(parent_id=self.request_id, coordinator=self.coordinator, stage=stage,
                                       service=service, attempt=attempt, reason=reason))

    def route(self, specialist: str, scores: dict[str, float], kind: RouteKind, fallback: bool = False,
              evidence: RouteEvidence | None = None) -> None:
        self._emit(RouteEvent(parent_id=self.request_id, coordinator=self.coordinator, specialist=specialist,
                              scores=scores, forced=kind == "forced", kind=kind, fallback=fallback, evidence=evidence))

    def token(self, text: str, stage: str) -> None:
        if self.answer_only and stage != "voice":
            return
        self._emit(TokenEvent(parent_id=self.request_id, coordinator=self.coordinator, text=text, stage=stage))

    def image(self, image: ImagePayload) -> None:
        self._emit(ImageEvent(parent_id=self.request_id, coordinator=self.coordinator, image=image))

    def keepalive(self, position: int | None, interval_s: float) -> None:
        """Send a progress event if the client heard nothing for `interval_s` (so silence means trouble)."""
        if time.monotonic() - self.last_sent >= interval_s:
            self._emit(ProgressEvent(parent_id=self.request_id, coordinator=self.coordinator, position=position,
                                     stage=None if position is not None else self.stage))

    def _emit(self, msg: Message) -> bool:
        with self._lock:
            if self.terminal is not None:
                log.debug("request %s already ended; %s dropped", self.request_id, msg.type)  # type: ignore[attr-defined]
                return False
            self.last_sent = time.monotonic()
            self._send(msg)
            return True

    # ------------------------------------------------------------ the end

    def done(self, **fields: Any) -> bool:
        """End the request with its result; False (and a log line) if it had already ended."""
        return self._end(DoneEvent(parent_id=self.request_id, coordinator=self.coordinator, **fields), "completed")

    def fail(self, code: ErrorCode, message: str, service: str | None = None, stage: str | None = None) -> bool:
        """End the request with a typed error; False (and a log line) if it had already ended."""
        event = ErrorEvent(parent_id=self.request_id, coordinator=self.coordinator, code=code, message=message,
                           service=service, stage=stage)
        return self._end(event, "cancelled" if code == ErrorCode.cancelled else "failed")

    def _end(self, event: Message, outcome: str) -> bool:
        with self._lock:
            if self.terminal is not None:
                log.error("request %s: second terminal event %s refused (it already ended with %s)",
                          self.request_id, event.type, self.terminal.type)  # type: ignore[attr-defined]
                return False
            self.terminal = event
            # Count before sending: a client that reads status right after its terminal event sees the count.
            self._on_end(outcome)
            self._send(event)
        return True
