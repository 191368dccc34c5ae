"""Token ids to text, a batch at a time, holding back what could still change or be a stop string."""

from __future__ import annotations

import logging
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

log = logging.getLogger(__name__)

INCOMPLETE = "\ufffd"  # what a byte-level tokenizer decodes part of a multi-byte character to


class IncrementalText:
    """Turns a growing list of token ids into text pieces that are never taken back.

    Each push decodes only the new ids (`tokenizers`' DecodeStream: a few tokens of context per id, however
    long the reply), which hands out text only once a character is whole. The last `len(longest stop) - 1`
    characters wait until they cannot begin a stop string; a stop string ends the reply before it, and
    `stopped` then says so.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        backend = stream_backend(tokenizer)
        self.decoder: StreamDecoder | WholeReplyDecoder = \
            StreamDecoder(backend, self.ids) if backend is not None else WholeReplyDecoder(tokenizer, self.ids)
        self.unsent = ""  # settled text not handed out yet: the hold, or all of it until a stop string is ruled out
        self.stopped = False

    def push(self, ids: list[int]) -> str:
        """Add ids; return the text that became final (may be empty)."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        self.unsent += self._settled(ids)
        cut = self._stop_at()
        if cut is not None:
            self.stopped = True
            return self._take(cut)
        return self._take(max(0, len(self.unsent) - self.hold))

    def finish(self) -> str:
        """The rest of the text once decoding ended (EOS or max_new_tokens)."""
        if self.stopped:
            return ""
        self.unsent += self.decoder.rest()
        cut = self._stop_at()
        self.stopped = True
        return self._take(len(self.unsent) if cut is None else cut)

    def _settled(self, ids: list[int]) -> str:
        try:
            return self.decoder.add(ids)
        except Exception as exc:  # tokenizers raises a bare Exception when a decoder's text is not a prefix of the next
            if not isinstance(self.decoder, StreamDecoder):
                raise
            log.warning("incremental decoding failed (%s); decoding the whole reply on each batch from here", exc)
            self.decoder = WholeReplyDecoder(self.decoder.backend, self.ids, self.decoder.settled)
            return self.decoder.add(ids)

    def _stop_at(self) -> int | None:
        # Settled text never changes, and what was sent was followed by `hold` characters that began no stop
        # string: a new one can only begin in the unsent text.
        found = [at for at in (self.unsent.find(s) for s in self.stop) if at >= 0]
        return min(found) if found else None

    def _take(self, end: int) -> str:
        piece, self.unsent = self.unsent[:end], self.unsent[end:]
        return piece


def stream_backend(tokenizer: Any) -> Tokenizer | None:
    """The `tokenizers.Tokenizer` whose decode is `tokenizer.decode`, or None where there is none.

    transformers' fast tokenizers hold one (`backend_tokenizer`). A slow, pure-Python tokenizer has none, and a
    fast one that cleans up spaces after decoding (" ." -> ".", `clean_up_tokenization_spaces`) says something
    the backend does not: a stream cannot clean a space whose "." has not arrived yet.
    """
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # transformers 5 skips the clean-up for BPE models unless forced; transformers 4 always runs it.
        forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", None)
        if forced is None or forced or type(backend.model).__name__ != "BPE":
            return None
    return backend


class StreamDecoder:
    """New text for new ids through `tokenizers`' DecodeStream: the work per id does not grow with the reply."""

    def __init__(self, backend: Tokenizer, ids: list[int]) -> None:
        self.backend = backend
        self.ids = ids  # the whole reply, shared with IncrementalText (read only for the rest at the end)
        self.stream = DecodeStream(skip_special_tokens=True)
        self.settled = 0  # characters handed out
        self.waiting = 0  # ids stepped since the last piece: part of a character, or ids that decode to nothing

    def add(self, ids: list[int]) -> str:
        """The text the new `ids` settle (the caller has already appended them to the reply)."""
        pieces = []
        for token in ids:
            piece = self.stream.step(self.backend, token)
            if piece is None:
                self.waiting += 1
            else:
                pieces.append(piece)
                self.waiting = 0
        text = "".join(pieces)
        self.settled += len(text)  # only once the batch went through: a decoder taking over resumes before it
        return text

    def rest(self) -> str:
        """What the waiting ids say once no more come: a cut-off character decodes to U+FFFD, as in a full decode."""
        if not self.waiting:
            return ""
        return self.backend.decode(self.ids, skip_special_tokens=True)[self.settled:]


class WholeReplyDecoder:
    """Decodes the whole reply on every batch: for a tokenizer without a `tokenizers` backend (see
    `stream_backend`), whose decode is all there is. Quadratic in the reply, microseconds a batch at a few
    hundred ids."""

    def __init__(self, tokenizer: Any, ids: list[int], settled: int = 0) -> None:
        self.tokenizer = tokenizer
        self.ids = ids  # the whole reply, shared with IncrementalText
        self.settled = settled  # characters of the decoded text handed out (a stream's, when taking over from one)

    def add(self, ids: list[int]) -> str:
        """The text the new `ids` settle: a trailing U+FFFD may be a character still arriving."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        pending = min(len(text) - len(text.rstrip(INCOMPLETE)), 3)  # a UTF-8 character has at most 3 more bytes
        return self._take(text, len(text) - pending)

    def rest(self) -> str:
        """Everything not yet settled."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        piece = text[self.settled:end]
        self.settled = max(self.settled, end)
        return piece
