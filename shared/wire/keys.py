"""CurveZMQ key files: what `lyra keys` writes and what every process reads when `runtime.curve` is on.

    <keys_dir>/                       mode 0700
      coordinator.key_secret          the coordinator's pair (public + secret)
      coordinator.key                 its public key: copy it to every worker and client host
      router.key_secret ...           one pair per worker service, and one per client (default "client")
      authorized/workers/<name>.key   public keys the coordinator admits on its worker socket
      authorized/clients/<name>.key   ... and on its client socket

Every file is mode 0600 and a key never reaches a log: lines name a key by its file or by `fingerprint`.
The files use pyzmq's certificate format, so `zmq.auth.load_certificate` reads them too. Admitting another
worker host or client is copying its public `.key` into `authorized/<workers|clients>/` (read on every
handshake: no restart); revoking is deleting it.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from pathlib import Path

from shared.wire import transport
from shared.wire.names import COORDINATOR, WORKER_SERVICES
from shared.wire.stack_secret import read_owner_only

DEFAULT_CLIENT = "client"
DOMAINS = ("workers", "clients")  # the ZAP domain of each coordinator socket
_KEY_LINE = re.compile(r'^\s*(public|secret)-key\s*=\s*"(.{40})"\s*$', re.MULTILINE)


class KeyFileError(Exception):
    """A key file is missing, malformed, or readable by others; the message says which and what to do."""


def fingerprint(public: bytes) -> str:
    """A short, non-secret name for a public key in log lines."""
    return hashlib.sha256(public).hexdigest()[:12]


def _write(path: Path, public: bytes, secret: bytes | None) -> None:
    """One certificate file, created 0600 whatever the umask (never world-readable, not even for a moment)."""
    lines = ["#   ZeroMQ CURVE certificate written by `lyra keys`", f"#   {time.strftime('%Y-%m-%d %H:%M:%S')}",
             "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, ("\n".join(lines) + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, stat.S_IRWXU)
    return path


def make_keys(directory: Path, clients: tuple[str, ...] = (DEFAULT_CLIENT,), force: bool = False) -> list[Path]:
    """A coordinator pair, one pair per worker service and per client, and their public keys authorized."""
    names = (COORDINATOR, *WORKER_SERVICES, *clients)
    existing = [directory / f"{name}.key_secret" for name in names if (directory / f"{name}.key_secret").exists()]
    if existing and not force:
        raise KeyFileError(f"{existing[0]} already exists; pass --force to replace every key (each host then needs "
                           "its new files)")
    written = []
    for name in names:
        domain = "workers" if name in WORKER_SERVICES else "clients" if name in clients else None
        public, secret = transport.curve_keypair()
        _write(_private_dir(directory) / f"{name}.key_secret", public, secret)
        _write(directory / f"{name}.key", public, None)
        written += [directory / f"{name}.key_secret", directory / f"{name}.key"]
        if domain is not None:
            authorized = _private_dir(_private_dir(directory / "authorized") / domain) / f"{name}.key"
            _write(authorized, public, None)
            written.append(authorized)
    return written


def _read(path: Path) -> dict[str, bytes]:
    text = read_owner_only(path, "key file", "make keys with `lyra keys` and copy this host's files", KeyFileError)
    found = {kind: value.encode() for kind, value in _KEY_LINE.findall(text)}
    if "public" not in found:
        raise KeyFileError(f"{path} holds no CURVE public key; make it again with `lyra keys`")
    return found


def load_pair(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a `.key_secret` file."""
    found = _read(path)
    if "secret" not in found:
        raise KeyFileError(f"{path} holds no CURVE secret key (a public `.key` file?)")
    return found["public"], found["secret"]


def load_public(path: Path) -> bytes:
    """The public key in a `.key` (or `.key_secret`) file."""
    return _read(path)["public"]


def authorized(directory: Path, domain: str) -> dict[bytes, str]:
    """Public key -> name of every `.key` file in `authorized/<domain>/` (files readable by others are skipped)."""
    admitted: dict[bytes, str] = {}
    for path in sorted((directory / "authorized" / domain).glob("*.key")):
        try:
            admitted[load_public(path)] = path.stem
        except KeyFileError:
            continue  # a bad file admits nobody; the coordinator logs the refusal of whoever relied on it
    return admitted


def identity(directory: Path, name: str, server: bool = False) -> transport.CurveKeys:
    """The keys a process presents: its own pair, and (connecting side) the coordinator's public key."""
    public, secret = load_pair(directory / f"{name}.key_secret")
    server_public = None if server else load_public(directory / f"{COORDINATOR}.key")
    return transport.CurveKeys(public=public, secret=secret, server_public=server_public)


def coordinator_gate(directory: Path) -> dict[str, transport.KeyList]:
    """Per ZAP domain, how the coordinator reads the keys in `directory` it admits (afresh on every handshake)."""
    return {domain: (lambda domain=domain: authorized(directory, domain)) for domain in DOMAINS}
