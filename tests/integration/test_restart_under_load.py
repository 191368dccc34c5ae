"""`supervisorctl restart <worker>` (or a crash) while clients keep the queue full: no request fails, each ends once.

A restart (SIGTERM: the worker drains and exits; or SIGKILL; then a new instance registers) meets requests
in every phase: a call in flight, a call sent to the instance as it exits, a request whose specialist the
old host held and the new one does not. Each must end with its answer, exactly one terminal event.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from dataclasses import dataclass, field

import pytest

from shared.client import LyraError

CLIENTS = 4
# Mostly the pragmatist, so requests often find their specialist resident (the host restart's hard case: the
# old host held it, the new one holds nothing), sometimes the philosopher (a swap: an unload and a load).
PROMPTS = ("math code", "math code", "math code", "meaning of life")


@dataclass
class Load:
    """Client threads sending requests one after another until told to stop; what each request came to."""

    stack: object
    stop: threading.Event = field(default_factory=threading.Event)
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for n in range(CLIENTS):
            thread = threading.Thread(target=self._client, args=(n,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _client(self, n: int) -> None:
        with self.stack.client(timeout_s=60) as client:
            for i in itertools.count():
                if self.stop.is_set():
                    return
                prompt = f"{PROMPTS[(n + i) % len(PROMPTS)]} client {n} request {i}"
                try:
                    done = client.chat(prompt)
                    outcome, into = f"{prompt} -> {done.specialist}", self.done
                except LyraError as exc:
                    outcome, into = f"{prompt} -> {exc.code}: {exc.message}", self.failed
                with self.lock:
                    into.append(outcome)

    def finished(self) -> int:
        with self.lock:
            return len(self.done) + len(self.failed)

    def wait_for(self, more: int, timeout_s: float = 30.0) -> None:
        target, deadline = self.finished() + more, time.monotonic() + timeout_s
        while self.finished() < target:
            assert time.monotonic() < deadline, f"the load stalled: {self.finished()} of {target} requests ended"
            time.sleep(0.05)

    def end(self, timeout_s: float = 60.0) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=timeout_s)
        assert not any(thread.is_alive() for thread in self.threads), "a client never heard its request end"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "killed"])
@pytest.mark.parametrize("service", ["router", "specialist_host", "voice"])
def test_restarting_a_worker_under_load_fails_no_request(make_stack, service: str, sig: int) -> None:
    fake = {"token_delay_s": 0.01, "triggers": True}
    stack = make_stack(runtime__heartbeat_timeout_s=5.0,  # the production default: a process start fits in it
                       router__fake=dict(fake, delay_s=0.02), voice__fake=fake,
                       specialists__pragmatist__fake=dict(fake, load_s=0.05),
                       specialists__philosopher__fake=dict(fake, load_s=0.05))
    load = Load(stack)
    load.start()
    try:
        for _ in range(2):  # the restart lands in a different phase of the pipeline each time
            load.wait_for(6)
            stack.kill(service, sig)  # as `supervisorctl restart` (stop, drained, then start) or a crash
            stack.start(service)
            load.wait_for(6)
    finally:
        load.end()
    assert load.failed == [], load.failed
    with stack.client() as client:
        status = client.status()
    counters = status.counters
    assert counters["completed"] == len(load.done) == counters["requests"]
    assert counters["failed"] == counters["cancelled"] == 0
    assert next(s for s in status.services if s.service == service).registrations == 3
    assert "second terminal event" not in (stack.dir / "coordinator.log").read_text()
