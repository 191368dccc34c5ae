"""Token ids to text, a batch at a time, holding back what could still change or be a stop string."""

from __future__ import annotations

from typing import Any

INCOMPLETE = "\ufffd"  # what a byte-level tokenizer decodes part of a multi-byte character to


class IncrementalText:
    """Turns a growing list of token ids into text pieces that are never taken back.

    Each push decodes the whole reply so far (a few hundred ids cost microseconds with a fast tokenizer)
    and hands out only the new, settled part: text ending in part of a character waits for the rest, and the
    last `len(longest stop) - 1` characters wait until they cannot begin a stop string. A stop string ends
    the reply before it; `stopped` then says so.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.stopped = False

    def push(self, ids: list[int]) -> str:
        """Add ids; return the text that became final (may be empty)."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self._text()
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._take(text[:cut])
        # Up to three trailing replacement characters may be a multi-byte character still arriving.
        pending = min(len(text) - len(text.rstrip(INCOMPLETE)), 3)
        return self._take(text[:max(self.sent, len(text) - max(self.hold, pending))])

    def finish(self) -> str:
        """The rest of the text once decoding ended (EOS or max_new_tokens)."""
        if self.stopped:
            return ""
        text = self._text()
        cut = self._stop_at(text)
        self.stopped = True
        return self._take(text if cut is None else text[:cut])

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _stop_at(self, text: str) -> int | None:
        # Only text not yet handed out can hold a new stop string (what was sent was checked before).
        since = max(0, self.sent - self.hold)
        found = [at for at in (text.find(s, since) for s in self.stop) if at >= 0]
        return min(found) if found else None

    def _take(self, text: str) -> str:
        piece = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return piece
