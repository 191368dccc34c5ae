"""The gateway's side of the coordinator: one `shared.client.AsyncClient` that carries every request.

Requests share one socket on the event loop (the client routes each answer to its request by id), so an
event costs no thread hop and no per-request connection. `max_concurrency` bounds the requests in flight;
a stream that ends early (the HTTP client went away) cancels its request in the coordinator at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from shared.client import IDLE, AsyncClient, LyraError
from shared.wire.messages import DoneEvent, Message, StatusReply

log = logging.getLogger(__name__)

KEEPALIVE = IDLE  # yielded by `Upstream.stream` when nothing arrived for `keepalive_s`


class Upstream:
    """Concurrent chat streams and status over one coordinator connection, at most `max_concurrency` at once."""

    def __init__(self, endpoint: str, max_concurrency: int, timeout_s: float, max_message_mb: float) -> None:
        self.endpoint = endpoint
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_message_mb = max_message_mb
        self._busy = 0
        self._client: AsyncClient | None = None

    def client(self) -> AsyncClient:
        """The connection, made on first use (inside the server's event loop)."""
        if self._client is None:
            self._client = AsyncClient(self.endpoint, self.timeout_s, self.max_message_mb)
        return self._client

    def in_flight(self) -> int:
        """Requests in flight now."""
        return self._busy

    async def status(self, timeout_s: float = 2.0) -> StatusReply:
        """The coordinator's status; raises LyraError when it does not answer within `timeout_s`."""
        return await self.client().status(timeout_s)

    async def stream(self, keepalive_s: float, **request: Any) -> AsyncIterator[Message | object]:
        """Yield the events of one chat request (and KEEPALIVE while none come); errors are raised.

        Raises `LyraError` with code "busy" when `max_concurrency` requests are in flight. Closing the
        iterator early (the HTTP client went away) cancels the request in the coordinator.
        """
        if self._busy >= self.max_concurrency:
            raise LyraError(f"busy: the gateway already carries {self._busy} requests (gateway.max_concurrency); "
                            "retry later", code="busy")
        self._busy += 1
        request_id: str | None = None
        finished = False
        try:
            async with aclosing(self.client().stream(idle_s=keepalive_s, events="answer", **request)) as events:
                async for event in events:
                    if isinstance(event, Message):
                        request_id = request_id or event.parent_id
                        finished = isinstance(event, DoneEvent)
                    yield event
        except LyraError:
            finished = True
            raise
        finally:
            self._busy -= 1
            if not finished and request_id is not None:
                log.info("request %s: the HTTP client went away; cancelled it", request_id)

    def close(self) -> None:
        """Close the connection (after the event loop stopped: outstanding requests are abandoned)."""
        if self._client is not None:
            self._client.close_socket()
            self._client = None
