"""Contract: every message type round-trips; bad frames are refused with the right typed error."""

from __future__ import annotations

import msgpack
import pytest
from pydantic import ValidationError

from shared.wire import messages as m
from shared.wire.transport import WireError, decode, encode

SAMPLES: list[m.Message] = [
    m.ChatRequest(text="hi", image=b"\x89PNG\x00\xff", specialist="artist",
                  options=m.GenerationOptions(max_new_tokens=5, temperature=0.0, seed=1)),
    m.ChatRequest(messages=[m.ChatTurn(role="user", content="a"), m.ChatTurn(role="assistant", content="b"),
                            m.ChatTurn(role="user", content="c")]),
    m.CancelRequest(parent_id="abc"),
    m.StatusRequest(),
    m.AcceptedEvent(parent_id="r", position=2, queue_depth=3, ticket=7, keepalive_s=1.0, coordinator="c-1"),
    m.ProgressEvent(parent_id="r", stage="voice", coordinator="c-1"),
    m.StageRestartedEvent(parent_id="r", stage="voice", service="voice", attempt=1, reason="voice restarted"),
    m.StageStartedEvent(parent_id="r", stage="route", service="router", model="router"),
    m.StageFinishedEvent(parent_id="r", stage="voice", service="voice", seconds=1.5),
    m.RouteEvent(parent_id="r", specialist="pragmatist", scores={"pragmatist": 0.75, "philosopher": 0.25}),
    m.TokenEvent(parent_id="r", text=" héllo", stage="voice"),
    m.ImageEvent(parent_id="r", image=m.ImagePayload(data=bytes(range(256)), width=1, height=1)),
    m.DoneEvent(parent_id="r", answer="a", specialist="s", scores={"s": 1.0}, timings={"total": 1.0},
                vram=[m.GpuSnapshot(gpu=0, budget_bytes=10, estimated_bytes=5, measured_bytes=None, resident=["x"])],
                image=m.ImagePayload(data=b"\x00\x01")),
    m.ErrorEvent(parent_id="r", code=m.ErrorCode.busy, message="busy", queue_depth=4),
    m.StatusReply(services=[m.ServiceStatus(service="router", state="up", pid=1,
                                            memory=[m.MemoryReading(device="gpu:0", allocated_bytes=1)])],
                  gpus=[], queue_depth=0, running=None, client_endpoint="ipc:///x", counters={"swaps": 1}),
    m.RegisterRequest(service="router", pid=1, instance="i", backend="fake", capabilities=["a"], resident=[],
                      placement={"a": "gpu:0"}, secret="s3cret"),
    m.RegisterReply(heartbeat_interval_s=1.0),
    m.HeartbeatEvent(instance="i", resident=["a"], busy_with="c"),
    m.ClassifyRequest(messages=[m.ChatTurn(role="user", content="x")],
                      labels=[m.RouteLabel(name="a", description="b")]),
    m.ClassifyReply(specialist="a", scores={"a": 1.0}),
    m.LoadRequest(model="a"),
    m.UnloadRequest(model="a"),
    m.LoadReply(model="a", resident=["a"], seconds=0.1),
    m.RunSpecialistRequest(model="a", messages=[m.ChatTurn(role="user", content="x")], image=b"\x01"),
    m.SpecialistReply(model="a", text="t", image=m.ImagePayload(data=b"png")),
    m.SynthesizeRequest(messages=[m.ChatTurn(role="user", content="x")], specialist="a", specialist_output="o"),
    m.SynthesizeReply(text="t"),
    m.CancelCallRequest(parent_id="c"),
    m.WorkerError(parent_id="c", code=m.ErrorCode.worker_error, message="boom", service="voice"),
]


def test_samples_cover_every_message_type() -> None:
    assert {s.type for s in SAMPLES} == set(m.MESSAGE_TYPES)  # type: ignore[attr-defined]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.type)
def test_round_trip_is_exact(sample: m.Message) -> None:
    frame = encode(sample)
    assert isinstance(msgpack.unpackb(frame), dict)  # a msgpack map on the wire
    assert decode(frame) == sample


def test_bytes_travel_as_msgpack_binary_not_base64() -> None:
    payload = bytes(range(256)) * 4
    raw = msgpack.unpackb(encode(m.ChatRequest(text="x", image=payload)), raw=True)
    assert raw[b"image"] == payload


def test_messages_are_frozen_and_forbid_unknown_fields() -> None:
    msg = m.StatusRequest()
    with pytest.raises(ValidationError):
        msg.id = "x"  # type: ignore[misc]
    with pytest.raises(WireError) as err:
        decode(msgpack.packb({**msg.model_dump(), "surprise": 1}))
    assert err.value.code == m.ErrorCode.bad_message


@pytest.mark.parametrize("frame,code", [
    (msgpack.packb({"type": "launch_missiles", "id": "x", "v": "1.0"}), m.ErrorCode.unknown_type),
    (msgpack.packb({**m.StatusRequest().model_dump(), "v": "2.0"}), m.ErrorCode.schema_version),
    (b"\xc1\xc1 garbage", m.ErrorCode.bad_message),
    (encode(m.ChatRequest(text="truncated"))[:-5], m.ErrorCode.bad_message),
    (msgpack.packb([1, 2, 3]), m.ErrorCode.bad_message),
    (msgpack.packb({"type": "chat_request", "v": "1.0", "text": 5}), m.ErrorCode.bad_message),
    (msgpack.packb({"type": "accepted_event", "v": "1.0", "position": "first", "queue_depth": 0}),
     m.ErrorCode.bad_message),
], ids=["unknown-type", "major-version", "garbage", "truncated", "array", "wrong-field-type", "wrong-event-field"])
def test_bad_frames_are_refused_with_a_typed_error(frame: bytes, code: m.ErrorCode) -> None:
    with pytest.raises(WireError) as err:
        decode(frame)
    assert err.value.code == code and err.value.message


def test_oversized_frame_is_refused() -> None:
    frame = encode(m.ChatRequest(text="x", image=b"\x00" * 2048))
    with pytest.raises(WireError) as err:
        decode(frame, max_bytes=1024)
    assert err.value.code == m.ErrorCode.too_large


def test_error_keeps_the_offending_id_when_readable() -> None:
    with pytest.raises(WireError) as err:
        decode(msgpack.packb({"type": "nope", "id": "abc", "v": "1.0"}))
    assert err.value.msg_id == "abc"
