"""What the voice is told about a specialist's output: its notes, or that they could not be read."""

from __future__ import annotations

import pytest

from services.voice.handlers import compose_voice_prompt
from services.voice.notes import unreadable
from shared.wire.messages import ChatTurn, SynthesizeRequest

READABLE = [
    "The image shows a red circle in the middle of a blue square.",
    "To fix a flat tyre, loosen the nuts, jack up the car and swap the wheel.",
    "```python\ndef reverse(s):\n    return s[::-1]\n```",
    "def reverse(s): return s[::-1]  # the slice walks backwards",
    "17 * 23 = 391.",
    "I drew: a lighthouse at sunset (256x256, 4 steps, seed 7)",
    "图片中有一个红色的圆，背景是蓝色的。",
    "На картинке красный круг на синем фоне.",
    "L'image montre un disque rouge sur un fond bleu, très simple.",
    "",
]
GIBBERISH = [
    "\ufffd" * 24,  # a random-weight vision model's bytes that decode to no character
    "ulpt弁Бенed sigmoidквquir 잠 ForbiddenЧ翻 inflatedthanwardsreserved",
    "\x00\x07\x1b[0m\x02\x03\x04",
    ";;; ))) ::: ### !!!",
]


@pytest.mark.parametrize("text", READABLE)
def test_text_a_person_can_read_passes(text: str) -> None:
    assert unreadable(text) is None


@pytest.mark.parametrize("text", GIBBERISH)
def test_output_that_is_not_text_is_named_so(text: str) -> None:
    reason = unreadable(text)
    assert reason is not None and ("characters are not text" in reason or "words" in reason), reason


def request(output: str, specialist: str = "perception") -> SynthesizeRequest:
    return SynthesizeRequest(messages=[ChatTurn(role="user", content="What is in this picture?")],
                             specialist=specialist, specialist_output=output)


def test_the_voice_gets_readable_notes_as_they_are() -> None:
    turns = compose_voice_prompt("You are Lyra.", request("A red disc on a blue ground."))
    assert "\nA red disc on a blue ground.\n" in turns[0].content


def test_the_voice_is_told_only_that_unreadable_notes_could_not_be_read() -> None:
    turns = compose_voice_prompt("You are Lyra.", request("\ufffd" * 24))
    system = turns[0].content
    assert "\ufffd" not in system  # the gibberish itself never reaches the voice
    assert "\nThe perception specialist's answer could not be read. Nothing is known about what it found.\n" in system
    assert turns[-1].content == "What is in this picture?"
