"""A flood of refused registrations costs the coordinator's log a line a second, with a count of the rest."""

from __future__ import annotations

import os
import re
import time

from shared.wire import transport
from shared.wire.messages import RegisterRequest

FLOOD = 20_000


def test_a_flood_of_registrations_without_the_secret_is_logged_once_a_second_with_counts(shared_stack) -> None:
    stack = shared_stack()
    log_path = stack.dir / "coordinator.log"
    start = log_path.stat().st_size
    frame = transport.encode(RegisterRequest(service="voice", pid=os.getpid(), instance="flood", backend="fake",
                                             capabilities=["voice"], resident=["voice"]))
    ctx = transport.new_context()
    sock = transport.connect_dealer(ctx, stack.worker_endpoint, 16 * 10**6, identity="flood")
    replies, sent = 0, 0
    deadline = time.monotonic() + 60
    try:
        while replies < FLOOD and time.monotonic() < deadline:
            while sent < FLOOD and sent - replies < 1000:  # the coordinator answers each refusal
                transport.send_raw(sock, frame)
                sent += 1
            while transport.poll([sock], 0.01):
                transport.recv(sock)
                replies += 1
    finally:
        sock.close()
        ctx.term()
    assert replies == FLOOD
    counted, deadline = 0, time.monotonic() + 5  # the last held-back refusals are told within about a second
    while counted < FLOOD and time.monotonic() < deadline:
        with log_path.open("rb") as log:
            log.seek(start)
            lines = [line for line in log.read().decode(errors="replace").splitlines()
                     if "registration as voice" in line]
        counted = sum(1 + int(m.group(1)) if (m := re.search(r"and (\d+) more refusals", line)) else
                      int(m.group(1)) if (m := re.search(r"(\d+) more refusals like this", line)) else 1
                      for line in lines)
        time.sleep(0.1)
    assert counted == FLOOD, lines  # every refusal is accounted for ...
    assert len(lines) < 40, f"{len(lines)} lines for {FLOOD} refusals"  # ... in about one line a second
    assert any("refused: no stack secret" in line for line in lines)
    with stack.client() as client:
        assert client.chat("math code").answer.startswith("[voice]")  # the real voice kept its registration
