"""Nothing a local client or process sends takes the coordinator down or starves its heartbeats."""

from __future__ import annotations

import io
import random
import struct
import threading
import time

import msgpack
import pytest
from PIL import Image

from shared.client import BadImageError
from shared.config.units import MB
from shared.wire import transport
from shared.wire.messages import ChatRequest, ChatTurn, ErrorEvent, StatusRequest
from tests.unit.test_fuzz_wire import dds_with_unknown_pixel_format, tiff, tiff_with_float_strip_offsets


def coordinator_pid(stack) -> int:
    return stack.procs["coordinator"].pid


def alive_and_serving(stack, pid: int) -> None:
    assert stack.procs["coordinator"].poll() is None and coordinator_pid(stack) == pid
    with stack.client() as client:
        assert client.chat("math code", specialist="pragmatist").answer
        assert {s.service: s.state for s in client.status().services}["voice"] in ("up", "busy")


def send_all(endpoint: str, frames: list[bytes], identity: str | None = None) -> None:
    ctx = transport.new_context()
    sock = transport.connect_dealer(ctx, endpoint, 64 * 1024 * 1024, identity=identity)
    try:
        for frame in frames:
            sock.socket.send(frame)  # blocking: a flood waits on the coordinator's per-client queue
    finally:
        time.sleep(0.2)
        sock.close()
        ctx.term()


def element_bomb() -> bytes:
    chunk = b"\xdd" + struct.pack(">I", 100_000) + b"\x80" * 100_000
    return b"\xdc" + struct.pack(">H", 250) + chunk * 250


def test_list_typed_frames_and_an_element_bomb_on_both_sockets(shared_stack) -> None:
    stack = shared_stack()
    pid = coordinator_pid(stack)
    frames = [msgpack.packb({"type": []}), msgpack.packb({"type": {"a": 1}, "id": "x"}), element_bomb()]
    send_all(stack.endpoint, frames)
    send_all(stack.worker_endpoint, frames, identity="voice")
    alive_and_serving(stack, pid)


@pytest.mark.parametrize("data", [dds_with_unknown_pixel_format(), tiff(), tiff_with_float_strip_offsets()],
                         ids=["dds", "tiff", "mutated-tiff"])
def test_unusual_image_formats_are_refused_and_the_stack_serves(shared_stack, data: bytes) -> None:
    stack = shared_stack()
    pid = coordinator_pid(stack)
    with stack.client() as client, pytest.raises(BadImageError, match="not an image this stack can read"):
        client.chat("what is this?", image=data)
    alive_and_serving(stack, pid)


def big_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (30, 90, 200)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def test_many_big_legal_images_do_not_starve_heartbeats(shared_stack) -> None:
    """Twenty 36-megapixel PNGs at once (each decode takes a core about 0.25 s) with a request in flight."""
    stack = shared_stack(voice__fake__token_delay_s=0.15)
    pid = coordinator_pid(stack)
    picture = big_png(6000)
    answers: list[str] = []
    in_flight = threading.Thread(target=lambda: answers.append(
        _chat(stack, "one two three four five six seven eight nine ten eleven twelve thirteen")), daemon=True)
    in_flight.start()
    time.sleep(0.3)
    ctx = transport.new_context()
    sender = transport.connect_dealer(ctx, stack.endpoint, 64 * 1024 * 1024)
    replies: list[str] = []
    try:
        for _ in range(20):
            transport.send(sender, ChatRequest(text="look", image=picture, specialist="pragmatist"))
        deadline = time.monotonic() + 30
        while len(replies) < 20 and time.monotonic() < deadline:
            got = transport.recv_timeout(sender, 1)
            if got is not None and got.message is not None and got.message.type in ("accepted_event", "error_event"):
                replies.append(got.message.type if got.message.type == "accepted_event" else got.message.code.value)
    finally:
        sender.close()
        ctx.term()
    in_flight.join(30)
    assert answers and answers[0], "the request in flight did not complete"
    assert len(replies) == 20 and "accepted_event" in replies and set(replies) <= {"accepted_event", "busy"}
    log = (stack.dir / "coordinator.log").read_text()
    assert "stopped heartbeating" not in log
    alive_and_serving(stack, pid)


def _chat(stack, text: str) -> str:
    with stack.client(timeout_s=60) as client:
        return client.chat(text, specialist="pragmatist").answer


def adversarial_frames(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    valid = [transport.encode(StatusRequest()), transport.encode(ChatRequest(text="hi"))]
    shapes = [lambda: rng.randbytes(rng.randint(0, 64)),
              lambda: msgpack.packb({"type": rng.choice([[], {}, 1, None, "chat_request", "x" * 70]),
                                     "v": rng.choice(["1.2", [], "9.9", 3]), "id": rng.choice([[], "i", 5])}),
              lambda: msgpack.packb({"type": "chat_request", "v": "1.2", "text": rng.choice([[1], {"a": []}, 7]),
                                     "options": rng.choice([[], {"max_new_tokens": -1}, "x"])}),
              lambda: rng.choice(valid)[:rng.randint(0, 20)],
              lambda: b"\x91" * rng.randint(1, 3000),
              lambda: msgpack.packb([{}] * rng.randint(0, 2000)),
              lambda: msgpack.packb({"type": "status_request", "v": "1.2", "id": "i" * rng.randint(100, 5000),
                                     "k" * rng.randint(1, 5000): rng.choice([[], {}, 1])})]
    return [rng.choice(shapes)() for _ in range(count)]


def flood(endpoint: str, frames: list[bytes], identity: str | None = None, timeout_s: float = 60.0) -> None:
    """Send every frame, then a status request, and wait for its answer: each frame was read by then."""
    sentinel = StatusRequest()
    ctx = transport.new_context()
    sock = transport.connect_dealer(ctx, endpoint, 64 * 1024 * 1024, identity=identity)
    answered = False
    try:
        for frame in [*frames, transport.encode(sentinel)]:
            sock.socket.send(frame)  # blocking: a flood waits on the coordinator's per-client queue
            while transport.poll([sock], 0):  # read replies as they come, so none is dropped for want of room
                answered = answered or transport.recv(sock).message.parent_id == sentinel.id
        deadline = time.monotonic() + timeout_s
        while not answered and time.monotonic() < deadline:
            got = transport.recv_timeout(sock, 1)
            answered = got is not None and got.message is not None and got.message.parent_id == sentinel.id
    finally:
        sock.close()
        ctx.term()
    assert answered, f"the coordinator did not get through {len(frames)} frames within {timeout_s:g}s"


def test_ten_thousand_adversarial_frames_on_each_socket(make_stack) -> None:
    stack = make_stack(runtime__client_max_msgs_per_s=1e6)  # unpaced: every frame reaches the decoder
    pid = coordinator_pid(stack)
    flood(stack.endpoint, adversarial_frames(10_000, seed=1))
    flood(stack.worker_endpoint, adversarial_frames(10_000, seed=2), identity="router")
    alive_and_serving(stack, pid)
    log = (stack.dir / "coordinator.log").read_text()
    assert len(log.splitlines()) < 500 and len(log) < 200_000  # refusals are counted, not logged one by one


def test_a_flooding_client_is_answered_busy_and_others_are_served(make_stack) -> None:
    stack = make_stack(runtime__client_max_msgs_per_s=200.0)
    pid = coordinator_pid(stack)
    ctx = transport.new_context()
    flood = transport.connect_dealer(ctx, stack.endpoint, 1024 * 1024)
    try:
        for _ in range(2000):
            flood.socket.send(transport.encode(StatusRequest()))
        codes = []
        deadline = time.monotonic() + 10
        while len(codes) < 2000 and time.monotonic() < deadline:
            got = transport.recv_timeout(flood, 1)
            if got is None:
                break
            codes.append(got.message.code.value if isinstance(got.message, ErrorEvent) else "ok")
    finally:
        flood.close()
        ctx.term()
    assert "busy" in codes and "ok" in codes
    alive_and_serving(stack, pid)


def test_frames_slow_to_validate_do_not_starve_heartbeats(shared_stack) -> None:
    """Legal frames that take 0.1 s each to validate (24,000-turn conversations), 40 at once, a request in flight."""
    stack = shared_stack(voice__fake__token_delay_s=0.15)
    pid = coordinator_pid(stack)
    answers: list[str] = []
    in_flight = threading.Thread(target=lambda: answers.append(
        _chat(stack, "one two three four five six seven eight nine ten eleven twelve thirteen")), daemon=True)
    in_flight.start()
    time.sleep(0.3)
    turns = [ChatTurn(role="user", content="x")] * 24_000
    frame = transport.encode(ChatRequest(messages=turns, specialist="nobody"))  # refused once validated
    ctx = transport.new_context()
    sender = transport.connect_dealer(ctx, stack.endpoint, 64 * 1024 * 1024)
    codes: list[str] = []
    try:
        for _ in range(40):
            transport.send_raw(sender, frame)
        deadline = time.monotonic() + 40
        while len(codes) < 40 and time.monotonic() < deadline:
            got = transport.recv_timeout(sender, 1)
            if got is not None and isinstance(got.message, ErrorEvent):
                codes.append(got.message.code.value)
    finally:
        sender.close()
        ctx.term()
    in_flight.join(30)
    assert answers and answers[0], "the request in flight did not complete"
    assert len(codes) == 40 and set(codes) <= {"invalid_request", "busy"}
    assert "stopped heartbeating" not in (stack.dir / "coordinator.log").read_text()
    alive_and_serving(stack, pid)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:  # VmRSS is in kB of 1024 bytes
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) * 1024 / MB


def test_a_flood_of_large_frames_is_held_to_the_byte_bound(make_stack) -> None:
    """150 frames of 4 MB from one client: the coordinator buffers client_queue_mb of them, not all 600 MB."""
    stack = make_stack(runtime__max_message_mb=4.0, runtime__client_queue_mb=32.0)
    pid = coordinator_pid(stack)
    start, peak, done = rss_mb(pid), [0.0], threading.Event()

    def watch() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss_mb(pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    frame = msgpack.packb({"type": "status_request", "v": "1.2", "pad": b"x" * 4_000_000})  # refused once read
    try:
        flood(stack.endpoint, [frame] * 150)
    finally:
        done.set()
        watcher.join(5)
    assert peak[0] - start < 250, f"the coordinator grew from {start:.0f} MB to {peak[0]:.0f} MB"
    alive_and_serving(stack, pid)
