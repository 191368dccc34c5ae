"""The only module that imports zmq and msgpack: sockets, framing, encode and decode.

Frames are msgpack maps validated against `shared.wire.messages`. Anything that is not a valid message becomes
a `WireError` carrying an `ErrorCode`; receiving never raises anything else, so a loop that calls
`recv_*` cannot be taken down by a peer's bytes. Pickle is never used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.asyncio
from pydantic import ValidationError

from shared.wire.messages import MESSAGE_ADAPTER, MESSAGE_TYPES, SCHEMA_MAJOR, ErrorCode, Message

log = logging.getLogger(__name__)

# runtime.max_message_mb's default: 32 MB, decimal like every size (shared.config.units, which the wire sits
# below and so cannot import).
DEFAULT_MAX_BYTES = 32 * 10**6
# zmq drops the connection of a peer whose frame exceeds MAXMSGSIZE. We set it well above the
# application limit so a merely-too-large frame still arrives and gets a typed `too_large` reply,
# while an absurd one cannot exhaust memory.
HARD_LIMIT_FACTOR = 4
MAX_ELEMENTS = 100_000  # arrays + maps + their items in one frame; real messages use a few thousand at most
MAX_DEPTH = 16  # nesting of arrays and maps; the schema's deepest message (a status reply) nests 5
MAX_ID_CHARS = 128  # `id` / `parent_id`: ours are 32 hex characters; a peer's own ids get room, not megabytes


class WireError(Exception):
    """A frame that is not a valid message; `code` says which way it is wrong."""

    def __init__(self, code: ErrorCode, message: str, msg_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.msg_id = msg_id  # the offending message's id, when it could be read


def _default(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"cannot put {type(value).__name__} on the wire")


def encode(message: Message) -> bytes:
    """Serialise a message to a msgpack map (bytes stay binary)."""
    return msgpack.packb(message.model_dump(mode="python"), use_bin_type=True, default=_default)


class _TooManyElements(Exception):
    """Raised from inside msgpack's hooks to stop unpacking a frame with too many elements."""


def _unpack(frame: bytes, max_bytes: int) -> Any:
    """msgpack -> Python with bounded element counts: a frame's bytes alone do not bound its memory.

    Thirty million empty maps fit in 30 MB and take gigabytes as Python objects, so every array and map
    counts its elements as it is built and unpacking stops past MAX_ELEMENTS; msgpack itself refuses
    nesting deeper than its stack (StackError).
    """
    seen = [0]

    def count(container: Any) -> Any:
        seen[0] += len(container) + 1
        if seen[0] > MAX_ELEMENTS:
            raise _TooManyElements
        return container

    return msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=max_bytes, max_str_len=max_bytes,
                           max_array_len=MAX_ELEMENTS, max_map_len=MAX_ELEMENTS, max_ext_len=0,
                           list_hook=count, object_hook=count)


def _nests_deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and maps nest more than `limit` levels (iterative: deep input must not recurse)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _envelope_id(raw: dict[Any, Any], field: str) -> str | None:
    """`id` or `parent_id` when it is a short string or absent; anything else is refused before it is echoed."""
    value = raw.get(field)
    if value is None or (isinstance(value, str) and len(value) <= MAX_ID_CHARS):
        return value
    raise WireError(ErrorCode.bad_message, f"`{field}` must be a string of at most {MAX_ID_CHARS} characters",
                    raw.get("id") if field == "parent_id" else None)


def _clip(text: str, limit: int = 64) -> str:
    """A peer's text as it may appear in an error sentence (and so in a log line): short."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# Pydantic's errors for a value of the right type outside its documented range.
RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
                          "too_long", "too_short", "string_too_long", "string_too_short", "multiple_of"})


def _options_out_of_range(kind: str, errors: list[Any]) -> bool:
    """A well-formed chat request whose only fault is option values outside their ranges: `invalid_request`
    (unacceptable, as ErrorCode says of bad options), not `bad_message` (malformed)."""
    return kind == "chat_request" and all(
        tuple(error["loc"][1:2]) == ("options",) and error["type"] in RANGE_ERRORS for error in errors)


def decode(frame: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Parse and validate one frame; raise WireError for anything else (and nothing else)."""
    if len(frame) > max_bytes:
        raise WireError(ErrorCode.too_large, f"message of {len(frame)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        raw = _unpack(frame, max_bytes)
    except _TooManyElements:
        raise WireError(ErrorCode.too_large, f"message has more than {MAX_ELEMENTS} elements") from None
    except ValueError as exc:  # msgpack's own caps read "N exceeds max_array_len(M)": a size, not a syntax error
        if "exceeds max_array_len" in str(exc) or "exceeds max_map_len" in str(exc):
            raise WireError(ErrorCode.too_large, f"a list or map holds more than {MAX_ELEMENTS} elements") from None
        raise WireError(ErrorCode.bad_message, "not a msgpack message (ValueError)") from None
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireError(ErrorCode.bad_message, f"not a msgpack message ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise WireError(ErrorCode.bad_message, f"a message must be a msgpack map, got {type(raw).__name__}")
    if _nests_deeper_than(raw, MAX_DEPTH):
        raise WireError(ErrorCode.bad_message, f"message nests deeper than {MAX_DEPTH} levels")
    msg_id = _envelope_id(raw, "id")
    _envelope_id(raw, "parent_id")
    kind = raw.get("type")
    if not isinstance(kind, str):  # check the shape before any lookup: a list or map is unhashable
        raise WireError(ErrorCode.bad_message, f"`type` must be a string, got {type(kind).__name__}", msg_id)
    if kind not in MESSAGE_TYPES:
        raise WireError(ErrorCode.unknown_type, f"unknown message type {_clip(kind)!r}", msg_id)
    version = raw.get("v", "")
    if not isinstance(version, str) or version.split(".")[0] != str(SCHEMA_MAJOR):
        raise WireError(
            ErrorCode.schema_version,
            f"schema version {_clip(repr(version))} is not supported; this process speaks {SCHEMA_MAJOR}.x",
            msg_id,
        )
    try:
        return MESSAGE_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "(message)"
        if _options_out_of_range(kind, errors):
            raise WireError(ErrorCode.invalid_request, f"{_clip(where)} is {_clip(repr(first['input']))}: "
                            f"{_clip(first['msg'], 200)}", msg_id) from None
        raise WireError(ErrorCode.bad_message, f"invalid {kind}: {_clip(where)}: {_clip(first['msg'], 200)}",
                        msg_id) from None
    except Exception as exc:  # a validator tripped on a shape it never expected: still only our wire error
        raise WireError(ErrorCode.bad_message, f"invalid {kind}: {type(exc).__name__}", msg_id) from None


# ---------------------------------------------------------------- sockets


class EndpointError(Exception):
    """An endpoint this process refuses to bind; the message says why and what to change."""


def endpoint_problem(endpoint: str) -> str | None:
    """Why an ipc:// endpoint must not be bound, or None: its directory exists and every user may write to it
    (a shared one like /tmp, where anyone could put a socket of their own in its place)."""
    if not endpoint.startswith("ipc://"):
        return None
    directory = Path(endpoint[len("ipc://"):]).parent
    try:
        mode = directory.stat().st_mode
    except FileNotFoundError:
        return None  # it will be created, private
    if mode & stat.S_IWOTH:
        return (f"refusing ipc endpoint {endpoint}: its directory {directory} is writable by every user (mode "
                f"{stat.S_IMODE(mode):04o}); put the socket in a private directory, e.g. the run directory")
    return None


def prepare_endpoint(endpoint: str) -> None:
    """Make an ipc:// endpoint's directory ready and remove a stale socket file; raise EndpointError for a
    directory every user may write to.

    Directories that are missing are created owner-only (0700, whatever the umask); an existing directory's
    mode is never changed: Lyra did not create it, and it may be shared (as root, chmod 0700 of /tmp would
    lock every other user out of it).
    """
    problem = endpoint_problem(endpoint)
    if problem is not None:
        raise EndpointError(problem)
    if not endpoint.startswith("ipc://"):
        return
    path = Path(endpoint[len("ipc://"):])
    for directory in reversed([d for d in (path.parent, *path.parent.parents) if not d.exists()]):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs, left as it is
        os.chmod(directory, stat.S_IRWXU)
    if path.exists():
        path.unlink()


@dataclass
class Endpoint:
    """A socket plus the limits it enforces (and, on Curve sockets, a monitor that reports failed handshakes)."""

    socket: zmq.Socket
    max_bytes: int
    monitor: zmq.Socket | None = None
    plain: zmq.Socket | None = None  # a blocking-API shadow of an asyncio socket (see `recv_async`)

    def close(self) -> None:
        """Close without lingering: unsent messages to a dead peer must never block exit."""
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
        self.socket.close(linger=0)

    @property
    def closed(self) -> bool:
        return bool(self.socket.closed)


def _configure(sock: zmq.Socket, max_bytes: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes * HARD_LIMIT_FACTOR)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.RCVHWM, 10_000)


def bind_router(ctx: zmq.Context, endpoint: str, max_bytes: int, queued_out: int = 10_000,
                queued_in: int = 10_000, curve: CurveKeys | None = None, zap_domain: str = "") -> Endpoint:
    """A ROUTER socket bound at `endpoint` (coordinator side); per peer, `queued_out` frames wait to be sent and
    at most `queued_in` received frames wait to be read (then that peer's sends block). With `curve` it is a
    CurveZMQ server whose peers the running `KeyGate` admits under `zap_domain`."""
    sock = ctx.socket(zmq.ROUTER)
    _configure(sock, max_bytes)
    monitor = _curve_server(sock, curve, zap_domain) if curve is not None else None
    sock.setsockopt(zmq.SNDHWM, queued_out)
    sock.setsockopt(zmq.RCVHWM, queued_in)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished peer raises instead of vanishing
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes its name back
    prepare_endpoint(endpoint)
    sock.bind(endpoint)
    if endpoint.startswith("ipc://"):
        os.chmod(endpoint[len("ipc://"):], 0o600)  # owner only, whatever the umask
    return Endpoint(sock, max_bytes, monitor)


def connect_dealer(ctx: zmq.Context, endpoint: str, max_bytes: int, identity: str | None = None,
                   curve: CurveKeys | None = None, watch: bool = False) -> Endpoint:
    """A DEALER socket connected to `endpoint` (worker or client side); a Curve client with `curve`. With
    `curve` or `watch`, failed handshakes are reported by `handshake_failures`."""
    sock = ctx.socket(zmq.DEALER)
    _configure(sock, max_bytes)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    if curve is not None:
        if curve.server_public is None:
            raise ValueError("a Curve client needs the server's public key")
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = curve.secret, curve.public, \
            curve.server_public
    monitor = _watch_handshakes(sock) if curve is not None or watch else None
    sock.connect(endpoint)
    return Endpoint(sock, max_bytes, monitor)


# ---------------------------------------------------------------- CurveZMQ


@dataclass(frozen=True)
class CurveKeys:
    """One side's CurveZMQ identity (z85 keys): its pair, and on the connecting side the server's public key."""

    public: bytes
    secret: bytes = field(repr=False)  # never printed, never logged
    server_public: bytes | None = None


KeyList = Callable[[], dict[bytes, str]]  # public key (z85) -> name, read afresh on each handshake
# A peer without Curve meeting a Curve socket shows up as PROTOCOL or NO_DETAIL, depending on timing.
MISMATCH = "the handshake failed: one side has no Curve key, or the keys do not belong together (coordinator.key?)"
HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the key was refused (it is not in the coordinator's authorized keys)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: MISMATCH,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: MISMATCH,
}


def curve_keypair() -> tuple[bytes, bytes]:
    """A fresh CurveZMQ (public, secret) pair, z85-encoded."""
    return zmq.curve_keypair()


def _curve_server(sock: zmq.Socket, keys: CurveKeys, zap_domain: str) -> zmq.Socket:
    sock.curve_server = True
    sock.curve_secretkey, sock.curve_publickey = keys.secret, keys.public
    sock.setsockopt(zmq.ZAP_DOMAIN, zap_domain.encode())
    return _watch_handshakes(sock)


def _watch_handshakes(sock: zmq.Socket) -> zmq.Socket:
    events = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    monitor = sock.get_monitor_socket(events)
    monitor.setsockopt(zmq.LINGER, 0)
    return monitor


def handshake_failures(endpoint: Endpoint) -> list[str]:
    """Failed handshakes reported since the last call, one sentence each ([] for unwatched sockets)."""
    found: list[str] = []
    monitor = endpoint.monitor
    if monitor is None:
        return found
    if isinstance(monitor, zmq.asyncio.Socket):  # an asyncio client's monitor: read it without the event loop
        monitor = zmq.Socket.shadow(monitor.underlying)
    while monitor.poll(0):
        frames = monitor.recv_multipart(flags=zmq.NOBLOCK)
        event = int.from_bytes(frames[0][:2], sys.byteorder) if frames and len(frames[0]) >= 2 else 0
        found.append(HANDSHAKE_FAILURES.get(event, f"handshake event {event}"))
    return found


class KeyGate:
    """The coordinator's ZAP handler: admits a Curve peer only when its public key is listed for the socket's
    domain; every refusal is logged (by fingerprint and domain, never the key)."""

    def __init__(self, ctx: zmq.Context, domains: dict[str, KeyList], fingerprint: Callable[[bytes], str]) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.authenticator = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
        self.authenticator.start()
        for domain, keys in domains.items():
            self.authenticator.configure_curve_callback(domain, _Admission(domain, keys, fingerprint))

    def stop(self) -> None:
        """Stop the ZAP thread (after the sockets it guards are closed)."""
        self.authenticator.stop()


class _Admission:
    """pyzmq's credentials provider for one ZAP domain."""

    def __init__(self, domain: str, keys: KeyList, fingerprint: Callable[[bytes], str]) -> None:
        self.domain, self.keys, self.fingerprint = domain, keys, fingerprint

    def callback(self, domain: str, key: bytes) -> bool:
        name = self.keys().get(key)
        if name is None:
            log.warning("refused a connection on the %s socket: its Curve public key (fingerprint %s) is not in "
                        "authorized/%s/", self.domain, self.fingerprint(key), self.domain)
            return False
        log.debug("admitted %s key %r on the %s socket", self.domain, name, self.domain)
        return True


def send(endpoint: Endpoint, message: Message, peer: bytes | None = None) -> bool:
    """Send a message (to `peer` on a ROUTER). False when the peer is gone or the socket is full."""
    frames = [encode(message)] if peer is None else [peer, encode(message)]
    try:
        sent = endpoint.socket.send_multipart(frames, flags=zmq.NOBLOCK)
        if isinstance(sent, asyncio.Future):  # an asyncio socket answers a non-blocking send with a done future
            sent.result()
        return True
    except zmq.ZMQError as exc:
        if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
            return False
        raise


def send_raw(endpoint: Endpoint, frame: bytes, peer: bytes | None = None) -> None:
    """Send arbitrary bytes (tests and the fake backend's `garbage` switch use this)."""
    endpoint.socket.send_multipart([frame] if peer is None else [peer, frame], flags=zmq.NOBLOCK)


@dataclass
class Received:
    """One incoming frame: who sent it, and the message or the reason it is not one."""

    peer: bytes | None
    message: Message | None
    error: WireError | None


def recv(endpoint: Endpoint, router: bool = False, admit: Callable[[bytes, int], bool] | None = None) -> Received:
    """Receive one already-available frame without blocking; never raises for bad content.

    `admit(peer, size)`, when given, is asked before the frame is decoded; a refused frame comes back as a
    `busy` WireError without being parsed (a client over its pace).
    """
    return _received(endpoint.socket.recv_multipart(flags=zmq.NOBLOCK), endpoint.max_bytes, router, admit)


def _received(frames: list[bytes], max_bytes: int, router: bool = False,
              admit: Callable[[bytes, int], bool] | None = None) -> Received:
    """What `recv` and `recv_async` make of one multipart message."""
    peer = frames[0] if router else None
    body = frames[1:] if router else frames
    if admit is not None and peer is not None and not admit(peer, sum(len(f) for f in body)):
        return Received(peer, None, WireError(ErrorCode.busy, "busy: this client sends faster than the "
                                              "coordinator's per-client pace; slow down and retry"))
    if len(body) != 1:
        return Received(peer, None, WireError(ErrorCode.bad_message, f"expected one frame, got {len(body)}"))
    try:
        return Received(peer, decode(body[0], max_bytes), None)
    except WireError as exc:
        return Received(peer, None, exc)


def poll(endpoints: list[Endpoint], timeout_s: float) -> list[Endpoint]:
    """Wait up to `timeout_s` for any endpoint to become readable; return the readable ones."""
    poller = zmq.Poller()
    for ep in endpoints:
        poller.register(ep.socket, zmq.POLLIN)
    ready = dict(poller.poll(max(0, int(timeout_s * 1000))))
    return [ep for ep in endpoints if ep.socket in ready]


def recv_timeout(endpoint: Endpoint, timeout_s: float) -> Received | None:
    """Receive one frame, waiting at most `timeout_s`; None on timeout."""
    if not poll([endpoint], timeout_s):
        return None
    return recv(endpoint)


def new_context() -> zmq.Context:
    """A fresh zmq context (one per process or per client)."""
    return zmq.Context()


def new_async_context() -> zmq.asyncio.Context:
    """A zmq context whose sockets serve an asyncio event loop (`recv_async`; `send` works on them too)."""
    return zmq.asyncio.Context()


async def recv_async(endpoint: Endpoint, most: int = 256) -> list[Received]:
    """Wait for a frame on a socket of `new_async_context()`, then take the frames already waiting behind it
    (up to `most`) without going back to the event loop; never raises for bad content."""
    batch = [await endpoint.socket.recv_multipart()]
    if endpoint.plain is None:  # the same socket without the asyncio machinery, for reads that cannot wait
        endpoint.plain = zmq.Socket.shadow(endpoint.socket.underlying)
    try:
        while len(batch) < most:
            batch.append(endpoint.plain.recv_multipart(flags=zmq.NOBLOCK))
    except zmq.Again:
        pass
    return [_received(frames, endpoint.max_bytes) for frames in batch]


# ---------------------------------------------------------------- in-process hand-off between threads


def bind_handoff(ctx: zmq.Context, address: str) -> Endpoint:
    """The receiving end of an inproc queue another thread pushes frames into."""
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    return Endpoint(sock, DEFAULT_MAX_BYTES)


def connect_handoff(ctx: zmq.Context, address: str) -> Endpoint:
    """The sending end of an inproc hand-off (one per thread: zmq sockets are not thread-safe)."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return Endpoint(sock, DEFAULT_MAX_BYTES)


def send_frames(endpoint: Endpoint, frames: list[bytes]) -> None:
    """Push raw frames into a hand-off (blocks only if the other thread is thousands behind)."""
    endpoint.socket.send_multipart(frames)


def recv_frames(endpoint: Endpoint) -> list[bytes]:
    """Take one already-available multipart message off a hand-off."""
    return endpoint.socket.recv_multipart(flags=zmq.NOBLOCK)


def send_encoded(endpoint: Endpoint, payload: bytes, peer: bytes) -> bool:
    """Send an already-encoded message to a ROUTER peer; False when the peer is gone or its queue is full."""
    return offer_encoded(endpoint, payload, peer) == "sent"


def offer_encoded(endpoint: Endpoint, payload: bytes, peer: bytes) -> str:
    """Try to send an already-encoded message to a ROUTER peer: "sent", "full" (its queue) or "gone"."""
    try:
        endpoint.socket.send_multipart([peer, payload], flags=zmq.NOBLOCK)
        return "sent"
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EAGAIN:
            return "full"
        if exc.errno == zmq.EHOSTUNREACH:
            return "gone"
        raise
