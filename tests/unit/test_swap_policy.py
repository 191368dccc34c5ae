"""Swap policy: grouping by specialist within the fairness bound, and swaps that never break a budget."""

from __future__ import annotations

import threading
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from services.coordinator.lifecycle import JobLifecycle
from services.coordinator.requests import Job, RequestQueue, Route
from services.coordinator.workers import StageError
from shared.config.schema import parse_config
from shared.config.units import GB
from shared.wire.messages import ChatRequest
from tests.stackproc import fake_config
from tests.unit.simulated_host import SimulatedStack

NAMES = ["a", "b", "c"]


def make_job(specialist: str) -> Job:
    request = ChatRequest(text="x")
    job = Job(request=request, peer=b"p", life=JobLifecycle(request.id, lambda _: None, "c-test"))
    job.route = Route(specialist, {specialist: 1.0}, False)
    return job


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(NAMES), min_size=1, max_size=30), st.integers(0, 4),
       st.lists(st.sampled_from(NAMES), max_size=30))
def test_grouping_never_overtakes_a_request_more_than_n_times(first: list[str], n: int, later: list[str]) -> None:
    queue = RequestQueue(size=100, max_overtakes=n)
    jobs = [make_job(s) for s in first]
    for job in jobs:
        queue.offer(job)
    resident, order, arrivals = None, [], iter(later)
    while True:
        job = queue.take(0, resident)
        if job is None:
            break
        order.append(job)
        resident = job.route.specialist
        queue.finish(job)
        arrival = next(arrivals, None)  # requests keep arriving while others run
        if arrival is not None:
            extra = make_job(arrival)
            jobs.append(extra)
            queue.offer(extra)
    assert sorted(j.ticket for j in order) == sorted(j.ticket for j in jobs)  # every request ran once
    assert all(j.overtaken <= n for j in jobs)
    for job in order:  # overtaken = how many later tickets ran before it
        before = order[:order.index(job)]
        assert sum(other.ticket > job.ticket for other in before) == job.overtaken
    if n == 0:
        assert [j.ticket for j in order] == sorted(j.ticket for j in jobs)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(NAMES), min_size=1, max_size=25),
       st.lists(st.floats(5, 40), min_size=3, max_size=3))
def test_random_swaps_never_put_a_gpu_over_budget(sequence: list[str], sizes: list[float]) -> None:
    raw = fake_config(Path("/tmp/lyra-sim"), specialists={
        name: {"backend": "fake", "memory_gb": size} for name, size in zip(NAMES, sizes, strict=True)})
    config = parse_config(raw)
    stack = SimulatedStack(config)  # voice 15 + 15 GB and router 8 GB resident, from their memory_gb
    ledger, residency = stack.ledger, stack.residency
    refused = 0
    for specialist in sequence:
        if stack.held == [specialist]:
            continue
        try:
            with residency.lock:
                residency.swap_to(specialist, "p", threading.Event())
        except StageError as exc:
            refused += 1
            assert exc.code.value == "over_budget" and "GB" in exc.message
        for gpu in (0, 1):
            assert ledger.used(gpu) <= ledger.budget(gpu)
    fits = {n for n, s in zip(NAMES, sizes, strict=True) if (15 + 0.5 + s + 0.5) * GB <= 47 * GB}
    assert refused == 0 or set(sequence) - fits
