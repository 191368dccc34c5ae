"""The worker loop every model service runs: register, poll, dispatch, heartbeat, drain on SIGTERM.

The main thread owns the socket (zmq sockets are not thread-safe). Calls run one at a time on a job
thread, so heartbeats keep flowing during a long load or generation and a cancel can reach a running
call. A call that ignores its cancel for `cancel_grace_s` makes the process exit, so supervisord
restarts it instead of leaving a wedged model behind.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from shared.config.schema import LyraConfig, ModelEntry
from shared.engine.cancel import Cancelled
from shared.models.base import BackendError, LoadContext, LoadedModel, WireGarbage, load_model
from shared.wire import keys, transport
from shared.wire.keys import KeyFileError
from shared.wire.messages import (
    CancelCallRequest,
    ErrorCode,
    ErrorEvent,
    HeartbeatEvent,
    MemoryReading,
    Message,
    RegisterReply,
    RegisterRequest,
    WorkerError,
)
from shared.wire.names import WorkerName
from shared.wire.stack_secret import SecretError, read_secret

log = logging.getLogger(__name__)

POLL_S = 0.05
GARBAGE = b"\xc1\xff not msgpack \x00"
REGISTER_RETRY_S = 1.0
REFUSAL_LOG_EVERY = 30  # a refused worker retries about once a second


@dataclass(frozen=True)
class RawFrame:
    """Bytes a handler wants sent as they are (the fake backend's `garbage` switch)."""

    data: bytes


@dataclass
class Call:
    """One request being served: the message and its cancel flag."""

    message: Message
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_at: float | None = None


Handler = Callable[[Message, threading.Event], Iterator[Message | RawFrame]]


class Worker:
    """What a worker service plugs into the loop: its handlers and what it reports about itself."""

    service: WorkerName  # the service this worker is: its process, its registration, its log lines
    backend: str = ""

    def __init__(self, context: LoadContext) -> None:
        self.context = context

    def handlers(self) -> dict[type[Message], Handler]:
        """Request type -> handler; a handler yields stream events and ends with its reply."""
        raise NotImplementedError

    def capabilities(self) -> list[str]:
        """Model names this worker can serve."""
        raise NotImplementedError

    def resident(self) -> list[str]:
        """Model names currently loaded."""
        raise NotImplementedError

    def memory(self) -> list[MemoryReading]:
        """Measured memory right now."""
        return []

    def placement(self) -> dict[str, str]:
        """Resolved placement of each resident model."""
        return {}

    def cached(self) -> dict[str, int]:
        """Bytes per model held in a host weight cache."""
        return {}

    def startup(self) -> None:
        """Load always-resident models before registering (router, voice)."""

    def estimates(self) -> dict[str, dict[str, int]]:
        """Estimated bytes per physical GPU of each model this worker can run (sent at registration)."""
        from shared.planning.ledger_bytes import estimates_for

        return estimates_for(self.context.config.models_of(self.service), self.context.physical_gpus)


class ResidentModelWorker(Worker):
    """A worker holding one always-resident model, loaded before it registers (router, voice)."""

    def __init__(self, context: LoadContext, entry: ModelEntry) -> None:
        super().__init__(context)
        self.entry = entry
        self.backend = entry.backend
        self.model: LoadedModel | None = None

    def startup(self) -> None:
        self.model = load_model(self.entry, self.context)

    def capabilities(self) -> list[str]:
        return [self.entry.name]

    def resident(self) -> list[str]:
        return [self.entry.name] if self.model else []

    def memory(self) -> list[MemoryReading]:
        return self.model.memory() if self.model else []

    def placement(self) -> dict[str, str]:
        return self.model.placement() if self.model else {}


def content_of(msg: Message) -> str:
    """The user-visible text a request carries (for `runtime.debug_content` logging)."""
    turns = getattr(msg, "messages", None) or []
    text = " | ".join(f"{t.role}: {t.content}" for t in turns)
    notes = getattr(msg, "specialist_output", "")
    return f"{text} | notes: {notes}" if notes else text


class ServiceLoop:
    """Runs one Worker against the coordinator until SIGTERM."""

    def __init__(self, worker: Worker, config: LyraConfig) -> None:
        self.worker = worker
        self.config = config
        self.instance = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # The coordinator knows a worker by the connection its registration came over, so the socket
        # identity is random: a process that merely claims the name `voice` cannot take this one's place.
        self.identity = f"{worker.service}.{secrets.token_hex(16)}"
        self.table = worker.handlers()
        self.jobs: queue.Queue[Call | None] = queue.Queue()
        self.ctx = transport.new_context()
        self.handoff_address = f"inproc://lyra-worker-outbox-{self.instance}"
        self.outbox = transport.bind_handoff(self.ctx, self.handoff_address)
        self.pending_out = 0  # items the job thread produced that the main thread has not sent yet
        self.count_lock = threading.Lock()
        self.current: Call | None = None
        self.stopping = threading.Event()
        self.registered = False
        self.refusals = 0  # failed Curve handshakes with the coordinator
        self.secret: str | None = None  # the stack secret this worker started with; never replaced

    # ------------------------------------------------------------ job thread

    def _job_thread(self) -> None:
        self.job_out = transport.connect_handoff(self.ctx, self.handoff_address)
        try:
            while True:
                call = self.jobs.get()
                if call is None:
                    return
                self.current = call
                try:
                    self._serve(call)
                finally:
                    self.current = None
        finally:
            self.job_out.close()

    def _emit(self, item: Message | RawFrame) -> None:
        """Hand an outgoing item to the main thread (which owns the socket) and wake it."""
        with self.count_lock:
            self.pending_out += 1
        frame = item.data if isinstance(item, RawFrame) else transport.encode(item)
        transport.send_frames(self.job_out, [frame])

    def _serve(self, call: Call) -> None:
        msg = call.message
        handler = self.table[type(msg)]
        started = time.perf_counter()
        if self.config.runtime.debug_content:  # development only: user text never reaches the logs otherwise
            log.debug("call %s content: %s", msg.id, content_of(msg))
        try:
            for item in handler(msg, call.cancel):
                self._emit(item)
        except WireGarbage:
            log.warning("call %s: sending garbage on purpose (fake misbehaviour)", msg.id)
            self._emit(RawFrame(GARBAGE))
        except Cancelled:
            self._error(msg, ErrorCode.cancelled, "the call was cancelled")
        except BackendError as exc:
            log.error("call %s (%s) failed: %s", msg.id, msg.type, exc)  # type: ignore[attr-defined]
            self._error(msg, exc.code, str(exc))
        except Exception as exc:  # a bug in a handler must not take the worker down
            log.error("call %s crashed:\n%s", msg.id, traceback.format_exc())
            self._error(msg, ErrorCode.internal, f"{type(exc).__name__}: {exc} (see the {self.worker.service} log)")
        log.info("call %s (request %s) %s done in %.3fs", msg.id, msg.parent_id, msg.type,  # type: ignore[attr-defined]
                 time.perf_counter() - started)

    def _error(self, msg: Message, code: ErrorCode, text: str) -> None:
        self._emit(WorkerError(parent_id=msg.id, code=code, message=text, service=self.worker.service))

    # ------------------------------------------------------------ main thread

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit status."""
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        self.estimates = self.worker.estimates()
        try:
            curve = self._curve_keys()
        except KeyFileError as exc:
            log.critical("cannot connect to the coordinator under Curve: %s", exc)
            return 2
        self._secret()  # bound to the stack this process was started for, before a model load of minutes
        self.worker.startup()
        sock = transport.connect_dealer(
            self.ctx, self.config.worker_endpoint(), self.config.max_message_bytes(), identity=self.identity,
            curve=curve, watch=self.config.worker_endpoint().startswith("tcp://"),  # a refusal is logged here too
        )
        job_thread = threading.Thread(target=self._job_thread, name="job", daemon=True)
        job_thread.start()
        try:
            return self._loop(sock)
        finally:
            self.jobs.put(None)
            job_thread.join(timeout=1)
            sock.close()
            self.outbox.close()
            if not job_thread.is_alive():
                self.ctx.term()

    def _curve_keys(self) -> transport.CurveKeys | None:
        """This service's Curve identity when the worker endpoint is under Curve (from <keys_dir>)."""
        if not self.config.curve_on(self.config.worker_endpoint()):
            return None
        return keys.identity(self.config.keys_dir(), self.worker.service)

    def _refused_handshakes(self, sock: transport.Endpoint) -> None:
        """Log the coordinator's refusals of our key: the first, then one in every REFUSAL_LOG_EVERY retries."""
        for why in transport.handshake_failures(sock):
            self.refusals += 1
            if self.refusals % REFUSAL_LOG_EVERY == 1:
                log.error("the coordinator at %s refused this worker's connection (%d time(s)): %s; is %s.key in "
                          "its authorized/workers/, and coordinator.key the coordinator's?", self.config
                          .worker_endpoint(), self.refusals, why, self.worker.service)

    def _loop(self, sock: transport.Endpoint) -> int:
        interval = self.config.runtime.heartbeat_interval_s
        next_beat = next_register = 0.0
        drain_until: float | None = None
        while True:
            now = time.monotonic()
            if self.stopping.is_set() and drain_until is None:
                log.info("SIGTERM: draining (up to %.1fs)", self.config.runtime.drain_s)
                drain_until = now + self.config.runtime.drain_s
            if drain_until is not None and (self._idle() or now > drain_until):
                self._flush(sock)
                return 0
            if not self.registered and now >= next_register:
                transport.send(sock, self._registration())
                next_register = now + REGISTER_RETRY_S
            if self.registered and now >= next_beat:
                transport.send(sock, self._heartbeat())
                next_beat = now + interval
            self._watchdog(now)
            ready = transport.poll([sock, self.outbox], POLL_S)
            self._refused_handshakes(sock)
            if self.outbox in ready:
                self._flush(sock)
            if sock in ready:
                while transport.poll([sock], 0):
                    self._incoming(sock, transport.recv(sock))

    def _idle(self) -> bool:
        return self.current is None and self.jobs.empty() and self.pending_out == 0

    def _flush(self, sock: transport.Endpoint) -> None:
        while transport.poll([self.outbox], 0):
            (frame,) = transport.recv_frames(self.outbox)
            with self.count_lock:
                self.pending_out -= 1
            transport.send_raw(sock, frame)

    def _watchdog(self, now: float) -> None:
        call = self.current
        grace = self.config.runtime.cancel_grace_s
        if call is not None and call.cancel_at is not None and now - call.cancel_at > grace:
            log.critical("call %s ignored its cancel for %.1fs; exiting so the supervisor restarts this worker",
                         call.message.id, self.config.runtime.cancel_grace_s)
            os._exit(3)

    def _incoming(self, sock: transport.Endpoint, got: transport.Received) -> None:
        if got.error is not None:
            log.warning("malformed message from the coordinator: %s", got.error.message)
            transport.send(sock, WorkerError(parent_id=got.error.msg_id, code=got.error.code,
                                             message=got.error.message, service=self.worker.service))
            return
        msg = got.message
        assert msg is not None
        if isinstance(msg, RegisterReply):
            self.registered = True
            log.info("registered with the coordinator (instance %s)", self.instance)
        elif isinstance(msg, ErrorEvent):
            self._coordinator_error(msg)
        elif isinstance(msg, CancelCallRequest):
            self._cancel(msg.parent_id)
        elif type(msg) in self.table:
            if self.stopping.is_set():
                transport.send(sock, WorkerError(parent_id=msg.id, code=ErrorCode.shutting_down,
                                                 message=f"{self.worker.service} is shutting down",
                                                 service=self.worker.service))
            else:
                self.jobs.put(Call(msg))
        else:
            log.warning("unexpected %s from the coordinator", msg.type)  # type: ignore[attr-defined]
            transport.send(sock, WorkerError(parent_id=msg.id, code=ErrorCode.unknown_type,
                                             message=f"{self.worker.service} does not handle {msg.type}",  # type: ignore[attr-defined]
                                             service=self.worker.service))

    def _coordinator_error(self, msg: ErrorEvent) -> None:
        if msg.code == ErrorCode.worker_missing:
            log.info("the coordinator does not know this worker (it restarted, or another registration "
                     "superseded this one): registering again")
            self.registered = False
        elif msg.code == ErrorCode.unauthorized:
            if self._belongs_to_an_earlier_stack():
                log.critical("the coordinator refused this worker, and %s now holds another stack's secret: this "
                             "worker belongs to a stack started before it; exiting", self.config.secret_path())
                os._exit(2)
            log.error("the coordinator refused this worker: %s", msg.message)
            self.registered = False
        elif msg.code == ErrorCode.schema_version:
            log.critical("the coordinator refused this worker: %s", msg.message)
            os._exit(2)
        else:
            log.warning("coordinator error %s: %s", msg.code.value, msg.message)

    def _cancel(self, call_id: str | None) -> None:
        call = self.current
        if call is not None and call.message.id == call_id:
            call.cancel.set()
            call.cancel_at = time.monotonic()
            log.info("cancelling call %s", call_id)

    def _registration(self) -> RegisterRequest:
        return RegisterRequest(
            service=self.worker.service, pid=os.getpid(), instance=self.instance, backend=self.worker.backend,
            capabilities=self.worker.capabilities(), resident=self.worker.resident(),
            memory=self.worker.memory(), placement=self.worker.placement(), estimates=self.estimates,
            secret=self._secret(),
        )

    def _secret(self) -> str | None:
        """The stack secret this worker started with: read once, then kept.

        A new `lyra up` in the same run directory writes a new secret, and a coordinator of that stack must
        refuse a worker left from the one before (it would serve another config's models, or none): so the
        file is read again only until it was read once.
        """
        if self.config.runtime.auth == "none" or self.config.curve_on(self.config.worker_endpoint()):
            return None  # under Curve our key proves who we are; the secret file stays on the coordinator's host
        if self.secret is None:
            try:
                self.secret = read_secret(self.config.secret_path())
            except SecretError as exc:
                log.error("registering without the stack secret: %s", exc)
        return self.secret

    def _belongs_to_an_earlier_stack(self) -> bool:
        """Whether the secret file now holds another secret than the one this worker started with."""
        try:
            return self.secret is not None and read_secret(self.config.secret_path()) != self.secret
        except SecretError:
            return False

    def _heartbeat(self) -> HeartbeatEvent:
        call = self.current
        return HeartbeatEvent(instance=self.instance, resident=self.worker.resident(),
                              busy_with=call.message.id if call else None, memory=self.worker.memory(),
                              cached=self.worker.cached())
