"""What `lyra status` (and the gateway's metrics) report about the coordinator's history."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from shared.wire.messages import SwapRecord

SWAP_RECORDS = 100  # swaps kept for status

NAMES = (
    "requests", "completed", "failed", "cancelled", "stage_reruns",
    "swaps", "swaps_from_host_cache", "swaps_from_checkpoint",
    "already_resident",  # a request found its specialist loaded: no swap at all
    "preloads", "preload_hits", "wasted_preloads",
)


@dataclass
class Counters:
    """Named counts, bumped from the I/O and pipeline threads, and the last swaps."""

    values: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NAMES, 0))
    swaps: deque[SwapRecord] = field(default_factory=lambda: deque(maxlen=SWAP_RECORDS))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bump(self, name: str) -> None:
        with self.lock:
            self.values[name] = self.values.get(name, 0) + 1

    def swapped(self, unloaded: str | None, loaded: str, source: str | None, seconds: float) -> None:
        """Count a swap and keep its record for status (and the gateway's metrics).

        A load the host answers with "resident" loaded nothing: it finished a load whose request was cancelled
        (loads run to their end), and this request found the model there. That is `already_resident`, not a
        swap, so `swaps` stays the sum of `swaps_from_host_cache` and `swaps_from_checkpoint`.
        """
        if source == "resident":
            self.bump("already_resident")
            return
        kind = source if source in ("host_cache", "checkpoint") else "unknown"
        with self.lock:
            self.values["swaps"] += 1
            if kind != "unknown":
                self.values[f"swaps_from_{kind}"] += 1
            self.swaps.append(SwapRecord(seq=self.values["swaps"], unloaded=unloaded, loaded=loaded, source=kind,
                                         seconds=round(seconds, 6)))

    def swap_records(self) -> list[SwapRecord]:
        with self.lock:
            return list(self.swaps)
