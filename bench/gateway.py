"""What the HTTP gateway adds over the Python client, with zero-delay fake workers (dev-style config).

    .venv/bin/python bench/gateway.py [--requests 200] [--tokens 500] [--clients 20] [--out FILE]

Three measurements, each through the gateway (httpx, keep-alive) and through `shared.client.Client`
against the same stack, both asking for the answer's events only (`events="answer"`, as the gateway
does); latencies alternate the two paths call by call, so a busy machine's drift hits both alike:
  per request  median latency of a short non-streaming turn (8 tokens): the difference is the gateway's cost,
               through httpx and through the stdlib's http.client (the HTTP client's own share differs by ~1 ms)
  per token    a streamed turn of ~`tokens` voice pieces: (gateway - client) / pieces
  throughput   requests/s with `clients` concurrent callers (each thread its own connection)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shared.client import Client
from shared.wire.messages import TokenEvent
from tests.gatewayproc import KEY, GatewayProcess, gateway_overrides
from tests.stackproc import StackProcesses

HEADERS = {"Authorization": f"Bearer {KEY}"}


def paired_median_ms(*fns: Callable[[], object], n: int) -> list[float]:
    """Median ms of each of `fns`, called in turn so that a busy machine's drift hits them alike."""
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(n):
        for fn, out in zip(fns, samples, strict=True):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [statistics.median(s) * 1000 for s in samples]


def throughput(call: Callable[[], object], clients: int, per_client: int) -> float:
    def worker() -> None:
        for _ in range(per_client):
            call()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return clients * per_client / (time.perf_counter() - start)


def run(requests: int, tokens: int, clients: int) -> dict[str, object]:
    fake = {"token_delay_s": 0.0, "delay_s": 0.0}
    stack = StackProcesses(router__fake=fake, voice__fake=fake, specialists__pragmatist__fake=fake,
                           specialists__philosopher__fake=fake, runtime__queue_size=4 * clients + 8,
                           **gateway_overrides())
    gateway = GatewayProcess(stack)
    long_prompt = " ".join(f"w{i}" for i in range(tokens))
    short = {"model": "lyra/pragmatist", "max_tokens": 8, "messages": [{"role": "user", "content": "math code"}]}
    streamed = {"model": "lyra/pragmatist", "max_tokens": tokens + 2, "stream": True,
                "messages": [{"role": "user", "content": long_prompt}]}
    try:
        stack.start_all()
        url = gateway.start() + "/v1/chat/completions"
        web = httpx.Client(headers=HEADERS, timeout=60)
        lyra = Client(stack.endpoint, timeout_s=60)

        def via_gateway() -> None:
            assert web.post(url, json=short).status_code == 200

        host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
        plain = http.client.HTTPConnection(host, int(port), timeout=60)  # the stdlib's: far less client-side work
        body = json.dumps(short)

        def via_gateway_plain() -> None:
            plain.request("POST", "/v1/chat/completions", body=body,
                          headers={**HEADERS, "Content-Type": "application/json"})
            answer = plain.getresponse()
            answer.read()
            assert answer.status == 200

        def via_client() -> None:
            lyra.chat("math code", specialist="pragmatist", max_new_tokens=8, events="answer")

        pieces = [0]

        def stream_gateway() -> None:
            with web.stream("POST", url, json=streamed) as r:
                pieces[0] = sum(1 for line in r.iter_lines() if line.startswith('data: {"id"')) - 2

        def stream_client() -> None:
            list(lyra.stream(long_prompt, specialist="pragmatist", max_new_tokens=tokens + 2, events="answer"))

        for _ in range(20):  # warm up every path (the first request loads the specialist)
            via_gateway()
            via_gateway_plain()
            via_client()
        client_ms, gateway_ms, plain_ms = paired_median_ms(via_client, via_gateway, via_gateway_plain, n=requests)
        voice_pieces = sum(isinstance(e, TokenEvent) and e.stage == "voice"
                           for e in lyra.stream(long_prompt, specialist="pragmatist", max_new_tokens=tokens + 2))
        runs = max(5, requests // 20)
        client_stream_ms, gateway_stream_ms = paired_median_ms(stream_client, stream_gateway, n=runs)
        assert pieces[0] == voice_pieces, (pieces[0], voice_pieces)
        lyra.close()
        web.close()
        plain.close()

        local = threading.local()

        def gw_call() -> None:
            if not hasattr(local, "http"):
                local.http = httpx.Client(headers=HEADERS, timeout=120)
            assert local.http.post(url, json=short).status_code == 200

        def client_call() -> None:
            if not hasattr(local, "lyra"):
                local.lyra = Client(stack.endpoint, timeout_s=120)
            local.lyra.chat("math code", specialist="pragmatist", max_new_tokens=8, events="answer")

        per_client = max(2, requests // clients)
        client_rps = throughput(client_call, clients, per_client)
        gateway_rps = throughput(gw_call, clients, per_client)
    finally:
        gateway.stop()
        stack.stop()
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "request_ms": {"client": round(client_ms, 3), "gateway_httpx": round(gateway_ms, 3),
                       "added_httpx": round(gateway_ms - client_ms, 3), "gateway_stdlib": round(plain_ms, 3),
                       "added_stdlib": round(plain_ms - client_ms, 3)},
        "stream": {"pieces": voice_pieces, "client_ms": round(client_stream_ms, 3),
                   "gateway_ms": round(gateway_stream_ms, 3),
                   "added_per_token_ms": round((gateway_stream_ms - client_stream_ms) / voice_pieces, 4)},
        "throughput_rps": {"clients": clients, "client": round(client_rps, 1), "gateway": round(gateway_rps, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--out", help="also write the numbers to this JSON file")
    args = parser.parse_args()
    result = run(args.requests, args.tokens, args.clients)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
