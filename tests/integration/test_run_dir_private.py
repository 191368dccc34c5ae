"""Everything `lyra up` leaves in a run directory is the owner's alone, whatever the umask it was started with."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stackproc import ROOT, fake_config, to_toml

pytestmark = pytest.mark.stack


def lyra(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          preexec_fn=lambda: os.umask(0o022))  # a common login umask: new files 0644


def exposed(run_dir: Path) -> dict[str, str]:
    """Paths under `run_dir` (itself included) that a group or other users may read, write or enter."""
    found = {}
    for path in [run_dir, *run_dir.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            found[str(path.relative_to(run_dir.parent))] = f"{mode:04o}"
    return found


def test_lyra_up_leaves_nothing_readable_by_others_in_the_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = tmp_path / "dev.toml"
    config.write_text(to_toml(fake_config(run_dir)))
    try:
        started = lyra("up", "-c", str(config), "--timeout", "60")
        assert started.returncode == 0, started.stdout + started.stderr
        assert (run_dir / "supervisord.log").exists() and (run_dir / "stack.json").exists()
        assert exposed(run_dir) == {}
    finally:
        stopped = lyra("down", "--run-dir", str(run_dir))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
