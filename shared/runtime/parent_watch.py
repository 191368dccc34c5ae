"""A service ends with its supervisor: a process whose supervisord is gone must not keep serving.

Killed with SIGKILL, supervisord cannot stop its programs: they are re-parented to init and, left alone, keep
their sockets, ports and GPUs, and register with the next stack's coordinator. Two guards, armed when a
service starts:
- Linux: the kernel's parent-death signal (`prctl(PR_SET_PDEATHSIG, SIGTERM)`): the service gets SIGTERM the
  moment its parent dies and drains as it does under `lyra down`;
- everywhere: a thread that compares `os.getppid()` with the parent it started under, twice a second, and
  sends the same SIGTERM where the kernel could not.
Either way, a process still running `grace_s` after its parent died exits at once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
WATCH_INTERVAL_S = 0.5
ORPHANED_EXIT_CODE = 4


def arm_parent_death_signal() -> bool:
    """Ask the kernel for SIGTERM when our parent dies; False where that is not available (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def end_with_parent(service: str, grace_s: float) -> None:
    """Arm both guards for this process; exit now when it was orphaned before they were armed.

    A process supervisord started (it sets SUPERVISOR_ENABLED) whose parent is already init lost its
    supervisord while starting. Under another supervisor that is init itself (systemd), nothing is watched.
    """
    parent = os.getppid()
    armed = arm_parent_death_signal()
    if parent == 1:
        if os.environ.get("SUPERVISOR_ENABLED"):
            log.critical("%s: the supervisord that started this process is gone; exiting", service)
            os._exit(ORPHANED_EXIT_CODE)
        return
    watch = threading.Thread(target=_watch, args=(service, parent, armed, grace_s), name="parent-watch",
                             daemon=True)
    watch.start()


def _watch(service: str, parent: int, armed: bool, grace_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL_S)
    log.critical("%s: its supervisor (pid %d) is gone; stopping (at most %.0f s)", service, parent, grace_s)
    if not armed:  # the kernel sent nothing: do what it would have
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    log.critical("%s: still running %.0f s after its supervisor died; exiting now", service, grace_s)
    logging.shutdown()
    os._exit(ORPHANED_EXIT_CODE)
