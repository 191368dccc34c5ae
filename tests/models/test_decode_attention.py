"""Runs the Triton kernels' tests under Triton's CPU interpreter: decode attention, products, the peer all-reduce.

Triton decides at import whether it interprets, so those tests need a process of their own that sets
TRITON_INTERPRET=1 before anything imports Triton.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (the dev extra installs it on Linux x86-64)")
pytestmark = pytest.mark.models

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("tests", ["interpreted_decode_attention.py", "interpreted_peer_reduce.py",
                                   "interpreted_gemv.py"])
def test_kernel_tests_pass_under_the_interpreter(tests: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          str(Path(__file__).with_name(tests))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1:] if run.stdout else []
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert summary and " passed" in summary[0] and "skipped" not in summary[0], summary
