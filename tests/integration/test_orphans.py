"""A stack whose supervisord is killed: its services end with it, `lyra` names and stops whatever is left of it,
and a worker of an earlier stack never registers with the coordinator of a later one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.client import Client
from shared.wire.stack_secret import create_secret
from tests.integration.test_supervisord import left_behind, lyra
from tests.stackproc import ROOT, fake_config, to_toml


def write_config(tmp_path: Path) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    config = tmp_path / "dev.toml"
    config.write_text(to_toml(fake_config(run_dir)))
    return config, run_dir


@pytest.mark.stack
def test_services_end_within_seconds_when_supervisord_is_killed_and_lyra_up_works_again(tmp_path: Path) -> None:
    config, run_dir = write_config(tmp_path)
    try:
        up = lyra("up", "-c", str(config), "--timeout", "60")
        assert up.returncode == 0, up.stdout + up.stderr
        os.kill(int((run_dir / "supervisord.pid").read_text()), signal.SIGKILL)
        began = time.monotonic()
        assert left_behind(run_dir, within_s=20) == []  # every service, re-parented to init, ended
        assert time.monotonic() - began < 10  # "within a few seconds": an idle fake stack drains at once
        status = lyra("status", timeout=30)
        assert status.returncode == 1 and "is gone" in status.stderr, status.stderr
        again = lyra("up", "-c", str(config), "--timeout", "60")
        assert again.returncode == 0, again.stdout + again.stderr
        chat = lyra("chat", "how do I do math with code", timeout=60)
        assert chat.returncode == 0 and "route: pragmatist" in chat.stdout, chat.stderr
    finally:
        lyra("down", "--run-dir", str(run_dir))
    assert left_behind(run_dir) == []


def test_lyra_names_what_is_left_of_a_stack_and_down_stops_it(tmp_path: Path) -> None:
    """A coordinator of this run directory whose supervisord is gone (it could not take it along)."""
    config, run_dir = write_config(tmp_path)
    run_dir.mkdir(mode=0o700)
    create_secret(run_dir / "stack.secret")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # the pid of a supervisord that no longer runs
    (run_dir / "supervisord.pid").write_text(str(dead.pid))
    (run_dir / "stack.json").write_text(
        f'{{"config": "{config}", "client_endpoint": "ipc://{run_dir}/client.sock", "run_dir": "{run_dir}", '
        f'"worker_endpoint": "ipc://{run_dir}/workers.sock", "supervisord_pid": {dead.pid}}}')
    state = Path(os.environ["XDG_STATE_HOME"]) / "lyra"
    state.mkdir(parents=True, exist_ok=True)
    (state / "stack.json").write_text(f'{{"run_dir": "{run_dir}"}}')  # the stack started last
    left = subprocess.Popen([sys.executable, "-m", "services.coordinator", "--config", str(config)], cwd=ROOT,
                            env={**os.environ, "LYRA_RUN_DIR": str(run_dir)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (run_dir / "client.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        named = f"coordinator (pid {left.pid})"
        status = lyra("status", "--run-dir", str(run_dir), timeout=30)
        assert status.returncode == 1 and named in status.stderr and "lyra down --run-dir" in status.stderr, \
            status.stderr
        assert (run_dir / "stack.json").exists()  # kept, so `lyra down` without arguments still finds it
        up = lyra("up", "-c", str(config), "--timeout", "60", timeout=60)
        assert up.returncode == 2 and named in up.stderr, up.stdout + up.stderr
        down = lyra("down", timeout=60)  # no arguments: the stack started last
        assert down.returncode == 0 and named in down.stdout, down.stdout + down.stderr
        assert left.wait(timeout=20) is not None
        assert not (run_dir / "stack.json").exists()
        assert "no stack was running" in lyra("down", "--run-dir", str(run_dir), timeout=60).stdout
    finally:
        if left.poll() is None:
            left.kill()
            left.wait(timeout=10)


def test_a_worker_of_an_earlier_stack_never_registers_with_a_later_ones_coordinator(make_stack) -> None:
    stack = make_stack()
    create_secret(stack.run_dir / "stack.secret")  # `lyra up` of another stack in the same run directory
    stack.kill("coordinator")
    stack.start("coordinator")
    workers = [stack.procs[s] for s in ("router", "specialist_host", "voice")]
    deadline = time.monotonic() + 20
    while any(p.poll() is None for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p.poll() for p in workers] == [2, 2, 2], stack.logs()  # each saw the new secret and left
    assert "belongs to a stack started before it" in (stack.dir / "router.log").read_text()
    with Client(stack.endpoint, timeout_s=10) as client:
        assert all(s.state != "up" for s in client.status(timeout_s=5).services)
