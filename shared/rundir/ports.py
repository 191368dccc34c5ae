"""Whether a TCP port can be bound, and who holds it when it cannot (`lyra up` checks the gateway's port first).

The holder is found on Linux through /proc: the listening socket's inode in /proc/net/tcp (or tcp6), then the
process with that socket among its /proc/<pid>/fd. Another user's process cannot be read, and other systems
have no /proc: the answer is then only "in use".
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

PROC = Path("/proc")
LISTEN = "0A"  # the socket state /proc/net/tcp writes for LISTEN


def bind_problem(host: str, port: int) -> str | None:
    """Why `host:port` cannot be bound as the gateway binds it (naming the holder where known); None if it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the gateway: TIME_WAIT is no holder
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return f"{host}:{port} cannot be bound: {exc.strerror or exc}"
            who = holder(port)
            return f"{host}:{port} is in use" + (f" by {who}" if who else "")
    return None


def holder(port: int) -> str | None:
    """"pid 123 (python -m http.server 8000)" for the process listening on `port`; None when it cannot be told."""
    inodes = listening_inodes(port)
    if not inodes:
        return None
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (entry / "fd").iterdir()}
        except OSError:  # another user's process, or gone meanwhile
            continue
        if links & {f"socket:[{inode}]" for inode in inodes}:
            return f"pid {entry.name} ({_command(entry)})"
    return None


def listening_inodes(port: int) -> set[str]:
    """The inodes of the sockets listening on `port` (IPv4 and IPv6), from /proc/net; empty where unreadable."""
    found = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN and int(fields[1].rpartition(":")[2], 16) == port:
                found.add(fields[9])
    return found


def _command(entry: Path) -> str:
    try:
        argv = (entry / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    return " ".join(a.decode(errors="replace") for a in argv if a)[:200] or "?"
