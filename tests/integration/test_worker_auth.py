"""Workers prove who they are: registrations without the stack secret are refused, real workers keep serving."""

from __future__ import annotations

import os
import stat
import time

from shared.wire import transport
from shared.wire.messages import ErrorCode, ErrorEvent, RegisterReply, RegisterRequest

LIMIT = 16 * 1024 * 1024


def registration(secret: str | None) -> RegisterRequest:
    return RegisterRequest(service="voice", pid=os.getpid(), instance=f"impostor-{time.monotonic_ns()}",
                           backend="fake", capabilities=["voice"], resident=["voice"], secret=secret)


def reply_to(sock: transport.Endpoint, kind: type, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = transport.recv_timeout(sock, 0.1)
        if got is not None and isinstance(got.message, kind):
            return got.message
    raise AssertionError(f"no {kind.__name__} within {timeout_s} s")


def test_impostor_is_refused_and_the_real_voice_keeps_answering(shared_stack) -> None:
    stack = shared_stack()
    assert stat.S_IMODE((stack.run_dir / "stack.secret").stat().st_mode) == 0o600
    ctx = transport.new_context()
    impostor = transport.connect_dealer(ctx, stack.worker_endpoint, LIMIT, identity="voice")
    try:
        for secret in (None, "guess"):
            transport.send(impostor, registration(secret))
            refused = reply_to(impostor, ErrorEvent)
            assert refused.code == ErrorCode.unauthorized and "stack secret" in refused.message
        with stack.client() as client:
            for _ in range(3):
                assert client.chat("math code").answer.startswith("[voice]")  # never the impostor's
        assert not transport.poll([impostor], 0.2)  # it was sent no call
    finally:
        impostor.close()
        ctx.term()
    with stack.client() as client:
        assert client.chat("meaning of life").answer.startswith("[voice]")
    log = (stack.dir / "coordinator.log").read_text()
    assert "registration as voice" in log and "refused: no stack secret" in log and "wrong stack secret" in log


def test_a_superseded_worker_registers_again_and_is_never_orphaned(shared_stack) -> None:
    """A second registration with the secret (a stray duplicate) wins; when it leaves, the real voice returns."""
    stack = shared_stack()
    ctx = transport.new_context()
    duplicate = transport.connect_dealer(ctx, stack.worker_endpoint, LIMIT, identity="voice")
    try:
        transport.send(duplicate, registration(stack.secret))
        reply_to(duplicate, RegisterReply)
    finally:
        duplicate.close()
        ctx.term()
    started = time.monotonic()
    with stack.client() as client:
        done = client.chat("math code")
    assert done.answer.startswith("[voice]")
    assert time.monotonic() - started < 5.0  # not the 60 s of worker_missing an orphaned voice used to cause
    log = (stack.dir / "voice.log").read_text()
    assert "superseded" in log


def test_tcp_client_endpoint_requires_the_secret(make_stack, monkeypatch) -> None:
    import socket

    import pytest

    from shared.client import Client, UnauthorizedError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stack = make_stack(runtime__client_endpoint=f"tcp://127.0.0.1:{port}")
    monkeypatch.delenv("LYRA_SECRET", raising=False)
    endpoint = f"tcp://127.0.0.1:{port}"
    with Client(endpoint, timeout_s=10) as anyone, pytest.raises(UnauthorizedError, match="stack secret"):
        anyone.chat("math code")
    with Client(endpoint, timeout_s=10, secret=stack.secret) as owner:
        assert owner.chat("math code").specialist == "pragmatist"
