"""The Python client of a running Lyra Runtime stack: `Client` (blocking) and `AsyncClient` (asyncio).

    from shared.client import Client
    with Client() as lyra:                      # finds the stack `lyra up` started
        result = lyra.chat("What is 17 * 23?")
        print(result.answer, result.specialist, result.timings)
        for event in lyra.stream("Tell me a story"):
            ...

Errors from the coordinator are raised as `LyraError` subclasses carrying its code and sentence. While a
chat request is outstanding the coordinator sends something at least every `keepalive_s`; a client that
hears a different coordinator instance, or nothing for a few intervals (then a status probe goes
unanswered), raises `CoordinatorRestartedError` within about 5 s instead of waiting for its timeout.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from shared.client import stack_record
from shared.config.units import MB
from shared.wire import keys, transport
from shared.wire.messages import (
    TERMINAL_TYPES,
    AcceptedEvent,
    CancelRequest,
    ChatRequest,
    ChatTurn,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    GenerationOptions,
    ImagePayload,
    Message,
    ProgressEvent,
    StatusReply,
    StatusRequest,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 900.0
FIRST_ANSWER_S = 1.0  # silence after a send before the client checks that anyone serves the endpoint at all
SILENT_INTERVALS = 3.0  # keepalive intervals of silence after which the client checks on the coordinator
PROBE_INTERVALS = 1.5  # how long that check (a status request) may go unanswered
HANDSHAKE_CHECK_S = 0.2  # on tcp, how often a waiting client looks for a refused handshake


class LyraError(Exception):
    """An error reported by the stack (or the client's own timeout); `code` is an ErrorCode value."""

    code = "error"

    def __init__(self, message: str, code: str | None = None, service: str | None = None,
                 event: ErrorEvent | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.service = service
        self.event = event


class BusyError(LyraError):
    """The queue is full; retry later."""


class DeadlineError(LyraError):
    """A stage ran past its deadline."""


class WorkerDeadError(LyraError):
    """A worker died, restarted, or never came up while the request needed it."""


class OverBudgetError(LyraError):
    """The VRAM ledger refused a load; the message carries the arithmetic."""


class InvalidRequestError(LyraError):
    """The request (or a message) was refused as malformed or unacceptable."""


class CancelledError(LyraError):
    """The request was cancelled."""


class BadImageError(LyraError):
    """The attached image was refused (unreadable, truncated, absurd dimensions, too large)."""


class StackNotFoundError(LyraError):
    """No running stack could be found."""


class ClientTimeoutError(LyraError):
    """No terminal event arrived within the client's timeout."""


class CoordinatorRestartedError(LyraError):
    """The coordinator restarted (or went silent) while the request was outstanding: it is lost; send it again."""


class UnauthorizedError(LyraError):
    """The request lacked the stack secret a tcp client endpoint requires."""


ERRORS: dict[str, type[LyraError]] = {
    ErrorCode.busy.value: BusyError,
    ErrorCode.deadline.value: DeadlineError,
    ErrorCode.worker_dead.value: WorkerDeadError,
    ErrorCode.worker_missing.value: WorkerDeadError,
    ErrorCode.over_budget.value: OverBudgetError,
    ErrorCode.invalid_request.value: InvalidRequestError,
    ErrorCode.bad_message.value: InvalidRequestError,
    ErrorCode.unknown_type.value: InvalidRequestError,
    ErrorCode.schema_version.value: InvalidRequestError,
    ErrorCode.too_large.value: InvalidRequestError,
    ErrorCode.cancelled.value: CancelledError,
    ErrorCode.image_unreadable.value: BadImageError,
    ErrorCode.image_truncated.value: BadImageError,
    ErrorCode.image_dimensions.value: BadImageError,
    ErrorCode.image_too_large.value: BadImageError,
    ErrorCode.coordinator_restarted.value: CoordinatorRestartedError,
    ErrorCode.unauthorized.value: UnauthorizedError,
}


def error_from_event(event: ErrorEvent) -> LyraError:
    """The typed exception for a coordinator error event."""
    cls = ERRORS.get(event.code.value, LyraError)
    return cls(event.message, code=event.code.value, service=event.service, event=event)


def pil_image(result: DoneEvent | ImagePayload) -> Any:
    """The result's image as a PIL image (needs Pillow); None when the turn made no image."""
    payload = result.image if isinstance(result, DoneEvent) else result
    if payload is None:
        return None
    from PIL import Image

    return Image.open(io.BytesIO(payload.data))


def _stack_secret(endpoint: str) -> str | None:
    """The secret a tcp endpoint requires: $LYRA_SECRET, else the file `lyra up` recorded."""
    if not endpoint.startswith("tcp://"):
        return None  # ipc endpoints sit in a private directory; the secret never leaves this machine's files
    if os.environ.get("LYRA_SECRET"):
        return os.environ["LYRA_SECRET"]
    try:
        return Path(find_stack()["secret_file"]).read_text().strip()
    except (LyraError, KeyError, OSError):
        return None


def _curve_keys(endpoint: str) -> transport.CurveKeys | None:
    """This client's Curve identity for a tcp endpoint, when key files are found: in $LYRA_KEYS_DIR, else in the
    keys_dir of the config in $LYRA_CONFIG or of the stack `lyra up` recorded (when that config puts Curve on
    the endpoint), else in the default keys_dir. The pair is `$LYRA_CLIENT_KEY` (default "client") and the
    coordinator's public key beside it."""
    directory = _keys_dir_for(endpoint) if endpoint.startswith("tcp://") else None
    name = os.environ.get("LYRA_CLIENT_KEY", keys.DEFAULT_CLIENT)
    if directory is None or not (directory / f"{name}.key_secret").exists():
        return None  # no keys: a Curve coordinator refuses us, and _events says so at once
    try:
        return keys.identity(directory, name)
    except keys.KeyFileError as exc:
        raise UnauthorizedError(f"cannot use this client's Curve keys: {exc}", code="unauthorized") from None


def _keys_dir_for(endpoint: str) -> Path | None:
    from shared.config.schema import ConfigError, default_keys_dir, load_config

    if os.environ.get("LYRA_KEYS_DIR"):
        return Path(os.environ["LYRA_KEYS_DIR"])
    try:
        source = os.environ.get("LYRA_CONFIG") or find_stack().get("config")
        config = load_config(source) if source else None
    except (LyraError, ConfigError):
        config = None
    if config is None:
        return default_keys_dir()
    return config.keys_dir() if config.curve_on(endpoint) else None


class CoordinatorWatch:
    """Ends a chat request whose coordinator restarted or went silent, instead of waiting for the timeout."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.coordinator: str | None = None  # the instance that accepted the request
        self.keepalive_s: float | None = None  # promised by the AcceptedEvent; None = an older coordinator
        self.last_heard = time.monotonic()
        self.probe_id: str | None = None
        self.probe_sent = 0.0

    def heard(self, msg: Message) -> None:
        """Note a message; raise CoordinatorRestartedError when it comes from another coordinator instance."""
        if msg.parent_id not in (self.request_id, self.probe_id):
            return
        instance = getattr(msg, "coordinator", None)
        if instance and self.coordinator and instance != self.coordinator:
            raise CoordinatorRestartedError(
                f"the coordinator restarted (instance {self.coordinator} -> {instance}) while request "
                f"{self.request_id} was outstanding; the request is lost: send it again",
                code=ErrorCode.coordinator_restarted.value)
        self.coordinator = self.coordinator or instance
        if isinstance(msg, AcceptedEvent) and msg.keepalive_s:
            self.keepalive_s = msg.keepalive_s
        self.last_heard, self.probe_id = time.monotonic(), None

    def check_in_s(self) -> float:
        """Seconds until the silence is worth acting on (infinite without a promised keepalive)."""
        if self.keepalive_s is None:
            return math.inf
        if self.probe_id is not None:
            return max(0.0, self.probe_sent + PROBE_INTERVALS * self.keepalive_s - time.monotonic())
        return max(0.0, self.last_heard + SILENT_INTERVALS * self.keepalive_s - time.monotonic())

    def overdue(self, secret: str | None) -> StatusRequest:
        """The silence ran out: a status probe to send, or CoordinatorRestartedError if one went unanswered."""
        if self.probe_id is not None:
            silent = time.monotonic() - self.last_heard
            raise CoordinatorRestartedError(
                f"no word from the coordinator for {silent:.1f} s while request {self.request_id} was outstanding "
                "(it restarted or hangs); the request is lost: send it again",
                code=ErrorCode.coordinator_restarted.value)
        probe = StatusRequest(secret=secret)
        self.probe_id, self.probe_sent = probe.id, time.monotonic()
        return probe


def _answer(request: Message, got: transport.Received, watch: CoordinatorWatch | None) -> Message | None:
    """The received message when it answers `request`; None for a keepalive or another request's event."""
    if got.error is not None:
        raise InvalidRequestError(f"unreadable message from the coordinator: {got.error.message}",
                                  code=got.error.code.value)
    msg = got.message
    if msg is not None and watch is not None:
        watch.heard(msg)
    if msg is None or msg.parent_id != request.id or isinstance(msg, ProgressEvent):
        return None
    return msg


def _ends(msg: Message) -> bool:
    """Whether `msg` is the last answer to its request."""
    return isinstance(msg, (*TERMINAL_TYPES, StatusReply))


def _timed_out(endpoint: str, limit: float) -> ClientTimeoutError:
    return ClientTimeoutError(f"no answer from the coordinator at {endpoint} within {limit:g} s; "
                              "is the stack up? (`lyra status`)", code="client_timeout")


def _raise_if_refused(sock: transport.Endpoint, endpoint: str) -> None:
    """UnauthorizedError when the coordinator refused our Curve handshake (a key it does not list, or none)."""
    refused = transport.handshake_failures(sock)
    if refused:
        raise UnauthorizedError(f"the coordinator at {endpoint} refused this client's connection: "
                                f"{refused[-1]}; a Curve stack admits the client keys in its keys_dir's "
                                "authorized/clients/ (`lyra keys`; $LYRA_KEYS_DIR points a client at its keys)",
                                code=ErrorCode.unauthorized.value)


def find_stack(run_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The live stack's record (endpoint, config, run dir): $LYRA_ENDPOINT, else see `stack_record.live_record`.

    A record whose stack is gone is removed and reported at once (StackNotFoundError), never waited on.
    """
    if os.environ.get("LYRA_ENDPOINT") and run_dir is None:
        return {"client_endpoint": os.environ["LYRA_ENDPOINT"]}
    try:
        return stack_record.live_record(Path(run_dir) if run_dir is not None else None)
    except stack_record.NoStack as exc:
        raise StackNotFoundError(str(exc), code="not_running") from None


def _image_bytes(image: Any) -> bytes | None:
    """Accept a path, raw bytes, or a PIL image."""
    if image is None or isinstance(image, bytes):
        return image
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"image must be a path, bytes or a PIL image, not {type(image).__name__}")


def build_request(text: str | None = None, messages: list[dict[str, str]] | None = None, image: Any = None,
                  specialist: str | None = None, events: str = "all", **options: Any) -> ChatRequest:
    """A validated ChatRequest from friendly arguments (`events="answer"`: see ChatRequest.events)."""
    turns = [ChatTurn(**m) for m in messages] if messages else None
    return ChatRequest(text=text, messages=turns, image=_image_bytes(image), specialist=specialist,
                       options=GenerationOptions(**options), events=events)


class Client:
    """Blocking client; one request at a time per instance (use one instance per thread)."""

    def __init__(self, endpoint: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_message_mb: float = 64.0, secret: str | None = None,
                 curve: transport.CurveKeys | None = None) -> None:
        self.endpoint = endpoint or find_stack()["client_endpoint"]
        self.timeout_s = timeout_s
        self.secret = secret or _stack_secret(self.endpoint)  # sent only where required: tcp endpoints
        curve = curve or _curve_keys(self.endpoint)
        self.ctx = transport.new_context()
        # On tcp a refused handshake (Curve keys) is watched for, so the caller hears it, not a timeout.
        self.watched = self.endpoint.startswith("tcp://")
        self.sock = transport.connect_dealer(self.ctx, self.endpoint, int(max_message_mb * MB),
                                             curve=curve, watch=self.watched)

    def close(self) -> None:
        """Close the socket and context (never blocks)."""
        self.sock.close()
        self.ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _events(self, request: Message, timeout_s: float | None) -> Iterator[Message]:
        """Send `request` and yield every message answering it, until a terminal one or the timeout."""
        limit = timeout_s if timeout_s is not None else self.timeout_s
        deadline = time.monotonic() + limit
        transport.send(self.sock, request)
        watch = CoordinatorWatch(request.id) if isinstance(request, ChatRequest) else None
        check_at = time.monotonic() + FIRST_ANSWER_S  # until the first answer: is anyone there?
        while True:
            left = deadline - time.monotonic()
            wait = min(left, watch.check_in_s()) if watch else left
            if check_at is not None:
                if time.monotonic() >= check_at:
                    self._check_served()
                    check_at = time.monotonic() + FIRST_ANSWER_S
                wait = min(wait, max(0.0, check_at - time.monotonic()))
            # Always read what is already buffered (wait 0): a caller slow to consume its stream has
            # heard from the coordinator, however old `last_heard` looks.
            if self.watched:
                wait = min(wait, HANDSHAKE_CHECK_S)
            got = transport.recv_timeout(self.sock, max(0.0, wait)) if left > 0 else None
            if got is None and self.watched:
                self._raise_if_refused()
            if got is None and time.monotonic() < deadline:
                if watch is not None and watch.check_in_s() <= 0:
                    transport.send(self.sock, watch.overdue(self.secret))
                continue  # the watch's check-in (or a poll that woke a moment early)
            if got is None:
                if isinstance(request, ChatRequest):
                    transport.send(self.sock, CancelRequest(parent_id=request.id, secret=self.secret))
                raise _timed_out(self.endpoint, limit)
            check_at = None  # someone serves the endpoint
            msg = _answer(request, got, watch)
            if msg is None:
                continue  # a late event of an earlier request, or a keepalive
            yield msg
            if _ends(msg):
                return

    def _check_served(self) -> None:
        """Raise StackNotFoundError when nothing serves the endpoint and no live stack will (a stale record)."""
        reason = stack_record.endpoint_gone(self.endpoint)
        if reason is not None:
            raise StackNotFoundError(reason, code="not_running")

    def _raise_if_refused(self) -> None:
        _raise_if_refused(self.sock, self.endpoint)

    def stream(self, text: str | None = None, *, messages: list[dict[str, str]] | None = None, image: Any = None,
               specialist: str | None = None, timeout_s: float | None = None, events: str = "all",
               **options: Any) -> Iterator[Message]:
        """Yield every event of one chat request (`events="answer"`: no stage events, only the voice's
        tokens); the last is a DoneEvent; errors are raised."""
        request = build_request(text, messages, image, specialist, events, **options)
        if self.secret:
            request = request.model_copy(update={"secret": self.secret})
        completed = False
        try:
            for event in self._events(request, timeout_s):
                if isinstance(event, ErrorEvent):
                    completed = True
                    raise error_from_event(event)
                completed = isinstance(event, DoneEvent)
                yield event
        finally:
            if not completed and not self.sock.closed:  # the caller stopped early: free the pipeline
                transport.send(self.sock, CancelRequest(parent_id=request.id, secret=self.secret))

    def chat(self, text: str | None = None, **kwargs: Any) -> DoneEvent:
        """Run one chat request and return its DoneEvent (answer, route, timings, VRAM, image)."""
        done = None
        for event in self.stream(text, **kwargs):
            if isinstance(event, DoneEvent):
                done = event
        assert done is not None
        return done

    def status(self, timeout_s: float = 5.0) -> StatusReply:
        """The coordinator's view of the stack."""
        for reply in self._events(StatusRequest(secret=self.secret), timeout_s):
            if isinstance(reply, ErrorEvent):
                raise error_from_event(reply)
            assert isinstance(reply, StatusReply)
            return reply
        raise ClientTimeoutError("no status reply", code="client_timeout")


IDLE = object()  # yielded by `AsyncClient.events` after `idle_s` without a message for its request
_WAKE = object()  # a timer's nudge to an inbox: re-check the deadline and the coordinator watch


class AsyncClient:
    """asyncio twin of Client over zmq.asyncio: `await chat(...)`, `async for event in stream(...)`.

    Any number of requests may be outstanding at once on one instance: they share one socket, and a reader
    task hands each message to its request's inbox by `parent_id`. Use an instance from one event loop.
    """

    def __init__(self, endpoint: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_message_mb: float = 64.0, secret: str | None = None,
                 curve: transport.CurveKeys | None = None) -> None:
        self.endpoint = endpoint or find_stack()["client_endpoint"]
        self.timeout_s = timeout_s
        self.secret = secret or _stack_secret(self.endpoint)
        self.ctx = transport.new_async_context()
        self.watched = self.endpoint.startswith("tcp://")  # a refused Curve handshake is heard, as in Client
        self.sock = transport.connect_dealer(self.ctx, self.endpoint, int(max_message_mb * MB),
                                             curve=curve or _curve_keys(self.endpoint), watch=self.watched)
        self._inboxes: dict[str, asyncio.Queue[Any]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        """The reader task: every incoming message to the inbox of the request it answers."""
        while True:
            for got in await transport.recv_async(self.sock):
                self._deliver(got)

    def _deliver(self, got: transport.Received) -> None:
        if got.error is not None:  # our coordinator only sends valid messages: every request must hear it
            log.warning("unreadable message from the coordinator: %s", got.error.message)
            for inbox in self._inboxes.values():
                inbox.put_nowait(got)
            return
        assert got.message is not None
        inbox = self._inboxes.get(got.message.parent_id or "")
        if inbox is not None:
            inbox.put_nowait(got)

    def _inbox(self, *ids: str) -> asyncio.Queue[Any]:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read(), name="lyra-client-reader")
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        for msg_id in ids:
            self._inboxes[msg_id] = inbox
        return inbox

    async def events(self, request: Message, timeout_s: float | None = None,
                     idle_s: float | None = None) -> AsyncIterator[Message | object]:
        """Send `request` and yield every message answering it until a terminal one; `IDLE` after each
        `idle_s` without one. Raises ClientTimeoutError (cancelling a chat request) past the timeout."""
        loop = asyncio.get_running_loop()
        limit = timeout_s if timeout_s is not None else self.timeout_s
        deadline = loop.time() + limit
        inbox = self._inbox(request.id)
        ids = [request.id]
        watch = CoordinatorWatch(request.id) if isinstance(request, ChatRequest) else None
        transport.send(self.sock, request)
        quiet_since = loop.time()
        check_at: float | None = quiet_since + FIRST_ANSWER_S  # until the first answer: is anyone there?
        try:
            while True:
                wake_at = min(deadline, loop.time() + (watch.check_in_s() if watch else math.inf),
                              quiet_since + idle_s if idle_s else math.inf, check_at or math.inf)
                got = await _next(inbox, loop, wake_at)
                now = loop.time()
                if got is _WAKE:
                    if check_at is not None and now >= check_at:
                        _raise_if_refused(self.sock, self.endpoint)
                        reason = stack_record.endpoint_gone(self.endpoint)
                        if reason is not None:
                            raise StackNotFoundError(reason, code="not_running")
                        check_at = now + FIRST_ANSWER_S
                    if now >= deadline:
                        if isinstance(request, ChatRequest):
                            transport.send(self.sock, CancelRequest(parent_id=request.id, secret=self.secret))
                        raise _timed_out(self.endpoint, limit)
                    if watch is not None and watch.check_in_s() <= 0:
                        probe = watch.overdue(self.secret)
                        self._inboxes[probe.id] = inbox
                        ids.append(probe.id)
                        transport.send(self.sock, probe)
                    if idle_s and now - quiet_since >= idle_s:
                        quiet_since = now
                        yield IDLE
                    continue
                check_at = None  # someone serves the endpoint
                msg = _answer(request, got, watch)
                if msg is None:
                    continue
                quiet_since = now
                yield msg
                if _ends(msg):
                    return
        finally:
            for msg_id in ids:
                self._inboxes.pop(msg_id, None)

    async def stream(self, text: str | None = None, *, messages: list[dict[str, str]] | None = None,
                     image: Any = None, specialist: str | None = None, timeout_s: float | None = None,
                     idle_s: float | None = None, events: str = "all", **options: Any) -> AsyncIterator[Message]:
        """Yield every event of one chat request (and `IDLE` every `idle_s` of silence, when asked); the
        last is a DoneEvent; errors are raised. Leaving the loop early cancels the request. `events` as
        in `Client.stream`."""
        request = build_request(text, messages, image, specialist, events, **options)
        if self.secret:
            request = request.model_copy(update={"secret": self.secret})
        completed = False
        try:
            async with aclosing(self.events(request, timeout_s, idle_s)) as events:
                async for event in events:
                    if isinstance(event, ErrorEvent):
                        completed = True
                        raise error_from_event(event)
                    completed = isinstance(event, DoneEvent)
                    yield event  # type: ignore[misc]
        finally:
            if not completed and not self.sock.closed:  # the caller stopped early: free the pipeline
                self.cancel(request.id)

    def cancel(self, request_id: str) -> None:
        """Ask the coordinator to cancel `request_id` (its remaining events are dropped)."""
        transport.send(self.sock, CancelRequest(parent_id=request_id, secret=self.secret))

    async def chat(self, text: str | None = None, **kwargs: Any) -> DoneEvent:
        """Run one chat request and return its DoneEvent."""
        done = None
        async for event in self.stream(text, **kwargs):
            if isinstance(event, DoneEvent):
                done = event
        assert done is not None
        return done

    async def status(self, timeout_s: float = 5.0) -> StatusReply:
        """The coordinator's view of the stack."""
        async with aclosing(self.events(StatusRequest(secret=self.secret), timeout_s)) as replies:
            async for reply in replies:
                if isinstance(reply, ErrorEvent):
                    raise error_from_event(reply)
                assert isinstance(reply, StatusReply)
                return reply
        raise ClientTimeoutError("no status reply", code="client_timeout")

    async def close(self) -> None:
        """Stop the reader and close the socket; outstanding requests end with their timeouts."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self.close_socket()

    def close_socket(self) -> None:
        """Close the socket and context without the event loop (after it stopped); never blocks."""
        self.sock.close()
        self.ctx.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _next(inbox: asyncio.Queue[Any], loop: asyncio.AbstractEventLoop, wake_at: float) -> Any:
    """The inbox's next item, or `_WAKE` at `wake_at` if none came (one timer handle, no task per wait)."""
    if not inbox.empty():
        return inbox.get_nowait()
    timer = loop.call_at(wake_at, inbox.put_nowait, _WAKE)
    try:
        return await inbox.get()
    finally:
        timer.cancel()
