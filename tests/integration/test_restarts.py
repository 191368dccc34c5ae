"""Restarts against live processes: a worker's stage runs again, a dead coordinator is noticed at once,
SIGTERM drains, and every request still ends with exactly one terminal event."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field

import pytest

from shared.client import CoordinatorRestartedError, LyraError
from shared.wire.messages import AcceptedEvent, DoneEvent, Message, StageRestartedEvent, StageStartedEvent, TokenEvent
from tests.stackproc import slow_router


@dataclass
class Outcome:
    """What one client saw: its events, the error it raised, and when."""

    events: list[Message] = field(default_factory=list)
    error: BaseException | None = None
    ended_at: float | None = None
    accepted: threading.Event = field(default_factory=threading.Event)


def chat_in_background(stack, text: str, **options) -> tuple[threading.Thread, Outcome]:
    outcome = Outcome()

    def run() -> None:
        try:
            with stack.client(timeout_s=30) as client:
                for event in client.stream(text, **options):
                    outcome.events.append(event)
                    if isinstance(event, AcceptedEvent):
                        outcome.accepted.set()
        except BaseException as exc:  # reported by the test
            outcome.error = exc
        outcome.ended_at = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def wait_busy(stack, service: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    with stack.client() as client:
        while time.monotonic() < deadline:
            if any(s.service == service and s.state == "busy" for s in client.status(timeout_s=2).services):
                return
            time.sleep(0.02)
    raise AssertionError(f"{service} never became busy")


@pytest.mark.parametrize("service,stage", [("router", "route"), ("specialist_host", "specialist"),
                                           ("voice", "voice")])
def test_worker_restarted_mid_stage_reruns_only_that_stage(make_stack, service: str, stage: str) -> None:
    stack = make_stack()
    thread, outcome = chat_in_background(stack, f"math code [[fake:slow:{service}]]")
    wait_busy(stack, service)
    stack.kill(service)
    stack.start(service)  # as supervisord would
    thread.join(timeout=20)
    assert outcome.error is None, outcome.error
    kinds = [(type(e).__name__, getattr(e, "stage", None)) for e in outcome.events if not isinstance(e, TokenEvent)]
    assert ("StageRestartedEvent", stage) in kinds and isinstance(outcome.events[-1], DoneEvent)
    started = [e.stage for e in outcome.events if isinstance(e, StageStartedEvent)]
    assert started == ["route", "load", "specialist", "voice"]  # nothing that succeeded ran twice
    restarted = next(e for e in outcome.events if isinstance(e, StageRestartedEvent))
    assert restarted.service == service and restarted.attempt == 1
    done = outcome.events[-1]
    assert done.specialist == "pragmatist" and done.answer.startswith("[voice]")
    if stage == "voice":  # the tokens after the restart marker are the whole answer
        after = outcome.events[outcome.events.index(restarted) + 1:]
        assert "".join(e.text for e in after if isinstance(e, TokenEvent) and e.stage == "voice") == done.answer
    with stack.client() as client:
        assert client.status().counters["stage_reruns"] == 1


def test_graceful_restart_mid_stage_and_restart_then_chat_at_once(make_stack) -> None:
    """`supervisorctl restart voice` mid-request, then `restart router` followed at once by a chat."""
    stack = make_stack(runtime__drain_s=0.3)  # shorter than the slow stage: the worker leaves mid-call
    thread, outcome = chat_in_background(stack, "math code [[fake:slow:voice]]")
    wait_busy(stack, "voice")
    stack.kill("voice", signal.SIGTERM)
    stack.start("voice")
    thread.join(timeout=20)
    assert outcome.error is None and isinstance(outcome.events[-1], DoneEvent), outcome.error
    stack.kill("router", signal.SIGTERM)
    stack.start("router")
    with stack.client() as client:
        assert client.chat("meaning of life").specialist == "philosopher"


def test_worker_gone_for_good_fails_after_one_bounded_wait(make_stack) -> None:
    stack = make_stack()
    thread, outcome = chat_in_background(stack, "math code [[fake:slow:voice]]")
    wait_busy(stack, "voice")
    killed = time.monotonic()
    stack.kill("voice")
    thread.join(timeout=20)
    assert isinstance(outcome.error, LyraError) and outcome.error.code == "worker_dead", outcome.error
    assert "re-run voice" in outcome.error.message
    assert outcome.ended_at - killed < 2 * 1.5 + 1.0  # detection + one wait, each a heartbeat timeout
    assert any(isinstance(e, StageRestartedEvent) for e in outcome.events)


@pytest.mark.parametrize("restart", [True, False], ids=["restarted", "gone"])
def test_coordinator_sigkill_ends_the_waiting_request_within_5s(make_stack, restart: bool) -> None:
    stack = make_stack(runtime__heartbeat_interval_s=1.0, runtime__heartbeat_timeout_s=3.0,
                       **slow_router(20.0))
    thread, outcome = chat_in_background(stack, "math code")
    assert outcome.accepted.wait(10)
    wait_busy(stack, "router")
    killed = time.monotonic()
    stack.kill("coordinator")
    if restart:
        stack.start("coordinator")  # supervisord brings it back in about half a second
    thread.join(timeout=10)
    assert isinstance(outcome.error, CoordinatorRestartedError), outcome.error
    assert outcome.error.code == "coordinator_restarted"
    assert outcome.ended_at - killed < 5.0
    if restart:
        assert "restarted (instance" in outcome.error.message


def test_sigterm_lets_the_running_request_finish_and_refuses_the_waiting_one(make_stack) -> None:
    stack = make_stack(runtime__drain_s=5.0, **slow_router(1.0))
    running, first = chat_in_background(stack, "math code")
    assert first.accepted.wait(10)
    waiting, second = chat_in_background(stack, "meaning of life")
    assert second.accepted.wait(10)
    stack.kill("coordinator", signal.SIGTERM)
    running.join(timeout=10)
    waiting.join(timeout=10)
    assert first.error is None and isinstance(first.events[-1], DoneEvent), first.error
    assert isinstance(second.error, LyraError) and second.error.code == "shutting_down", second.error
    assert stack.procs["coordinator"].returncode == 0


def test_sigterm_ends_a_request_that_outlasts_drain_s_with_shutting_down(make_stack) -> None:
    stack = make_stack(runtime__drain_s=0.5, **slow_router(10.0))
    thread, outcome = chat_in_background(stack, "math code")
    wait_busy(stack, "router")
    stopped = time.monotonic()
    stack.kill("coordinator", signal.SIGTERM)
    thread.join(timeout=10)
    assert isinstance(outcome.error, LyraError) and outcome.error.code == "shutting_down", outcome.error
    assert outcome.ended_at - stopped < 0.5 + 1.5


def test_a_caller_slow_to_consume_its_stream_is_not_told_the_coordinator_restarted(make_stack) -> None:
    stack = make_stack(**slow_router(0.3))
    with stack.client() as client:
        events = []
        for event in client.stream("math code"):
            events.append(event)
            if len(events) < 3:
                time.sleep(1.0)  # five keepalive intervals without reading the socket
    assert isinstance(events[-1], DoneEvent)
