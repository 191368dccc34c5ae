"""Validate image bytes before any model sees them: each kind of bad image gets its own error."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from shared.config.units import MB
from shared.wire.messages import ErrorCode

# The decoders the stack accepts (Pillow names). Fewer decoders, fewer ways for a crafted file to reach
# rarely used code: DDS and TIFF files raised NotImplementedError, TypeError and OverflowError here.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class ImageLimits:
    """What the stack accepts."""

    max_bytes: int
    max_side: int
    max_pixels: int
    formats: tuple[str, ...] | None = FORMATS  # Pillow decoders tried; None = all of them (tests only)


class BadImage(Exception):
    """The image was refused; `code` says why."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# What a decoder raises for data that ends early or is damaged. Anything else from inside Pillow
# (NotImplementedError, TypeError, OverflowError on crafted headers) means it cannot read the file at all.
_CORRUPT = (OSError, ValueError, SyntaxError, EOFError)


def check_image(data: bytes, limits: ImageLimits) -> tuple[str, int, int]:
    """Return (format, width, height) of a decodable image within the limits, or raise BadImage."""
    if len(data) > limits.max_bytes:
        raise BadImage(ErrorCode.image_too_large, f"the image is {len(data) / MB:.1f} MB; the limit is "
                                                  f"{limits.max_bytes / MB:.1f} MB (runtime.max_image_mb)")
    fmt, width, height = _header(data, limits)
    if width < 1 or height < 1 or max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise BadImage(ErrorCode.image_dimensions, f"the image is {width}x{height}; the limit is "
                                                   f"{limits.max_side} px a side and {limits.max_pixels} pixels")
    _decode(data, fmt, limits)
    return fmt, width, height


def _header(data: bytes, limits: ImageLimits) -> tuple[str, int, int]:
    """Format and size from the header alone (nothing is decoded yet)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=limits.formats) as header:
                return header.format or "unknown", header.width, header.height
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(ErrorCode.image_dimensions, f"the image's dimensions are absurd ({exc})") from None
    except Exception:  # any decoder failure: Pillow raises many unrelated types
        raise BadImage(ErrorCode.image_unreadable, "the attached file is not an image this stack can read "
                                                   f"({', '.join(FORMATS)})") from None


def _decode(data: bytes, fmt: str, limits: ImageLimits) -> None:
    """A full decode of an image whose size already passed the limits: damage shows here, before any model."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=limits.formats) as image:
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(ErrorCode.image_dimensions, f"the image's dimensions are absurd ({exc})") from None
    except _CORRUPT as exc:
        raise BadImage(ErrorCode.image_truncated, f"the {fmt} image is truncated or corrupt "
                                                  f"({type(exc).__name__})") from None
    except Exception as exc:
        raise BadImage(ErrorCode.image_unreadable, f"the {fmt} image cannot be decoded "
                                                   f"({type(exc).__name__})") from None
