"""The per-stack secret: what proves a process was started for this stack.

`lyra up` (and the test harness) writes a fresh random token to a 0600 file in the run directory before
starting anything. Every worker registration carries it, and so does every client request on a tcp client
endpoint; the coordinator refuses anything without it. A file rather than an environment variable, so
that it never shows up in `ps e`, supervisord's config or a log line.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

FILE_NAME = "stack.secret"


class SecretError(Exception):
    """The secret file is missing, unreadable or readable by others; the message says which and what to do."""


def create_secret(path: Path) -> str:
    """Write a fresh secret to `path` (mode 0600, replaced atomically) and return it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask cannot widen it, an existing file's mode cannot either
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return token


def read_owner_only(path: Path, what: str, missing: str, error: type[Exception]) -> str:
    """The text of `path`, which must be readable by its owner alone; `error` with a sentence otherwise.

    `what` names the file in the sentences ("the stack secret"); `missing` says how to make one.
    """
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError:
        raise error(f"no {what} at {path}: {missing}") from None
    except OSError as exc:
        raise error(f"cannot read {what} at {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise error(f"{what} {path} is readable by others (mode {stat.S_IMODE(mode):o}); `chmod 600 {path}` "
                    f"or {missing}")
    return text


def read_secret(path: Path) -> str:
    """The secret in `path`; SecretError when it is missing, empty or readable by anyone but its owner."""
    token = read_owner_only(path, "stack secret", "start the stack with `lyra up`", SecretError).strip()
    if not token:
        raise SecretError(f"the stack secret {path} is empty: restart the stack with `lyra up`")
    return token


def ensure_secret(path: Path) -> str:
    """The secret in `path`, creating it when there is none (a coordinator started by hand)."""
    try:
        return read_secret(path)
    except SecretError:
        if path.exists():
            raise
        return create_secret(path)


def matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison, so timing does not leak how much of a guess was right."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())
