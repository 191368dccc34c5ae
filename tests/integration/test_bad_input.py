"""Every process survives bad input on its socket, answers with a typed error, and keeps serving."""

from __future__ import annotations

import msgpack
import pytest

from shared.client import InvalidRequestError
from shared.wire import transport
from shared.wire.messages import ChatRequest, ErrorCode, ErrorEvent, RegisterRequest, StatusRequest

BAD_FRAMES = {
    "garbage": (b"\xc1\xff\x00 not msgpack", ErrorCode.bad_message),
    "truncated": (transport.encode(ChatRequest(text="hello there"))[:-4], ErrorCode.bad_message),
    "unknown_type": (msgpack.packb({"type": "format_disk", "id": "u1", "v": "1.0"}), ErrorCode.unknown_type),
    "wrong_version": (msgpack.packb({**StatusRequest(id="w1").model_dump(), "v": "9.0"}), ErrorCode.schema_version),
    "wrong_types": (msgpack.packb({"type": "chat_request", "v": "1.0", "text": ["x"]}), ErrorCode.bad_message),
    "oversized": (transport.encode(ChatRequest(text="x", image=b"\x00" * (2 * 1024 * 1024))), ErrorCode.too_large),
}


@pytest.fixture
def stack(shared_stack):
    return shared_stack(runtime__max_message_mb=1.0)


def test_coordinator_client_socket_refuses_each_bad_frame_and_keeps_serving(stack) -> None:
    ctx = transport.new_context()
    sock = transport.connect_dealer(ctx, stack.endpoint, 16 * 1024 * 1024)
    try:
        for name, (frame, code) in BAD_FRAMES.items():
            transport.send_raw(sock, frame)
            got = transport.recv_timeout(sock, 5)
            assert got is not None, f"no reply to {name}"
            assert isinstance(got.message, ErrorEvent), name
            assert got.message.code == code, (name, got.message)
        transport.send(sock, RegisterRequest(service="router", pid=1, instance="x", backend="x", capabilities=[],
                                             resident=[]))
        got = transport.recv_timeout(sock, 5)
        assert got is not None and got.message.code == ErrorCode.invalid_request
    finally:
        sock.close()
        ctx.term()
    with stack.client() as client:
        assert client.chat("math code").specialist == "pragmatist"
        with pytest.raises(InvalidRequestError, match="unknown specialist"):
            client.chat("x", specialist="astrologer")
        with pytest.raises(InvalidRequestError, match="needs `text`"):
            client.chat("   ")


def test_worker_socket_survives_garbage_and_impostors(stack) -> None:
    ctx = transport.new_context()
    impostor = transport.connect_dealer(ctx, stack.worker_endpoint, 16 * 1024 * 1024, identity="nobody")
    fake_router = transport.connect_dealer(ctx, stack.worker_endpoint, 16 * 1024 * 1024, identity="router-x")
    try:
        transport.send_raw(impostor, b"\x00garbage")
        transport.send_raw(fake_router, BAD_FRAMES["wrong_version"][0])
    finally:
        impostor.close()
        fake_router.close()
        ctx.term()
    with stack.client() as client:
        assert client.chat("meaning of life").specialist == "philosopher"


def test_worker_sending_garbage_fails_the_request_not_the_stack(shared_stack) -> None:
    stack = shared_stack()
    with stack.client() as client:
        with pytest.raises(Exception) as err:
            client.chat("math [[fake:garbage:voice]]")
        assert err.value.code == "worker_error" and "malformed" in err.value.message
        assert client.chat("math code").specialist == "pragmatist"


def test_worker_error_is_reported_with_its_sentence(shared_stack) -> None:
    stack = shared_stack()
    with stack.client() as client:
        with pytest.raises(Exception) as err:
            client.chat("math [[fake:error:specialist_host]]")
        assert err.value.code == "worker_error" and "told to fail" in err.value.message
        assert err.value.service == "specialist_host"
        assert client.chat("math code").answer


def test_worker_process_answers_bad_frames_with_typed_errors_and_keeps_serving(make_stack) -> None:
    """A worker against a coordinator played by the test: garbage in, WorkerError out, still serving."""
    from shared.wire.messages import ChatTurn, ClassifyReply, ClassifyRequest, RegisterReply, RouteLabel, WorkerError

    stack = make_stack(start=False)
    ctx = transport.new_context()
    server = transport.bind_router(ctx, stack.worker_endpoint, 1024 * 1024)
    stack.start("router")
    try:
        got = _recv(server, RegisterRequest)
        peer = got.peer
        transport.send(server, RegisterReply(heartbeat_interval_s=0.2), peer)
        for name in ("garbage", "truncated", "unknown_type", "wrong_version", "wrong_types"):
            transport.send_raw(server, BAD_FRAMES[name][0], peer)
            reply = _recv(server, WorkerError)
            assert reply.message.code == BAD_FRAMES[name][1], name
        transport.send(server, StatusRequest(), peer)  # valid, but not something a worker serves
        assert _recv(server, WorkerError).message.code == ErrorCode.unknown_type
        request = ClassifyRequest(messages=[ChatTurn(role="user", content="math")],
                                  labels=[RouteLabel(name="a", description="math"),
                                          RouteLabel(name="b", description="art")])
        transport.send(server, request, peer)
        reply = _recv(server, ClassifyReply)
        assert reply.message.parent_id == request.id and reply.message.specialist == "a"
        assert stack.procs["router"].poll() is None
    finally:
        server.close()
        ctx.term()


def _recv(server, kind, timeout_s: float = 10.0):
    """The next message of `kind` from the worker, skipping heartbeats."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if transport.poll([server], 0.1):
            got = transport.recv(server, router=True)
            if isinstance(got.message, kind):
                return got
    raise AssertionError(f"no {kind.__name__} from the worker")
