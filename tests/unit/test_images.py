"""Image validation: every kind of bad image has its own error, before any model runs."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from services.coordinator.images import BadImage, ImageLimits, check_image
from shared.wire.messages import ErrorCode

LIMITS = ImageLimits(max_bytes=200_000, max_side=4096, max_pixels=4_000_000)


def png(width: int, height: int, colour: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header claims absurd dimensions (tiny payload)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + \
        chunk(b"IEND", b"")


def test_a_good_png_and_jpeg_pass() -> None:
    assert check_image(png(64, 48), LIMITS) == ("PNG", 64, 48)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="JPEG")
    assert check_image(buf.getvalue(), LIMITS)[0] == "JPEG"


@pytest.mark.parametrize("data,code", [
    (b"this is a text file, not a picture", ErrorCode.image_unreadable),
    (b"", ErrorCode.image_unreadable),
    (png(200, 200, (1, 2, 3))[:300], ErrorCode.image_truncated),
    (png_header_claiming(100_000, 100_000), ErrorCode.image_dimensions),
    (png_header_claiming(5000, 10), ErrorCode.image_dimensions),
    (b"\x89PNG" + b"\x00" * 300_000, ErrorCode.image_too_large),
])
def test_each_kind_of_bad_image_has_its_own_error(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(BadImage) as err:
        check_image(data, LIMITS)
    assert err.value.code == code and err.value.message
