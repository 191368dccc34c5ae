"""One request, end to end: route -> ensure the specialist is resident -> run it -> voice.

Runs on the coordinator's pipeline thread, strictly one request at a time. It talks to workers only
through `WorkerRegistry.call` and to the client only through the job's lifecycle, so it needs no sockets
itself. A stage whose worker dies or restarts runs again on the new instance (`runtime.stage_retries`);
the specialist stage goes only to a host instance that holds its specialist, reloaded into it if not
(a restarted host holds nothing), however the stage reached it: first send, re-send, or re-run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from services.coordinator.counters import Counters
from services.coordinator.ledger import VramLedger
from services.coordinator.requests import Job, Route
from services.coordinator.swap import Residency
from services.coordinator.workers import Needs, StageError, WorkerRegistry
from shared.config.schema import LyraConfig
from shared.wire.messages import (
    ChatTurn,
    ClassifyReply,
    ClassifyRequest,
    ErrorCode,
    Message,
    RouteLabel,
    RunSpecialistRequest,
    SpecialistReply,
    SynthesizeReply,
    SynthesizeRequest,
    TokenEvent,
)
from shared.wire.names import ROUTER, SPECIALIST_HOST, VOICE

log = logging.getLogger(__name__)

T = TypeVar("T")


def conversation(job: Job) -> list[ChatTurn]:
    """The request's turns (plain `text` becomes one user turn)."""
    if job.request.messages:
        return list(job.request.messages)
    return [ChatTurn(role="user", content=job.request.text or "")]

class Pipeline:
    """Executes jobs through the workers; each job ends through its lifecycle, exactly once."""

    def __init__(self, config: LyraConfig, registry: WorkerRegistry, ledger: VramLedger, residency: Residency,
                 counters: Counters, on_voice_start: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.registry = registry
        self.ledger = ledger
        self.residency = residency
        self.counters = counters
        self.labels = [RouteLabel(name=n, description=e.description)
                       for n, e in config.specialists.items() if e.routable]
        self.on_voice_start = on_voice_start  # the coordinator's prefetcher starts its work here

    def run(self, job: Job) -> None:
        """Run one job to its terminal event."""
        self.counters.bump("requests")
        timings: dict[str, float] = {"queue": round(time.monotonic() - job.accepted_at, 6)}
        started = time.monotonic()
        try:
            result = self._stages(job, timings)
        except StageError as exc:
            log.warning("request %s failed: %s: %s", job.id, exc.code.value, exc.message)
            if exc.code == ErrorCode.cancelled:
                job.life.fail(job.cancel_code, job.cancel_reason or exc.message, exc.service, exc.stage)
            else:
                job.life.fail(exc.code, exc.message, exc.service, exc.stage)
            return
        except Exception as exc:  # a coordinator bug must still end the request
            log.exception("request %s hit an internal error", job.id)
            job.life.fail(ErrorCode.internal,
                          f"internal error: {type(exc).__name__}: {exc} (see the coordinator log)")
            return
        timings["total"] = round(time.monotonic() - started + timings["queue"], 6)
        job.life.done(**result, timings=timings, vram=self.ledger.snapshot(), ticket=job.ticket)

    # ------------------------------------------------------------ stages

    def _rerunning(self, job: Job, stage: str, service: str, attempt: Callable[[], T]) -> T:
        """Run one stage; if its worker dies or restarts, wait for the new instance and run it again.

        Only `worker_dead` is retried (a deadline or a worker's own error would likely repeat), at most
        `runtime.stage_retries` times; stages that already succeeded are never repeated.
        """
        reruns = 0
        while True:
            try:
                return attempt()
            except StageError as exc:
                if exc.code != ErrorCode.worker_dead or reruns >= self.config.runtime.stage_retries:
                    raise
                reruns += 1
                log.warning("request %s: %s; re-running %s (re-run %d)", job.id, exc.message, stage, reruns)
                self.counters.bump("stage_reruns")
                job.life.restarted(stage, service, reruns, exc.message)
                wait = self.config.runtime.heartbeat_timeout_s
                try:
                    self.registry.wait_up(service, wait, job.cancel, replacing=exc.instance)
                except StageError as gone:
                    if gone.code == ErrorCode.cancelled:
                        raise
                    raise StageError(ErrorCode.worker_dead, f"{exc.message}; it did not come back within "
                                     f"{wait:g} s to re-run {stage}", service, stage) from None

    def _stage(self, job: Job, timings: dict[str, float], stage: str, service: str, model: str | None,
               request: Callable[[], Message], deadline: float, needs: Needs | None = None) -> Message:
        """Run a streaming stage: a fresh call per attempt (its own id), each to an instance that `needs` allows."""
        job.life.started(stage, service, model)
        begun = time.monotonic()
        wait = self.config.runtime.heartbeat_timeout_s

        def attempt() -> Message:
            reply: Message | None = None
            for item in self.registry.call(service, request(), deadline, job.cancel, stage, wait, needs):
                if isinstance(item, TokenEvent):
                    job.life.token(item.text, item.stage)
                else:
                    reply = item
            assert reply is not None
            return reply

        reply = self._rerunning(job, stage, service, attempt)
        seconds = time.monotonic() - begun
        timings[stage] = round(seconds, 6)
        job.life.finished(stage, service, seconds, model)
        return reply

    def _expect(self, reply: Message, kind: type, service: str) -> None:
        if not isinstance(reply, kind):
            raise StageError(ErrorCode.worker_error, f"{service} answered {reply.type} "  # type: ignore[attr-defined]
                             f"where {kind.__name__} was expected", service)

    def _stages(self, job: Job, timings: dict[str, float]) -> dict[str, Any]:
        """Route, load, specialist, voice; returns the DoneEvent's fields."""
        turns = conversation(job)
        route = self._route(job, timings)
        specialist = route.specialist
        self._ensure_resident(job, specialist, timings)
        deadlines, residency = self.config.deadlines, self.residency
        result = self._stage(job, timings, "specialist", SPECIALIST_HOST, specialist,
                             lambda: RunSpecialistRequest(parent_id=job.id, model=specialist, messages=turns,
                                                          image=job.request.image, options=job.request.options),
                             deadlines.specialist,
                             Needs(specialist, lambda: residency.restore(specialist, job.id, job.cancel)))
        self._expect(result, SpecialistReply, SPECIALIST_HOST)
        assert isinstance(result, SpecialistReply)
        if result.image is not None:
            job.life.image(result.image)
        self.on_voice_start()
        spoken = self._stage(job, timings, "voice", VOICE, self.config.voice.name,
                             lambda: SynthesizeRequest(parent_id=job.id, messages=turns, specialist=specialist,
                                                       specialist_output=result.text, options=job.request.options),
                             deadlines.voice)
        self._expect(spoken, SynthesizeReply, VOICE)
        assert isinstance(spoken, SynthesizeReply)
        return {"answer": spoken.text, "specialist": specialist, "scores": route.scores,
                "forced": route.kind == "forced", "route_kind": route.kind, "fallback": route.fallback,
                "specialist_output": result.text, "image": result.image, "usage": spoken.usage,
                "truncated": [t for t in (result.truncated, spoken.truncated) if t is not None] or None}

    def route_early(self, job: Job) -> None:
        """Decide a waiting job's specialist ahead of its turn (no events; the job shows them later)."""
        if job.route is None:
            job.route = self._forced_route(job) or self._classify(job, job.cancel)[0]

    def _forced_route(self, job: Job) -> Route | None:
        forced = job.request.specialist or (
            self.config.routing.image_specialist if job.request.image is not None else "")
        if not forced:
            return None
        kind = "forced" if job.request.specialist else "image_rule"
        return Route(forced, {name: float(name == forced) for name in self.config.specialists}, True, kind)

    def _classify(self, job: Job, cancel: threading.Event) -> tuple[Route, float]:
        begun = time.monotonic()
        request = ClassifyRequest(parent_id=job.id, messages=conversation(job), labels=self.labels)
        reply = self.registry.call_reply(ROUTER, request, self.config.deadlines.route, cancel, "route",
                                         self.config.runtime.heartbeat_timeout_s)
        self._expect(reply, ClassifyReply, ROUTER)
        assert isinstance(reply, ClassifyReply)
        if reply.specialist not in self.config.specialists:
            raise StageError(ErrorCode.worker_error, f"router chose unknown specialist {reply.specialist!r}", ROUTER)
        return Route(reply.specialist, reply.scores, False, "routed", reply.fallback, reply.evidence), \
            time.monotonic() - begun

    def _route(self, job: Job, timings: dict[str, float]) -> Route:
        route = job.route or self._forced_route(job)
        if route is None or not route.forced:
            router = self.config.router.name
            job.life.started("route", ROUTER, router)
            seconds, begun = 0.0, time.monotonic()
            if route is None:
                route, _ = self._rerunning(job, "route", ROUTER, lambda: self._classify(job, job.cancel))
                seconds = time.monotonic() - begun  # every attempt counts
            timings["route"] = round(seconds, 6)
            job.life.finished("route", ROUTER, seconds, router)
        else:
            timings["route"] = 0.0
        job.route = route
        job.life.route(route.specialist, route.scores, route.kind, route.fallback, route.evidence)  # type: ignore[arg-type]
        return route

    def _ensure_resident(self, job: Job, specialist: str, timings: dict[str, float]) -> None:
        service = SPECIALIST_HOST
        self.registry.wait_up(service, self.config.runtime.heartbeat_timeout_s, job.cancel)
        with self.residency.lock:
            if self.residency.claim(specialist):
                timings["load"] = 0.0
                return
            job.life.started("load", service, specialist)
            timings["load"] = round(self._rerunning(
                job, "load", service, lambda: self.residency.swap_to(specialist, job.id, job.cancel)), 6)
        job.life.finished("load", service, timings["load"], specialist)
