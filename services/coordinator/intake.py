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


@dataclass
class _Window:
    """One kind of refusal: when it may be logged again, and what was held back meanwhile."""

    next_at: float = 0.0
    suppressed: int = 0
    last: str = ""  # the last one held back, as it would have read


class QuietLog:
    """Refusals that a flood could repeat thousands of times a second: per kind (`key`), at most one line a
    second, the next line counting those held back; `flush` reports those still untold once their second is up."""

    def __init__(self, logger: logging.Logger, every_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 max_kinds: int = 256) -> None:
        self.logger = logger
        self.every_s = every_s
        self.clock = clock
        self.max_kinds = max_kinds  # kinds are chosen by our code, but never let them grow without a bound
        self.windows: dict[str, _Window] = {}

    def warning(self, text: str, *args: object, key: str = "") -> None:
        self.log(logging.WARNING, text, *args, key=key)

    def error(self, text: str, *args: object, key: str = "") -> None:
        self.log(logging.ERROR, text, *args, key=key)

    def log(self, level: int, text: str, *args: object, key: str = "") -> None:
        now = self.clock()
        window = self.windows.get(key)
        if window is None:
            if len(self.windows) >= self.max_kinds:
                self.flush(force=True)
                self.windows.clear()
            window = self.windows[key] = _Window()
        if now < window.next_at:
            window.suppressed += 1
            window.last = text % args if args else text
            return
        if window.suppressed:
            text += f" (and {window.suppressed} more refusals in the last {self.every_s:g}s)"
        window.suppressed, window.next_at = 0, now + self.every_s
        self.logger.log(level, text, *args)

    def flush(self, force: bool = False) -> None:
        """Log the count of refusals held back whose window has closed (a flood that stopped is still told)."""
        now = self.clock()
        for window in self.windows.values():
            if window.suppressed and (force or now >= window.next_at):
                self.logger.warning("%d more refusals like this within %gs were not logged (the last: %s)",
                                    window.suppressed, self.every_s, window.last)
                window.suppressed, window.next_at = 0, now + self.every_s
