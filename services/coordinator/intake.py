"""Work on client input that is too slow for the I/O thread, and the pace each client may send at.

The I/O thread owns the sockets and keeps the workers' liveness: anything that can take it away for long
(decoding a 40-megapixel PNG takes about 0.4 s) runs on one intake thread instead, whose results leave
through the same thread-safe hand-off as the pipeline's. A client that sends faster than its budget of
frames or bytes per second is answered `busy` for the excess, before its frames are decoded, so a flood
cannot grow the coordinator or keep it from its other work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_PENDING = 8  # image checks waiting or running; more are answered busy
IDLE_PEER_S = 60.0  # forget a client's budget after this long without a frame


class SlowIntake:
    """One thread for slow checks of client input, with a bounded backlog."""

    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake")
        self.max_pending = max_pending
        self.pending = 0
        self.lock = threading.Lock()

    def submit(self, work: Callable[[], None]) -> bool:
        """Run `work` on the intake thread; False (nothing queued) when the backlog is full."""
        with self.lock:
            if self.pending >= self.max_pending:
                return False
            self.pending += 1
        self.pool.submit(self._run, work)
        return True

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:  # a bug in a check must not kill the intake thread for every later request
            log.exception("intake work failed")
        finally:
            with self.lock:
                self.pending -= 1

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Bucket:
    frames: float
    bytes: float
    at: float


class ClientPacer:
    """Token buckets per client: frames per second and bytes per second, each with a burst of one second."""

    def __init__(self, frames_per_s: float, bytes_per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.frames_per_s = frames_per_s
        self.bytes_per_s = bytes_per_s
        self.clock = clock
        self.buckets: dict[bytes, _Bucket] = {}
        self.last_sweep = clock()

    def admit(self, peer: bytes, size: int) -> bool:
        """Whether a frame of `size` bytes from `peer` is within its budget (and charge it if so)."""
        now = self.clock()
        bucket = self.buckets.get(peer)
        if bucket is None:
            bucket = self.buckets[peer] = _Bucket(self.frames_per_s, self.bytes_per_s, now)
        elapsed = now - bucket.at
        bucket.frames = min(self.frames_per_s, bucket.frames + elapsed * self.frames_per_s)
        bucket.bytes = min(self.bytes_per_s, bucket.bytes + elapsed * self.bytes_per_s)
        bucket.at = now
        self._sweep(now)
        # A frame larger than the whole byte budget still passes when the bucket is full, so no legal
        # message is refused for ever; it then empties the bucket.
        if bucket.frames < 1 or (bucket.bytes < size and bucket.bytes < self.bytes_per_s):
            return False
        bucket.frames -= 1
        bucket.bytes -= size
        return True

    def _sweep(self, now: float) -> None:
        if now - self.last_sweep < IDLE_PEER_S:
            return
        self.last_sweep = now
        for peer in [p for p, b in self.buckets.items() if now - b.at > IDLE_PEER_S]:
            del self.buckets[peer]


class QuietLog:
    """Warnings that a flood could repeat thousands of times a second: at most one line a second, with a count."""

    def __init__(self, logger: logging.Logger, every_s: float = 1.0) -> None:
        self.logger = logger
        self.every_s = every_s
        self.next_at = 0.0
        self.suppressed = 0

    def warning(self, text: str, *args: object) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return
        if self.suppressed:
            text += f" (and {self.suppressed} more refusals in the last {self.every_s:g}s)"
        self.suppressed, self.next_at = 0, now + self.every_s
        self.logger.warning(text, *args)
