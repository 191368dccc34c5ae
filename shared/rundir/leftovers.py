"""The processes of a stack, found by its run directory: what is left of it when its supervisord is gone.

Every process of a stack `lyra up` started inherits `LYRA_RUN_DIR=<its run directory>` (supervisord's
environment, passed on to its programs and the voice's tensor ranks). On Linux, /proc gives each process's
environment and command line (this user's processes only), so a stack's processes are found by that
variable and named by their `-m services.<name>` module. Elsewhere nothing can be found this way:
`SCAN_UNAVAILABLE` says what to do instead.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
SCAN_UNAVAILABLE = ("processes of a stack cannot be found on this system (no /proc): look for "
                    "`python -m services.` processes with `ps` and end them")


@dataclass(frozen=True)
class StackProcess:
    """One live process of a stack: its pid and what it is ("coordinator", "voice.rank", "supervisord")."""

    pid: int
    name: str

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid})"


def can_scan() -> bool:
    """Whether this system shows other processes' environments (/proc)."""
    return (PROC / "self" / "environ").exists()


def stack_processes(run_dir: Path) -> list[StackProcess]:
    """The live Lyra processes (services, tensor ranks, supervisord) started for the stack of `run_dir`."""
    if not can_scan():
        return []
    wanted = os.path.realpath(run_dir)
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            zombie = (entry / "stat").read_text().rpartition(")")[2].split()[:1] == ["Z"]
        except OSError:  # gone meanwhile, or another user's
            continue
        name = _lyra_program(argv)
        if name is None or zombie:
            continue
        run_dirs = [e[len(b"LYRA_RUN_DIR="):].decode(errors="replace") for e in environ
                    if e.startswith(b"LYRA_RUN_DIR=")]
        if any(os.path.realpath(value) == wanted for value in run_dirs):
            found.append(StackProcess(int(entry.name), name))
    return sorted(found, key=lambda p: p.pid)


def _lyra_program(argv: list[str]) -> str | None:
    """"router" for `python -m services.router ...`, "supervisord" for supervisord; None for anything else."""
    if "-m" in argv[:-1]:
        module = argv[argv.index("-m") + 1]
        if module.startswith("services."):
            return module[len("services."):]
    if any(Path(arg).name == "supervisord" for arg in argv[:2]):
        return "supervisord"
    return None


def describe(processes: list[StackProcess]) -> str:
    """"coordinator (pid 10), router (pid 11)"."""
    return ", ".join(str(p) for p in processes)


def stop(processes: list[StackProcess], timeout_s: float) -> list[StackProcess]:
    """SIGTERM each (they drain as under `lyra down`), SIGKILL what still runs after `timeout_s`; those left."""
    for process in processes:
        _signal(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in processes if _alive(p.pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for process in alive:
        _signal(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while (alive := [p for p in alive if _alive(p.pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, ended but not yet reaped by init, does not)."""
    if can_scan():
        try:
            return (PROC / str(pid) / "stat").read_text().rpartition(")")[2].split()[:1] != ["Z"]
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
