"""The gateway's side of the coordinator: pooled `shared.client.Client`s, each on its own thread.

A zmq socket must stay on the thread that made it, and one `Client` carries one request at a time, so
every connection here owns a one-thread executor. A streaming request borrows a connection whose thread
iterates `Client.stream` and hands each event to the event loop with `call_soon_threadsafe` (one wake-up
per event, no round trip). A separate control connection asks for status and sends cancels, so a client
that disconnects frees the pipeline at once even while its connection's thread waits on a swap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from shared import transport
from shared.client import Client, LyraError
from shared.messages import CancelRequest, Message, StatusReply

log = logging.getLogger(__name__)

KEEPALIVE = object()  # yielded by `Upstream.stream` when nothing arrived for `keepalive_s`
_END = object()


class Connection:
    """One `Client` and the only thread that may touch its socket."""

    def __init__(self, endpoint: str, timeout_s: float, max_message_mb: float) -> None:
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lyra-upstream")
        self.client: Client = self.executor.submit(Client, endpoint, timeout_s, max_message_mb).result(timeout=10)

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        return self.executor.submit(fn, *args)

    def close(self) -> None:
        self.executor.submit(self.client.close).result(timeout=5)
        self.executor.shutdown(wait=False)


class Upstream:
    """Concurrent chat streams and status over a bounded pool of coordinator connections."""

    def __init__(self, endpoint: str, max_concurrency: int, timeout_s: float, max_message_mb: float) -> None:
        self.endpoint = endpoint
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_message_mb = max_message_mb
        self._idle: list[Connection] = []
        self._busy = 0
        self._control: Connection | None = None

    def _connect(self) -> Connection:
        return Connection(self.endpoint, self.timeout_s, self.max_message_mb)

    def _control_connection(self) -> Connection:
        if self._control is None:
            self._control = self._connect()
        return self._control

    def in_flight(self) -> int:
        """Requests holding a connection now."""
        return self._busy

    async def status(self, timeout_s: float = 2.0) -> StatusReply:
        """The coordinator's status; raises LyraError when it does not answer within `timeout_s`."""
        control = self._control_connection()
        future = control.submit(control.client.status, timeout_s)
        return await asyncio.wrap_future(future)

    def cancel(self, request_id: str) -> None:
        """Ask the coordinator to cancel `request_id` (fire and forget; its reply is skipped later)."""
        control = self._control_connection()
        control.submit(transport.send, control.client.sock, CancelRequest(parent_id=request_id))

    async def stream(self, keepalive_s: float, **request: Any) -> AsyncIterator[Message | object]:
        """Yield the events of one chat request (and KEEPALIVE while none come); errors are raised.

        Raises `LyraError` with code "busy" when every connection is taken. Closing the iterator early
        (the HTTP client went away) cancels the request in the coordinator.
        """
        if self._busy >= self.max_concurrency:
            raise LyraError(f"busy: the gateway already carries {self._busy} requests (gateway.max_concurrency); "
                            "retry later", code="busy")
        self._busy += 1
        loop = asyncio.get_running_loop()
        try:
            conn = self._idle.pop() if self._idle else await loop.run_in_executor(None, self._connect)
        except BaseException:
            self._busy -= 1
            raise
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        pump = conn.submit(_pump, conn.client, request, stop, loop, queue.put_nowait)
        pump.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release, conn))
        last = [loop.time()]  # when the last event came; the ticker reads it (a shared cell, no per-event task)
        ticker = asyncio.ensure_future(_keepalive(queue, keepalive_s, last))
        request_id: str | None = None
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item is not KEEPALIVE:
                    last[0] = loop.time()
                    request_id = request_id or item.parent_id
                yield item
        finally:
            ticker.cancel()
            if not finished:
                stop.set()
                if request_id is not None:
                    log.info("request %s: the HTTP client went away; cancelling it", request_id)
                    self.cancel(request_id)

    def _release(self, conn: Connection) -> None:
        self._busy -= 1
        self._idle.append(conn)

    def close(self) -> None:
        """Close every idle connection and the control connection."""
        for conn in [*self._idle, *([self._control] if self._control else [])]:
            try:
                conn.close()
            except (concurrent.futures.TimeoutError, RuntimeError) as exc:
                log.warning("closing a coordinator connection failed: %s", exc)
        self._idle.clear()
        self._control = None


async def _keepalive(queue: asyncio.Queue[Any], every_s: float, last: list[float]) -> None:
    """Put KEEPALIVE on the queue after every `every_s` (up to twice that) without an event."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every_s)
        if loop.time() - last[0] >= every_s:
            last[0] = loop.time()
            queue.put_nowait(KEEPALIVE)


def _pump(client: Client, request: dict[str, Any], stop: threading.Event, loop: asyncio.AbstractEventLoop,
          put: Callable[[Any], None]) -> None:
    """On the connection's thread: run one request, handing each event (or the error) to the loop."""
    events = client.stream(**request)
    try:
        for event in events:
            loop.call_soon_threadsafe(put, event)
            if stop.is_set():
                break
        loop.call_soon_threadsafe(put, _END)
    except LyraError as exc:
        loop.call_soon_threadsafe(put, exc)
    except Exception as exc:  # the client library broke: end this request, keep the gateway serving
        log.exception("coordinator connection failed")
        loop.call_soon_threadsafe(put, LyraError(f"the gateway lost its coordinator connection: {exc}",
                                                 code="internal"))
    finally:
        events.close()
