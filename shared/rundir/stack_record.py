"""Where a running stack is recorded, whether it is still alive, and who holds a run directory or endpoint.

A stack is identified by its run directory: `lyra up` writes `<run_dir>/stack.json` (endpoint, config,
secret file, supervisord's pid) beside the sockets, logs and supervisord's own control files, so two stacks
with two run directories never share a file. `$XDG_STATE_HOME/lyra/stack.json` only points at the run
directory of the stack started last, so `lyra chat` works from any directory; `lyra down` removes that
pointer only when it points at the stack being stopped.

A record whose supervisord is gone (a crash, a reboot, a kill) is stale: whoever finds it says so, removes
it and the socket files it left, and never waits on an endpoint nobody serves.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

from shared.config.paths import default_run_dir, state_dir
from shared.rundir import leftovers

RECORD = "stack.json"
SUPERVISORD_PID = "supervisord.pid"
CONTROL_FILES = ("supervisord.pid", "supervisor.sock")


class NoStack(Exception):
    """No live stack at the place looked at; the message says what was found and what to do."""


def pointer_file() -> Path:
    """Where `lyra up` notes the run directory of the stack it started last."""
    return state_dir() / "stack.json"


def record_path(run_dir: Path) -> Path:
    """The stack record inside a run directory."""
    return Path(run_dir) / RECORD


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Record a started stack in its run directory and point the state home at it."""
    record_path(run_dir).touch(mode=0o600)
    record_path(run_dir).chmod(0o600)  # owner only, like everything in the run directory (an old record too)
    record_path(run_dir).write_text(json.dumps(record, indent=2))
    pointer_file().parent.mkdir(parents=True, exist_ok=True)
    pointer_file().write_text(json.dumps({"run_dir": str(run_dir)}))


def remove_record(run_dir: Path) -> None:
    """Forget the stack of `run_dir`, and the pointer only if it points here (another stack may own it)."""
    record_path(run_dir).unlink(missing_ok=True)
    if _pointed_run_dir() == Path(run_dir):
        pointer_file().unlink(missing_ok=True)


def _pointed_run_dir() -> Path | None:
    try:
        return Path(json.loads(pointer_file().read_text())["run_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The record in `run_dir`, live or stale; None when there is none (or it is unreadable)."""
    return _read(record_path(run_dir))


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def process_alive(pid: int | None, name: str = "") -> bool:
    """Whether `pid` runs, and (where /proc tells) its command line mentions `name`: a reused pid is not ours."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not a stack of ours
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True  # no /proc here: the signal check is all we have
    return name in cmdline


def supervisord_pid(run_dir: Path) -> int | None:
    """The pid of the live supervisord that runs the stack of `run_dir`, or None."""
    try:
        pid = int((Path(run_dir) / SUPERVISORD_PID).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid, "supervisord") else None


def ipc_path(endpoint: str) -> Path | None:
    """The socket file of an ipc:// endpoint; None for other transports."""
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


def listener(endpoint: str) -> int | None:
    """Who serves `endpoint` now: the listening process's pid for ipc (0 when unknown, e.g. tcp); None if nobody.

    A plain connect that is refused (or finds no socket file) proves nobody serves it; on a Unix socket
    SO_PEERCRED names the process that listens. The connection is closed before any byte is sent.
    """
    path = ipc_path(endpoint)
    if path is not None:
        return _unix_listener(path)
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=0.5):
                return 0
        except (OSError, ValueError):
            return None
    return 0  # a transport we cannot probe: assume it serves, so nothing is removed or refused wrongly


def _unix_listener(path: Path) -> int | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(0.5)
    try:
        sock.connect(str(path))
        creds = sock.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_PEERCRED", 17), struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except OSError:
        return 0  # it exists and did not refuse (e.g. a full backlog): treat as in use
    finally:
        sock.close()


def clean_stale(run_dir: Path, record: dict[str, Any]) -> list[str]:
    """Remove what a dead stack left in `run_dir` (record, pointer, unserved socket files); what was removed."""
    removed = []
    for endpoint in (record.get("client_endpoint", ""), record.get("worker_endpoint", "")):
        path = ipc_path(endpoint or "")
        if path is not None and path.exists() and listener(endpoint) is None:
            path.unlink(missing_ok=True)
            removed.append(str(path))
    for name in CONTROL_FILES:
        if (Path(run_dir) / name).exists():
            (Path(run_dir) / name).unlink(missing_ok=True)
            removed.append(str(Path(run_dir) / name))
    remove_record(run_dir)
    return [str(record_path(run_dir)), *removed]


def current_run_dir() -> Path:
    """The run directory commands act on by default: $LYRA_RUN_DIR, else the stack started last's, else the
    default one (whether or not a stack lives there)."""
    if os.environ.get("LYRA_RUN_DIR"):
        return Path(os.environ["LYRA_RUN_DIR"])
    return _pointed_run_dir() or default_run_dir()


def live_record(run_dir: Path | None = None) -> dict[str, Any]:
    """The record of the live stack of `run_dir` (default: the one started last, else the default run dir).

    Raises NoStack when there is none; a stale record is cleaned up first and the message says so.
    """
    if run_dir is None:
        run_dir = current_run_dir()
    record = _read(record_path(run_dir))
    if record is None:
        remove_record(run_dir)  # a pointer to a stopped stack leads nowhere
        raise NoStack(f"no running Lyra stack found in {run_dir}: start one with `lyra up -c CONFIG` "
                      "(or pass --run-dir / set LYRA_RUN_DIR or LYRA_ENDPOINT)")
    if supervisord_pid(run_dir) is None:
        left = leftovers.stack_processes(run_dir)
        if left:  # keep the record: `lyra down` finds the run directory through it
            raise NoStack(orphans_message(run_dir, left, record.get("supervisord_pid")))
        clean_stale(run_dir, record)
        raise NoStack(f"the stack recorded in {run_dir} is gone (supervisord pid {record.get('supervisord_pid')} "
                      "is not running); its state and socket files were removed: start it again with "
                      f"`lyra up -c {record.get('config', 'CONFIG')}`")
    return record


def endpoint_gone(endpoint: str) -> str | None:
    """Why a client should stop waiting on `endpoint`: nobody serves it and no live stack will; else None.

    A live supervisord whose record names the endpoint is restarting its coordinator: worth waiting for.
    """
    if listener(endpoint) is not None:
        return None
    path = ipc_path(endpoint)
    for run_dir in filter(None, (path.parent if path else None, _pointed_run_dir())):
        record = _read(record_path(run_dir))
        if record and record.get("client_endpoint") == endpoint and supervisord_pid(run_dir) is not None:
            return None
    return (f"nothing serves {endpoint} (no coordinator listens there and no live stack owns it): "
            "the stack is gone; start it with `lyra up -c CONFIG`")


def orphans_message(run_dir: Path, left: list[leftovers.StackProcess], supervisord: object = None) -> str:
    """What to say about processes of a stack whose supervisord is gone, and how to stop them."""
    lost = f" (pid {supervisord})" if supervisord else ""
    return (f"the stack in {run_dir} lost its supervisord{lost}, but processes of it still run: "
            f"{leftovers.describe(left)}; stop them with `lyra down --run-dir {run_dir}`")


def in_use(run_dir: Path, endpoints: list[str]) -> str | None:
    """Why a new stack may not start in `run_dir` with `endpoints`: a live owner or processes an earlier stack
    left there, named by pid; else None."""
    owner = supervisord_pid(run_dir)
    if owner is not None:
        config = (_read(record_path(run_dir)) or {}).get("config", "?")
        return (f"run directory {run_dir} is in use by a live Lyra stack (supervisord pid {owner}, config {config}): "
                f"stop it with `lyra down --run-dir {run_dir}`, or give this config its own runtime.run_dir")
    left = leftovers.stack_processes(run_dir)
    if left:
        return orphans_message(run_dir, left, (_read(record_path(run_dir)) or {}).get("supervisord_pid"))
    return taken(endpoints)


def taken(endpoints: list[str]) -> str | None:
    """Why these endpoints cannot be bound: one already has a listener (named by pid where known); else None."""
    for endpoint in endpoints:
        pid = listener(endpoint)
        if pid is not None:
            who = f"pid {pid}" if pid else "another process"
            return (f"endpoint {endpoint} is in use by {who}: stop that process, or give this config its own "
                    "runtime.run_dir (or client_endpoint / worker_endpoint)")
    return None
