"""One request's life on the client side, sans I/O: the one place that decides how a request ends.

`RequestSession` holds no socket and reads no clock. A driver (`Client` blocking, `AsyncClient` on asyncio)
sends `session.request`, feeds it every message received (`on_message`, `on_unreadable`) and, when nothing
arrived by `wake_at()`, the time (`on_clock`); it sends what the session asks for (a status probe, a
cancel) and raises what it decides. The session

- passes on the answers to its request, in order, and ends at the terminal event (exactly once: a second
  one is logged and dropped); progress events and other requests' events are dropped;
- watches the coordinator while a chat request is outstanding: a new coordinator instance id in an answer,
  or silence past a few keepalive intervals and then an unanswered status probe, is a
  `CoordinatorRestartedError` (the request is lost), decided within seconds instead of at the timeout;
- times the request out (`ClientTimeoutError`) and says when to check that anyone serves the endpoint;
- names the cancel a chat request left unfinished needs (`abandon`), once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NoReturn

from shared.client.errors import (
    ClientTimeoutError,
    CoordinatorRestartedError,
    InvalidRequestError,
    LyraError,
    error_from_event,
)
from shared.wire.messages import (
    TERMINAL_TYPES,
    AcceptedEvent,
    CancelRequest,
    ChatRequest,
    ErrorCode,
    ErrorEvent,
    Message,
    ProgressEvent,
    StatusReply,
    StatusRequest,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 900.0
FIRST_ANSWER_S = 1.0  # silence after a send before the client checks that anyone serves the endpoint at all
SILENT_INTERVALS = 3.0  # keepalive intervals of silence after which the client checks on the coordinator
PROBE_INTERVALS = 1.5  # how long that check (a status request) may go unanswered


@dataclass(frozen=True)
class Due:
    """What the clock asks of a driver when nothing arrived; a driver acts on the fields in this order."""

    check_served: bool = False  # no answer yet: raise if nothing serves the endpoint (or it refused us)
    error: LyraError | None = None  # raise this: the timeout, or an unanswered probe
    probe: StatusRequest | None = None  # send this status request: is the coordinator still there?
    idle: bool = False  # `idle_s` passed without an answer: tell the caller


class RequestSession:
    """The client side of one request: answers in, terminal event, restart and silence detection, errors out.

    Times are in seconds of one monotonic clock the driver chooses. With `raise_errors` an ErrorEvent is
    raised as its LyraError; without, it is returned like any terminal event.
    """

    def __init__(self, request: Message, now: float, timeout_s: float, endpoint: str = "the coordinator",
                 secret: str | None = None, idle_s: float | None = None, raise_errors: bool = True) -> None:
        self.request = request
        self.endpoint = endpoint  # named in the timeout's sentence
        self.secret = secret  # stamped on the probes and the cancel
        self.timeout_s = timeout_s
        self.deadline = now + timeout_s
        self.idle_s = idle_s
        self.raise_errors = raise_errors
        self.finished = False  # the terminal event arrived
        self.cancelled = False  # `abandon` named the cancel
        self.quiet_since = now  # the last answer passed on (or the start)
        self.check_at: float | None = now + FIRST_ANSWER_S  # until the first answer: is anyone there?
        # A chat request is watched and cancelled; a status request is short and is its own probe.
        self.is_chat = isinstance(request, ChatRequest)
        self.coordinator: str | None = None  # the instance that answered first
        self.keepalive_s: float | None = None  # promised by the AcceptedEvent; None = an older coordinator
        self.last_heard = now
        self.probe_id: str | None = None
        self.probe_sent = 0.0

    # ---------------------------------------------------------------- what arrives

    def on_message(self, msg: Message, now: float) -> Message | None:
        """The message when it is an answer to pass on; None for a keepalive, another request's event, or one
        after the terminal event. Raises CoordinatorRestartedError for an answer from another instance, and
        the ErrorEvent's LyraError with `raise_errors`."""
        self.check_at = None  # someone serves the endpoint
        if self.finished:
            if msg.parent_id == self.request.id:
                level = logging.WARNING if ends(msg) else logging.DEBUG
                log.log(level, "request %s: dropped a %s after its terminal event", self.request.id, msg.type)
            return None
        self._hear(msg, now)
        if msg.parent_id != self.request.id or isinstance(msg, ProgressEvent):
            return None
        self.quiet_since = now
        self.finished = ends(msg)
        if self.raise_errors and isinstance(msg, ErrorEvent):
            raise error_from_event(msg)
        return msg

    def on_unreadable(self, code: str, reason: str) -> NoReturn:
        """A frame that is no valid message: our coordinator sends only valid ones, so the request fails."""
        raise InvalidRequestError(f"unreadable message from the coordinator: {reason}", code=code)

    def _hear(self, msg: Message, now: float) -> None:
        """Note a sign of life; raise CoordinatorRestartedError when it comes from another coordinator instance."""
        if not self.is_chat or msg.parent_id not in (self.request.id, self.probe_id):
            return
        instance = getattr(msg, "coordinator", None)
        if instance and self.coordinator and instance != self.coordinator:
            raise CoordinatorRestartedError(
                f"the coordinator restarted (instance {self.coordinator} -> {instance}) while request "
                f"{self.request.id} was outstanding; the request is lost: send it again",
                code=ErrorCode.coordinator_restarted.value)
        self.coordinator = self.coordinator or instance
        if isinstance(msg, AcceptedEvent) and msg.keepalive_s:
            self.keepalive_s = msg.keepalive_s
        self.last_heard, self.probe_id = now, None

    # ---------------------------------------------------------------- the clock

    def wake_at(self) -> float:
        """When to call `on_clock` if nothing arrives before."""
        idle_at = self.quiet_since + self.idle_s if self.idle_s else math.inf
        check_at = self.check_at if self.check_at is not None else math.inf
        return min(self.deadline, self._watch_due(), idle_at, check_at)

    def expired(self, now: float) -> bool:
        """Whether the timeout has passed (nothing more is worth reading)."""
        return now >= self.deadline

    def on_clock(self, now: float) -> Due:
        """What is due at `now` when nothing arrived since the last call."""
        check_served = self.check_at is not None and now >= self.check_at
        if check_served:
            self.check_at = now + FIRST_ANSWER_S
        if self.expired(now):
            error: LyraError = ClientTimeoutError(
                f"no answer from the coordinator at {self.endpoint} within {self.timeout_s:g} s; "
                "is the stack up? (`lyra status`)", code="client_timeout")
            return Due(check_served, error)
        probe = None
        if now >= self._watch_due():
            if self.probe_id is not None:
                return Due(check_served, CoordinatorRestartedError(
                    f"no word from the coordinator for {now - self.last_heard:.1f} s while request "
                    f"{self.request.id} was outstanding (it restarted or hangs); the request is lost: send it again",
                    code=ErrorCode.coordinator_restarted.value))
            probe = StatusRequest(secret=self.secret)
            self.probe_id, self.probe_sent = probe.id, now
        idle = bool(self.idle_s and now - self.quiet_since >= self.idle_s)
        if idle:
            self.quiet_since = now
        return Due(check_served, None, probe, idle)

    def _watch_due(self) -> float:
        """When the coordinator's silence is worth acting on (never without a promised keepalive)."""
        if self.keepalive_s is None:
            return math.inf
        if self.probe_id is not None:
            return self.probe_sent + PROBE_INTERVALS * self.keepalive_s
        return self.last_heard + SILENT_INTERVALS * self.keepalive_s

    # ---------------------------------------------------------------- the end

    def abandon(self) -> CancelRequest | None:
        """The cancel to send when the caller stops before the terminal event (or an error ended the wait), so
        the coordinator frees the pipeline; None when nothing needs it (not a chat request, ended, sent)."""
        if not self.is_chat or self.finished or self.cancelled:
            return None
        self.cancelled = True
        return CancelRequest(parent_id=self.request.id, secret=self.secret)


def ends(msg: Message) -> bool:
    """Whether `msg` is the last answer to its request."""
    return isinstance(msg, (*TERMINAL_TYPES, StatusReply))
