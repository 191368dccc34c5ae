"""Replies a slow client has not taken yet, held in the coordinator instead of cancelling its request.

zmq holds a few hundred reply frames per client (`CLIENT_REPLY_FRAMES`). A client that reads more slowly
than a stream arrives (a fast model, a busy machine, a slow link) fills that; its frames then wait here,
in order, up to `runtime.client_queue_mb` per client, and go out as the client catches up. Only a client
that is gone, or that falls that far behind, has its request cancelled.
"""

from __future__ import annotations

from collections import deque

from shared.wire import transport

RETRY_S = 0.005  # how soon the coordinator's loop comes back while any client has a backlog


class ReplyBacklog:
    """Per-client queues of encoded replies that zmq's own queue had no room for."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._waiting: dict[bytes, deque[tuple[str, bytes]]] = {}
        self._bytes: dict[bytes, int] = {}

    def pending(self) -> bool:
        """Whether any client has replies waiting here."""
        return bool(self._waiting)

    def send(self, sock: transport.Endpoint, peer: bytes, request_id: str, payload: bytes) -> bool:
        """Send (or hold, in order) one reply; False when its client is gone or too far behind."""
        if peer not in self._waiting:
            outcome = transport.offer_encoded(sock, payload, peer)
            if outcome != "full":
                return outcome == "sent"
            self._waiting[peer], self._bytes[peer] = deque(), 0
        return self._hold(peer, request_id, payload)

    def _hold(self, peer: bytes, request_id: str, payload: bytes) -> bool:
        if self._bytes[peer] + len(payload) > self.limit_bytes:
            return False
        self._waiting[peer].append((request_id, payload))
        self._bytes[peer] += len(payload)
        return True

    def retry(self, sock: transport.Endpoint) -> list[str]:
        """Send what each client has room for now; the request ids whose client turned out to be gone."""
        lost: list[str] = []
        for peer in list(self._waiting):
            queue = self._waiting[peer]
            while queue:
                request_id, payload = queue[0]
                outcome = transport.offer_encoded(sock, payload, peer)
                if outcome == "full":
                    break
                queue.popleft()
                self._bytes[peer] -= len(payload)
                if outcome == "gone":
                    lost.extend(rid for rid, _ in [(request_id, payload), *queue])
                    queue.clear()
            if not queue:
                del self._waiting[peer], self._bytes[peer]
        return lost
