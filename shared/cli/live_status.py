"""A one-line live status while a turn runs or a stack starts: redrawn in place on a terminal, silent in a pipe.

`lyra chat`, `lyra demo` and `lyra up` show what is happening before the first word arrives
(`routing -> pragmatist (0.85) -> loading -> thinking -> answering  12.4s`). On a terminal the line is
redrawn with a carriage return and cleared (erase to end of line) when the answer starts streaming; when
neither stdout nor stderr is a terminal nothing is drawn, so a pipe never receives a control character.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from shared.wire.messages import (
    AcceptedEvent,
    DoneEvent,
    ErrorEvent,
    ImageEvent,
    Message,
    ProgressEvent,
    RouteEvent,
    StageRestartedEvent,
    StageStartedEvent,
    TokenEvent,
)

CLEAR = "\r\x1b[K"  # back to the start of the line, erase to its end
TICK_S = 0.5  # how often the elapsed seconds are redrawn between events
STAGE_WORDS = {"route": "routing", "load": "loading", "specialist": "thinking", "voice": "answering"}


def terminal_stream() -> TextIO | None:
    """Where a live status may be drawn: stderr when it is a terminal, else stdout when it is; else None."""
    for stream in (sys.stderr, sys.stdout):
        try:
            if stream.isatty():
                return stream
        except (AttributeError, ValueError):  # a closed or replaced stream
            continue
    return None


def turn_step(event: Message, specialist_tokens: int) -> str | None:
    """The step a turn's event adds to the status line, or None when it adds none."""
    if isinstance(event, AcceptedEvent) and event.position > 0:
        return f"queued ({event.position} ahead)"
    if isinstance(event, ProgressEvent) and event.position:
        return f"queued ({event.position} ahead)"
    if isinstance(event, RouteEvent):
        how = {"forced": "forced", "image_rule": "image rule"}.get(event.kind)
        score = event.scores.get(event.specialist)
        note = how or ("unsure" if event.fallback else f"{score:.2f}" if score is not None else "")
        return f"{event.specialist} ({note})" if note else event.specialist
    if isinstance(event, StageStartedEvent):
        word = STAGE_WORDS.get(event.stage, event.stage)
        return f"{word} {event.model}" if event.stage == "load" and event.model else word
    if isinstance(event, StageRestartedEvent):
        return f"{event.service} restarted, running {event.stage} again"
    if isinstance(event, TokenEvent) and event.stage == "specialist":
        return f"thinking ({specialist_tokens} tokens)"
    return None


class LiveStatus:
    """The status line of one turn (or one `lyra up`), drawn on `stream` when it is given, else nowhere.

    Call `feed` with every event; it clears the line when the answer (or anything else that prints) comes.
    `start` runs a ticker that redraws the elapsed seconds between events; `close` stops it and clears.
    """

    def __init__(self, stream: TextIO | None, clock: Callable[[], float] = time.monotonic,
                 width: int | None = None, prefix: str = "") -> None:
        self.stream = stream
        self.prefix = prefix  # already printed on the line (the demo's "lyra> "): redrawn with the status
        self.clock = clock
        self.began = clock()
        self.width = width or shutil.get_terminal_size((80, 24)).columns
        self.steps: list[str] = []
        self.specialist_tokens = 0
        self.shown = False
        self.finished = False  # the answer started: nothing more is drawn for this turn
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.ticker: threading.Thread | None = None

    @property
    def drawing(self) -> bool:
        """Whether anything is drawn at all (a terminal was given)."""
        return self.stream is not None

    def line(self) -> str:
        """The status as one line, cut to the terminal's width so a redraw never wraps."""
        elapsed = f"  {self.clock() - self.began:.1f}s"
        text = " -> ".join(self.steps) or "waiting"
        room = max(self.width - 1 - len(self.prefix) - len(elapsed), 8)
        if len(text) > room:
            text = "..." + text[-(room - 3):]
        return text + elapsed

    def feed(self, event: Message) -> None:
        """Take one event: add its step and redraw, or clear the line when output follows."""
        if isinstance(event, TokenEvent) and event.stage == "specialist":
            self.specialist_tokens += 1
        if (isinstance(event, TokenEvent) and event.stage == "voice") or isinstance(
                event, (ImageEvent, DoneEvent, ErrorEvent)):
            self.finish()
            return
        step = turn_step(event, self.specialist_tokens)
        if step is not None:
            self.set_step(step)
        elif isinstance(event, ProgressEvent):
            self.redraw()

    def set_step(self, step: str) -> None:
        """Add `step` (replacing the last one when it is the same kind of step, as a counter) and redraw."""
        if self.steps and step.split(" (")[0] == self.steps[-1].split(" (")[0]:
            self.steps[-1] = step
        else:
            self.steps.append(step)
        self.finished = False
        self.redraw()

    def show(self, text: str) -> None:
        """Replace the whole status with `text` (a startup's progress line) and redraw."""
        self.steps = [text]
        self.finished = False
        self.redraw()

    def redraw(self) -> None:
        """Draw the line again in place (the elapsed seconds moved)."""
        with self.lock:
            if self.stream is None or self.finished:
                return
            self.stream.write(CLEAR + self.prefix + self.line())
            self.stream.flush()
            self.shown = True

    def finish(self) -> None:
        """Clear the line: the answer (or an error, or an image note) prints next."""
        with self.lock:
            self.finished = True
            if self.stream is not None and self.shown:
                self.stream.write(CLEAR + self.prefix)
                self.stream.flush()
            self.shown = False

    def start(self) -> LiveStatus:
        """Redraw every TICK_S seconds until `close` (on a terminal only)."""
        if self.stream is not None and self.ticker is None:
            self.ticker = threading.Thread(target=self._tick, name="live-status", daemon=True)
            self.ticker.start()
        return self

    def _tick(self) -> None:
        while not self.stopped.wait(TICK_S):
            self.redraw()

    def close(self) -> None:
        """Stop the ticker and clear the line."""
        self.stopped.set()
        if self.ticker is not None:
            self.ticker.join(timeout=2)
        self.finish()

    def __enter__(self) -> LiveStatus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_printer(live: LiveStatus, indent: str = "  ") -> Callable[[str], None]:
    """A `stack.up` progress callback: the live line on a terminal, else one printed line per change."""
    if live.drawing:
        return live.show
    return lambda line: print(f"{indent}{line}", flush=True)
