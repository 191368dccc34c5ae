"""Client messages in, immediate replies out: validate, queue, cancel, report status. No sockets here."""

from __future__ import annotations

import logging
from collections.abc import Callable

from services.coordinator.ledger import VramLedger
from services.coordinator.pipeline import Pipeline
from services.coordinator.requests import Job, QueueFull, RequestQueue
from services.coordinator.workers import WorkerRegistry
from shared.config import LyraConfig
from shared.images import BadImage, ImageLimits, check_image
from shared.messages import (
    AcceptedEvent,
    CancelRequest,
    ChatRequest,
    ErrorCode,
    ErrorEvent,
    Message,
    StatusReply,
    StatusRequest,
)
from shared.transport import Received

log = logging.getLogger(__name__)


def bad_image(config: LyraConfig, msg: ChatRequest) -> BadImage | None:
    """Why the attached image is refused, or None (also when there is none)."""
    if msg.image is None:
        return None
    runtime = config.runtime
    limits = ImageLimits(max_bytes=int(runtime.max_image_mb * 1e6), max_side=runtime.max_image_side,
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
    return None


class ClientHandlers:
    """Dispatch table for client messages; each handler returns the replies to send back at once."""

    def __init__(self, config: LyraConfig, queue: RequestQueue, registry: WorkerRegistry, ledger: VramLedger,
                 pipeline: Pipeline) -> None:
        self.config = config
        self.queue = queue
        self.registry = registry
        self.ledger = ledger
        self.pipeline = pipeline
        self.table: dict[type, Callable[[Message, bytes, bool], list[Message]]] = {
            ChatRequest: self.chat, CancelRequest: self.cancel, StatusRequest: self.status,
        }

    def handle(self, got: Received, stopping: bool) -> list[Message]:
        """Replies for one received frame (malformed frames get a typed error)."""
        if got.error is not None:
            log.warning("malformed client message: %s: %s", got.error.code.value, got.error.message)
            return [ErrorEvent(parent_id=got.error.msg_id, code=got.error.code, message=got.error.message)]
        msg = got.message
        assert msg is not None and got.peer is not None
        handler = self.table.get(type(msg))
        if handler is None:
            return [ErrorEvent(parent_id=msg.id, code=ErrorCode.invalid_request,
                               message=f"{msg.type} is not a client request")]  # type: ignore[attr-defined]
        return handler(msg, got.peer, stopping)

    def chat(self, msg: Message, peer: bytes, stopping: bool) -> list[Message]:
        assert isinstance(msg, ChatRequest)
        if stopping:
            return [ErrorEvent(parent_id=msg.id, code=ErrorCode.shutting_down,
                               message="the coordinator is shutting down; retry when it is back")]
        problem = invalid_chat(self.config, msg)
        if problem:
            return [ErrorEvent(parent_id=msg.id, code=ErrorCode.invalid_request, message=problem)]
        image_problem = bad_image(self.config, msg)
        if image_problem:
            log.warning("request %s refused: %s", msg.id, image_problem.message)
            return [ErrorEvent(parent_id=msg.id, code=image_problem.code, message=image_problem.message)]
        if self.queue.find(msg.id):
            return [ErrorEvent(parent_id=msg.id, code=ErrorCode.invalid_request,
                               message=f"request id {msg.id} is already queued")]
        job = Job(request=msg, peer=peer)
        try:
            position = self.queue.offer(job)
        except QueueFull:
            depth = self.queue.depth()
            return [ErrorEvent(parent_id=msg.id, code=ErrorCode.busy, queue_depth=depth,
                               message=f"busy: {depth} requests are already waiting; retry later")]
        log.info("request %s accepted at position %d (ticket %d)", msg.id, position, job.ticket)
        return [AcceptedEvent(parent_id=msg.id, position=position, queue_depth=self.queue.depth(), ticket=job.ticket)]

    def cancel(self, msg: Message, peer: bytes, stopping: bool) -> list[Message]:
        target = msg.parent_id or ""
        waiting = self.queue.remove(target)
        if waiting is not None:
            return [ErrorEvent(parent_id=target, code=ErrorCode.cancelled, message="cancelled before it ran")]
        job = self.queue.find(target)
        if job is None:
            return [ErrorEvent(parent_id=target, code=ErrorCode.invalid_request,
                               message=f"no queued or running request {target!r}")]
        job.stop("cancelled by the client")
        return []  # the pipeline sends the terminal `cancelled` event

    def status(self, msg: Message, peer: bytes, stopping: bool) -> list[Message]:
        running = self.queue.running
        return [StatusReply(
            parent_id=msg.id, services=self.registry.statuses(), gpus=self.ledger.snapshot(),
            queue_depth=self.queue.depth(), running=running.id if running else None,
            client_endpoint=self.config.client_endpoint(), counters=dict(self.pipeline.counters.values),
            config_path=self.config.source,
        )]
