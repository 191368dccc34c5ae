"""Small output helpers shared by the CLI and the demo."""

from __future__ import annotations

from pathlib import Path

from shared.wire.messages import DoneEvent, ImageEvent, Message, StageRestartedEvent, TokenEvent


def save_image(event: ImageEvent, out_dir: str) -> Path:
    """Write an image event to `out_dir` and return the path."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = {"image/png": ".png", "image/jpeg": ".jpg"}.get(event.image.mime, ".bin")
    path = folder / f"lyra-{event.parent_id or event.id}{suffix}"
    path.write_bytes(event.image.data)
    return path


class VoiceText:
    """The answer as streamed so far: what to print for each event, and the text itself.

    A `stage_restarted` for the voice means the answer starts over: the partial text is dropped and a
    marker is printed, so the terminal shows where the second (complete) answer begins.
    """

    def __init__(self) -> None:
        self.text = ""

    def feed(self, event: Message) -> str:
        """What to print for `event` (often nothing)."""
        if isinstance(event, TokenEvent) and event.stage == "voice":
            self.text += event.text
            return event.text
        if isinstance(event, StageRestartedEvent) and event.stage == "voice":
            dropped, self.text = self.text, ""
            note = "; the answer so far is dropped" if dropped else ""
            return f"\n[{event.service} restarted mid-answer{note}: starting over]\n"
        return ""


def route_note(done: DoneEvent) -> str:
    """How the specialist was chosen, after its name: "" when the router chose it outright."""
    kind = done.route_kind or ("forced" if done.forced else "routed")
    notes = {"forced": " (forced)", "image_rule": " (image rule)"}
    return notes.get(kind, " (fallback: the router was unsure)" if done.fallback else "")
