"""`lyra demo`: start the stack on a config, hold a short scripted conversation, stop the stack."""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TextIO

from shared.cli import stack
from shared.cli.live_status import LiveStatus, progress_printer
from shared.cli.render import VoiceText, route_note, save_image
from shared.client import Client, LyraError
from shared.config.paths import default_config
from shared.config.schema import load_config
from shared.engine.echoes import instruction_echoes, trailing_filler
from shared.wire.messages import DoneEvent, ImageEvent, StageRestartedEvent, TokenEvent

FENCE = re.compile(r"^[ \t]*```", re.MULTILINE)
LIST_NUMBER_LAST = re.compile(r"(?:^|\n)[ \t]*\d+[.)]$")  # the answer ends on the number of a list item

SCRIPT: tuple[tuple[str, bool], ...] = (  # (prompt, attach a picture)
    ("How do I fix a flat tyre?", False),
    ("What is the meaning of life?", False),
    ("Write a Python function that reverses a string.", False),
    ("Is free will an illusion?", False),
    ("Draw a picture of a lighthouse at sunset.", False),
    ("What is in this picture?", True),
)
# `lyra demo --quick`: one turn for each specialist (pragmatist, philosopher, artist, perception).
QUICK_SCRIPT = tuple(turn for turn in SCRIPT if turn[0] in (
    "How do I fix a flat tyre?", "Is free will an illusion?", "Draw a picture of a lighthouse at sunset.",
    "What is in this picture?"))


def sample_picture() -> bytes:
    """A small picture to ask perception about (a red disc on blue), made on the spot."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 96), (30, 60, 160))
    ImageDraw.Draw(image).ellipse((24, 24, 72, 72), fill=(220, 30, 30))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def answer_problems(answer: str) -> list[str]:
    """What makes an answer look broken: cut off mid-sentence or at a list number, a code fence left open,
    a line said twice, a phrase looping, the voice's instructions echoed, filler after the answer."""
    problems = []
    text = answer.strip()
    if text and (not re.search(r"([.!?:;]|```)[\"')\]*_\s]*$", text) or LIST_NUMBER_LAST.search(text)):
        problems.append(f"cut off: ...{text[-40:]!r}")
    if len(FENCE.findall(text)) % 2:
        problems.append("unclosed code fence")
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 10]
    problems += [f"repeated line: {line[:60]!r}" for line, n in Counter(lines).items() if n > 1]
    words = re.findall(r"\w+", text.lower())
    grams = Counter(tuple(words[i:i + 4]) for i in range(len(words) - 3))
    problems += [f"repeated phrase: {' '.join(gram)!r} x{n}" for gram, n in grams.items() if n > 1]
    pairs = Counter(tuple(words[i:i + 2]) for i in range(len(words) - 1))
    problems += [f"looping: {' '.join(pair)!r} x{n}" for pair, n in pairs.items() if n > 2 and len(set(pair)) > 1
                 and _within(words, pair, 12)]
    problems += [f"instructions echoed: {sentence[:60]!r}" for sentence in instruction_echoes(text)]
    problems += [f"filler at the end: {sentence[:60]!r}" for sentence in trailing_filler(text)]
    return problems


def _within(words: list[str], pair: tuple[str, ...], span: int) -> bool:
    """Whether `pair` occurs three times within `span` words (a loop, not a common phrase)."""
    starts = [i for i in range(len(words) - 1) if tuple(words[i:i + 2]) == pair]
    return any(starts[j + 2] - starts[j] <= span for j in range(len(starts) - 2))


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is a terminal (a live status is drawn there; never into a pipe or a file)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _scores(done: DoneEvent) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(done.scores.items(), key=lambda kv: -kv[1]))


def converse(client: Client, script: tuple[tuple[str, bool], ...], image_dir: Path,
             out: TextIO = sys.stdout) -> list[DoneEvent]:
    """Send each prompt, stream the answer, print route, scores, timings and where images went."""
    results = []
    for prompt, attach in script:
        shown = f"{prompt} [+ a picture]" if attach else prompt
        print(f"\nyou> {shown}\nlyra> ", end="", file=out, flush=True)
        done = None
        answer = VoiceText()
        saved = []
        # On a terminal, "lyra> routing -> philosopher (0.91) -> thinking  8.2s" until the answer streams.
        with LiveStatus(out if is_terminal(out) else None, prefix="lyra> ") as live:
            for event in client.stream(prompt, image=sample_picture() if attach else None):
                live.feed(event)
                if isinstance(event, (TokenEvent, StageRestartedEvent)):
                    print(answer.feed(event), end="", file=out, flush=True)
                elif isinstance(event, ImageEvent):
                    saved.append(save_image(event, str(image_dir)))  # shown on its own line after the answer
                elif isinstance(event, DoneEvent):
                    done = event
        assert done is not None
        for path in saved:
            print(f"\n  image saved: {path}", end="", file=out)
        t = done.timings
        print(f"\n  route: {done.specialist}{route_note(done)} ({_scores(done)})", file=out)
        print("  timings: " + "  ".join(f"{k} {t[k]:.2f}s" for k in ("route", "load", "specialist", "voice", "total")
                                        if k in t), file=out, flush=True)
        for problem in answer_problems(done.answer):
            print(f"  check: {problem}", file=out, flush=True)
        results.append(done)
    return results


def run_demo(config_path: str | None, timeout_s: float, image_dir: str = "lyra-demo-images",
             script: tuple[tuple[str, bool], ...] = SCRIPT) -> int:
    """The whole demo; returns the exit status."""
    config = load_config(config_path or default_config())
    # The demo talks to the coordinator and stops the stack when done: an HTTP API would only claim a port.
    config = config.model_copy(update={"gateway": config.gateway.model_copy(update={"enabled": False})})
    print(f"Lyra Runtime demo on {Path(config.source).name}: starting the stack (first start loads the models)...",
          flush=True)
    began = time.monotonic()
    with LiveStatus(sys.stdout if is_terminal(sys.stdout) else None) as live:  # stops what it started on failure
        stack.up(config, timeout_s, progress_printer(live))
    try:
        print(f"stack up in {time.monotonic() - began:.1f}s", flush=True)
        with Client(config.client_endpoint(), timeout_s=timeout_s) as client:
            results = converse(client, script, Path(image_dir))
    except LyraError as exc:
        print(f"\ndemo failed: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping the stack...", flush=True)
        stack.down(config.run_dir())
    reached = sorted({r.specialist for r in results})
    flagged = sum(bool(answer_problems(r.answer)) for r in results)
    print(f"specialists reached: {', '.join(reached)}; answers flagged: {flagged} of {len(results)}; "
          f"total {time.monotonic() - began:.1f}s")
    if len(reached) < 2:
        print("demo failed: the router sent every turn to one specialist", file=sys.stderr)
        return 1
    return 0
