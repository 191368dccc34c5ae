"""JobLifecycle: a request's events, and exactly one terminal event whoever tries to send a second."""

from __future__ import annotations

import threading

from services.coordinator.lifecycle import JobLifecycle
from shared.wire.messages import DoneEvent, ErrorCode, ErrorEvent, Message, ProgressEvent, StageRestartedEvent


def lifecycle() -> tuple[JobLifecycle, list[Message], list[str]]:
    sent: list[Message] = []
    outcomes: list[str] = []
    return JobLifecycle("req-1", sent.append, "coord-1", outcomes.append), sent, outcomes


def test_a_second_terminal_event_is_refused_and_logged(caplog) -> None:
    life, sent, outcomes = lifecycle()
    life.started("voice", "voice", "voice")
    life.token("hi", "voice")
    assert life.done(answer="hi", specialist="s", scores={"s": 1.0}, timings={"total": 0.1})
    assert not life.fail(ErrorCode.cancelled, "too late")
    assert not life.done(answer="again", specialist="s", scores={}, timings={})
    life.token("after the end", "voice")
    assert [m.type for m in sent] == ["stage_started_event", "token_event", "done_event"]
    assert outcomes == ["completed"]
    assert "second terminal event" in caplog.text and "req-1" in caplog.text
    assert all(m.parent_id == "req-1" and m.coordinator == "coord-1" for m in sent)


def test_racing_terminal_events_from_two_threads_send_exactly_one() -> None:
    for _ in range(50):
        life, sent, outcomes = lifecycle()
        start = threading.Barrier(2)

        def end(code: ErrorCode, life: JobLifecycle = life, start: threading.Barrier = start) -> None:
            start.wait(timeout=5)
            life.fail(code, code.value)

        threads = [threading.Thread(target=end, args=(c,)) for c in (ErrorCode.cancelled, ErrorCode.shutting_down)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=5)
        assert len([m for m in sent if isinstance(m, (DoneEvent, ErrorEvent))]) == 1 and len(outcomes) == 1


def test_restart_and_keepalive_events() -> None:
    life, sent, _ = lifecycle()
    life.keepalive(position=2, interval_s=0.0)
    life.started("voice", "voice", None)
    life.restarted("voice", "voice", 1, "voice restarted")
    life.keepalive(position=None, interval_s=0.0)
    life.keepalive(position=None, interval_s=60.0)  # just sent something: nothing to add
    progress = [m for m in sent if isinstance(m, ProgressEvent)]
    assert [(p.position, p.stage) for p in progress] == [(2, None), (None, "voice")]
    restarted = next(m for m in sent if isinstance(m, StageRestartedEvent))
    assert restarted.stage == "voice" and restarted.attempt == 1
    assert life.fail(ErrorCode.worker_dead, "gone", service="voice", stage="voice")
    assert life.ended and isinstance(life.terminal, ErrorEvent) and life.terminal.stage == "voice"
