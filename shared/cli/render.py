"""How the CLI and the demo show things: a status table, an answer's summary, streamed text, images."""

from __future__ import annotations

from pathlib import Path

from shared.config.units import GB, format_gb
from shared.wire.messages import DoneEvent, ImageEvent, Message, StageRestartedEvent, StatusReply, TokenEvent


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


def _gb(value: int | None) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


def render_status(status: StatusReply) -> str:
    """A human table of services, GPUs and the queue."""
    # Columns as wide as their longest entry: "diffusers,transformers" must not run into the next one.
    backend = max([len("backend"), *(len(s.backend or "-") for s in status.services)]) + 2
    resident = max([len("resident"), *(len(", ".join(s.resident) or "-") for s in status.services)]) + 2
    lines = [f"coordinator: {status.client_endpoint}   queue: {status.queue_depth} waiting"
             f"{', running ' + status.running if status.running else ''}",
             f"{'service':<16}{'state':<9}{'pid':>8}  {'backend':<{backend}}{'resident':<{resident}}placement"]
    for s in status.services:
        placement = ", ".join(f"{k}={v}" for k, v in s.placement.items()) or "-"
        lines.append(f"{s.service:<16}{s.state:<9}{s.pid or '-':>8}  {s.backend or '-':<{backend}}"
                     f"{', '.join(s.resident) or '-':<{resident}}{placement}")
        if s.cached:
            held = ", ".join(f"{k} {format_gb(v, 2)}" for k, v in s.cached.items())
            lines.append(f"{'':<16}host weight cache (least recently used first): {held}")
    if status.gpus:
        lines.append(f"{'gpu':<6}{'budget GB':>10}{'estimated':>11}{'measured':>10}  resident")
        for g in status.gpus:
            lines.append(f"{g.gpu:<6}{_gb(g.budget_bytes):>10}{_gb(g.estimated_bytes):>11}{_gb(g.measured_bytes):>10}"
                         f"  {', '.join(g.resident) or '-'}")
    if status.counters:
        lines.append("counters: " + ", ".join(f"{k}={v}" for k, v in status.counters.items()))
    return "\n".join(lines)


def print_summary(done: DoneEvent) -> None:
    """Route, scores and timings after an answer."""
    scores = ", ".join(f"{k} {v:.2f}" for k, v in sorted(done.scores.items(), key=lambda kv: -kv[1]))
    print(f"route: {done.specialist}{route_note(done)}   scores: {scores}")
    order = ("queue", "route", "load", "specialist", "voice", "total")
    print("timings: " + "  ".join(f"{k} {done.timings[k]:.3f}s" for k in order if k in done.timings))
    for cut in done.truncated or []:
        print(f"truncated: the {cut.stage} ({cut.model}) read only the last {cut.kept_tokens} of {cut.prompt_tokens} "
              f"prompt tokens (max_context {cut.max_context}); the oldest text was dropped")
