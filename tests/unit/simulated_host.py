"""A worker registry whose workers answer in-process: the coordinator's residency logic without sockets.

Replies go through the registry the way the coordinator's I/O thread puts them there (recorded, then handed to
the waiting call), so what the registry, the ledger and the preload record say is what they say in the stack.
"""

from __future__ import annotations

import itertools
import threading

from services.coordinator.counters import Counters
from services.coordinator.ledger import VramLedger
from services.coordinator.swap import Residency, footprints
from services.coordinator.workers import WorkerRegistry
from shared.config.schema import LyraConfig
from shared.config.units import GB
from shared.wire.messages import (
    CancelCallRequest,
    ErrorCode,
    HeartbeatEvent,
    LoadReply,
    LoadRequest,
    MemoryReading,
    Message,
    RegisterRequest,
    RunSpecialistRequest,
    SpecialistReply,
    UnloadRequest,
    WorkerError,
)
from shared.wire.names import ROUTER, SPECIALIST_HOST, VOICE, WORKER_SERVICES


class SimulatedStack:
    """Router and voice holding their models; a specialist host that loads whatever it is told, one at a time."""

    def __init__(self, config: LyraConfig, sizes: dict[str, float] | None = None) -> None:
        self.config = config
        self.sizes = sizes or {name: entry.memory_gb for name, entry in config.specialists.items()}
        self.registry = WorkerRegistry(WORKER_SERVICES, 5.0, self.send)
        self.ledger = VramLedger(config, lambda: footprints(config, self.registry))
        self.counters = Counters()
        self.residency = Residency(config, self.registry, self.ledger, self.counters)
        self.held: list[str] = []  # what the host process holds
        self.instances = itertools.count(1)
        self.sent: list[tuple[str, Message, str]] = []
        self.die_before: type[Message] | None = None  # the host exits just before this message reaches it ...
        self.restart_s = 0.1  # ... and its supervisor has a new one registered this much later
        self.register(ROUTER, [config.router.name])
        self.register(VOICE, [config.voice.name])
        self.restart_host()

    def register(self, service: str, resident: list[str]) -> str:
        instance = f"{service}-{next(self.instances)}"
        self.registry.register(RegisterRequest(service=service, pid=1, instance=instance, backend="fake",
                                               capabilities=list(self.config.models_of(service)),
                                               resident=resident), instance.encode())
        return instance

    def restart_host(self) -> str:
        """The host process restarts: it holds nothing and registers as a new instance."""
        self.held = []
        return self.register(SPECIALIST_HOST, [])

    def heartbeat(self, service: str, resident: list[str]) -> None:
        self.registry.heartbeat(service, HeartbeatEvent(instance=self.registry.holding(service).instance,
                                                        resident=resident, memory=self.memory(resident)))

    def memory(self, resident: list[str]) -> list[MemoryReading]:
        size = int(sum(self.sizes.get(name, 0) for name in resident) * GB)
        return [MemoryReading(device="gpu:1", allocated_bytes=size, reserved_bytes=size)] if resident else []

    def send(self, service: str, msg: Message, instance: str = "") -> None:
        """The coordinator's send (its I/O thread's part too): the host answers at once, through the registry."""
        self.sent.append((service, msg, instance))
        if isinstance(msg, CancelCallRequest) or service != SPECIALIST_HOST:
            return
        if self.die_before is not None and isinstance(msg, self.die_before):
            self.die_before = None
            self.held = []
            threading.Timer(self.restart_s, self.restart_host).start()
            self.registry.unreachable(service, msg.id, self.registry.peer_of(service))  # as Coordinator._forward
            return
        if instance and instance != self.registry.holding(service).instance:  # as Coordinator._forward
            self.registry.unreachable(service, msg.id, None)
            return
        if isinstance(msg, RunSpecialistRequest):
            self.registry.deliver(service, SpecialistReply(parent_id=msg.id, model=msg.model, text="ran")
                                  if msg.model in self.held else
                                  WorkerError(parent_id=msg.id, code=ErrorCode.internal, service=service,
                                              message=f"specialist {msg.model!r} is not resident"))
            return
        if isinstance(msg, UnloadRequest) and msg.model in self.held:
            self.held.remove(msg.model)
        elif isinstance(msg, LoadRequest) and msg.model not in self.held:
            assert not self.held, "the host was asked to hold two specialists"
            self.held = [msg.model]
        if isinstance(msg, (LoadRequest, UnloadRequest)):
            reply = LoadReply(parent_id=msg.id, model=msg.model, resident=list(self.held), seconds=0,
                              memory=self.memory(self.held), source="checkpoint")
            self.registry.loaded(service, reply)  # as WorkerHandlers.load_reply records it
            self.registry.deliver(service, reply)
