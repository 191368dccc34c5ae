"""`Client`: the blocking client, a socket and a polling loop that drive one `RequestSession` at a time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import closing
from typing import Any

from shared.client.discovery import check_served, curve_keys, find_stack, raise_if_refused, stack_secret
from shared.client.errors import ClientTimeoutError
from shared.client.request import build_request
from shared.client.session import DEFAULT_TIMEOUT_S, RequestSession
from shared.config.units import MB
from shared.wire import transport
from shared.wire.messages import DoneEvent, Message, StatusReply, StatusRequest

HANDSHAKE_CHECK_S = 0.2  # on tcp, how often a waiting client looks for a refused handshake


class Client:
    """Blocking client; one request at a time per instance (use one instance per thread)."""

    def __init__(self, endpoint: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_message_mb: float = 64.0, secret: str | None = None,
                 curve: transport.CurveKeys | None = None) -> None:
        self.endpoint = endpoint or find_stack()["client_endpoint"]
        self.timeout_s = timeout_s
        self.secret = secret or stack_secret(self.endpoint)  # sent only where required: tcp endpoints
        curve = curve or curve_keys(self.endpoint)
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

    def _session(self, request: Message, timeout_s: float | None) -> RequestSession:
        limit = timeout_s if timeout_s is not None else self.timeout_s
        return RequestSession(request, time.monotonic(), limit, self.endpoint, self.secret)

    def _exchange(self, session: RequestSession) -> Iterator[Message]:
        """Send the session's request and yield its answers until the terminal one; a chat request left
        unfinished (the caller stopped, an error ended the wait) is cancelled."""
        try:
            transport.send(self.sock, session.request)
            while True:
                got = self._receive(session)
                if got is None:
                    self._on_clock(session)
                elif got.error is not None:
                    session.on_unreadable(got.error.code.value, got.error.message)
                elif got.message is not None:
                    msg = session.on_message(got.message, time.monotonic())
                    if msg is not None:
                        yield msg
                        if session.finished:
                            return
        finally:
            cancel = session.abandon()
            if cancel is not None and not self.sock.closed:
                transport.send(self.sock, cancel)

    def _receive(self, session: RequestSession) -> transport.Received | None:
        """The next frame, or None when the session's clock is due first (nothing is read past the timeout)."""
        now = time.monotonic()
        if session.expired(now):
            return None
        # Always read what is already buffered (a wait of 0): a caller slow to consume its stream has heard
        # from the coordinator, however long ago the session last did.
        wait = session.wake_at() - now
        if self.watched:
            wait = min(wait, HANDSHAKE_CHECK_S)
        return transport.recv_timeout(self.sock, max(0.0, wait))

    def _on_clock(self, session: RequestSession) -> None:
        if self.watched:
            raise_if_refused(self.sock, self.endpoint)
        due = session.on_clock(time.monotonic())
        if due.check_served:
            check_served(self.sock, self.endpoint)
        if due.error is not None:
            raise due.error
        if due.probe is not None:
            transport.send(self.sock, due.probe)

    def stream(self, text: str | None = None, *, messages: list[dict[str, str]] | None = None, image: Any = None,
               specialist: str | None = None, timeout_s: float | None = None, events: str = "all",
               **options: Any) -> Iterator[Message]:
        """Yield every event of one chat request (`events="answer"`: no stage events, only the voice's
        tokens); the last is a DoneEvent; errors are raised."""
        request = build_request(text, messages, image, specialist, events, **options)
        if self.secret:
            request = request.model_copy(update={"secret": self.secret})
        with closing(self._exchange(self._session(request, timeout_s))) as answers:
            yield from answers

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
        with closing(self._exchange(self._session(StatusRequest(secret=self.secret), timeout_s))) as replies:
            for reply in replies:  # an ErrorEvent is raised by the session
                assert isinstance(reply, StatusReply)
                return reply
        raise ClientTimeoutError("no status reply", code="client_timeout")
