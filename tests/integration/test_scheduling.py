"""Swap policy against the real coordinator: early routing, preloading, grouping by specialist."""

from __future__ import annotations

import threading

from shared.wire.messages import AcceptedEvent, DoneEvent


def run_concurrently(stack, prompts: list[str]) -> list[DoneEvent]:
    """Send prompts in this order (each accepted before the next is sent); return done events."""
    results: list[DoneEvent] = []
    accepted = threading.Semaphore(0)

    def one(prompt: str) -> None:
        with stack.client() as client:
            for event in client.stream(prompt):
                if isinstance(event, AcceptedEvent):
                    accepted.release()
                elif isinstance(event, DoneEvent):
                    results.append(event)

    threads = []
    for prompt in prompts:
        thread = threading.Thread(target=one, args=(prompt,))
        thread.start()
        threads.append(thread)
        assert accepted.acquire(timeout=10)
    for thread in threads:
        thread.join(timeout=60)
    return sorted(results, key=lambda r: r.sent_at)


def tag(done: DoneEvent) -> str:
    """The request's letter: the fake specialist echoes the prompt, whose last word is the letter."""
    return done.specialist_output.split()[-2]


def test_preload_loads_the_next_specialist_while_voice_speaks(make_stack) -> None:
    stack = make_stack(scheduling={"preload": True},
                       voice__fake={"token_delay_s": 0.02, "triggers": True},
                       specialists__philosopher__fake={"load_s": 0.3, "triggers": True})
    first, second = run_concurrently(stack, ["math code first", "meaning of life second"])
    assert (first.specialist, second.specialist) == ("pragmatist", "philosopher")
    assert second.timings["load"] == 0.0  # already resident when its turn came
    with stack.client() as client:
        counters = client.status().counters
    assert counters["preloads"] == 1 and counters["preload_hits"] == 1 and counters["wasted_preloads"] == 0


def test_without_preload_the_swap_is_paid_in_the_request(make_stack) -> None:
    stack = make_stack(voice__fake={"token_delay_s": 0.02, "triggers": True},
                       specialists__philosopher__fake={"load_s": 0.3, "triggers": True})
    _, second = run_concurrently(stack, ["math code first", "meaning of life second"])
    assert second.timings["load"] >= 0.3
    with stack.client() as client:
        assert client.status().counters["preloads"] == 0


def test_grouping_runs_a_resident_specialist_request_first_within_the_bound(make_stack) -> None:
    stack = make_stack(scheduling={"max_overtakes": 1}, voice__fake={"token_delay_s": 0.02, "triggers": True})
    done = run_concurrently(stack, ["math code A", "meaning of life B", "math code C", "meaning of life D"])
    order = [tag(d) for d in done]
    assert order == ["A", "C", "B", "D"]  # C overtook B once; B was then due


def test_strict_fifo_by_default(make_stack) -> None:
    stack = make_stack(voice__fake={"token_delay_s": 0.02, "triggers": True})
    done = run_concurrently(stack, ["math code A", "meaning of life B", "math code C"])
    assert [tag(d) for d in done] == ["A", "B", "C"]
