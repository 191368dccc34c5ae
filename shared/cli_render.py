"""Small output helpers shared by the CLI and the demo."""

from __future__ import annotations

from pathlib import Path

from shared.messages import ImageEvent


def save_image(event: ImageEvent, out_dir: str) -> Path:
    """Write an image event to `out_dir` and return the path."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = {"image/png": ".png", "image/jpeg": ".jpg"}.get(event.image.mime, ".bin")
    path = folder / f"lyra-{event.parent_id or event.id}{suffix}"
    path.write_bytes(event.image.data)
    return path
