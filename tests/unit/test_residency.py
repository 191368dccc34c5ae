"""One record of what each worker holds: the registry's, from the workers' own reports; the ledger's lines,
the preload record and where a call may go are derived from it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from services.coordinator.workers import Needs, StageError
from shared.config.schema import parse_config
from shared.wire.messages import (
    ChatTurn,
    ErrorCode,
    LoadRequest,
    Message,
    RunSpecialistRequest,
    SpecialistReply,
    WorkerError,
)
from shared.wire.names import SPECIALIST_HOST
from tests.stackproc import fake_config
from tests.unit.simulated_host import SimulatedStack

HOST = SPECIALIST_HOST


@pytest.fixture
def stack(tmp_path: Path) -> SimulatedStack:
    return SimulatedStack(parse_config(fake_config(tmp_path)))


def host_line(stack: SimulatedStack) -> list[str]:
    return [name for name in stack.ledger.snapshot()[1].resident if name.startswith(HOST)]


def swap(stack: SimulatedStack, specialist: str) -> None:
    with stack.residency.lock:
        stack.residency.swap_to(specialist, "r", threading.Event())


def test_a_heartbeat_reporting_another_resident_set_changes_what_the_ledger_shows(stack: SimulatedStack) -> None:
    swap(stack, "pragmatist")
    assert host_line(stack) == ["specialist_host:pragmatist"]
    # The host finished a load its caller had given up on (a deadline): its next heartbeat says so.
    stack.held = ["philosopher"]
    stack.heartbeat(HOST, ["philosopher"])
    assert host_line(stack) == ["specialist_host:philosopher"]
    assert stack.residency.resident() == "philosopher"
    assert stack.ledger.used(1) == int((15 + 0.5 + 25 + 0.5) * 1e9)  # voice's half, the philosopher, two contexts
    stack.heartbeat(HOST, [])
    assert host_line(stack) == [] and stack.residency.resident() is None


def test_an_unload_reply_is_recorded_even_when_the_load_after_it_fails(stack: SimulatedStack) -> None:
    swap(stack, "pragmatist")
    answer = stack.send

    def refuse_loads(service: str, msg: Message, instance: str = "") -> None:
        if isinstance(msg, LoadRequest):  # the host answers the load with an error: nothing new is resident
            stack.registry.deliver(service, WorkerError(parent_id=msg.id, code=ErrorCode.internal, service=service,
                                                        message="the load failed"))
            return
        answer(service, msg, instance)

    stack.registry.send = refuse_loads
    with pytest.raises(StageError):
        swap(stack, "philosopher")
    assert stack.residency.resident() is None and host_line(stack) == []
    with stack.residency.lock:
        assert stack.residency.claim("pragmatist") is False  # no request runs against a specialist that left


def test_a_preload_lost_to_a_host_restart_is_not_counted_as_a_hit(stack: SimulatedStack) -> None:
    assert stack.residency.preload("philosopher", "next", threading.Event()) is not None
    stack.restart_host()  # the preloaded weights went with the process
    with stack.residency.lock:
        assert not stack.residency.claim("philosopher")
    swap(stack, "philosopher")  # the request that needed it loads it itself
    with stack.residency.lock:
        assert stack.residency.claim("philosopher")
    counters = stack.counters.values
    assert counters["preloads"] == 1 and counters["preload_hits"] == 0 and counters["already_resident"] == 1


def test_a_preload_unloaded_before_its_request_is_counted_as_wasted(stack: SimulatedStack) -> None:
    stack.residency.preload("philosopher", "next", threading.Event())
    swap(stack, "pragmatist")
    assert stack.counters.values["wasted_preloads"] == 1


def run(stack: SimulatedStack, specialist: str) -> SpecialistReply:
    request = RunSpecialistRequest(model=specialist, messages=[ChatTurn(role="user", content="x")])
    needs = Needs(specialist, lambda: stack.residency.restore(specialist, "r", threading.Event()))
    items = list(stack.registry.call(HOST, request, 5.0, threading.Event(), "specialist", 1.0, needs))
    assert isinstance(items[-1], SpecialistReply)
    return items[-1]


def test_a_call_needing_a_specialist_reloads_it_into_a_restarted_host_first(stack: SimulatedStack) -> None:
    swap(stack, "pragmatist")
    instance = stack.restart_host()
    assert run(stack, "pragmatist").text == "ran"
    kinds = [(type(msg).__name__, to) for _, msg, to in stack.sent[-2:]]
    assert kinds == [("LoadRequest", instance), ("RunSpecialistRequest", instance)]


def test_a_call_resent_after_the_host_restarted_reloads_its_specialist_first(stack: SimulatedStack) -> None:
    """The host exits as the call is sent (`supervisorctl restart` between two requests): the call goes again,
    to the new instance, once it holds the specialist."""
    swap(stack, "pragmatist")
    stack.die_before = RunSpecialistRequest
    assert run(stack, "pragmatist").text == "ran"
    runs = [to for _, msg, to in stack.sent if isinstance(msg, RunSpecialistRequest)]
    assert len(runs) == 2 and runs[0] != runs[1] == stack.registry.holding(HOST).instance
    assert stack.held == ["pragmatist"]
