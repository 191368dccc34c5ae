"""Starting and stopping the whole stack under supervisord (`lyra up` / `lyra down`).

One stack per run directory: its sockets, logs, secret, record and supervisord's control files all live
there (see `shared.rundir.stack_record`), so two stacks with two run directories run side by side.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.client import Client, LyraError
from shared.config.paths import project_file
from shared.config.schema import ConfigError, LyraConfig, load_config
from shared.config.secrets import MissingApiKey, gateway_key
from shared.rundir import leftovers, ports, stack_record
from shared.wire import transport
from shared.wire.messages import StatusReply
from shared.wire.names import COORDINATOR, GATEWAY, PROGRAMS, WORKER_SERVICES
from shared.wire.stack_secret import create_secret

CRASH_STARTS = 3  # a program started this many times while `up` waits keeps crashing: give up
LOG_TAIL = 15  # lines of the failing service's log that `up` prints
PREVIOUS_LOGS = "previous"  # logs/previous/: the logs of the stack that ran in this run directory before
ORPHAN_STOP_S = 15  # like supervisord's stopwaitsecs: a service drains within runtime.drain_s of SIGTERM


class StackError(Exception):
    """The stack could not be started or stopped; the message says why and what to do."""


def supervisord_conf() -> Path:
    """The supervisord.conf every stack runs under (the clone's, or the installed package's)."""
    return project_file("supervisord.conf")


def venv_bin(name: str) -> str:
    """A console script installed beside this interpreter (the venv's), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def supervisorctl(run_dir: Path, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run supervisorctl against the supervisord of the stack in `run_dir`."""
    return subprocess.run([venv_bin("supervisorctl"), "-c", str(supervisord_conf()), *args], capture_output=True,
                          text=True, timeout=timeout_s, env={**os.environ, "LYRA_RUN_DIR": str(run_dir)})


def supervisord_pid(run_dir: Path) -> int | None:
    """The pid of the live supervisord running the stack in `run_dir`, or None."""
    return stack_record.supervisord_pid(run_dir)


def enabled_programs(config: LyraConfig) -> list[str]:
    """The programs `config` runs here: the coordinator, the workers no other host runs, the gateway if enabled."""
    workers = [s for s in WORKER_SERVICES if not config.runs_elsewhere(s)]
    return [COORDINATOR, *workers, *([GATEWAY] if config.gateway.enabled else [])]


def ctl_status(run_dir: Path, done: subprocess.CompletedProcess[str]) -> tuple[str, int]:
    """`supervisorctl status`'s lines and exit status, judged by the stack's config: a program the config does not
    run (a disabled gateway, a worker on another host) is marked so and fails nothing; 0 when every one it runs
    is RUNNING, else 3 (supervisorctl's own code)."""
    text = (done.stdout + done.stderr).rstrip()
    if done.returncode not in (0, 3):  # supervisord unreachable, a name it does not know: its word stands
        return text, done.returncode
    try:
        enabled = enabled_programs(load_config((stack_record.read_record(run_dir) or {})["config"]))
    except (KeyError, ConfigError):
        return text, done.returncode  # no record or config to judge by: supervisorctl's word stands
    lines, healthy = [], True
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name in PROGRAMS and name not in enabled:
            line += "   (not run by this config)"
        elif name in PROGRAMS:
            healthy = healthy and rest.split()[:1] == ["RUNNING"]
        lines.append(line)
    return "\n".join(lines), 0 if healthy else 3


def programs(run_dir: Path) -> list[dict[str, Any]]:
    """supervisord's view of each program (name, statename, pid, start, ...), over its control socket."""
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(serverurl=f"unix://{run_dir / 'supervisor.sock'}")
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
    try:
        return proxy.supervisor.getAllProcessInfo()
    except (OSError, xmlrpc.client.Error):
        return []  # supervisord is not answering yet (or any more)


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


def make_private(run_dir: Path) -> None:
    """Owner-only run directory and logs, including logs an older stack left readable.

    supervisord's umask makes the files of its programs 0600, but it opens its own log before applying it
    (0644 under a login's umask), and it appends to an existing log without changing its mode: so the log
    is created here, 0600, before supervisord starts.
    """
    for directory in (run_dir, run_dir / "logs"):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
    (run_dir / "supervisord.log").touch(mode=0o600)
    for path in [*(run_dir / "logs").iterdir(), *run_dir.glob("supervisord.log*")]:
        if path.is_file():
            os.chmod(path, 0o600)


def claim(config: LyraConfig) -> Path:
    """The config's run directory, refused (StackError naming the owner's pid) while a live stack uses it."""
    run_dir = config.run_dir()
    reason = stack_record.in_use(run_dir, [config.client_endpoint(), config.worker_endpoint()])
    if reason is not None:
        raise StackError(reason)
    if stack_record.record_path(run_dir).exists():  # a stack that is gone, processes and all: its files go
        stack_record.clean_stale(run_dir, {"client_endpoint": config.client_endpoint(),
                                           "worker_endpoint": config.worker_endpoint()})
    return run_dir


def preflight(config: LyraConfig) -> None:
    """StackError for what would stop `config`'s stack once started, found before anything starts or loads:
    its endpoints, a live stack or what is left of one in its run directory, the gateway's key and port."""
    for endpoint in (config.client_endpoint(), config.worker_endpoint()):
        problem = transport.endpoint_problem(endpoint)  # the coordinator would refuse it: say so before starting
        if problem is not None:
            raise StackError(problem)
    reason = stack_record.in_use(config.run_dir(), [config.client_endpoint(), config.worker_endpoint()])
    if reason is not None:
        raise StackError(reason)
    problem = gateway_problem(config)
    if problem is not None:
        raise StackError(problem)


def gateway_problem(config: LyraConfig) -> str | None:
    """Why the gateway `config` enables could not start here (its key variable, its port); None when it can."""
    settings = config.gateway
    if not settings.enabled:
        return None
    try:
        gateway_key(settings.host, settings.api_key_env, config.source)
    except MissingApiKey as exc:
        return str(exc)
    problem = ports.bind_problem(settings.host, settings.port) if settings.port else None
    if problem is not None:
        return (f"{config.source}: the gateway's port {problem}: stop that process, or set gateway.port to a free "
                "port (0 picks one at start)")
    return None


def set_aside_logs(run_dir: Path) -> None:
    """Move an earlier stack's logs to logs/previous/ (replacing older ones), so `lyra logs` shows only this one's."""
    logs = run_dir / "logs"
    earlier = [p for p in [*logs.glob("*.log*"), *run_dir.glob("supervisord.log*")] if p.is_file()]
    if not earlier:
        return
    previous = logs / PREVIOUS_LOGS
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir(mode=0o700)
    for path in earlier:
        path.rename(previous / path.name)


def gateway_url(run_dir: Path) -> str | None:
    """The base URL (`.../v1`) of the gateway serving for the stack in `run_dir`, from the record it writes."""
    try:
        return json.loads((run_dir / "gateway.json").read_text())["url"] + "/v1"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def up(config: LyraConfig, timeout_s: float, progress: Callable[[str], None]) -> StatusReply:
    """Start supervisord for `config`, wait until every service registered, record the stack.

    Whatever goes wrong after supervisord started (a program that keeps crashing, the timeout), the
    stack is stopped again before the StackError is raised: `up` never leaves a broken stack running.
    """
    preflight(config)
    run_dir = claim(config)
    set_aside_logs(run_dir)
    make_private(run_dir)
    if config.runtime.auth == "secret":
        create_secret(config.secret_path())  # a fresh one per stack: workers must present it to register
    started = subprocess.run([venv_bin("supervisord"), "-c", str(supervisord_conf())], env=stack_env(config),
                             capture_output=True, text=True, timeout=30)
    if started.returncode != 0:
        raise StackError(f"supervisord failed to start: {started.stderr.strip() or started.stdout.strip()}")
    try:
        stack_record.write_record(run_dir, {
            "config": config.source, "client_endpoint": config.client_endpoint(),
            "worker_endpoint": config.worker_endpoint(), "run_dir": str(run_dir),
            "supervisord_conf": str(supervisord_conf()), "secret_file": str(config.secret_path()),
            "supervisord_pid": _await_supervisord(run_dir)})
        status = wait_ready(config.client_endpoint(), timeout_s, progress, run_dir)
        if config.gateway.enabled:
            progress(f"gateway up at {start_gateway(config, timeout_s)}/v1")
    except BaseException:
        down(run_dir)
        raise
    return status


def _await_supervisord(run_dir: Path, timeout_s: float = 10) -> int | None:
    """supervisord daemonizes before writing its pid file: wait for it."""
    deadline = time.monotonic() + timeout_s
    while (pid := supervisord_pid(run_dir)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid


def start_gateway(config: LyraConfig, timeout_s: float) -> str:
    """Start the HTTP gateway program and wait until it answers /health; its base URL."""
    run_dir = config.run_dir()
    record = run_dir / "gateway.json"  # the gateway writes its real address here once bound
    record.unlink(missing_ok=True)
    started = supervisorctl(run_dir, "start", GATEWAY)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            url = json.loads(record.read_text())["url"]
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return url
        except (OSError, ValueError, KeyError):
            pass
        if "ERROR" in started.stdout or "FATAL" in supervisorctl(run_dir, "status", GATEWAY).stdout:
            raise StackError(f"the gateway failed to start: {started.stdout.strip()}\n{log_tail(run_dir, GATEWAY)}")
        time.sleep(0.2)
    raise StackError(f"the gateway did not answer within {timeout_s:g} s; see `lyra logs gateway`")


def log_tail(run_dir: Path, service: str, lines: int = LOG_TAIL) -> str:
    """The last lines of a service's log, indented, under a heading naming the file."""
    path = run_dir / "logs" / f"{service}.log"
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return f"last {len(tail)} lines of {path}:\n" + "\n".join(f"  | {line}" for line in tail)


class CrashWatch:
    """Counts each program's starts while `up` waits; names one that keeps crashing (or that supervisord gave up)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.starts: dict[str, set[int]] = {}

    def crashing(self) -> tuple[str, str] | None:
        """The first program that is FATAL or was started CRASH_STARTS times, and how it ended; else None."""
        for info in programs(self.run_dir):
            name = info["name"]
            if info.get("start"):
                self.starts.setdefault(name, set()).add(info["start"])
            runs = len(self.starts.get(name, ()))
            if info["statename"] == "FATAL" or runs >= CRASH_STARTS:
                why = f": {info['spawnerr']}" if info.get("spawnerr") else ""
                return name, f"{name} keeps crashing ({runs} starts, now {info['statename']}{why})"
        return None


def wait_ready(endpoint: str, timeout_s: float, progress: Callable[[str], None], run_dir: Path) -> StatusReply:
    """Poll status until every worker is up; fail fast, with the log's last lines, when a program keeps crashing."""
    deadline, last = time.monotonic() + timeout_s, ""
    watch = CrashWatch(run_dir)
    with Client(endpoint) as client:
        while True:
            try:
                status = client.status(timeout_s=1)
                waiting = [s.service for s in status.services if s.state not in ("up", "busy")]
                if not waiting:
                    return status
                ready = len(status.services) - len(waiting)
                line = (f"loading {', '.join(waiting)}: waiting for {'it' if len(waiting) == 1 else 'them'} "
                        f"to register ({ready} of {len(status.services)} services up)")
            except LyraError:
                line = "waiting for the coordinator"
            if line != last:
                progress(line)
                last = line
            crash = watch.crashing()
            if crash is not None:
                service, why = crash
                raise StackError(f"{why}; the stack was stopped.\n{log_tail(run_dir, service)}")
            if time.monotonic() > deadline:
                raise StackError(f"the stack was not ready within {timeout_s:g} s ({line}); the stack was stopped; "
                                 "see `lyra logs <service>`")
            time.sleep(0.3)


def down(run_dir: Path, timeout_s: float = 60) -> str | None:
    """Stop every service and the supervisord of `run_dir`, and whatever an earlier stack left running there
    (its supervisord killed); what was stopped, in words, or None when nothing ran."""
    pid = supervisord_pid(run_dir)
    stopped = None
    if pid is not None:
        supervisorctl(run_dir, "shutdown", timeout_s=timeout_s)
        deadline = time.monotonic() + timeout_s
        while supervisord_pid(run_dir) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if supervisord_pid(run_dir) is not None:  # supervisord itself is stuck: end it and its group
            os.kill(pid, signal.SIGKILL)
        stopped = f"the stack in {run_dir}"
    left = leftovers.stack_processes(run_dir)
    if left:
        still = leftovers.stop(left, min(timeout_s, ORPHAN_STOP_S))
        if still:
            raise StackError(f"could not stop {leftovers.describe(still)} of the stack in {run_dir}")
        stopped = f"{stopped}, and what was left of an earlier one: " if stopped else \
            f"what was left of the stack in {run_dir}: "
        stopped += leftovers.describe(left)
    record = stack_record.read_record(run_dir)
    if record is not None:
        stack_record.clean_stale(run_dir, record)  # sockets and control files nobody serves any more
    stack_record.remove_record(run_dir)
    return stopped
