"""Where a reply given a sentence grace ends: at a sentence end past its budget, with every code fence closed.

A model's configured `max_new_tokens` is its budget; `finish_sentence_tokens` more are its grace. Past the
budget the reply stops at the first sentence end outside a code fence, or right after a code fence
closes. Inside a fence past the budget, text is handed out a whole line at a time, so when the grace runs
out the half-written line is dropped. A reply that ends (end of reply or grace spent) with a fence still
open gets the fence closed: the code it holds is usually the useful part, so it is kept rather than cut.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

# ".", "!" or "?", closing quotes, brackets or emphasis kept, then whitespace: a sentence end. A "." at the
# very end of the text so far waits for the next piece ("3" + ".5" is no sentence end).
SENTENCE_END = re.compile(r"[.!?][\"')\]*_]*(?=\s)")
FENCE = re.compile(r"^[ \t]*```", re.MULTILINE)
LIST_MARKER = re.compile(r"(?:^|\n)[ \t]*(?:\d+|[A-Za-z])\.$")  # "2." or "b." opening a list item
CLOSE_FENCE = "```"


def fence_open(text: str) -> bool:
    """Whether `text` ends inside a code fence (an odd number of ``` lines)."""
    return len(FENCE.findall(text)) % 2 == 1


def _is_sentence_end(text: str, dot: int) -> bool:
    """Whether the mark at `dot` ends a sentence, not a list number ("2.") or an initial ("e.g.", "J. K.")."""
    if text[dot] != ".":
        return True
    if LIST_MARKER.search(text[:dot + 1]):
        return False
    single_letter = dot >= 1 and text[dot - 1].isalpha() and (dot == 1 or not text[dot - 2].isalnum())
    return not single_letter


def _sentence_end(text: str, start: int, stop: int) -> int | None:
    """End (exclusive) of the first sentence end found in text[start:stop]."""
    for match in SENTENCE_END.finditer(text, start):  # no endpos: the lookahead may read the whitespace at `stop`
        if match.start() >= stop:
            return None
        if _is_sentence_end(text, match.start()):
            return match.end()
    return None


def reply_end(before: str, new: str) -> int | None:
    """Where in `new` (which follows `before`) the reply may end, or None.

    The end is the first sentence end outside a code fence, or the end of a closing fence. A sentence end
    whose mark ended `before` counts too (it had to wait for the whitespace after it).
    """
    text = before + new
    start = len(before)
    inside = fence_open(before)
    scan = max(0, start - 1)
    for fence in FENCE.finditer(text, max(0, start - len(CLOSE_FENCE) + 1)):
        if fence.end() <= start:
            continue
        if inside:
            return fence.end() - start
        end = _sentence_end(text, scan, fence.start())
        if end is not None:
            return max(0, end - start)
        inside, scan = True, fence.end()
    if inside:
        return None
    end = _sentence_end(text, scan, len(text))
    return None if end is None else max(0, end - start)


def finish_sentence(pieces: Iterator[str], made: Callable[[], int], budget: int, limit: int) -> Iterator[str]:
    """Pass the reply through; past `budget` tokens end it where `reply_end` says; close an open fence.

    `made()` is the number of tokens decoded so far and `limit` the most the decoder makes (budget + grace):
    the decoder stopping short of `limit` means the model ended its reply.
    """
    said = ""  # handed out so far
    held = ""  # past the budget inside a fence: the line not yet complete
    for piece in pieces:
        if made() <= budget:
            said += piece
            yield piece
            continue
        pending = held + piece
        end = reply_end(said, pending)
        if end is not None:
            if end:
                yield pending[:end]
            return
        if fence_open(said + pending):
            cut = pending.rfind("\n") + 1
            ready, held = pending[:cut], pending[cut:]
        else:
            ready, held = pending, ""
        said += ready
        if ready:
            yield ready
    if held and made() < limit:  # the model ended its reply: its last line is whole
        said += held
        yield held
    if fence_open(said):
        yield CLOSE_FENCE if said.endswith("\n") else "\n" + CLOSE_FENCE
