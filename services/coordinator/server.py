"""The coordinator process: client and worker sockets, the request queue, and the pipeline thread.

The main thread owns every socket and never blocks on a worker. The pipeline thread runs one job at a
time and hands outgoing messages to the main thread through an inproc socket, so sends stay on the
thread that owns the sockets and wake it at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from services.coordinator.handlers import ClientHandlers
from services.coordinator.ledger import VramLedger, split_estimate
from services.coordinator.pipeline import Pipeline
from services.coordinator.prefetch import Prefetcher
from services.coordinator.requests import Job, RequestQueue
from services.coordinator.workers import WorkerRegistry
from shared import transport
from shared.config import WORKER_SERVICES, LyraConfig
from shared.messages import (
    SCHEMA_MAJOR,
    ErrorCode,
    ErrorEvent,
    HeartbeatEvent,
    Message,
    RegisterReply,
    RegisterRequest,
    WorkerError,
)

log = logging.getLogger(__name__)

HANDOFF = "inproc://lyra-coordinator-outbox"
TICK_S = 0.1


class Coordinator:
    """Owns the sockets; routes client requests into the queue and worker messages to pending calls."""

    def __init__(self, config: LyraConfig) -> None:
        self.config = config
        self.ctx = transport.new_context()
        self.stopping = threading.Event()
        self.queue = RequestQueue(config.runtime.queue_size, config.scheduling.max_overtakes)
        self.ledger = VramLedger(config)
        self.registry = WorkerRegistry(WORKER_SERVICES, config.runtime.heartbeat_timeout_s, self._send_to_worker)
        self.pipeline = Pipeline(config, self.registry, self.ledger, self._send_to_client)
        self.prefetcher = Prefetcher(config, self.pipeline, self.queue)
        self.client_handlers = ClientHandlers(config, self.queue, self.registry, self.ledger, self.pipeline)
        self._local = threading.local()
        self.handoff_sockets: list[transport.Endpoint] = []

    # ------------------------------------------------------------ hand-off from other threads

    def _handoff(self) -> transport.Endpoint:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._local.sock = transport.connect_handoff(self.ctx, HANDOFF)
            self.handoff_sockets.append(sock)
        return sock

    def _send_to_worker(self, service: str, msg: Message) -> None:
        transport.send_frames(self._handoff(), [b"w", service.encode(), msg.id.encode(), transport.encode(msg)])

    def _send_to_client(self, job: Job, msg: Message) -> None:
        transport.send_frames(self._handoff(), [b"c", job.peer, job.id.encode(), transport.encode(msg)])

    # ------------------------------------------------------------ main loop

    def serve(self) -> int:
        """Bind, start the pipeline thread, and serve until SIGTERM; returns the exit status."""
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        limit = self.config.max_message_bytes()
        self.clients = transport.bind_router(self.ctx, self.config.client_endpoint(), limit)
        self.workers = transport.bind_router(self.ctx, self.config.worker_endpoint(), limit)
        self.inbox = transport.bind_handoff(self.ctx, HANDOFF)
        log.info("coordinator up: clients at %s, workers at %s", self.config.client_endpoint(),
                 self.config.worker_endpoint())
        pipeline = threading.Thread(target=self._pipeline_thread, name="pipeline", daemon=True)
        pipeline.start()
        threading.Thread(target=self.prefetcher.run, name="prefetch", daemon=True).start()
        try:
            self._loop(pipeline)
        finally:
            self.prefetcher.stop.set()
            pipeline.join(timeout=2)
            for ep in (self.clients, self.workers, self.inbox, *self.handoff_sockets):
                ep.close()
            self.ctx.term()
        return 0

    def _loop(self, pipeline: threading.Thread) -> None:
        drain_until: float | None = None
        while True:
            if self.stopping.is_set() and drain_until is None:
                drain_until = time.monotonic() + self.config.runtime.drain_s
                self._refuse_waiting()
            if drain_until is not None and (self.queue.running is None or time.monotonic() > drain_until):
                self._flush_handoff()
                return
            for ep in transport.poll([self.clients, self.workers, self.inbox], TICK_S):
                self._drain(ep)
            for service in self.registry.check_liveness():
                log.error("%s stopped heartbeating; marked dead", service)

    def _drain(self, ep: transport.Endpoint) -> None:
        for _ in range(1000):  # bounded so one busy socket cannot starve the others
            if not transport.poll([ep], 0):
                return
            if ep is self.inbox:
                self._forward(transport.recv_frames(ep))
            elif ep is self.clients:
                self._from_client(transport.recv(ep, router=True))
            else:
                self._from_worker(transport.recv(ep, router=True))

    def _flush_handoff(self) -> None:
        while transport.poll([self.inbox], 0.05):
            self._forward(transport.recv_frames(self.inbox))

    def _forward(self, frames: list[bytes]) -> None:
        kind, peer, request_id, payload = frames
        if kind == b"w":
            if not transport.send_encoded(self.workers, payload, peer):
                service = peer.decode(errors="replace")
                log.warning("%s is not connected; its call %s waits for it to come back", service,
                            request_id.decode())
                self.registry.unreachable(service, request_id.decode())
            return
        if not transport.send_encoded(self.clients, payload, peer):
            job = self.queue.find(request_id.decode())
            if job is not None:
                log.info("client of request %s is gone; cancelling it", job.id)
                job.stop("the client disconnected")

    def _refuse_waiting(self) -> None:
        log.info("SIGTERM: refusing %d waiting request(s), draining the running one", self.queue.depth())
        for job in self.queue.drain():
            self._send_to_client(job, ErrorEvent(parent_id=job.id, code=ErrorCode.shutting_down,
                                                 message="the coordinator is shutting down; retry when it is back"))
        if self.queue.running is not None:
            self.queue.running.stop("the coordinator is shutting down")

    def _pipeline_thread(self) -> None:
        while not self.stopping.is_set():
            self.prefetcher.wait_idle(self.config.deadlines.load + self.config.deadlines.route)
            resident = self.registry.resident("specialist_host")
            job = self.queue.take(timeout_s=TICK_S, resident=resident[0] if resident else None)
            if job is None:
                continue
            try:
                if job.cancel.is_set():
                    self._send_to_client(job, ErrorEvent(parent_id=job.id, code=ErrorCode.cancelled,
                                                         message=job.cancel_reason or "cancelled"))
                else:
                    self.pipeline.run(job)
            finally:
                self.queue.finish(job)

    # ------------------------------------------------------------ clients

    def _from_client(self, got: transport.Received) -> None:
        assert got.peer is not None
        for reply in self.client_handlers.handle(got, self.stopping.is_set()):
            transport.send(self.clients, reply, got.peer)

    # ------------------------------------------------------------ workers

    def _from_worker(self, got: transport.Received) -> None:
        assert got.peer is not None
        service = got.peer.decode(errors="replace")
        if service not in self.registry.workers:
            log.warning("message from unknown worker identity %r dropped", service)
            return
        if got.error is not None:
            log.error("malformed message from %s: %s", service, got.error.message)
            self.registry.fail_service(service, f"{service} sent a malformed message ({got.error.message})")
            transport.send(self.workers, ErrorEvent(parent_id=got.error.msg_id, code=got.error.code,
                                                    message=got.error.message), got.peer)
            return
        msg = got.message
        if isinstance(msg, RegisterRequest):
            self._register(msg, got.peer)
        elif isinstance(msg, HeartbeatEvent):
            if not self.registry.heartbeat(service, msg):
                transport.send(self.workers, ErrorEvent(parent_id=msg.id, code=ErrorCode.worker_missing,
                                                        message="unknown worker instance: register first"), got.peer)
            else:
                self.ledger.measure(service, msg.memory)
        else:
            self.registry.seen(service)
            if not self.registry.deliver(service, msg) and not isinstance(msg, WorkerError):
                log.debug("late %s from %s for %s dropped", msg.type, service, msg.parent_id)  # type: ignore[union-attr]

    def _register(self, msg: RegisterRequest, peer: bytes) -> None:
        if msg.service != peer.decode(errors="replace"):
            transport.send(self.workers, ErrorEvent(parent_id=msg.id, code=ErrorCode.invalid_request,
                                                    message=f"identity {peer!r} registered as {msg.service!r}"), peer)
            return
        if msg.schema_version.split(".")[0] != str(SCHEMA_MAJOR):
            log.error("%s speaks schema %s; refused", msg.service, msg.schema_version)
            transport.send(self.workers, ErrorEvent(
                parent_id=msg.id, code=ErrorCode.schema_version,
                message=f"schema {msg.schema_version} refused: the coordinator speaks {SCHEMA_MAJOR}.x"), peer)
            return
        restarted = self.registry.register(msg)
        entries = self.config.models_of(msg.service)
        estimates: dict[int, int] = {}
        for name in msg.resident:
            if name in entries:
                per_gpu = self.registry.estimate(msg.service, name) or split_estimate(
                    entries[name], self.config.gpus_of(msg.service))
                for gpu, size in per_gpu.items():
                    estimates[gpu] = estimates.get(gpu, 0) + size
        self.ledger.set_resident(msg.service, msg.resident, estimates)
        for warning in self.ledger.measure(msg.service, msg.memory):
            log.warning("estimate off by more than 10%%: %s", warning)
        log.info("%s %s (pid %d, instance %s, resident %s)", msg.service,
                 "registered" if restarted else "re-registered", msg.pid, msg.instance, msg.resident or "nothing")
        transport.send(self.workers, RegisterReply(parent_id=msg.id,
                                                   heartbeat_interval_s=self.config.runtime.heartbeat_interval_s), peer)


def run(config: LyraConfig) -> int:
    """Entry point used by `python -m services.coordinator`."""
    log.info("coordinator starting (pid %d, config %s)", os.getpid(), config.source)
    return Coordinator(config).serve()
