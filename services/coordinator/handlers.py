"""Client messages in, immediate replies out: validate, queue, cancel, report status. No sockets here."""

from __future__ import annotations

import logging
from collections.abc import Callable
from queue import SimpleQueue

from services.coordinator.admission import option_problem
from services.coordinator.images import BadImage, ImageLimits, check_image
from services.coordinator.intake import QuietLog, SlowIntake
from services.coordinator.ledger import VramLedger
from services.coordinator.lifecycle import JobLifecycle
from services.coordinator.pipeline import Pipeline
from services.coordinator.requests import Job, QueueFull, RequestQueue
from services.coordinator.workers import WorkerRegistry
from shared.config.schema import LyraConfig
from shared.config.units import MB
from shared.wire.messages import (
    AcceptedEvent,
    CancelRequest,
    ChatRequest,
    ErrorCode,
    ErrorEvent,
    Message,
    StatusReply,
    StatusRequest,
)
from shared.wire.stack_secret import matches
from shared.wire.transport import Received

log = logging.getLogger(__name__)


def bad_image(config: LyraConfig, msg: ChatRequest) -> BadImage | None:
    """Why the attached image is refused, or None (also when there is none)."""
    if msg.image is None:
        return None
    runtime = config.runtime
    limits = ImageLimits(max_bytes=int(runtime.max_image_mb * MB), max_side=runtime.max_image_side,
                         max_pixels=int(runtime.max_image_megapixels * 1e6))
    try:
        check_image(msg.image, limits)
    except BadImage as exc:
        return exc
    return None


def invalid_chat(config: LyraConfig, msg: ChatRequest) -> str | None:
    """Why a chat request cannot run, or None when it can."""
    if not msg.messages and not (msg.text and msg.text.strip()):
        return "a chat request needs `text` or a non-empty `messages` list"
    if msg.messages and msg.messages[-1].role != "user":
        return "the last message of the conversation must be the user's"
    if msg.specialist and msg.specialist not in config.specialists:
        return f"unknown specialist {msg.specialist!r}; choose one of {', '.join(config.specialists)}"
    return option_problem(config, msg)


class ClientHandlers:
    """Dispatch table for client messages; each handler returns the replies to send back at once."""

    def __init__(self, config: LyraConfig, queue: RequestQueue, registry: WorkerRegistry, ledger: VramLedger,
                 pipeline: Pipeline, lifecycle: Callable[[str, bytes, bool], JobLifecycle], instance: str,
                 secret: str | None = None, wake: Callable[[], None] | None = None) -> None:
        self.config = config
        self.queue = queue
        self.registry = registry
        self.ledger = ledger
        self.pipeline = pipeline
        self.lifecycle = lifecycle  # makes the lifecycle of a request it accepts
        self.instance = instance  # this coordinator's instance id, stamped on every reply
        self.secret = secret  # required on every request when set (tcp client endpoints)
        self.wake = wake  # tells the I/O thread that checked images wait in `checked`
        self.intake = SlowIntake()
        self.checked: SimpleQueue[tuple[ChatRequest, bytes, BadImage | None]] = SimpleQueue()
        self.refusals = QuietLog(log)
        self.table: dict[type, Callable[[Message, bytes, bool], list[Message]]] = {
            ChatRequest: self.chat, CancelRequest: self.cancel, StatusRequest: self.status,
        }

    def handle(self, got: Received, stopping: bool) -> list[Message]:
        """Replies for one received frame (malformed frames get a typed error)."""
        if got.error is not None:
            self.refusals.warning("client message refused: %s: %s", got.error.code.value, got.error.message,
                                  key=got.error.code.value)
            return [self._error(got.error.msg_id, got.error.code, got.error.message)]
        msg = got.message
        assert msg is not None and got.peer is not None
        handler = self.table.get(type(msg))
        if handler is None:
            return [self._error(msg.id, ErrorCode.invalid_request,
                                f"{msg.type} is not a client request")]  # type: ignore[attr-defined]
        if self.secret is not None and not matches(self.secret, msg.secret):  # type: ignore[attr-defined]
            self.refusals.warning("%s without the stack secret refused", msg.type,  # type: ignore[attr-defined]
                                  key="no secret")
            return [self._error(msg.id, ErrorCode.unauthorized, "this tcp endpoint needs the stack secret: pass "
                                f"secret= or set LYRA_SECRET (it is in {self.config.secret_path()})")]
        return handler(msg, got.peer, stopping)

    def _error(self, parent_id: str | None, code: ErrorCode, message: str, **fields: int) -> ErrorEvent:
        """A refusal of a request that was never accepted (accepted ones end through their lifecycle)."""
        return ErrorEvent(parent_id=parent_id, coordinator=self.instance, code=code, message=message, **fields)

    def chat(self, msg: Message, peer: bytes, stopping: bool) -> list[Message]:
        assert isinstance(msg, ChatRequest)
        if stopping:
            return [self._error(msg.id, ErrorCode.shutting_down,
                                "the coordinator is shutting down; retry when it is back")]
        problem = invalid_chat(self.config, msg)
        if problem:
            return [self._error(msg.id, ErrorCode.invalid_request, problem)]
        if msg.image is not None and self.wake is not None:
            # Decoding a large image would take the I/O thread away from heartbeats: the intake thread checks
            # it, and the I/O thread queues the request once told (so its replies keep their order).
            if not self.intake.submit(lambda: self._check_image(msg, peer)):
                return [self._error(msg.id, ErrorCode.busy, "busy: too many images are being checked; retry later")]
            return []
        return self._queue_chat(msg, peer, bad_image(self.config, msg))

    def _check_image(self, msg: ChatRequest, peer: bytes) -> None:
        """On the intake thread: the slow check, then a wake-up for the I/O thread."""
        self.checked.put((msg, peer, bad_image(self.config, msg)))
        assert self.wake is not None
        self.wake()

    def finish_checked(self) -> list[tuple[bytes, Message]]:
        """On the I/O thread: queue (or refuse) every request whose image check finished; (peer, reply) pairs."""
        replies = []
        while not self.checked.empty():
            msg, peer, problem = self.checked.get()
            replies += [(peer, reply) for reply in self._queue_chat(msg, peer, problem)]
        return replies

    def _queue_chat(self, msg: ChatRequest, peer: bytes, image_problem: BadImage | None) -> list[Message]:
        """Queue a checked request (or refuse its image)."""
        if image_problem:
            log.warning("request %s refused: %s", msg.id, image_problem.message)
            return [self._error(msg.id, image_problem.code, image_problem.message)]
        if self.queue.find(msg.id):
            return [self._error(msg.id, ErrorCode.invalid_request, f"request id {msg.id} is already queued")]
        job = Job(request=msg, peer=peer, life=self.lifecycle(msg.id, peer, msg.events == "answer"))
        try:
            position = self.queue.offer(job)
        except QueueFull:
            depth = self.queue.depth()
            return [self._error(msg.id, ErrorCode.busy, f"busy: {depth} requests are already waiting; retry later",
                                queue_depth=depth)]
        log.info("request %s accepted at position %d (ticket %d)", msg.id, position, job.ticket)
        return [AcceptedEvent(parent_id=msg.id, coordinator=self.instance, position=position,
                              queue_depth=self.queue.depth(), ticket=job.ticket,
                              keepalive_s=self.config.runtime.heartbeat_interval_s)]

    def cancel(self, msg: Message, peer: bytes, stopping: bool) -> list[Message]:
        target = msg.parent_id or ""
        waiting = self.queue.remove(target)
        if waiting is not None:
            waiting.life.fail(ErrorCode.cancelled, "cancelled before it ran")
            return []
        job = self.queue.find(target)
        if job is None:
            return [self._error(target, ErrorCode.invalid_request, f"no queued or running request {target!r}")]
        job.stop("cancelled by the client")
        return []  # the pipeline sends the terminal `cancelled` event

    def status(self, msg: Message, peer: bytes, stopping: bool) -> list[Message]:
        running = self.queue.running
        return [StatusReply(
            parent_id=msg.id, coordinator=self.instance, services=self.registry.statuses(), gpus=self.ledger.snapshot(),
            queue_depth=self.queue.depth(), running=running.id if running else None,
            client_endpoint=self.config.client_endpoint(), counters=dict(self.pipeline.counters.values),
            config_path=self.config.source, swaps=self.pipeline.counters.swap_records(),
        )]
