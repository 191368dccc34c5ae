"""The demo's transcript: the answer on the `lyra>` line, a saved image on a line of its own."""

from __future__ import annotations

import io
from pathlib import Path

from shared.cli.demo import converse
from shared.wire.messages import DoneEvent, ImageEvent, ImagePayload, TokenEvent


class ScriptedClient:
    """Plays back one turn's events, as the coordinator would stream them."""

    def stream(self, text: str, image: bytes | None = None):
        yield ImageEvent(parent_id="r1", image=ImagePayload(data=b"\x89PNG fake"))
        yield TokenEvent(parent_id="r1", stage="voice", text="I drew")
        yield TokenEvent(parent_id="r1", stage="voice", text=" a lighthouse.")
        yield DoneEvent(parent_id="r1", answer="I drew a lighthouse.", specialist="artist", scores={"artist": 1.0},
                        timings={"route": 0.1, "total": 0.5})


def test_the_saved_image_is_on_its_own_line_after_the_answer(tmp_path: Path) -> None:
    out = io.StringIO()
    converse(ScriptedClient(), (("Draw a lighthouse.", False),), tmp_path, out)
    lines = out.getvalue().splitlines()
    assert "lyra> I drew a lighthouse." in lines
    saved = [line for line in lines if "image saved" in line]
    assert saved == [f"  image saved: {tmp_path / 'lyra-r1.png'}"] and (tmp_path / "lyra-r1.png").exists()


def test_status_speaks_the_planners_gb_and_its_columns_never_run_together() -> None:
    from shared.cli.main import render_status
    from shared.wire.messages import GpuSnapshot, ServiceStatus, StatusReply

    status = StatusReply(
        services=[ServiceStatus(service="specialist_host", state="up", pid=42, backend="diffusers,transformers",
                                resident=["philosopher"])],
        gpus=[GpuSnapshot(gpu=0, budget_bytes=47_000_000_000, estimated_bytes=0, measured_bytes=None, resident=[])],
        queue_depth=0, running=None, client_endpoint="ipc:///x")
    text = render_status(status)
    assert "diffusers,transformers  philosopher" in text  # at least two spaces between columns
    assert "47.00" in text  # 47 GB in the config is 47.00 here, as in `lyra plan`


def test_the_demo_check_finds_cut_off_and_repeated_answers() -> None:
    from shared.cli.demo import answer_problems

    assert answer_problems("I boil the water first. Then I pour it over the leaves.") == []
    assert answer_problems("Here it is:\n```python\ndef f(s):\n    return s[::-1]\n```") == []
    assert answer_problems("I think the meaning of life is") == ["cut off: ...'I think the meaning of life is'"]
    assert answer_problems("Steps:\n1. Loosen the nuts.\n2.") == ["cut off: ...'Steps:\\n1. Loosen the nuts.\\n2.'"]
    assert answer_problems("```python\ndef f(s):\n    return s[::-1]  # reversed.") == ["unclosed code fence"]
    looping = answer_problems("You need a kettle, a kettle, and a kettle.")
    assert looping == ["looping: 'a kettle' x3"]
    twice = answer_problems("Fill the kettle with water now.\nFill the kettle with water now.")
    assert twice[0] == "repeated line: 'Fill the kettle with water now.'" and "repeated phrase" in twice[1]


def test_the_demo_prints_each_problem_under_its_turn(tmp_path: Path) -> None:
    class CutOff(ScriptedClient):
        def stream(self, text: str, image: bytes | None = None):
            yield DoneEvent(parent_id="r2", answer="The answer is that we", specialist="philosopher",
                            scores={"philosopher": 1.0}, timings={"total": 0.5}, route_kind="routed", fallback=True)

    out = io.StringIO()
    converse(CutOff(), (("Why?", False),), tmp_path, out)
    assert "  route: philosopher (fallback: the router was unsure) (philosopher 1.00)" in out.getvalue()
    assert "  check: cut off: ...'The answer is that we'" in out.getvalue()
