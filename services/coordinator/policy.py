"""Which waiting request runs next: FIFO, or grouped by specialist within a fairness bound.

Grouping serves a waiting request whose specialist is already resident before older requests that
would need a swap, saving the swap, but no request is ever overtaken more than `max_overtakes` times.
`max_overtakes = 0` (the default) is strict FIFO.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Waiting(Protocol):
    """What the policy needs to know about a waiting request."""

    overtaken: int

    def known_specialist(self) -> str | None:
        """The specialist it will need, when known (forced, or routed early)."""


def pick_next(waiting: Sequence[Waiting], resident: str | None, max_overtakes: int) -> int:
    """Index of the request to run next; never overtakes a request more than `max_overtakes` times."""
    if not waiting or max_overtakes <= 0 or resident is None:
        return 0
    for index, job in enumerate(waiting):
        if job.known_specialist() == resident:
            return index  # every request ahead of it may still be overtaken once more
        if job.overtaken >= max_overtakes:
            return 0  # this one may not be passed again: serve in FIFO order
    return 0
