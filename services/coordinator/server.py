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
import uuid

from services.coordinator.backlog import RETRY_S, ReplyBacklog
from services.coordinator.counters import Counters
from services.coordinator.handlers import ClientHandlers
from services.coordinator.intake import ClientPacer
from services.coordinator.ledger import VramLedger
from services.coordinator.lifecycle import JobLifecycle
from services.coordinator.pipeline import Pipeline
from services.coordinator.prefetch import Prefetcher
from services.coordinator.requests import RequestQueue
from services.coordinator.swap import Residency, footprints
from services.coordinator.worker_handlers import WorkerHandlers
from services.coordinator.workers import WorkerRegistry
from shared.config.schema import LyraConfig
from shared.config.units import MB
from shared.wire import keys, transport
from shared.wire.messages import ErrorCode, Message
from shared.wire.names import WORKER_SERVICES
from shared.wire.stack_secret import SecretError, ensure_secret

log = logging.getLogger(__name__)

HANDOFF = "inproc://lyra-coordinator-outbox"
TICK_S = 0.1
CLIENT_REPLY_FRAMES = 256  # replies waiting for one slow client
DRAIN_SLICE_S = 0.05  # longest one socket is read in one pass of the loop
DRAIN_GRACE_S = 2.0  # after drain_s, how long the cancelled running request gets to send its terminal event


class Coordinator:
    """Owns the sockets; routes client requests into the queue and worker messages to pending calls."""

    def __init__(self, config: LyraConfig) -> None:
        self.config = config
        self.instance = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # clients compare it to notice a restart
        self.ctx = transport.new_context()
        self.stopping = threading.Event()
        self.queue = RequestQueue(config.runtime.queue_size, config.scheduling.max_overtakes)
        self.registry = WorkerRegistry(WORKER_SERVICES, config.runtime.heartbeat_timeout_s, self._send_to_worker)
        self.ledger = VramLedger(config, lambda: footprints(config, self.registry))  # lines derived from the registry
        self.counters = Counters()
        self.residency = Residency(config, self.registry, self.ledger, self.counters)
        self.pipeline = Pipeline(config, self.registry, self.ledger, self.residency, self.counters,
                                 on_voice_start=lambda: self.prefetcher.kick())
        self.prefetcher = Prefetcher(config, self.queue, self.residency, self.pipeline.route_early)
        secret = ensure_secret(config.secret_path()) if config.runtime.auth == "secret" else None
        # With Curve, keys say who may connect; the secret file never leaves this host, so a socket under Curve
        # does not ask for it.
        self.curve = keys.identity(config.keys_dir(), keys.COORDINATOR, server=True) if config.runtime.curve \
            else None
        self.gate = transport.KeyGate(self.ctx, keys.coordinator_gate(config.keys_dir()), keys.fingerprint) \
            if self.curve else None
        self.handshakes_logged: dict[tuple[str, str], float] = {}  # (socket, reason) -> when last logged
        self.client_handlers = ClientHandlers(config, self.queue, self.registry, self.ledger, self.pipeline,
                                              self._lifecycle, self.instance,
                                              secret if config.client_needs_secret() else None,
                                              lambda: transport.send_frames(self._handoff(), [b"i", b"", b"", b""]))
        runtime = config.runtime
        self.pacer = ClientPacer(runtime.client_max_msgs_per_s, runtime.client_max_mb_per_s * MB)
        self.worker_handlers = WorkerHandlers(config, self.registry, self.residency,
                                              None if config.curve_on(config.worker_endpoint()) else secret)
        self.backlog = ReplyBacklog(int(runtime.client_queue_mb * MB))
        self._local = threading.local()
        self.handoff_sockets: list[transport.Endpoint] = []

    # ------------------------------------------------------------ hand-off from other threads

    def _handoff(self) -> transport.Endpoint:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._local.sock = transport.connect_handoff(self.ctx, HANDOFF)
            self.handoff_sockets.append(sock)
        return sock

    def _send_to_worker(self, service: str, msg: Message, instance: str = "") -> None:
        """Send to `service`'s `instance` ("" = whichever is registered when the I/O thread sends it)."""
        transport.send_frames(self._handoff(), [b"w", service.encode(), msg.id.encode(), transport.encode(msg),
                                                instance.encode()])

    def _send_to_client(self, peer: bytes, request_id: str, msg: Message) -> None:
        transport.send_frames(self._handoff(), [b"c", peer, request_id.encode(), transport.encode(msg)])

    def _lifecycle(self, request_id: str, peer: bytes, answer_only: bool = False) -> JobLifecycle:
        """How an accepted request will talk to its client (the one place it can end)."""
        return JobLifecycle(request_id, lambda msg: self._send_to_client(peer, request_id, msg), self.instance,
                            self.counters.bump, answer_only)

    # ------------------------------------------------------------ main loop

    def serve(self) -> int:
        """Bind, start the pipeline thread, and serve until SIGTERM; returns the exit status."""
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        limit = self.config.max_message_bytes()
        # Input buffered per client is bounded in bytes (runtime.client_queue_mb): a client flooding faster than
        # we read blocks in its own process instead of growing ours. A count alone (256 frames) let 300 frames
        # of 8 MB take the coordinator to 1.1 GB. Replies get a few hundred frames: a stream must not stall.
        self.clients = transport.bind_router(self.ctx, self.config.client_endpoint(), limit,
                                             queued_out=CLIENT_REPLY_FRAMES,
                                             queued_in=self.config.client_queue_frames(),
                                             **self._curve_of(self.config.client_endpoint(), "clients"))
        self.workers = transport.bind_router(self.ctx, self.config.worker_endpoint(), limit,
                                             **self._curve_of(self.config.worker_endpoint(), "workers"))
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
            self.client_handlers.intake.stop()
            pipeline.join(timeout=2)
            for ep in (self.clients, self.workers, self.inbox, *self.handoff_sockets):
                ep.close()
            if self.gate is not None:
                self.gate.stop()
            self.ctx.term()
        return 0

    def _curve_of(self, endpoint: str, domain: str) -> dict[str, object]:
        """bind_router's Curve arguments for one of our endpoints (none unless Curve protects it)."""
        return {"curve": self.curve, "zap_domain": domain} if self.config.curve_on(endpoint) else {}

    def _log_refused_handshakes(self) -> None:
        """A peer without a key (or with the wrong coordinator key) never reaches ZAP: its failure shows here."""
        for domain, ep in (("client", self.clients), ("worker", self.workers)):
            for why in transport.handshake_failures(ep):
                now = time.monotonic()  # a refused peer retries every second: one line per reason a second
                if now - self.handshakes_logged.get((domain, why), -1.0) >= 1.0:
                    self.handshakes_logged[(domain, why)] = now
                    log.warning("refused a %s connection at %s: %s", domain, ep.socket.last_endpoint.decode(), why)

    def _loop(self, pipeline: threading.Thread) -> None:
        drain_until: float | None = None
        next_keepalive = 0.0
        while True:
            now = time.monotonic()
            if self.stopping.is_set() and drain_until is None:
                drain_until = now + self.config.runtime.drain_s
                self._refuse_waiting()
            if drain_until is not None and self._drained(now, drain_until):
                self._flush_handoff()
                return
            for ep in transport.poll([self.clients, self.workers, self.inbox], RETRY_S if self.backlog.pending()
                                     else TICK_S):
                self._drain(ep)
            for request_id in self.backlog.retry(self.clients):
                self._client_lost(request_id)
            self._log_refused_handshakes()
            self.client_handlers.refusals.flush()  # a flood of refusals that stopped still gets its count logged
            self.worker_handlers.strangers.flush()
            if time.monotonic() - now > self.config.runtime.heartbeat_interval_s:
                # This pass was long (a burst of large frames): heartbeats that arrived meanwhile wait unread in
                # the worker socket, and must count before anyone is judged silent.
                self._drain(self.workers)
            for service in self.registry.check_liveness():
                log.error("%s stopped heartbeating; marked dead", service)
            if now >= next_keepalive:
                self._keepalive()
                next_keepalive = now + self.config.runtime.heartbeat_interval_s / 2

    def _keepalive(self) -> None:
        """Every outstanding request hears from us at least once per heartbeat interval: silence means trouble."""
        interval = self.config.runtime.heartbeat_interval_s
        for job, position in self.queue.outstanding():
            job.life.keepalive(position, interval)

    def _drained(self, now: float, drain_until: float) -> bool:
        """Whether the SIGTERM drain is over: the running request ended, or ran out of `drain_s`."""
        running = self.queue.running
        if running is None:
            return True
        if now > drain_until and not running.cancel.is_set():
            log.warning("request %s did not finish within drain_s (%gs); ending it", running.id,
                        self.config.runtime.drain_s)
            running.stop(f"the coordinator is shutting down; the request did not finish within its "
                         f"{self.config.runtime.drain_s:g} s drain", ErrorCode.shutting_down)
        return now > drain_until + DRAIN_GRACE_S

    def _drain(self, ep: transport.Endpoint) -> None:
        # Bounded in frames and in time, so one busy socket cannot starve the others, nor the liveness check
        # and keepalives after it: legal frames can take 0.1 s each to validate (a 24,000-turn conversation).
        stop_at = time.monotonic() + DRAIN_SLICE_S
        for _ in range(1000):
            if time.monotonic() > stop_at or not transport.poll([ep], 0):
                return
            if ep is self.inbox:
                self._forward(transport.recv_frames(ep))
            elif ep is self.clients:
                self._from_client(transport.recv(ep, router=True, admit=self.pacer.admit))
            else:
                self._from_worker(transport.recv(ep, router=True))

    def _flush_handoff(self) -> None:
        while transport.poll([self.inbox], 0.05):
            self._forward(transport.recv_frames(self.inbox))

    def _forward(self, frames: list[bytes]) -> None:
        kind, peer, request_id, payload, *rest = frames
        if kind == b"i":  # image checks finished on the intake thread
            for client, reply in self.client_handlers.finish_checked():
                transport.send(self.clients, reply, client)
            return
        if kind == b"w":
            service, instance = peer.decode(), rest[0].decode()
            # Only to the instance the call was made ready on: a newer one may not hold what it needs.
            worker = self.registry.peer_of(service, instance)
            if worker is None or not transport.send_encoded(self.workers, payload, worker):
                log.warning("%s%s is not connected; its call %s waits for it to come back", service,
                            f" instance {instance}" if instance else "", request_id.decode())
                self.registry.unreachable(service, request_id.decode(), worker)
            return
        if not self.backlog.send(self.clients, peer, request_id.decode(), payload):
            self._client_lost(request_id.decode())

    def _client_lost(self, request_id: str) -> None:
        job = self.queue.find(request_id)
        if job is not None and not job.cancel.is_set():
            log.info("client of request %s is gone (or %g MB behind); cancelling it", job.id,
                     self.config.runtime.client_queue_mb)
            job.stop("the client disconnected")

    def _refuse_waiting(self) -> None:
        """SIGTERM: waiting requests end with shutting_down; the running one may finish within drain_s."""
        log.info("SIGTERM: refusing %d waiting request(s); the running one has %gs to finish", self.queue.depth(),
                 self.config.runtime.drain_s)
        for job in self.queue.drain():
            job.life.fail(ErrorCode.shutting_down, "the coordinator is shutting down; retry when it is back")

    def _pipeline_thread(self) -> None:
        while not self.stopping.is_set():
            self.prefetcher.wait_idle(self.config.deadlines.load + self.config.deadlines.route)
            job = self.queue.take(timeout_s=TICK_S, resident=self.residency.resident())
            if job is None:
                continue
            try:
                if job.cancel.is_set():
                    job.life.fail(job.cancel_code, job.cancel_reason or "cancelled")
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
        for reply in self.worker_handlers.handle(got):
            transport.send(self.workers, reply, got.peer)


def run(config: LyraConfig) -> int:
    """Entry point used by `python -m services.coordinator`."""
    for endpoint in (config.client_endpoint(), config.worker_endpoint()):
        problem = transport.endpoint_problem(endpoint)  # a shared directory: refused before anything is bound
        if problem is not None:
            log.critical("coordinator cannot start: %s", problem)
            return 2
    try:
        coordinator = Coordinator(config)
    except (SecretError, keys.KeyFileError) as exc:  # an exposed or missing secret or key: refuse to serve
        log.critical("coordinator cannot start: %s", exc)
        return 2
    log.info("coordinator starting (pid %d, instance %s, config %s)", os.getpid(), coordinator.instance,
             config.source)
    return coordinator.serve()
