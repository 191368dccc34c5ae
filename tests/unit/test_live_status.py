"""The live status line: what a terminal shows while a turn runs, and that a pipe gets none of it."""

from __future__ import annotations

import io

from shared.cli.demo import converse
from shared.cli.live_status import CLEAR, LiveStatus
from shared.wire.messages import AcceptedEvent, DoneEvent, RouteEvent, StageFinishedEvent, StageStartedEvent, TokenEvent


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal and records what was written."""

    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def turn_events() -> list:
    """One turn as the coordinator streams it: route, load, specialist, voice tokens, done."""
    return [AcceptedEvent(position=0, queue_depth=1),
            StageStartedEvent(stage="route", service="router"),
            StageFinishedEvent(stage="route", service="router", seconds=1.0),
            RouteEvent(specialist="pragmatist", scores={"pragmatist": 0.85, "artist": 0.15}),
            StageStartedEvent(stage="load", service="specialist_host", model="pragmatist"),
            StageStartedEvent(stage="specialist", service="specialist_host", model="pragmatist"),
            TokenEvent(stage="specialist", text="Jack"),
            TokenEvent(stage="specialist", text=" up"),
            StageStartedEvent(stage="voice", service="voice"),
            TokenEvent(stage="voice", text="Lift"),
            TokenEvent(stage="voice", text=" the car."),
            DoneEvent(answer="Lift the car.", specialist="pragmatist", scores={"pragmatist": 0.85},
                      timings={"route": 1.0, "total": 9.0})]


def test_a_terminal_sees_each_step_with_elapsed_seconds_redrawn_in_place_then_cleared() -> None:
    term, clock = FakeTerminal(), FakeClock()
    live = LiveStatus(term, clock=clock, width=200)
    drawn = []
    for event in turn_events():
        clock.now += 2.0
        before = len(term.getvalue())
        live.feed(event)
        drawn.append(term.getvalue()[before:])
        if isinstance(event, TokenEvent) and event.stage == "voice":
            term.write(event.text)  # the answer, printed by the caller after the line was cleared
    frames = [frame.removeprefix(CLEAR) for frame in drawn if frame.startswith(CLEAR) and frame != CLEAR]
    assert frames[0] == "routing  4.0s"
    assert "routing -> pragmatist (0.85) -> loading pragmatist  10.0s" in frames
    assert "routing -> pragmatist (0.85) -> loading pragmatist -> thinking (2 tokens)  16.0s" in frames
    assert frames[-1].startswith("routing -> pragmatist (0.85) -> loading pragmatist -> thinking (2 tokens) -> "
                                 "answering  18.0s")
    # The first word of the answer clears the line; the answer itself is all that remains after the last clear.
    assert term.getvalue().rsplit(CLEAR, 1)[1] == "Lift the car."


def test_a_long_status_is_cut_to_the_terminal_width_so_a_redraw_never_wraps() -> None:
    term = FakeTerminal()
    live = LiveStatus(term, clock=FakeClock(), width=40)
    for event in turn_events()[:8]:
        live.feed(event)
    last = term.getvalue().rsplit(CLEAR, 1)[1]
    assert len(last) < 40 and last.startswith("...") and last.endswith("0.0s")


def test_no_stream_draws_nothing_whatever_the_events() -> None:
    live = LiveStatus(None, clock=FakeClock())
    for event in turn_events():
        live.feed(event)
    assert not live.drawing and not live.shown


class ScriptedClient:
    def stream(self, text: str, image: bytes | None = None):
        yield from turn_events()


def test_the_demo_draws_its_status_after_the_prompt_on_a_terminal_and_not_in_a_file(tmp_path) -> None:
    term = FakeTerminal()
    converse(ScriptedClient(), (("How do I fix a flat tyre?", False),), tmp_path, term)
    assert f"{CLEAR}lyra> routing" in term.getvalue()
    assert f"{CLEAR}lyra> Lift the car." in term.getvalue()
    piped = io.StringIO()
    converse(ScriptedClient(), (("How do I fix a flat tyre?", False),), tmp_path, piped)
    assert "\r" not in piped.getvalue() and "\x1b" not in piped.getvalue()
    assert "lyra> Lift the car." in piped.getvalue().splitlines()


def test_a_stack_start_shows_one_line_on_a_terminal_and_a_line_per_change_in_a_pipe(capsys) -> None:
    from shared.cli.live_status import progress_printer

    term = FakeTerminal()
    live = LiveStatus(term, clock=FakeClock(), width=200)
    show = progress_printer(live)
    show("loading router, voice: waiting for them to register (1 of 3 services up)")
    show("loading router: waiting for it to register (2 of 3 services up)")
    live.close()
    assert term.getvalue().split(CLEAR)[1:] == [
        "loading router, voice: waiting for them to register (1 of 3 services up)  0.0s",
        "loading router: waiting for it to register (2 of 3 services up)  0.0s", ""]
    printed = progress_printer(LiveStatus(None))
    printed("loading router: waiting for it to register (2 of 3 services up)")
    assert capsys.readouterr().out == "  loading router: waiting for it to register (2 of 3 services up)\n"
