"""Nothing a peer sends can make decoding or the image check raise anything but our own typed errors."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from services.coordinator.images import BadImage, ImageLimits, check_image
from shared.wire import transport
from shared.wire.messages import MESSAGE_TYPES, ChatRequest, ChatTurn, ErrorCode, HeartbeatEvent, StatusRequest

LIMITS = ImageLimits(max_bytes=8_000_000, max_side=4096, max_pixels=16_000_000)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
           | st.binary(max_size=20))
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30)
envelopes = st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(MESSAGE_TYPES)) | values, "v": values | st.just("1.2"), "id": values},
    optional={"parent_id": values, "text": values, "options": values})


def decodes_or_wire_error(frame: bytes) -> None:
    try:
        transport.decode(frame)
    except transport.WireError as exc:
        assert isinstance(exc.code, ErrorCode)


@FAST
@given(st.binary(max_size=512))
def test_any_bytes_give_a_message_or_a_wire_error(frame: bytes) -> None:
    decodes_or_wire_error(frame)


@FAST
@given(envelopes)
def test_any_msgpack_map_gives_a_message_or_a_wire_error(raw: dict) -> None:
    decodes_or_wire_error(msgpack.packb(raw, use_bin_type=True))


@pytest.mark.parametrize("kind", [[], {}, [1, 2], {"a": 1}, 3.5, None, b"chat_request"])
def test_a_type_of_the_wrong_shape_is_a_bad_message(kind: object) -> None:
    with pytest.raises(transport.WireError) as raised:
        transport.decode(msgpack.packb({"type": kind, "v": "1.2", "id": "x"}, use_bin_type=True))
    assert raised.value.code == ErrorCode.bad_message and raised.value.msg_id == "x"


def test_an_element_count_bomb_is_refused_without_building_it() -> None:
    # 300 arrays of 100k empty maps: about 30 MB on the wire, gigabytes as Python objects.
    chunk = b"\xdd" + struct.pack(">I", 100_000) + b"\x80" * 100_000
    frame = b"\xdc" + struct.pack(">H", 300) + chunk * 300
    assert len(frame) < transport.DEFAULT_MAX_BYTES
    with pytest.raises(transport.WireError) as raised:
        transport.decode(frame)
    assert raised.value.code in (ErrorCode.too_large, ErrorCode.bad_message)


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(transport.WireError):
        transport.decode(b"\x81\xa1a" * 10_000 + b"\xc0")


def png(size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, format="TIFF")
    return buf.getvalue()


def dds_with_unknown_pixel_format() -> bytes:
    """A DDS header whose pixel-format flags Pillow does not know (it raised NotImplementedError)."""
    header = struct.pack("<4sI", b"DDS ", 124) + struct.pack("<6I", 0x1007, 4, 4, 16, 0, 0) + b"\0" * 44
    pixel_format = struct.pack("<2I4s5I", 32, 0x80000, b"\0\0\0\0", 0, 0, 0, 0, 0)
    return header + pixel_format + b"\0" * 20 + b"\0" * 64


@pytest.mark.parametrize("data", [dds_with_unknown_pixel_format(), tiff(), tiff()[:40] + b"\xff" * 30 + tiff()[70:]],
                         ids=["dds", "tiff", "mutated-tiff"])
def test_unusual_or_crafted_formats_are_unreadable_images(data: bytes) -> None:
    with pytest.raises(BadImage) as raised:
        check_image(data, LIMITS)
    assert raised.value.code == ErrorCode.image_unreadable


@FAST
@given(st.data())
def test_mutated_images_give_a_typed_refusal_or_pass(data: st.DataObject) -> None:
    original = bytearray(png((16, 16)))
    for _ in range(data.draw(st.integers(1, 8))):
        original[data.draw(st.integers(0, len(original) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(original)))
    try:
        check_image(bytes(original[:cut]), LIMITS)
    except BadImage as exc:
        assert exc.code in (ErrorCode.image_unreadable, ErrorCode.image_truncated, ErrorCode.image_dimensions)


# ---------------------------------------------------------------- what a refusal may echo, and how deep a frame nests


@pytest.mark.parametrize("field,value", [("id", "i" * 10_000), ("id", ["x"]), ("id", {"a": 1}),
                                         ("parent_id", "p" * 10_000), ("parent_id", [1]), ("parent_id", 7)])
def test_an_envelope_id_of_the_wrong_shape_or_size_is_refused(field: str, value: object) -> None:
    raw = {"type": "status_request", "v": "1.2", "id": "ok", field: value}
    with pytest.raises(transport.WireError) as raised:
        transport.decode(msgpack.packb(raw, use_bin_type=True))
    assert raised.value.code == ErrorCode.bad_message and len(raised.value.message) < 200
    assert raised.value.msg_id in (None, "ok")


@pytest.mark.parametrize("raw", [
    {"type": "status_request", "v": "1.2", "k" * 1_000_000: 1},  # an unknown field's name is the error's place
    {"type": "status_request", "v": "9" * 1_000_000},
    {"type": "x" * 1_000_000, "v": "1.2"},
], ids=["field-name", "version", "type"])
def test_a_refusal_never_echoes_a_peers_megabytes(raw: dict) -> None:
    with pytest.raises(transport.WireError) as raised:
        transport.decode(msgpack.packb(raw, use_bin_type=True))
    assert len(raised.value.message) < 300  # it is sent back and logged


def test_nesting_past_the_limit_is_refused_and_real_messages_fit() -> None:
    deep: object = "x"
    for _ in range(transport.MAX_DEPTH):
        deep = [deep]
    with pytest.raises(transport.WireError, match="nests deeper"):
        transport.decode(msgpack.packb({"type": "chat_request", "v": "1.2", "text": deep}))
    turns = [ChatTurn(role="user" if i % 2 == 0 else "assistant", content=f"t{i}") for i in range(2001)]
    assert len(transport.decode(transport.encode(ChatRequest(messages=turns))).messages) == 2001


def test_thirty_million_empty_maps_cost_next_to_nothing() -> None:
    count = 30_000_000
    bomb = b"\xdd" + struct.pack(">I", count) + b"\x80" * count  # one array of 30M empty maps: 30 MB
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(transport.WireError) as raised:
            transport.decode(bomb)
        seconds, peak = time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert raised.value.code == ErrorCode.too_large and seconds < 1.0 and peak < 10_000_000


@FAST
@given(st.sampled_from([transport.encode(ChatRequest(text="hi", image=b"\x89PNG")), transport.encode(StatusRequest()),
                        transport.encode(HeartbeatEvent(instance="i", resident=[]))]),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_valid_frames_give_a_message_or_a_wire_error(frame: bytes, flips: list[tuple[int, int]]) -> None:
    data = bytearray(frame)
    for where, byte in flips:
        data[where % len(data)] = byte
    decodes_or_wire_error(bytes(data))


# ---------------------------------------------------------------- every Pillow decoder, not only the five we open

ALL_DECODERS = ImageLimits(max_bytes=8_000_000, max_side=4096, max_pixels=16_000_000, formats=None)


def tiff_with_float_strip_offsets() -> bytes:
    """A TIFF whose StripOffsets tag claims the FLOAT type: Pillow raised TypeError decoding it."""
    data = bytearray(tiff())
    ifd = struct.unpack("<I", data[4:8])[0]
    for entry in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
        at = ifd + 2 + 12 * entry
        if struct.unpack("<H", data[at:at + 2])[0] == 273:  # StripOffsets
            data[at + 2:at + 4] = struct.pack("<H", 11)  # FLOAT
    return bytes(data)


@pytest.mark.parametrize("data,raises", [(dds_with_unknown_pixel_format(), NotImplementedError),
                                         (tiff_with_float_strip_offsets(), TypeError)], ids=["dds", "tiff"])
def test_a_decoder_exception_of_any_type_is_image_unreadable(data: bytes, raises: type[Exception]) -> None:
    with pytest.raises(raises):  # what Pillow itself does with the file
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    with pytest.raises(BadImage) as raised:
        check_image(data, ALL_DECODERS)
    assert raised.value.code == ErrorCode.image_unreadable


@FAST
@given(st.sampled_from([tiff(), dds_with_unknown_pixel_format(), png((16, 16))]), st.data())
def test_mutated_files_through_every_decoder_give_a_typed_refusal_or_pass(original: bytes,
                                                                          data: st.DataObject) -> None:
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 6))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    try:
        check_image(bytes(mutated), ALL_DECODERS)
    except BadImage as exc:
        assert isinstance(exc.code, ErrorCode) and exc.message


@FAST
@given(st.binary(max_size=2048) | st.sampled_from([b"DDS ", b"II*\x00", b"MM\x00*", b"\x89PNG\r\n\x1a\n", b"GIF89a",
                                                    b"BM", b"RIFF", b"\xff\xd8\xff"]).flatmap(
    lambda magic: st.binary(max_size=512).map(lambda rest: magic + rest)))
def test_any_bytes_through_every_decoder_give_a_typed_refusal_or_pass(data: bytes) -> None:
    for limits in (LIMITS, ALL_DECODERS):
        try:
            check_image(data, limits)
        except BadImage as exc:
            assert isinstance(exc.code, ErrorCode)
