"""Coordinator overhead with zero-delay fake workers, next to a raw pyzmq round trip on the same machine.

    .venv/bin/python bench/overhead.py [--requests 500] [--clients 1]

Every request does route -> specialist -> voice against fake workers that answer at once, so the
latency is the runtime's own cost: validation, queueing, three worker round trips and the client's
event stream. The raw number is a bare DEALER/ROUTER echo of a small msgpack map over ipc.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shared.transport import raw_roundtrip_benchmark
from tests.stackproc import StackProcesses


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(requests: int, clients: int) -> None:
    raw = raw_roundtrip_benchmark(2000, b"x" * 64)
    fake = {"token_delay_s": 0.0, "delay_s": 0.0}
    stack = StackProcesses(router__fake=fake, voice__fake=fake, voice__generation={"max_new_tokens": 8},
                           specialists__pragmatist__fake=fake, specialists__philosopher__fake=fake,
                           runtime__queue_size=4 * clients + 8)
    try:
        stack.start_all()
        with stack.client() as client:
            for _ in range(20):  # warm up; the first request also loads the specialist
                client.chat("math code", max_new_tokens=8)
        latencies: list[float] = []
        lock = threading.Lock()

        def worker(n: int) -> None:
            with stack.client() as client:
                for _ in range(requests // clients):
                    t0 = time.perf_counter()
                    client.chat("math code", max_new_tokens=8)
                    with lock:
                        latencies.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        stack.stop()
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"raw pyzmq DEALER<->ROUTER round trip (ipc, 64 B): median {statistics.median(raw) * 1e6:.0f} us, "
          f"p99 {percentile(raw, 0.99) * 1e6:.0f} us")
    print(f"Lyra request (route + specialist + voice, 8 tokens streamed, {clients} client(s)): "
          f"median {statistics.median(latencies) * 1e3:.2f} ms, p99 {percentile(latencies, 0.99) * 1e3:.2f} ms")
    print(f"throughput: {len(latencies) / wall:.1f} requests/s over {len(latencies)} requests")
    print(f"added latency per request vs one raw round trip: "
          f"{(statistics.median(latencies) - statistics.median(raw)) * 1e3:.2f} ms median")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=1)
    args = parser.parse_args()
    run(args.requests, args.clients)
