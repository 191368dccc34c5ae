"""Coordinator logic without sockets: queue, ledger, request validation, voice prompt."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from services.coordinator.handlers import invalid_chat
from services.coordinator.ledger import Footprint, OverBudget, VramLedger, split_estimate
from services.coordinator.lifecycle import JobLifecycle
from services.coordinator.requests import Job, QueueFull, RequestQueue
from services.voice.handlers import compose_voice_prompt
from shared.config.schema import parse_config
from shared.config.units import GB
from shared.wire.messages import ChatRequest, ChatTurn, MemoryReading, SynthesizeRequest
from tests.stackproc import fake_config


def job(text: str = "x") -> Job:
    request = ChatRequest(text=text)
    return Job(request=request, peer=b"p", life=JobLifecycle(request.id, lambda _: None, "c-test"))


def test_queue_is_fifo_bounded_and_cancellable() -> None:
    q = RequestQueue(size=2)
    a, b, c = job(), job(), job()
    assert q.offer(a) == 0 and q.offer(b) == 1
    with pytest.raises(QueueFull):
        q.offer(c)
    assert q.take(0.1) is a and q.running is a
    assert q.offer(c) == 2  # b waits, a runs
    assert q.remove(b.id) is b and q.find(b.id) is None
    q.finish(a)
    assert q.take(0.1) is c
    assert [j.ticket for j in (a, b, c)] == [1, 2, 3]


def test_queue_take_times_out_and_drain_returns_waiting() -> None:
    q = RequestQueue(size=4)
    assert q.take(0.05) is None
    waiting = [job(), job()]
    for j in waiting:
        q.offer(j)
    assert q.drain() == waiting and q.take(0.01) is None


def ledger(tmp_path: Path, held: list[Footprint]) -> VramLedger:
    """A ledger whose lines come from `held` (the registry's record, in the coordinator), read at each use."""
    return VramLedger(parse_config(fake_config(tmp_path)), lambda: list(held))


def test_ledger_admits_within_budget_and_refuses_with_arithmetic(tmp_path: Path) -> None:
    book = ledger(tmp_path, [Footprint("voice", ("voice",), {0: 15 * GB, 1: 15 * GB})])
    book.check("specialist_host", "pragmatist", {1: 30 * GB})  # 15 + 0.5 + 30 + 0.5 = 46 <= 47
    with pytest.raises(OverBudget) as err:
        book.check("specialist_host", "big", {1: 32 * GB})
    text = str(err.value)
    assert "GPU 1" in text and "over by 1.00 GB" in text and "budget 47.00 GB" in text


def test_ledger_uses_measured_bytes_and_warns_when_estimate_is_off(tmp_path: Path) -> None:
    reading = MemoryReading(device="gpu:1", allocated_bytes=12 * GB, reserved_bytes=12 * GB)
    held = [Footprint("specialist_host", ("a",), {1: 10 * GB}, (reading,))]
    book = ledger(tmp_path, held)
    warnings = book.estimate_warnings("specialist_host")
    assert warnings and "estimated 10.00 GB" in warnings[0]
    assert book.used(1) == 12 * GB + int(0.5 * GB)
    snap = {g.gpu: g for g in book.snapshot()}
    assert snap[1].measured_bytes == 12 * GB and snap[1].resident == ["specialist_host:a"]
    held[:] = [Footprint("specialist_host", (), {})]  # the host reported holding nothing
    assert book.used(1) == 0 and book.snapshot()[1].resident == []


def test_split_estimate_spreads_over_the_process_gpus(tmp_path: Path) -> None:
    config = parse_config(fake_config(tmp_path))
    assert split_estimate(config.voice, [0, 1]) == {0: 15 * GB, 1: 15 * GB}
    assert split_estimate(config.voice, []) == {}


@pytest.mark.parametrize("request_,problem", [
    (ChatRequest(text=" "), "needs `text`"),
    (ChatRequest(text="x", specialist="nope"), "unknown specialist"),
    (ChatRequest(messages=[ChatTurn(role="user", content="a"), ChatTurn(role="assistant", content="b")]),
     "must be the user's"),
    (ChatRequest(text="fine"), None),
])
def test_chat_validation(tmp_path: Path, request_: ChatRequest, problem: str | None) -> None:
    found = invalid_chat(parse_config(fake_config(tmp_path)), request_)
    assert (found is None) if problem is None else (problem in found)


def test_voice_prompt_carries_persona_history_and_specialist_notes() -> None:
    msg = SynthesizeRequest(messages=[ChatTurn(role="user", content="hi"), ChatTurn(role="assistant", content="yo"),
                                      ChatTurn(role="user", content="what is 2+2?")],
                            specialist="pragmatist", specialist_output="4")
    turns = compose_voice_prompt("You are Lyra.", msg)
    assert [t.role for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[0].content.startswith("You are Lyra.")
    assert "pragmatist" in turns[0].content and "\n4\n" in turns[0].content
    assert turns[-1].content == "what is 2+2?"


def test_job_stop_is_idempotent_and_keeps_the_first_reason() -> None:
    j = job()
    j.stop("client gone")
    j.stop("shutdown")
    assert j.cancel.is_set() and j.cancel_reason == "client gone"
    assert isinstance(j.cancel, threading.Event)


def test_calibration_removes_a_label_prior_and_keeps_a_distribution() -> None:
    import math

    from services.router.handlers import calibrated

    biased = {"artist": 0.6, "pragmatist": 0.3, "philosopher": 0.1}
    prior = {"artist": math.log(0.8), "pragmatist": math.log(0.1), "philosopher": math.log(0.1)}
    scores = calibrated(biased, prior)
    assert abs(sum(scores.values()) - 1) < 1e-9
    assert max(scores, key=scores.get) == "pragmatist"  # 0.3/0.1 beats 0.6/0.8
    uniform = {k: math.log(1 / 3) for k in biased}
    assert calibrated(biased, uniform) == pytest.approx(biased)


def test_the_pacer_allows_a_burst_then_the_rate_and_forgets_idle_clients() -> None:
    from services.coordinator.intake import IDLE_PEER_S, ClientPacer

    now = [0.0]
    pacer = ClientPacer(frames_per_s=10, bytes_per_s=1000, clock=lambda: now[0])
    assert all(pacer.admit(b"a", 10) for _ in range(10)) and not pacer.admit(b"a", 10)
    assert pacer.admit(b"b", 10)  # another client has its own budget
    now[0] += 0.5
    assert sum(pacer.admit(b"a", 10) for _ in range(10)) == 5
    now[0] += 1.0
    assert pacer.admit(b"a", 5000)  # larger than the whole budget: allowed once the bucket is full ...
    assert not pacer.admit(b"a", 1)  # ... and it empties the bucket
    now[0] += IDLE_PEER_S + 1
    pacer.admit(b"c", 1)
    assert set(pacer.buckets) == {b"c"}
