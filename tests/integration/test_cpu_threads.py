"""runtime.cpu_threads: each model process runs torch on that many threads, as its log says."""

from __future__ import annotations

from shared.client import Client


def test_model_processes_use_the_configured_cpu_threads(make_stack) -> None:
    stack = make_stack(runtime__cpu_threads=1)
    with Client(stack.endpoint, timeout_s=60) as client:
        assert client.chat("how do I do math with code").answer
    for service in ("router", "specialist_host", "voice"):
        log = (stack.dir / f"{service}.log").read_text()
        assert "torch uses 1 CPU thread(s) (runtime.cpu_threads)" in log, log[-2000:]
