"""Worker messages in, replies out: registration (with the stack secret), heartbeats, call replies. No sockets.

A worker is known by the connection its accepted registration came over, not by the name it claims:
a process without the stack secret is refused and logged and never receives a call, and a process whose
registration was superseded is told to register again rather than being silently ignored. Every report of
what a worker holds (registration, heartbeat, load or unload reply) goes into the registry here, in the
order the worker sent them, before any call waiting on it hears of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from services.coordinator.intake import QuietLog
from services.coordinator.swap import Residency
from services.coordinator.workers import WorkerRegistry
from shared.config.schema import LyraConfig
from shared.wire.messages import (
    SCHEMA_MAJOR,
    ErrorCode,
    ErrorEvent,
    HeartbeatEvent,
    LoadReply,
    Message,
    RegisterReply,
    RegisterRequest,
    WorkerError,
)
from shared.wire.stack_secret import matches
from shared.wire.transport import Received

log = logging.getLogger(__name__)

Handler = Callable[[Message, bytes, "str | None"], list[Message]]


class WorkerHandlers:
    """Dispatch table for worker messages; each handler returns the replies for the sending connection."""

    def __init__(self, config: LyraConfig, registry: WorkerRegistry, residency: Residency, secret: str | None) -> None:
        self.config = config
        self.registry = registry
        self.residency = residency
        self.secret = secret  # None only with runtime.auth = "none"
        # A stranger's flood must not become a flood of log lines: refusals are logged at most once a second per
        # kind, with a count of those held back (20,000 registrations without the secret wrote 20,000 lines).
        self.strangers = QuietLog(log)
        self.table: dict[type, Handler] = {RegisterRequest: self.register, HeartbeatEvent: self.heartbeat,
                                           LoadReply: self.load_reply}

    def handle(self, got: Received) -> list[Message]:
        """Replies for one frame from the worker socket."""
        assert got.peer is not None
        service = self.registry.service_of(got.peer)
        if got.error is not None:
            return self._malformed(got, service)
        msg = got.message
        assert msg is not None
        handler = self.table.get(type(msg))
        if handler is not None:
            return handler(msg, got.peer, service)
        return self._reply(msg, service)

    def _reply(self, msg: Message, service: str | None) -> list[Message]:
        """A call's stream event or reply: to the call waiting for it (a registered connection's only)."""
        if service is None:
            self.strangers.warning("%s from an unregistered connection refused", msg.type)  # type: ignore[attr-defined]
            return [self._register_first(msg)]
        self.registry.seen(service)
        if not self.registry.deliver(service, msg) and not isinstance(msg, WorkerError):
            log.debug("late %s from %s for %s dropped", msg.type, service, msg.parent_id)  # type: ignore[attr-defined]
        return []

    def load_reply(self, msg: Message, peer: bytes, service: str | None) -> list[Message]:
        """What the host holds after a load or unload: recorded even when its call was given up (a deadline)."""
        assert isinstance(msg, LoadReply)
        if service is not None:
            self.registry.loaded(service, msg)
            self.residency.reported(service)
        return self._reply(msg, service)

    def _malformed(self, got: Received, service: str | None) -> list[Message]:
        assert got.error is not None
        if service is None:  # nobody we know: no call to fail, and no reason to answer a stranger
            self.strangers.warning("malformed message from an unregistered connection dropped: %s",
                                   got.error.message)
            return []
        log.error("malformed message from %s: %s", service, got.error.message)
        self.registry.fail_service(service, f"{service} sent a malformed message ({got.error.message})")
        return [ErrorEvent(parent_id=got.error.msg_id, code=got.error.code, message=got.error.message)]

    @staticmethod
    def _register_first(msg: Message) -> ErrorEvent:
        # worker_missing makes a worker register again: the way a superseded real worker comes back
        return ErrorEvent(parent_id=msg.id, code=ErrorCode.worker_missing,
                          message="unknown worker connection: register first")

    def heartbeat(self, msg: Message, peer: bytes, service: str | None) -> list[Message]:
        assert isinstance(msg, HeartbeatEvent)
        if service is None or not self.registry.heartbeat(service, msg):
            return [self._register_first(msg)]
        self.residency.reported(service)
        return []

    def register(self, msg: Message, peer: bytes, service: str | None) -> list[Message]:
        assert isinstance(msg, RegisterRequest)
        problem = self._refusal(msg)
        if problem is not None:
            return [problem]
        restarted = self.registry.register(msg, peer)
        self.residency.reported(msg.service)
        log.info("%s %s (pid %d, instance %s, resident %s)", msg.service,
                 "registered" if restarted else "re-registered", msg.pid, msg.instance, msg.resident or "nothing")
        return [RegisterReply(parent_id=msg.id, heartbeat_interval_s=self.config.runtime.heartbeat_interval_s)]

    def _refusal(self, msg: RegisterRequest) -> ErrorEvent | None:
        """Why this registration is refused, or None."""
        if msg.service not in self.registry.workers:
            name = msg.service[:64]  # a peer's string: never echoed or logged at any length
            self.strangers.warning("registration as unknown service %r (pid %d) refused", name, msg.pid)
            return ErrorEvent(parent_id=msg.id, code=ErrorCode.invalid_request, message=f"unknown service {name!r}")
        if self.secret is not None and not matches(self.secret, msg.secret):
            which = "wrong" if msg.secret else "no"
            self.strangers.warning("registration as %s (pid %d) refused: %s stack secret", msg.service, msg.pid,
                                   which, key=f"{msg.service} {which} secret")
            return ErrorEvent(parent_id=msg.id, code=ErrorCode.unauthorized,
                              message=f"registration as {msg.service} refused: it must carry the stack secret "
                                      f"from {self.config.secret_path()} (written by `lyra up`)")
        if msg.schema_version.split(".")[0] != str(SCHEMA_MAJOR):
            self.strangers.error("%s speaks schema %s; refused", msg.service, msg.schema_version[:32],
                                 key=f"{msg.service} schema")
            return ErrorEvent(parent_id=msg.id, code=ErrorCode.schema_version,
                              message=f"schema {msg.schema_version} refused: the coordinator speaks {SCHEMA_MAJOR}.x")
        return None
