"""The real coordinator against fake workers running as subprocesses."""

from __future__ import annotations

import threading
import time

import pytest

from shared.client import BusyError, CancelledError, DeadlineError, WorkerDeadError
from shared.wire.messages import (
    AcceptedEvent,
    DoneEvent,
    ErrorEvent,
    RouteEvent,
    StageFinishedEvent,
    StageStartedEvent,
    TokenEvent,
)
from tests.stackproc import slow_router


def test_one_chat_streams_every_event_in_order(make_stack) -> None:
    stack = make_stack(voice__fake={"token_delay_s": 0.001})  # its own stack: this request loads the pragmatist
    with stack.client() as client:
        events = list(client.stream("how do I do math with code"))
    kinds = [type(e).__name__ for e in events if not isinstance(e, TokenEvent)]
    assert kinds == [
        "AcceptedEvent", "StageStartedEvent", "StageFinishedEvent", "RouteEvent",
        "StageStartedEvent", "StageFinishedEvent",  # load
        "StageStartedEvent", "StageFinishedEvent",  # specialist
        "StageStartedEvent", "StageFinishedEvent",  # voice
        "DoneEvent",
    ]
    stages = [e.stage for e in events if isinstance(e, StageStartedEvent)]
    assert stages == ["route", "load", "specialist", "voice"]
    assert all(e.parent_id == events[0].parent_id for e in events)
    route = next(e for e in events if isinstance(e, RouteEvent))
    assert route.specialist == "pragmatist" and abs(sum(route.scores.values()) - 1) < 1e-9
    done = events[-1]
    assert isinstance(done, DoneEvent)
    voice_tokens = "".join(e.text for e in events if isinstance(e, TokenEvent) and e.stage == "voice")
    assert voice_tokens == done.answer and done.answer.startswith("[voice]")
    assert set(done.timings) >= {"queue", "route", "load", "specialist", "voice", "total"}
    assert [g.gpu for g in done.vram] == [0, 1]
    assert "specialist_host:pragmatist" in done.vram[1].resident
    finished = {e.stage: e.seconds for e in events if isinstance(e, StageFinishedEvent)}
    assert finished.keys() == {"route", "load", "specialist", "voice"}


def test_forced_specialist_skips_the_router(shared_stack) -> None:
    stack = shared_stack()
    with stack.client() as client:
        events = list(client.stream("how do I do math", specialist="philosopher"))
    route = next(e for e in events if isinstance(e, RouteEvent))
    assert route.forced and route.specialist == "philosopher"
    assert "route" not in [e.stage for e in events if isinstance(e, StageStartedEvent)]


def test_fifty_requests_from_five_clients_all_complete_in_fifo_order(shared_stack) -> None:
    stack = shared_stack()
    with stack.client() as client:
        before = client.status().counters
    results: list[DoneEvent] = []
    accepted: dict[str, int] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client_thread(n: int) -> None:
        try:
            with stack.client() as client:
                for i in range(10):
                    topic = "meaning of life" if (n + i) % 2 else "math code"
                    for event in client.stream(f"client {n} request {i} {topic}"):
                        with lock:
                            if isinstance(event, AcceptedEvent):
                                accepted[event.parent_id] = event.ticket
                            elif isinstance(event, DoneEvent):
                                results.append(event)
        except BaseException as exc:  # reported below with the thread's context
            errors.append(exc)

    threads = [threading.Thread(target=client_thread, args=(n,)) for n in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == 50 and len({r.parent_id for r in results}) == 50
    by_completion = sorted(results, key=lambda r: r.sent_at)
    tickets = [r.ticket for r in by_completion]
    assert tickets == sorted(tickets), "requests did not run in acceptance order"
    assert all(accepted[r.parent_id] == r.ticket for r in results)
    with stack.client() as client:
        counters = client.status().counters
    assert counters["completed"] - before["completed"] == 50 and counters["failed"] == before["failed"]


SLOW_ROUTER = {"runtime__queue_size": 2, **slow_router(0.5)}  # one running, two waiting


def test_full_queue_answers_busy_with_the_depth(shared_stack) -> None:
    stack = shared_stack(**SLOW_ROUTER)
    first = [stack.client() for _ in range(3)]
    streams = [c.stream("math code") for c in first]
    for s in streams:  # each gets accepted: one running, two waiting
        assert isinstance(next(s), AcceptedEvent)
    with stack.client() as extra, pytest.raises(BusyError) as err:
        extra.chat("one too many")
    assert err.value.event.queue_depth == 2 and "busy" in err.value.message
    for s, c in zip(streams, first, strict=True):
        assert isinstance(list(s)[-1], DoneEvent)
        c.close()


@pytest.mark.parametrize("service,stage", [("router", "route"), ("specialist_host", "specialist"),
                                           ("voice", "voice")])
def test_worker_killed_mid_stage_fails_the_request_then_recovers(shared_stack, service: str, stage: str) -> None:
    stack = shared_stack()  # left as found: the killed worker is started again
    outcome: dict[str, object] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            with stack.client() as client:
                client.chat(f"math code [[fake:slow:{service}]]")
        except Exception as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    _wait_busy(stack, service)
    stack.kill(service)
    thread.join(timeout=30)
    error = outcome.get("error")
    assert isinstance(error, WorkerDeadError), error
    assert error.service == service and stage in error.message
    assert outcome["seconds"] < 5.0 + 1.0  # within the stage deadline
    stack.start(service)
    stack.wait_ready()
    with stack.client() as client:
        assert client.chat("math code").specialist == "pragmatist"


def _wait_busy(stack, service: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    with stack.client() as client:
        while time.monotonic() < deadline:
            if any(s.service == service and s.state == "busy" for s in client.status().services):
                return
            time.sleep(0.02)
    raise AssertionError(f"{service} never became busy")


def test_hung_worker_gives_a_deadline_error_and_the_stack_recovers(make_stack) -> None:
    stack = make_stack(deadlines__route=1.0, runtime__cancel_grace_s=0.5)  # the hung router exits 0.5 s past its cancel
    started = time.monotonic()
    with stack.client() as client, pytest.raises(DeadlineError) as err:
        client.chat("math [[fake:hang:router]]")
    assert time.monotonic() - started < 3.0
    assert err.value.service == "router" and "deadline" in err.value.message
    # The router ignores the cancel; its watchdog exits after cancel_grace_s. Restart it as supervisord would.
    stack.procs["router"].wait(timeout=10)
    stack.start("router")
    stack.wait_ready()
    with stack.client() as client:
        assert client.chat("math code").specialist == "pragmatist"


def test_client_that_disconnects_mid_stream_frees_the_pipeline(make_stack) -> None:
    stack = make_stack(voice__fake={"token_delay_s": 0.05, "triggers": True})
    client = stack.client()
    stream = client.stream("math code " + "word " * 100)
    for event in stream:
        if isinstance(event, TokenEvent) and event.stage == "voice":
            break
    client.sock.close()  # vanish without a polite cancel
    client.ctx.term()
    started = time.monotonic()
    with stack.client() as other:
        done = other.chat("meaning of life", max_new_tokens=3)
    assert done.specialist == "philosopher"
    assert time.monotonic() - started < 3.0  # not the ~5 s the abandoned answer would take
    with stack.client() as other:
        assert other.status().counters["cancelled"] == 1


def test_cancel_while_queued_and_while_running(shared_stack) -> None:
    stack = shared_stack(**SLOW_ROUTER)
    with stack.client() as c:
        before = c.status().counters["completed"]
    with stack.client() as a, stack.client() as b:
        first = a.stream("math code")
        second = b.stream("meaning")
        assert isinstance(next(first), AcceptedEvent)
        assert isinstance(next(second), AcceptedEvent)
        second.close()  # polite cancel of the waiting request
        first.close()  # and of the running one
    with stack.client() as c:
        assert c.chat("math code").specialist == "pragmatist"
        counters = c.status().counters
    assert counters["completed"] == before + 1


def test_cancelled_error_type(shared_stack) -> None:
    stack = shared_stack(**SLOW_ROUTER)
    with stack.client() as a, stack.client() as b:
        stream = a.stream("math code")
        accepted = next(stream)
        from shared.wire import transport
        from shared.wire.messages import CancelRequest
        transport.send(b.sock, CancelRequest(parent_id=accepted.parent_id))
        with pytest.raises(CancelledError):
            list(stream)


def test_over_budget_swap_is_refused_with_the_arithmetic_and_loads_nothing(make_stack) -> None:
    from shared.client import OverBudgetError

    stack = make_stack(specialists__philosopher__memory_gb=60.0)  # GPU 1 budget is 47 GB
    with stack.client() as client:
        assert client.chat("math code").specialist == "pragmatist"
        with pytest.raises(OverBudgetError) as err:
            client.chat("meaning of life", specialist="philosopher")
        status = client.status()
    text = err.value.message
    assert "GPU 1" in text and "budget 47.00 GB" in text and "over by" in text and "lyra plan" in text
    host = next(s for s in status.services if s.service == "specialist_host")
    assert host.resident == ["pragmatist"]  # nothing unloaded, nothing loaded
    assert status.counters["swaps"] == 1 and status.counters["failed"] == 1



def test_a_client_slower_than_its_stream_still_gets_every_token(shared_stack) -> None:
    # 3,000 voice pieces with no delay, to a client that keeps only 8 frames and reads nothing for 1.5 s:
    # more than zmq and the kernel hold for it, so the rest wait in the coordinator (runtime.client_queue_mb)
    # instead of the request being cancelled as if the client had left.
    import zmq

    from shared.client import build_request
    from shared.wire import transport

    stack = shared_stack()  # fake workers without delays
    prompt = " ".join(f"{i:04d}" + "x" * 60 for i in range(3000))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 8)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(stack.endpoint)
    client = transport.Endpoint(sock, 64 * 1024 * 1024)
    try:
        request = build_request(prompt, specialist="pragmatist", max_new_tokens=3100)
        transport.send(client, request.model_copy(update={"secret": stack.secret}))
        time.sleep(1.5)  # the whole answer is produced meanwhile
        events = []
        while not events or not isinstance(events[-1], (DoneEvent, ErrorEvent)):
            got = transport.recv_timeout(client, 10)
            assert got is not None and got.message is not None, got
            events.append(got.message)
    finally:
        sock.close(0)
        ctx.term()
    done = events[-1]
    assert isinstance(done, DoneEvent), done
    pieces = [e.text for e in events if isinstance(e, TokenEvent) and e.stage == "voice"]
    assert len(pieces) > 2000 and "".join(pieces) == done.answer


def test_answer_only_events_leave_out_stages_and_the_specialists_tokens(shared_stack) -> None:
    stack = shared_stack()
    with stack.client() as client:
        events = list(client.stream("how do I do math with code", events="answer"))
    kinds = {type(e).__name__ for e in events}
    assert kinds == {"AcceptedEvent", "RouteEvent", "TokenEvent", "DoneEvent"}, kinds
    assert {e.stage for e in events if isinstance(e, TokenEvent)} == {"voice"}
    done = events[-1]
    assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == done.answer
    assert set(done.timings) >= {"route", "specialist", "voice"}  # the stage timings still travel in `done`


def test_counters_tell_swaps_from_requests_that_found_their_model_loaded(make_stack) -> None:
    stack = make_stack()
    with stack.client() as client:
        for name in ("pragmatist", "pragmatist", "philosopher"):
            client.chat("hello", specialist=name, max_new_tokens=2)
        status = client.status()
    assert status.counters["swaps"] == 2 and status.counters["already_resident"] == 1
    assert [(s.unloaded, s.loaded) for s in status.swaps] == [(None, "pragmatist"), ("pragmatist", "philosopher")]
