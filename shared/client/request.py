"""What a caller hands the client and gets back: a ChatRequest built from friendly arguments, a result's image."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from shared.wire.messages import ChatRequest, ChatTurn, DoneEvent, GenerationOptions, ImagePayload


def build_request(text: str | None = None, messages: list[dict[str, str]] | None = None, image: Any = None,
                  specialist: str | None = None, events: str = "all", **options: Any) -> ChatRequest:
    """A validated ChatRequest from friendly arguments (`events="answer"`: see ChatRequest.events)."""
    turns = [ChatTurn(**m) for m in messages] if messages else None
    return ChatRequest(text=text, messages=turns, image=image_bytes(image), specialist=specialist,
                       options=GenerationOptions(**options), events=events)


def image_bytes(image: Any) -> bytes | None:
    """The bytes of an image given as a path, raw bytes, or a PIL image."""
    if image is None or isinstance(image, bytes):
        return image
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"image must be a path, bytes or a PIL image, not {type(image).__name__}")


def pil_image(result: DoneEvent | ImagePayload) -> Any:
    """The result's image as a PIL image (needs Pillow); None when the turn made no image."""
    payload = result.image if isinstance(result, DoneEvent) else result
    if payload is None:
        return None
    from PIL import Image

    return Image.open(io.BytesIO(payload.data))
