"""The client's request session without sockets: answers in, terminal event, restarts, silence, errors out."""

from __future__ import annotations

import logging

import pytest

from shared.client import (
    BusyError,
    ClientTimeoutError,
    CoordinatorRestartedError,
    InvalidRequestError,
    RequestSession,
)
from shared.client.session import FIRST_ANSWER_S, PROBE_INTERVALS, SILENT_INTERVALS, Due
from shared.wire.messages import (
    AcceptedEvent,
    CancelRequest,
    ChatRequest,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    ProgressEvent,
    StatusReply,
    StatusRequest,
    TokenEvent,
)

KEEPALIVE_S = 1.0


def chat(timeout_s: float = 60.0, **kwargs) -> RequestSession:
    return RequestSession(ChatRequest(text="hi"), now=0.0, timeout_s=timeout_s, endpoint="ipc:///x.sock",
                          secret="s3cret", **kwargs)


def accepted(session: RequestSession, instance: str = "c1") -> AcceptedEvent:
    return AcceptedEvent(parent_id=session.request.id, coordinator=instance, position=0, queue_depth=1,
                         keepalive_s=KEEPALIVE_S)


def token(session: RequestSession, text: str = "x", instance: str = "c1") -> TokenEvent:
    return TokenEvent(parent_id=session.request.id, coordinator=instance, stage="voice", text=text)


def done(session: RequestSession, answer: str = "x") -> DoneEvent:
    return DoneEvent(parent_id=session.request.id, coordinator="c1", answer=answer, specialist="pragmatist",
                     scores={}, timings={})


def status_reply(parent_id: str | None, instance: str = "c1") -> StatusReply:
    return StatusReply(parent_id=parent_id, coordinator=instance, services=[], gpus=[], queue_depth=0, running=None,
                       client_endpoint="ipc:///x.sock")


def test_the_terminal_event_ends_the_request_exactly_once() -> None:
    session = chat()
    assert session.on_message(accepted(session), 0.1) is not None
    assert session.on_message(token(session), 0.2) is not None and not session.finished
    end = done(session)
    assert session.on_message(end, 0.3) is end and session.finished
    assert session.on_message(token(session), 0.4) is None  # nothing passes after the end
    assert session.abandon() is None  # an ended request needs no cancel


def test_a_second_terminal_event_is_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    session = chat()
    session.on_message(done(session, "first"), 0.1)
    with caplog.at_level(logging.WARNING, logger="shared.client.session"):
        assert session.on_message(done(session, "second"), 0.2) is None
        error = ErrorEvent(parent_id=session.request.id, code=ErrorCode.cancelled, message="late")
        assert session.on_message(error, 0.3) is None  # not raised either
    assert [r.getMessage() for r in caplog.records] == [
        f"request {session.request.id}: dropped a done_event after its terminal event",
        f"request {session.request.id}: dropped a error_event after its terminal event"]


def test_events_of_another_request_and_progress_events_are_not_passed_on() -> None:
    session = chat()
    other = ChatRequest(text="other")
    assert session.on_message(TokenEvent(parent_id=other.id, text="no"), 0.1) is None
    assert session.on_message(DoneEvent(parent_id=other.id, answer="no", specialist="p", scores={}, timings={}),
                              0.2) is None
    assert session.on_message(ProgressEvent(parent_id=session.request.id, coordinator="c1"), 0.3) is None
    assert not session.finished


def test_an_error_event_is_raised_as_its_typed_error_and_needs_no_cancel() -> None:
    session = chat()
    busy = ErrorEvent(parent_id=session.request.id, code=ErrorCode.busy, message="queue full; retry later")
    with pytest.raises(BusyError, match="queue full") as raised:
        session.on_message(busy, 0.1)
    assert raised.value.event == busy and session.finished and session.abandon() is None
    returned = chat(raise_errors=False)  # `AsyncClient.events` hands the event over instead
    event = busy.model_copy(update={"parent_id": returned.request.id})
    assert returned.on_message(event, 0.1) is event and returned.finished


def test_a_changed_coordinator_instance_id_raises_the_restart_error() -> None:
    session = chat()
    session.on_message(accepted(session, "c1"), 0.1)
    with pytest.raises(CoordinatorRestartedError, match="instance c1 -> c2") as raised:
        session.on_message(token(session, instance="c2"), 0.2)
    assert raised.value.code == ErrorCode.coordinator_restarted.value
    cancel = session.abandon()  # the caller's wait ended: the (lost) request is cancelled, once
    assert isinstance(cancel, CancelRequest) and cancel.parent_id == session.request.id and cancel.secret == "s3cret"
    assert session.abandon() is None


def test_silence_past_the_keepalive_deadline_probes_then_raises_the_restart_error() -> None:
    session = chat()
    session.on_message(accepted(session), 0.0)
    quiet_until = SILENT_INTERVALS * KEEPALIVE_S
    assert session.wake_at() == quiet_until
    assert session.on_clock(quiet_until - 0.01).probe is None
    probe = session.on_clock(quiet_until).probe
    assert isinstance(probe, StatusRequest) and probe.secret == "s3cret"
    assert session.wake_at() == quiet_until + PROBE_INTERVALS * KEEPALIVE_S
    due = session.on_clock(session.wake_at())
    assert isinstance(due.error, CoordinatorRestartedError) and "no word from the coordinator" in due.error.message


def test_an_answered_probe_resets_the_silence_and_a_probe_from_another_instance_is_a_restart() -> None:
    session = chat()
    session.on_message(accepted(session), 0.0)
    probe = session.on_clock(3.0).probe
    assert probe is not None
    assert session.on_message(status_reply(probe.id), 3.5) is None  # not an answer to the chat request
    assert session.wake_at() == 3.5 + SILENT_INTERVALS * KEEPALIVE_S and session.on_clock(4.0).error is None
    second = session.on_clock(6.5).probe
    assert second is not None
    with pytest.raises(CoordinatorRestartedError):
        session.on_message(status_reply(second.id, instance="c2"), 6.6)


def test_without_a_promised_keepalive_only_the_timeout_ends_the_wait() -> None:
    session = chat(timeout_s=30.0)
    session.on_message(accepted(session).model_copy(update={"keepalive_s": None}), 0.0)
    assert session.wake_at() == 30.0
    assert session.on_clock(29.9) == Due()  # nothing due
    due = session.on_clock(30.0)
    assert isinstance(due.error, ClientTimeoutError) and "ipc:///x.sock within 30 s" in due.error.message
    assert isinstance(session.abandon(), CancelRequest)  # a timed-out chat request is cancelled


def test_until_the_first_answer_the_driver_checks_every_second_that_anyone_serves_the_endpoint() -> None:
    session = chat()
    assert session.wake_at() == FIRST_ANSWER_S
    assert session.on_clock(FIRST_ANSWER_S).check_served
    assert session.wake_at() == 2 * FIRST_ANSWER_S and not session.on_clock(1.5).check_served
    session.on_message(ProgressEvent(parent_id="someone else's"), 1.6)  # any message proves someone is there
    assert session.wake_at() == 60.0 and not session.on_clock(2.5).check_served


def test_a_timeout_wins_over_an_unanswered_probe_and_is_checked_after_serving() -> None:
    session = chat(timeout_s=4.0)
    session.on_clock(FIRST_ANSWER_S)  # nobody answered yet
    due = session.on_clock(4.0)
    assert due.check_served and isinstance(due.error, ClientTimeoutError)


def test_idle_marks_come_every_idle_s_without_an_answer() -> None:
    session = chat(idle_s=0.5)
    session.on_message(accepted(session), 0.0)
    assert session.wake_at() == 0.5 and session.on_clock(0.5).idle
    assert session.wake_at() == 1.0 and not session.on_clock(0.75).idle
    session.on_message(token(session), 0.75)  # an answer restarts the quiet
    assert session.wake_at() == 1.25 and session.on_clock(1.25).idle


def test_an_unreadable_frame_fails_the_request_and_a_status_request_is_never_cancelled() -> None:
    session = chat()
    with pytest.raises(InvalidRequestError, match="unreadable message from the coordinator: bad msgpack"):
        session.on_unreadable(ErrorCode.bad_message.value, "bad msgpack")
    status = RequestSession(StatusRequest(), now=0.0, timeout_s=5.0)
    assert status.on_message(status_reply(status.request.id), 0.1) is not None and status.finished
    assert RequestSession(StatusRequest(), now=0.0, timeout_s=5.0).abandon() is None
