"""`AsyncClient`: the asyncio client, one socket whose reader task feeds each outstanding `RequestSession`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from shared.client.discovery import check_served, curve_keys, find_stack, stack_secret
from shared.client.errors import ClientTimeoutError
from shared.client.request import build_request
from shared.client.session import DEFAULT_TIMEOUT_S, RequestSession
from shared.config.units import MB
from shared.wire import transport
from shared.wire.messages import CancelRequest, DoneEvent, Message, StatusReply, StatusRequest

log = logging.getLogger(__name__)

IDLE = object()  # yielded by `AsyncClient.events` after `idle_s` without a message for its request
_WAKE = object()  # a timer's nudge to an inbox: the session's clock is due


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
        self.secret = secret or stack_secret(self.endpoint)
        self.ctx = transport.new_async_context()
        self.watched = self.endpoint.startswith("tcp://")  # a refused Curve handshake is heard, as in Client
        self.sock = transport.connect_dealer(self.ctx, self.endpoint, int(max_message_mb * MB),
                                             curve=curve or curve_keys(self.endpoint), watch=self.watched)
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

    def _session(self, request: Message, timeout_s: float | None, idle_s: float | None = None,
                 raise_errors: bool = True) -> RequestSession:
        limit = timeout_s if timeout_s is not None else self.timeout_s
        return RequestSession(request, asyncio.get_running_loop().time(), limit, self.endpoint, self.secret,
                              idle_s, raise_errors)

    async def events(self, request: Message, timeout_s: float | None = None,
                     idle_s: float | None = None) -> AsyncIterator[Message | object]:
        """Send `request` and yield every message answering it until a terminal one (an ErrorEvent too);
        `IDLE` after each `idle_s` without one. Raises ClientTimeoutError (cancelling a chat request) past
        the timeout."""
        async with aclosing(self._exchange(self._session(request, timeout_s, idle_s, False))) as answers:
            async for answer in answers:
                yield answer

    async def _exchange(self, session: RequestSession) -> AsyncIterator[Message | object]:
        """Send the session's request and yield its answers (and IDLE marks) until the terminal one; a chat
        request left unfinished (the caller stopped, an error ended the wait) is cancelled."""
        loop = asyncio.get_running_loop()
        inbox = self._inbox(session.request.id)
        ids = [session.request.id]
        try:
            transport.send(self.sock, session.request)
            while True:
                got = await _next(inbox, loop, session.wake_at())
                if got is _WAKE:
                    due = session.on_clock(loop.time())
                    if due.check_served:
                        check_served(self.sock, self.endpoint)
                    if due.error is not None:
                        raise due.error
                    if due.probe is not None:
                        self._inboxes[due.probe.id] = inbox
                        ids.append(due.probe.id)
                        transport.send(self.sock, due.probe)
                    if due.idle:
                        yield IDLE
                elif got.error is not None:
                    session.on_unreadable(got.error.code.value, got.error.message)
                elif got.message is not None:
                    msg = session.on_message(got.message, loop.time())
                    if msg is not None:
                        yield msg
                        if session.finished:
                            return
        finally:
            for msg_id in ids:
                self._inboxes.pop(msg_id, None)
            cancel = session.abandon()
            if cancel is not None and not self.sock.closed:
                transport.send(self.sock, cancel)

    async def stream(self, text: str | None = None, *, messages: list[dict[str, str]] | None = None,
                     image: Any = None, specialist: str | None = None, timeout_s: float | None = None,
                     idle_s: float | None = None, events: str = "all", **options: Any) -> AsyncIterator[Message]:
        """Yield every event of one chat request (and `IDLE` every `idle_s` of silence, when asked); the
        last is a DoneEvent; errors are raised. Leaving the loop early cancels the request. `events` as
        in `Client.stream`."""
        request = build_request(text, messages, image, specialist, events, **options)
        if self.secret:
            request = request.model_copy(update={"secret": self.secret})
        async with aclosing(self._exchange(self._session(request, timeout_s, idle_s))) as answers:
            async for answer in answers:
                yield answer  # type: ignore[misc]

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
        async with aclosing(self._exchange(self._session(StatusRequest(secret=self.secret), timeout_s))) as replies:
            async for reply in replies:  # an ErrorEvent is raised by the session
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
