"""End to end under supervisord: `lyra up`, chat, restart each service, `lyra down`, nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.client import Client, LyraError, find_stack
from tests.stackproc import ROOT, fake_config, to_toml

pytestmark = pytest.mark.stack

LYRA = [sys.executable, "-m", "shared.cli"]


def lyra(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LYRA, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def supervisorctl(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    bin_dir = Path(sys.executable).parent
    return subprocess.run([str(bin_dir / "supervisorctl"), "-c", "supervisord.conf", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "LYRA_RUN_DIR": str(run_dir)})


def our_processes(run_dir: Path) -> list[str]:
    """Live (non-zombie) processes started for the stack of `run_dir` (other stacks may run meanwhile)."""
    from shared.cli.stack import supervisord_pid

    # -ww: whole command lines; pytest sets COLUMNS, and ps cut each line there, before the run directory
    out = subprocess.run(["ps", "-ww", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout.splitlines()
    services = [line for line in out if "services." in line and str(run_dir.parent) in line and " Z" not in line]
    pid = supervisord_pid(run_dir)
    return services + ([f"supervisord {pid}"] if pid is not None else [])


def left_behind(run_dir: Path, within_s: float = 0.5) -> list[str]:
    """`our_processes(run_dir)` once it is empty, or as it still is `within_s` from now (what was left behind)."""
    deadline = time.monotonic() + within_s
    while (found := our_processes(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_up_chat_restart_each_service_down(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = tmp_path / "dev.toml"
    config.write_text(to_toml(fake_config(run_dir)))
    try:
        up = lyra("up", "-c", str(config), "--timeout", "60")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "router" in up.stdout and "up" in up.stdout
        chat = lyra("chat", "how do I do math with code", cwd=tmp_path)  # any directory
        assert chat.returncode == 0, chat.stderr
        assert "route: pragmatist" in chat.stdout and "timings:" in chat.stdout
        for service in ("router", "specialist_host", "voice", "coordinator"):
            before = _pids(run_dir)
            restarted = supervisorctl(run_dir, "restart", service)
            assert restarted.returncode == 0, restarted.stdout + restarted.stderr
            _wait_all_up(run_dir, service, before)
            again = lyra("chat", "--json", "meaning of life", cwd=tmp_path)
            assert again.returncode == 0, (service, again.stderr, lyra("logs", service).stdout)
            assert json.loads(again.stdout)["specialist"] == "philosopher"
        logs = lyra("logs", "router")
        assert "registered with the coordinator" in logs.stdout
        private = {path.name: path.stat().st_mode & 0o777 for path in
                   [*(run_dir / "logs").glob("*.log"), run_dir / "client.sock", run_dir / "workers.sock"]}
        assert private and all(mode == 0o600 for mode in private.values()), private  # owner only
    finally:
        down = lyra("down")
    assert down.returncode == 0 and "stopped" in down.stdout
    assert left_behind(run_dir) == []
    assert lyra("status").returncode != 0


def _pids(run_dir: Path) -> dict[str, int | None]:
    """Each worker's pid, as the stack's coordinator reports it."""
    with Client(find_stack(run_dir)["client_endpoint"], timeout_s=10) as client:
        return {s.service: s.pid for s in client.status(timeout_s=5).services}


def _wait_all_up(run_dir: Path, restarted: str, before: dict[str, int | None], timeout_s: float = 30) -> None:
    """Poll through the Python client (a `lyra status` process per poll costs 0.6 s of CPU on the 2-core VM)."""
    endpoint, deadline = find_stack(run_dir)["client_endpoint"], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with Client(endpoint, timeout_s=10) as client:
                services = client.status(timeout_s=1).services
        except LyraError:  # the coordinator itself is restarting
            services = []
        if services and all(s.state == "up" for s in services) and (
                restarted == "coordinator" or
                next(s.pid for s in services if s.service == restarted) != before[restarted]):
            return
        time.sleep(0.1)
    raise AssertionError(f"stack not back up after restarting {restarted}")
