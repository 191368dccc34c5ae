"""The native asyncio client: many requests on one socket, each answered in full and in its own order."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.client import IDLE, AsyncClient, BusyError, ClientTimeoutError, CoordinatorRestartedError
from shared.wire.messages import AcceptedEvent, DoneEvent, RouteEvent, TokenEvent
from tests.stackproc import slow_router


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def test_twenty_concurrent_requests_on_one_client_each_get_their_own_answer(shared_stack) -> None:
    stack = shared_stack()  # fake workers without delays; the queue holds 64
    with stack.client() as client:
        before = client.status().counters["completed"]

    async def main() -> list[tuple[str, list]]:
        async with AsyncClient(stack.endpoint, timeout_s=30) as lyra:
            async def one(i: int) -> tuple[str, list]:
                topic = "meaning of life" if i % 2 else "math code"
                return topic, [e async for e in lyra.stream(f"request {i} {topic}")]
            return await asyncio.gather(*(one(i) for i in range(20)))

    outcomes = run(main())
    ids = set()
    for topic, events in outcomes:
        assert isinstance(events[0], AcceptedEvent) and isinstance(events[-1], DoneEvent)
        assert {e.parent_id for e in events} == {events[0].parent_id}  # nothing of another request
        done = events[-1]
        assert done.specialist == ("philosopher" if topic.startswith("meaning") else "pragmatist")
        streamed = "".join(e.text for e in events if isinstance(e, TokenEvent) and e.stage == "voice")
        assert streamed == done.answer
        ids.add(done.parent_id)
    assert len(ids) == 20
    with stack.client() as client:
        assert client.status().counters["completed"] == before + 20


def test_leaving_the_stream_early_cancels_the_request(make_stack) -> None:
    stack = make_stack(voice__fake={"token_delay_s": 0.05, "triggers": True})

    async def main() -> float:
        async with AsyncClient(stack.endpoint, timeout_s=30) as lyra:
            async for event in lyra.stream("math code " + "word " * 100):
                if isinstance(event, TokenEvent) and event.stage == "voice":
                    break
            started = time.monotonic()
            done = await lyra.chat("meaning of life", max_new_tokens=3)
            assert done.specialist == "philosopher"
            return time.monotonic() - started

    assert run(main()) < 3.0  # not the ~5 s the abandoned answer would take
    with stack.client() as client:
        assert client.status().counters["cancelled"] == 1


def test_busy_timeout_status_and_idle_marks(make_stack) -> None:
    stack = make_stack(runtime__queue_size=1, **slow_router(0.6))

    async def main() -> None:
        async with AsyncClient(stack.endpoint, timeout_s=30) as lyra:
            slow = lyra.stream("math code", idle_s=0.1)
            assert isinstance(await slow.__anext__(), AcceptedEvent)
            deadline = time.monotonic() + 10  # accepted is not yet running: wait until it leaves the queue
            while (await lyra.status()).queue_depth and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            queued = lyra.stream("math code")
            assert isinstance(await queued.__anext__(), AcceptedEvent)
            with pytest.raises(BusyError):
                await lyra.chat("one too many")
            status = await lyra.status()  # answered while both streams are open
            assert status.queue_depth >= 1
            idles = 0
            async for event in slow:
                idles += event is IDLE
                if isinstance(event, RouteEvent):
                    break
            assert idles >= 3  # routing takes at least 0.6 s; an IDLE mark every 0.1 s of silence
            await slow.aclose()
            await queued.aclose()
            with pytest.raises(ClientTimeoutError):
                await lyra.chat("math code", timeout_s=0.5)

    run(main())


def test_a_killed_coordinator_ends_every_waiting_request_within_5s(make_stack) -> None:
    stack = make_stack(runtime__heartbeat_interval_s=1.0, runtime__heartbeat_timeout_s=3.0,
                       **slow_router(20.0))

    async def main() -> tuple[list, float]:
        async with AsyncClient(stack.endpoint, timeout_s=30) as lyra:
            streams = [lyra.stream("math code") for _ in range(2)]
            for s in streams:
                assert isinstance(await s.__anext__(), AcceptedEvent)
            await asyncio.sleep(0.3)
            stack.kill("coordinator")
            killed = time.monotonic()

            async def drain(s) -> BaseException | None:
                try:
                    async for _ in s:
                        pass
                except Exception as exc:
                    return exc
                return None

            errors = await asyncio.gather(*(drain(s) for s in streams))
            return errors, time.monotonic() - killed

    errors, took = run(main())
    assert all(isinstance(e, CoordinatorRestartedError) for e in errors), errors
    assert took < 5.0
