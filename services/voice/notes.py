"""Whether a specialist's output is text the voice can use, judged by its characters and word shapes.

A specialist can produce something that is not text at all: a random-weight or broken model writes
replacement characters, control bytes, symbol soup or fragments of several scripts run together. Handed
to the voice as notes, such output gets "explained" with invented content. `unreadable` finds it without a
model: what share of the characters are broken, and what share of the words look like words (letters of
one script, with a vowel when Latin), numbers or code. Fenced and inline code count as readable. It cannot
tell fluent nonsense from sense; that would take a language model's judgement.
"""

from __future__ import annotations

import re
import unicodedata

MIN_WORD_SHARE = 0.6  # below this share of word-like words, the text is not readable
MAX_BROKEN_SHARE = 0.1  # above this share of broken characters (U+FFFD, control, unassigned), neither
MAX_WORD_LETTERS = 25  # a longer run of letters is several tokens run together, not a word
EDGE = "\"'“”‘’«»()[]{}<>.,;:!?*_`~-–—…/\\|#"
CODE = re.compile(r"```.*?(?:```|$)|`[^`\n]+`", re.DOTALL)
WORD = re.compile(r"[^\W\d_]+(?:['’\-][^\W\d_]+)*")
NUMBER = re.compile(r"[+\-]?\d[\d.,:/x×%]*(?:st|nd|rd|th|s|px|km|kg|cm|mm)?")
IDENTIFIER = re.compile(r"[A-Za-z_][\w.]*(?:[(\[{=<>:+\-*/].*)?")
SEPARATORS = re.compile(r"[\s\u3000-\u303f\uff01-\uff0f\uff1a-\uff20]+")  # spaces; CJK and full-width punctuation
VOWELS = set("aeiouyAEIOUY")
KANA_AND_HAN = ("CJK", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA")
UNSPACED = ("CJK", "THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN")  # scripts written without spaces between words


def unreadable(text: str) -> str | None:
    """Why `text` is not usable text (a phrase for the voice and the log), or None when it is."""
    prose = CODE.sub(" ", text)
    visible = [ch for ch in prose if not ch.isspace()]
    if not visible:
        return None  # empty, or code only
    broken = sum(_broken(ch) for ch in visible)
    if broken > MAX_BROKEN_SHARE * len(visible):
        return f"{broken} of its {len(visible)} characters are not text"
    words = [word for word in (token.strip(EDGE) for token in SEPARATORS.split(prose)) if word]
    if not words:
        return "it holds no words, only punctuation"
    wordlike = sum(_wordlike(word) for word in words)
    if wordlike < MIN_WORD_SHARE * len(words):
        return f"only {wordlike} of its {len(words)} words look like words"
    return None


def _broken(ch: str) -> bool:
    return ch == "\ufffd" or unicodedata.category(ch) in ("Cc", "Cn", "Co", "Cs")


def _wordlike(word: str) -> bool:
    """A word of one script (a Latin one with a vowel), a number, or an ASCII code token."""
    if NUMBER.fullmatch(word):
        return True
    if WORD.fullmatch(word):
        letters = [ch for ch in word if ch.isalpha()]
        scripts = {_script(ch) for ch in letters}
        if len(scripts) != 1 or (len(letters) > MAX_WORD_LETTERS and not scripts & set(UNSPACED)):
            return False
        latin = scripts == {"LATIN"}
        return not latin or len(letters) <= 3 or any(_base(ch) in VOWELS for ch in letters)
    return word.isascii() and IDENTIFIER.fullmatch(word) is not None and any(ch in word for ch in "()[]{}=_.")


def _script(ch: str) -> str:
    """The script of a letter by its Unicode name ("LATIN", "CYRILLIC", ...); kana and Han are one."""
    script = unicodedata.name(ch, "UNKNOWN").split(" ")[0]
    return "CJK" if script in KANA_AND_HAN else script


def _base(ch: str) -> str:
    """A letter without its accents ("é" -> "e")."""
    return unicodedata.normalize("NFD", ch)[0]
