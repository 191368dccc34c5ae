"""Coordinator overhead with zero-delay fake workers, next to a raw pyzmq round trip on the same machine.

    .venv/bin/python bench/overhead.py [--requests 500] [--clients 1] [--recovery 5]

Every request does route -> specialist -> voice against fake workers that answer at once, so the
latency is the runtime's own cost: validation, queueing, three worker round trips and the client's
event stream. It runs with every socket over ipc, over tcp on loopback, and over tcp with CurveZMQ (keys
and ZAP as `lyra keys` sets them up), in the same run (`--transports`). The raw number is a bare
DEALER/ROUTER echo of a small msgpack map over the same transport: the cost of one hop.

Recovery (default heartbeats: 1 s interval, 5 s timeout), each trial with a request in its voice stage:
the time from a coordinator SIGKILL (restarted at once, as supervisord does) to the client's
`coordinator_restarted` error, and from a voice SIGKILL plus restart to the end of the re-run voice stage
(which includes starting the new voice process and its own streaming).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shared.client import CoordinatorRestartedError
from shared.wire.keys import identity, make_keys
from shared.wire.messages import StageFinishedEvent, StageRestartedEvent, TokenEvent
from tests.stackproc import StackProcesses

VOICE_TOKENS = 20
TOKEN_DELAY_S = 0.02



def raw_roundtrip_benchmark(n: int, payload: bytes, kind: str = "ipc") -> list[float]:
    """Round-trip latencies (seconds) of a bare DEALER<->ROUTER echo, for bench comparisons: over ipc, tcp on
    loopback, or tcp with CurveZMQ (`kind` = "ipc", "tcp" or "curve"; Curve without a ZAP handler here)."""
    ctx = zmq.Context()
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    if kind == "curve":
        server_public, server_secret = zmq.curve_keypair()
        server.curve_server, server.curve_secretkey, server.curve_publickey = True, server_secret, server_public
        client.curve_publickey, client.curve_secretkey = zmq.curve_keypair()
        client.curve_serverkey = server_public
    if kind == "ipc":
        path = f"ipc://{tempfile.mkdtemp(prefix='lyra-raw-')}/echo.sock"
        server.bind(path)
    else:
        path = f"tcp://127.0.0.1:{server.bind_to_random_port('tcp://127.0.0.1')}"
    client.connect(path)

    def echo() -> None:
        for _ in range(n):
            server.send_multipart(server.recv_multipart())

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        client.send(msgpack.packb({"type": "x", "p": payload}))
        msgpack.unpackb(client.recv())
        times.append(time.perf_counter() - start)
    thread.join(5)
    client.close(0)
    server.close(0)
    ctx.term()
    return times

def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


TRANSPORTS = ("ipc", "tcp", "curve")  # the default ipc run dir; tcp on loopback; tcp with CurveZMQ and ZAP


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stack(kind: str, clients: int) -> StackProcesses:
    """The zero-delay dev stack whose client and worker sockets use `kind`."""
    fake = {"token_delay_s": 0.0, "delay_s": 0.0}
    wire: dict[str, object] = {}
    if kind != "ipc":
        wire = {"runtime__client_endpoint": f"tcp://127.0.0.1:{_free_port()}",
                "runtime__worker_endpoint": f"tcp://127.0.0.1:{_free_port()}"}
    keys_dir = Path(tempfile.mkdtemp(prefix="lyra-bench-keys-")) / "keys"
    if kind == "curve":
        make_keys(keys_dir)
        wire |= {"runtime__curve": True, "runtime__keys_dir": str(keys_dir)}
    stack = StackProcesses(router__fake=fake, voice__fake=fake, voice__generation={"max_new_tokens": 8},
                           specialists__pragmatist__fake=fake, specialists__philosopher__fake=fake,
                           runtime__queue_size=4 * clients + 8, **wire)
    stack.curve = identity(keys_dir, "client") if kind == "curve" else None
    return stack


def _batch(stack: StackProcesses, requests: int, clients: int) -> list[float]:
    """Latencies of `requests` chats sent by `clients` threads at once."""
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        with stack.client() as client:
            for _ in range(requests // clients):
                t0 = time.perf_counter()
                client.chat("math code", max_new_tokens=8)
                with lock:
                    latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def run(requests: int, clients: int, kinds: tuple[str, ...], rounds: int = 5) -> None:
    """Every transport in the same run, in interleaved rounds (this shared VM drifts between minutes)."""
    raw = {kind: raw_roundtrip_benchmark(2000, b"x" * 64, kind) for kind in kinds}
    stacks = {kind: _stack(kind, clients) for kind in kinds}
    latencies: dict[str, list[float]] = {kind: [] for kind in kinds}
    wall = dict.fromkeys(kinds, 0.0)
    try:
        for stack in stacks.values():
            stack.start_all()
            _batch(stack, 20, 1)  # warm up; the first request also loads the specialist
        for _ in range(rounds):
            for kind, stack in stacks.items():
                start = time.perf_counter()
                latencies[kind] += _batch(stack, max(clients, requests // rounds), clients)
                wall[kind] += time.perf_counter() - start
    finally:
        for stack in stacks.values():
            stack.stop()
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'transport':<10}{'raw round trip':>16}{'request median':>16}{'p99':>10}{'req/s':>8}  "
          f"(route + specialist + voice, 8 tokens streamed, {clients} client(s))")
    for kind in kinds:
        mine = latencies[kind]
        print(f"{kind:<10}{statistics.median(raw[kind]) * 1e6:>13.0f} us{statistics.median(mine) * 1e3:>13.2f} ms"
              f"{percentile(mine, 0.99) * 1e3:>7.2f} ms{len(mine) / wall[kind]:>8.1f}")
    base = statistics.median(latencies[kinds[0]])
    for kind in kinds[1:]:
        print(f"{kind} vs {kinds[0]}: {(statistics.median(latencies[kind]) - base) * 1e3:+.2f} ms per request, "
              f"{(statistics.median(raw[kind]) - statistics.median(raw[kinds[0]])) * 1e6:+.0f} us per raw hop")


def _trial(stack: StackProcesses, act: Callable[[], None]) -> tuple[float, dict[str, float], BaseException | None]:
    """Start a chat, act once its voice stage runs; returns when it acted and when each event came."""
    seen: dict[str, float] = {}
    outcome: list[BaseException] = []
    speaking = threading.Event()

    def chat() -> None:
        try:
            with stack.client(timeout_s=30) as client:
                for event in client.stream("math code " + "word " * VOICE_TOKENS, max_new_tokens=VOICE_TOKENS):
                    if isinstance(event, TokenEvent) and event.stage == "voice":
                        speaking.set()
                    if isinstance(event, StageRestartedEvent):
                        seen["restarted"] = time.monotonic()
                    elif isinstance(event, StageFinishedEvent) and event.stage == "voice":
                        seen["voice_end"] = time.monotonic()
        except BaseException as exc:  # the measured outcome, not a failure of the bench
            outcome.append(exc)
        seen["end"] = time.monotonic()

    thread = threading.Thread(target=chat)
    thread.start()
    if not speaking.wait(10):
        raise TimeoutError("the voice stage never started streaming")
    acted = time.monotonic()
    act()
    thread.join(timeout=30)
    return acted, seen, outcome[0] if outcome else None


def recovery(trials: int) -> None:
    fake = {"token_delay_s": TOKEN_DELAY_S, "triggers": True}
    stack = StackProcesses(runtime__heartbeat_interval_s=1.0, runtime__heartbeat_timeout_s=5.0, voice__fake=fake)
    to_error: list[float] = []
    to_rerun_end: list[float] = []
    to_restarted: list[float] = []
    try:
        stack.start_all()
        for _ in range(trials):
            def kill_coordinator() -> None:
                stack.kill("coordinator")
                stack.start("coordinator")

            acted, seen, error = _trial(stack, kill_coordinator)
            assert isinstance(error, CoordinatorRestartedError), error
            to_error.append(seen["end"] - acted)
            stack.wait_ready()
        for _ in range(trials):
            def restart_voice() -> None:
                stack.kill("voice")
                stack.start("voice")

            acted, seen, error = _trial(stack, restart_voice)
            assert error is None and "restarted" in seen, error
            to_restarted.append(seen["restarted"] - acted)
            to_rerun_end.append(seen["voice_end"] - acted)
            stack.wait_ready()
    finally:
        stack.stop()
    own = VOICE_TOKENS * TOKEN_DELAY_S
    print(f"coordinator SIGKILL -> client's coordinator_restarted error ({trials} trials): "
          f"median {statistics.median(to_error):.2f} s, max {max(to_error):.2f} s")
    print(f"voice SIGKILL + restart -> stage_restarted event: median {statistics.median(to_restarted):.2f} s; "
          f"-> end of the re-run voice stage: median {statistics.median(to_rerun_end):.2f} s, "
          f"max {max(to_rerun_end):.2f} s (of which the stage's own streaming ~{own:.2f} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--recovery", type=int, default=5, help="trials of each recovery measurement (0 = skip)")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help="comma-separated: ipc, tcp, curve")
    args = parser.parse_args()
    run(args.requests, args.clients, tuple(args.transports.split(",")))
    if args.recovery:
        recovery(args.recovery)
