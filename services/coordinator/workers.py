"""Worker registry and calls: who is up, what they hold, and request/stream/reply exchanges with them.

The I/O thread feeds `WorkerRegistry` (registrations, heartbeats, replies); the pipeline thread makes
calls through it. A call ends with the worker's reply or one `StageError`: worker error, deadline,
cancellation, or the worker dying or restarting mid-call. It never waits without a bound.

The registry is the one record of what each worker holds: every report from the worker itself (its
registration, each heartbeat, each load or unload reply) replaces it, in the order the worker sent them.
The VRAM ledger's lines and the preload record are derived from it, never kept beside it. A call is
addressed to one instance of its worker: a message is never handed to a newer instance than the one the
call's preconditions (the model it needs resident) were checked against.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from shared.wire.messages import (
    CancelCallRequest,
    ErrorCode,
    HeartbeatEvent,
    LoadReply,
    MemoryReading,
    Message,
    RegisterRequest,
    ServiceStatus,
    Stage,
    TokenEvent,
    WorkerError,
)

log = logging.getLogger(__name__)

WAIT_STEP_S = 0.05
RESTORE_TRIES = 3  # loads of a needed model before a call gives up (each may meet another restart)


class StageError(Exception):
    """A stage could not complete; becomes the request's terminal ErrorEvent."""

    def __init__(self, code: ErrorCode, message: str, service: str | None = None, stage: Stage | None = None,
                 instance: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.service = service
        self.stage = stage
        self.instance = instance  # the worker instance that failed (a re-run waits for another one)


@dataclass(frozen=True)
class WorkerGone:
    """Put into a pending call's inbox when its worker died or restarted."""

    reason: str
    unsent: bool = False  # the request never reached the worker, so sending it again is safe
    code: ErrorCode = ErrorCode.worker_dead
    instance: str = ""  # the instance that went away; a call already resent to a newer one ignores it


@dataclass(frozen=True)
class Needs:
    """A model the instance receiving a call must hold, and how to make it hold it (a swap, budget checked)."""

    model: str
    restore: Callable[[], None]


@dataclass(frozen=True)
class Holding:
    """What one worker holds, copied from the registry: its models, memory readings and their estimates."""

    service: str
    instance: str
    resident: tuple[str, ...]
    epoch: int  # changes whenever `resident` does (a load, an unload, a restart)
    memory: tuple[MemoryReading, ...]
    estimates: dict[str, dict[int, int]]  # the worker's own: model -> GPU -> bytes


@dataclass
class WorkerState:
    """The coordinator's view of one worker process."""

    service: str
    instance: str = ""
    peer: bytes = b""  # the registered connection's routing id; messages from any other are not this worker's
    pid: int | None = None
    backend: str = ""
    capabilities: list[str] = field(default_factory=list)
    resident: list[str] = field(default_factory=list)
    memory: list[MemoryReading] = field(default_factory=list)
    placement: dict[str, str] = field(default_factory=dict)
    last_seen: float = 0.0
    alive: bool = False
    busy_with: str | None = None
    registrations: int = 0
    estimates: dict[str, dict[int, int]] = field(default_factory=dict)  # model -> GPU -> bytes
    cached: dict[str, int] = field(default_factory=dict)  # host weight cache: model -> bytes
    epoch: int = 0  # bumped whenever `resident` changes: what a preload made resident is still there iff unchanged

    def holds(self, resident: list[str], restarted: bool = False) -> None:
        """Record what the worker reports it holds now (the one place `resident` changes)."""
        if restarted or list(resident) != self.resident:
            self.epoch += 1
        self.resident = list(resident)


@dataclass
class PendingCall:
    service: str
    instance: str  # the worker instance the request went to
    inbox: queue.Queue = field(default_factory=queue.Queue)


class WorkerRegistry:
    """Thread-safe registry of workers and of calls waiting on them."""

    def __init__(self, services: tuple[str, ...], heartbeat_timeout_s: float,
                 send: Callable[[str, Message, str], None]) -> None:
        self.lock = threading.RLock()
        self.workers = {name: WorkerState(service=name) for name in services}
        self.pending: dict[str, PendingCall] = {}
        self.peers: dict[bytes, str] = {}  # routing id of each registered connection -> service
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.send = send  # thread-safe "send this message to that worker's instance" ("" = whichever is registered)
        self.changed = threading.Condition(self.lock)

    # ------------------------------------------------------------ fed by the I/O thread

    def register(self, msg: RegisterRequest, peer: bytes) -> bool:
        """Record an authenticated registration from connection `peer`; True when it is a new process.

        The newest registration wins: the previous connection of that service is forgotten, so if it is
        still alive its next heartbeat is refused and it registers again (never left orphaned).
        """
        with self.lock:
            state = self.workers[msg.service]
            restarted = state.instance != msg.instance
            if restarted and state.instance:
                self._fail_calls(msg.service, f"{msg.service} restarted (pid {state.pid} -> {msg.pid})",
                                 instance=state.instance)
            self.peers.pop(state.peer, None)
            self.peers[peer] = msg.service
            state.peer = peer
            state.instance, state.pid, state.backend = msg.instance, msg.pid, msg.backend
            state.capabilities = list(msg.capabilities)
            state.holds(msg.resident, restarted)
            state.memory, state.placement = list(msg.memory), dict(msg.placement)
            state.estimates = {m: {int(g): b for g, b in per.items()} for m, per in msg.estimates.items()}
            state.last_seen, state.alive = time.monotonic(), True
            state.registrations += restarted
            self.changed.notify_all()
            return restarted

    def heartbeat(self, service: str, beat: HeartbeatEvent) -> bool:
        """Record a heartbeat; False when it comes from a process we do not know (it must register)."""
        with self.lock:
            state = self.workers[service]
            if state.instance != beat.instance or not state.alive:
                return False
            state.last_seen = time.monotonic()
            state.holds(beat.resident)
            state.busy_with, state.memory, state.cached = beat.busy_with, list(beat.memory), dict(beat.cached)
            return True

    def loaded(self, service: str, reply: LoadReply) -> None:
        """Record what a worker holds after a load or unload it reports (also one whose caller gave up on it)."""
        with self.lock:
            state = self.workers[service]
            state.holds(reply.resident)
            state.memory, state.placement = list(reply.memory), dict(reply.placement)

    def service_of(self, peer: bytes) -> str | None:
        """The service whose current registration came over connection `peer`, if any."""
        with self.lock:
            return self.peers.get(peer)

    def peer_of(self, service: str, instance: str = "") -> bytes | None:
        """Where to send to `service`: its registered connection; None before it registered, or when `instance`
        is given and another instance has registered since (the message was meant for the one before)."""
        with self.lock:
            state = self.workers[service]
            if instance and state.instance != instance:
                return None
            return state.peer or None

    def seen(self, service: str) -> None:
        with self.lock:
            self.workers[service].last_seen = time.monotonic()

    def deliver(self, service: str, msg: Message) -> bool:
        """Hand a worker's reply or stream event to the call waiting for it."""
        with self.lock:
            call = self.pending.get(msg.parent_id or "")
            if call is None or call.service != service:
                return False
            call.inbox.put(msg)
            return True

    def fail_service(self, service: str, reason: str) -> None:
        """A worker sent garbage or misbehaved: end its pending calls with a worker error."""
        with self.lock:
            self._fail_calls(service, reason, ErrorCode.worker_error)

    def unreachable(self, service: str, call_id: str, peer: bytes | None) -> None:
        """A request could not be delivered to connection `peer`: the worker is gone (it may be restarting)."""
        with self.lock:
            state = self.workers[service]
            if peer is not None and peer == state.peer:  # the registered connection itself is gone
                state.alive = False
            call = self.pending.get(call_id)
            if call is not None:
                call.inbox.put(WorkerGone(f"{service} is not connected", unsent=True, instance=call.instance))

    def check_liveness(self) -> list[str]:
        """Mark silent workers dead and fail their calls; returns the newly dead services."""
        now, dead = time.monotonic(), []
        with self.lock:
            for state in self.workers.values():
                if state.alive and now - state.last_seen > self.heartbeat_timeout_s:
                    state.alive = False
                    dead.append(state.service)
                    self._fail_calls(state.service, f"{state.service} stopped responding "
                                                    f"(no heartbeat for {self.heartbeat_timeout_s:g} s)")
        return dead

    def _fail_calls(self, service: str, reason: str, code: ErrorCode = ErrorCode.worker_dead,
                    instance: str | None = None) -> None:
        """End the calls `service` has pending (only those sent to `instance`, when given)."""
        for call in self.pending.values():
            if call.service == service and instance in (None, call.instance):
                call.inbox.put(WorkerGone(reason, code=code, instance=call.instance))

    # ------------------------------------------------------------ used by the pipeline thread

    def wait_up(self, service: str, timeout_s: float, cancel: threading.Event,
                replacing: str | None = None) -> WorkerState:
        """Wait (bounded) for `service` to be registered and alive, e.g. while supervisord restarts it.

        With `replacing`, wait for an instance other than that one (it failed or is draining).
        """
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while not self.workers[service].alive or self.workers[service].instance == replacing:
                if cancel.is_set():
                    raise StageError(ErrorCode.cancelled, f"cancelled while waiting for {service}", service)
                left = deadline - time.monotonic()
                if left <= 0:
                    state = self.workers[service]
                    what = "has not registered" if not state.registrations else "is down"
                    raise StageError(ErrorCode.worker_missing,
                                     f"{service} {what}; is it running? (`lyra status`, `lyra logs {service}`)",
                                     service)
                self.changed.wait(min(left, WAIT_STEP_S * 4))
            return self.workers[service]

    def ready(self, service: str, needs: Needs | None, cancel: threading.Event, missing_wait_s: float) -> str:
        """The instance a call goes to: registered, alive, and holding `needs.model` (restored first if not)."""
        for _ in range(RESTORE_TRIES):
            state = self.wait_up(service, missing_wait_s, cancel)
            with self.lock:
                if not state.alive:
                    continue  # it went away again since wait_up returned
                if needs is None or needs.model in state.resident:
                    return state.instance
            needs.restore()
        if needs is None:
            raise StageError(ErrorCode.worker_dead, f"{service} went away {RESTORE_TRIES} times as a call to it was "
                             "sent", service)
        raise StageError(ErrorCode.worker_error, f"{service} does not hold {needs.model} after {RESTORE_TRIES} "
                         "loads of it", service)

    def call(self, service: str, request: Message, deadline_s: float, cancel: threading.Event,
             stage: str, missing_wait_s: float, needs: Needs | None = None) -> Iterator[Message]:
        """Send `request` to `service` (to an instance holding `needs.model`, when given); yield its stream
        events, then its reply; raise StageError."""
        call = PendingCall(service, self.ready(service, needs, cancel, missing_wait_s))
        with self.lock:
            self.pending[request.id] = call
        try:
            self.send(service, request, call.instance)
            yield from self._await(call, request, deadline_s, cancel, stage, missing_wait_s, needs)
        finally:
            with self.lock:
                self.pending.pop(request.id, None)

    def call_reply(self, service: str, request: Message, deadline_s: float, cancel: threading.Event,
                   stage: str, missing_wait_s: float) -> Message:
        """Like `call`, for requests that stream nothing: return the reply alone."""
        reply: Message | None = None
        for item in self.call(service, request, deadline_s, cancel, stage, missing_wait_s):
            reply = item
        assert reply is not None
        return reply

    def _await(self, call: PendingCall, request: Message, deadline_s: float, cancel: threading.Event,
               stage: str, missing_wait_s: float, needs: Needs | None) -> Iterator[Message]:
        service, deadline = call.service, time.monotonic() + deadline_s
        resent = False
        while True:
            if cancel.is_set():
                self.send(service, CancelCallRequest(parent_id=request.id), call.instance)
                raise StageError(ErrorCode.cancelled, f"cancelled during {stage}", service, stage)
            left = deadline - time.monotonic()
            if left <= 0:
                self.send(service, CancelCallRequest(parent_id=request.id), call.instance)
                raise StageError(ErrorCode.deadline,
                                 f"{service} did not finish {stage} within its {deadline_s:g} s deadline", service,
                                 stage)
            try:
                item = call.inbox.get(timeout=min(left, WAIT_STEP_S))
            except queue.Empty:
                continue
            if isinstance(item, WorkerGone) and item.instance != call.instance:
                continue  # news of an instance this call no longer waits on (it was resent to a newer one)
            if isinstance(item, WorkerGone) and item.unsent and not resent:
                # The instance it was addressed to is gone: the next one may hold nothing (a restarted specialist
                # host), so it is made ready the way a first send is. Waiting and restoring have bounds of their
                # own and do not eat into the stage's deadline.
                log.info("%s was unreachable; waiting for it to come back, then resending", service)
                began = time.monotonic()
                instance = self.ready(service, needs, cancel, missing_wait_s)
                deadline += time.monotonic() - began
                with self.lock:
                    call.instance = instance
                resent = True
                self.send(service, request, instance)
                continue
            if isinstance(item, WorkerGone):
                raise StageError(item.code, f"{item.reason} during {stage}", service, stage, call.instance)
            if isinstance(item, WorkerError):
                raise self._worker_error(item, call, stage)
            yield item
            if not isinstance(item, TokenEvent):
                return

    def _worker_error(self, item: WorkerError, call: PendingCall, stage: str) -> StageError:
        service = call.service
        if item.code == ErrorCode.shutting_down:  # a graceful restart: the stage runs again on the next instance
            return StageError(ErrorCode.worker_dead, f"{service} was shutting down during {stage}", service, stage,
                              call.instance)
        code = item.code if item.code != ErrorCode.internal else ErrorCode.worker_error
        return StageError(code, f"{service} failed during {stage}: {item.message}", service, stage)

    # ------------------------------------------------------------ status

    def statuses(self) -> list[ServiceStatus]:
        now = time.monotonic()
        with self.lock:
            return [
                ServiceStatus(
                    service=s.service,
                    state="missing" if not s.registrations and not s.alive else
                          ("dead" if not s.alive else ("busy" if s.busy_with else "up")),
                    pid=s.pid, backend=s.backend or None, resident=list(s.resident),
                    last_seen_s=round(now - s.last_seen, 3) if s.last_seen else None,
                    registrations=s.registrations, memory=list(s.memory), placement=dict(s.placement),
                    cached=dict(s.cached),
                )
                for s in self.workers.values()
            ]

    def holding(self, service: str) -> Holding:
        """A copy of what `service` holds now."""
        with self.lock:
            s = self.workers[service]
            return Holding(s.service, s.instance, tuple(s.resident), s.epoch, tuple(s.memory),
                           {m: dict(per) for m, per in s.estimates.items()})

    def holdings(self) -> list[Holding]:
        """What every worker holds now (one consistent copy)."""
        with self.lock:
            return [self.holding(service) for service in self.workers]

    def resident(self, service: str) -> list[str]:
        with self.lock:
            return list(self.workers[service].resident)
