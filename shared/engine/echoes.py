"""Sentences a small voice copies from its own instructions, and the filler it tacks on after an answer.

SmolLM2-135M as the voice sometimes restates its prompt ("Answer the user's last message yourself, using the
notes.", "My response is written in first person.") and ends with pleasantries nobody asked for ("I'm glad
you're happy with the answer."). `EchoFilter` removes both from a streamed reply a sentence at a time: an
echo is dropped wherever it stands, filler only when nothing but filler follows it. Code (inside a fence)
passes untouched. `instruction_echoes` and `trailing_filler` name what a finished reply still holds (the
demo's check uses them).
"""

from __future__ import annotations

import re

# Phrases of the voice's handoff and persona, and words the user never used (the specialists, their notes).
ECHO = re.compile("|".join((
    r"\bthe user'?s?'? (last |latest )?(message|question|turn)\b",
    r"\b(using|use|from|in|according to|based on) (the|my|these|your) notes\b",
    r"\bthe notes (say|support|do not|don't|provided|prepared)\b",
    r"\bin (the )?first[- ]person\b",
    r"\bmy (response|reply|answer) (is|will be|should be|must be)\b",
    r"\byour (pragmatist|philosopher|artist|perception) specialist\b",  # the voice's notes say "could not be read"
    r"\bspecialist (prepared|'s notes|notes)\b",
    r"\bkeep (my |the )?answers? to two or three sentences\b",
    r"\bsay only what the notes support\b",
    r"\bwarm and concise assistant\b",
)), re.IGNORECASE)
# Pleasantries after the answer: harmless alone, noise at the end of every reply.
FILLER = re.compile("|".join((
    r"^i'?m (so )?(glad|happy) (you|that|to hear|i could)",
    r"^i hope (this|that|it|my answer) (helps|helped|answers|was)",
    r"^(please )?(let me know|feel free)\b",
    r"^(is there )?anything else\b",
    r"^if you have (any )?(other|more|further)? ?questions\b",
    r"^(thank you|thanks) for (asking|your question|the question|reaching out)",
    r"^happy to help\b",
    r"^(have a (great|nice|good) day)\b",
)), re.IGNORECASE)
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")
FENCE = "```"


def is_echo(sentence: str) -> bool:
    """Whether `sentence` restates the voice's instructions or names its internal notes."""
    return ECHO.search(sentence) is not None


def is_filler(sentence: str) -> bool:
    """Whether `sentence` is a pleasantry that adds nothing to an answer."""
    return FILLER.search(sentence.strip().lstrip("\"'*-– ")) is not None


def sentences(text: str) -> list[str]:
    """`text` cut after each sentence end, keeping every character (the pieces join back to `text`)."""
    pieces, start = [], 0
    for end in SENTENCE_END.finditer(text):  # the space after a sentence goes with the next one
        cut = end.start() + len(end.group().rstrip())
        if cut > start:
            pieces.append(text[start:cut])
            start = cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def outside_code(text: str) -> list[str]:
    """The sentences of `text` outside code fences."""
    return [s for i, part in enumerate(text.split(FENCE)) if i % 2 == 0 for s in sentences(part) if s.strip()]


def instruction_echoes(text: str) -> list[str]:
    """The sentences of a finished reply that restate the voice's instructions."""
    return [s.strip() for s in outside_code(text) if is_echo(s)]


def trailing_filler(text: str) -> list[str]:
    """The pleasantries a finished reply ends with (after its last sentence of substance)."""
    found = []
    for sentence in reversed(outside_code(text)):
        if not is_filler(sentence):
            break
        found.insert(0, sentence.strip())
    return found if len(found) < len(outside_code(text)) else []


# How an echoed or filler sentence begins: the filter decides on a sentence's first words, so every other
# sentence streams as it is made (lower case, straight apostrophes).
ECHO_STARTS = ("answer the user", "the user's", "using the notes", "based on the notes", "according to the notes",
               "from the notes", "the notes", "my response is", "my response will", "my reply is",
               "in first person", "in the first person", "speaking in first person", "you are lyra",
               "your pragmatist", "your philosopher", "your artist", "your perception", "keep answers to",
               "say only what the notes")
FILLER_STARTS = ("i'm glad you", "i'm glad that", "i'm glad to", "i am glad", "i'm happy to help", "i'm happy you",
                 "i'm so glad", "i hope this", "i hope that", "i hope it", "i hope my", "let me know",
                 "please let me know", "feel free", "is there anything else", "anything else",
                 "if you have any", "if you have other", "if you have more", "if you have further",
                 "thank you for asking", "thanks for asking", "thank you for your question", "happy to help",
                 "have a great day", "have a nice day", "have a good day")
CLOSERS = "\"')]*_"  # may follow a sentence's final mark


def _opening(sentence: str) -> str:
    return sentence.lstrip("\"'*-– ").lower().replace("’", "'")


class EchoFilter:
    """Streams a reply through without sentences that echo the instructions or filler that ends it.

    Each sentence is judged on its first words: held while they could still begin an echo or filler, then
    streamed as it is made (most sentences), or dropped whole (an echo), or held until a sentence of
    substance follows (filler; dropped when the reply ends first). Code inside a fence is never touched.
    When every sentence would go, the reply is kept as it was: an odd answer says more than none.
    """

    def __init__(self) -> None:
        self.state = "start"  # start | undecided | pass | drop | filler | code
        self.gap = ""  # whitespace before the current sentence
        self.sentence = ""  # the current sentence while it is held (undecided, drop, filler)
        self.held: list[str] = []  # filler sentences (with their gaps) waiting for substance after them
        self.last = ""  # the last characters seen (sentence ends, fences)
        self.kept = False
        self.dropped: list[str] = []  # every sentence left out (for the log)
        self.original = ""

    def feed(self, piece: str) -> str:
        """The text that may go out now that `piece` arrived."""
        self.original += piece
        return "".join(self._char(ch) for ch in piece)

    def finish(self) -> str:
        """What is left to send once the reply ended."""
        out = self._end_sentence() if self.state in ("undecided", "drop", "filler") else ""
        self.dropped += [held.strip() for held in self.held]
        self.held = []
        if not self.kept and self.dropped:  # everything went: keep the reply as it was
            self.dropped, self.kept = [], True
            return self.original
        return out

    def _char(self, ch: str) -> str:
        ended = ch == "\n" or (ch.isspace() and self.last.rstrip(CLOSERS)[-1:] in (".", "!", "?"))
        self.last = (self.last + ch)[-8:]
        if self.state == "code":
            if self.last.endswith("```"):
                self.state = "pass"
            return ch
        if self.last.endswith("```"):  # code begins: what was held is part of it
            out = self._release(self.gap + self.sentence + ch) if self.state != "pass" else ch
            self.state, self.gap, self.sentence = "code", "", ""
            return out
        if ended and self.state != "start":
            out = self._end_sentence()
            self.state, self.gap = "start", ch
            return out
        if self.state == "start":
            if ch.isspace():
                self.gap += ch
                return ""
            self.state, self.sentence = "undecided", ""
        if self.state == "pass":
            return ch
        self.sentence += ch
        return self._decide() if self.state == "undecided" else ""

    def _decide(self) -> str:
        opening = _opening(self.sentence)
        if any(opening.startswith(p) for p in ECHO_STARTS):
            self.state = "drop"
        elif any(opening.startswith(p) for p in FILLER_STARTS):
            self.state = "filler"
        elif not any(p.startswith(opening) for p in (*ECHO_STARTS, *FILLER_STARTS)):
            self.state = "pass"
            out, self.gap, self.sentence = self._release(self.gap + self.sentence), "", ""
            return out
        return ""

    def _end_sentence(self) -> str:
        """The current sentence ended: what of it goes out."""
        sentence, gap = self.sentence, self.gap
        self.sentence, self.gap = "", ""
        if self.state == "drop":
            self.dropped.append(sentence.strip())
        elif self.state == "filler":
            self.held.append(gap + sentence)
        elif self.state == "undecided" and sentence.strip():  # a short sentence: judged whole
            if is_echo(sentence):
                self.dropped.append(sentence.strip())
            elif is_filler(sentence):
                self.held.append(gap + sentence)
            else:
                return self._release(gap + sentence)
        return ""

    def _release(self, text: str) -> str:
        """`text` goes out, after the filler it proved was not the end."""
        out = "".join(self.held) + text
        self.held = []
        if not self.kept:
            out = out.lstrip()
        self.kept = self.kept or bool(out.strip())
        return out
