"""Starting and stopping the whole stack under supervisord (`lyra up` / `lyra down`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from shared.client import Client, LyraError, state_file
from shared.config import WORKER_SERVICES, LyraConfig
from shared.messages import StatusReply
from shared.stack_secret import create_secret

ROOT = Path(__file__).resolve().parent.parent
SUPERVISORD_CONF = ROOT / "supervisord.conf"
CONTROL_DIR = ROOT / ".run"
PIDFILE = CONTROL_DIR / "supervisord.pid"


class StackError(Exception):
    """The stack could not be started or stopped; the message says why and what to do."""


def _bin(name: str) -> str:
    """A console script installed beside this interpreter (the venv's), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def supervisorctl(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run supervisorctl against our supervisord.conf."""
    return subprocess.run([_bin("supervisorctl"), "-c", str(SUPERVISORD_CONF), *args],
                          capture_output=True, text=True, timeout=timeout_s)


def supervisord_pid() -> int | None:
    """The running supervisord's pid, or None."""
    try:
        pid = int(PIDFILE.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def stack_env(config: LyraConfig) -> dict[str, str]:
    """The LYRA_* variables supervisord.conf expands for this config."""
    env = dict(os.environ)
    env.update(
        LYRA_CONFIG=config.source, LYRA_RUN_DIR=str(config.run_dir()), LYRA_PYTHON=sys.executable,
        **{f"LYRA_GPUS_{s.upper()}": ",".join(str(g) for g in config.gpus_of(s)) for s in WORKER_SERVICES},
        # A service another host runs (services.<name>.external) is not started here; `lyra up` waits for it.
        **{f"LYRA_AUTOSTART_{s.upper()}": str(not config.runs_elsewhere(s)).lower() for s in WORKER_SERVICES},
    )
    return env


def make_private(run_dir: Path, control_dir: Path) -> None:
    """Owner-only run and control directories and logs, including logs an older stack left readable.

    supervisord's umask makes new files 0600, but it appends to an existing log without changing its mode.
    """
    for directory in (run_dir, run_dir / "logs", control_dir):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
    for path in [*(run_dir / "logs").iterdir(), *control_dir.glob("*.log*")]:
        if path.is_file():
            os.chmod(path, 0o600)


def up(config: LyraConfig, timeout_s: float, progress: Callable[[str], None]) -> StatusReply:
    """Start supervisord for `config`, wait until every service registered, record the stack."""
    if supervisord_pid() is not None:
        raise StackError(f"a stack is already running (supervisord pid {supervisord_pid()}); `lyra down` first")
    run_dir = config.run_dir()
    make_private(run_dir, CONTROL_DIR)
    if config.runtime.auth == "secret":
        create_secret(config.secret_path())  # a fresh one per stack: workers must present it to register
    started = subprocess.run([_bin("supervisord"), "-c", str(SUPERVISORD_CONF)], env=stack_env(config),
                             capture_output=True, text=True, timeout=30)
    if started.returncode != 0:
        raise StackError(f"supervisord failed to start: {started.stderr.strip() or started.stdout.strip()}")
    record = {"config": config.source, "client_endpoint": config.client_endpoint(), "run_dir": str(run_dir),
              "supervisord_conf": str(SUPERVISORD_CONF), "secret_file": str(config.secret_path())}
    state_file().parent.mkdir(parents=True, exist_ok=True)
    state_file().write_text(json.dumps(record, indent=2))
    status = wait_ready(config.client_endpoint(), timeout_s, progress)
    if config.gateway.enabled:
        progress(f"gateway up at {start_gateway(config, timeout_s)}/v1")
    return status


def start_gateway(config: LyraConfig, timeout_s: float) -> str:
    """Start the HTTP gateway program and wait until it answers /health; its base URL."""
    record = config.run_dir() / "gateway.json"  # the gateway writes its real address here once bound
    record.unlink(missing_ok=True)
    started = supervisorctl("start", "gateway")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            url = json.loads(record.read_text())["url"]
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return url
        except (OSError, ValueError, KeyError):
            pass
        if "ERROR" in started.stdout or "FATAL" in supervisorctl("status", "gateway").stdout:
            raise StackError(f"the gateway failed to start: {started.stdout.strip()}; see `lyra logs gateway`")
        time.sleep(0.2)
    raise StackError(f"the gateway did not answer within {timeout_s:g} s; see `lyra logs gateway`")


def wait_ready(endpoint: str, timeout_s: float, progress: Callable[[str], None]) -> StatusReply:
    """Poll status until every worker is up; fail early when supervisord gave up on a program."""
    deadline, last = time.monotonic() + timeout_s, ""
    with Client(endpoint) as client:
        while True:
            try:
                status = client.status(timeout_s=2)
                waiting = [s.service for s in status.services if s.state not in ("up", "busy")]
                if not waiting:
                    return status
                line = f"waiting for {', '.join(waiting)} to register"
            except LyraError:
                line = "waiting for the coordinator"
            if line != last:
                progress(line)
                last = line
            fatal = [ln for ln in supervisorctl("status").stdout.splitlines() if "FATAL" in ln or "BACKOFF" in ln]
            if fatal:
                raise StackError("a service failed to start:\n  " + "\n  ".join(fatal) +
                                 "\nsee `lyra logs <service>`")
            if time.monotonic() > deadline:
                raise StackError(f"the stack was not ready within {timeout_s:g} s ({line}); see `lyra logs <service>`")
            time.sleep(0.3)


def down(timeout_s: float = 60) -> bool:
    """Stop every service and supervisord; True when something was running."""
    pid = supervisord_pid()
    if pid is None:
        state_file().unlink(missing_ok=True)
        return False
    supervisorctl("shutdown", timeout_s=timeout_s)
    deadline = time.monotonic() + timeout_s
    while supervisord_pid() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    if supervisord_pid() is not None:  # supervisord itself is stuck: end it and its group
        os.kill(pid, signal.SIGKILL)
    state_file().unlink(missing_ok=True)
    return True
