"""The voice's reply without its instructions echoed or filler tacked on, streamed a piece at a time."""

from __future__ import annotations

import pytest

from shared.cli.demo import answer_problems
from shared.engine.echoes import EchoFilter

REPLY = ("Answer the user's last message yourself, using the notes. To fix a flat tyre, loosen the nuts.\n"
         "Then jack up the car. I'm glad you're happy with the answer.")
CODE = ("Here it is:\n```python\ndef reverse(s):\n    return s[::-1]  # using the notes\n```\n"
        "This reverses it. I hope this helps!")


def filtered(text: str, step: int) -> str:
    echoes = EchoFilter()
    out = "".join(echoes.feed(text[i:i + step]) for i in range(0, len(text), step))
    return out + echoes.finish()


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_echoes_and_trailing_filler_go_whatever_the_pieces(step: int) -> None:
    assert filtered(REPLY, step) == "To fix a flat tyre, loosen the nuts.\nThen jack up the car."
    assert filtered(CODE, step) == CODE.removesuffix(" I hope this helps!")  # code is never touched
    assert filtered("My response is in first person: it may be. I think it is useful.", step) == \
        "I think it is useful."


def test_filler_followed_by_substance_stays_and_a_reply_of_filler_only_is_kept() -> None:
    assert filtered("It depends. I'm glad you asked. Most people say yes.", 4) == \
        "It depends. I'm glad you asked. Most people say yes."
    assert filtered("I'm happy to help!", 4) == "I'm happy to help!"


def test_the_demo_check_flags_echoed_instructions_and_filler() -> None:
    problems = answer_problems(REPLY)
    assert any(p.startswith("instructions echoed: \"Answer the user's last") for p in problems), problems
    assert any(p.startswith("filler at the end: \"I'm glad you're happy") for p in problems), problems
    assert not answer_problems("Loosen the nuts, jack up the car and swap the wheel.")


def test_a_sentence_of_substance_streams_as_it_is_made_not_at_its_end() -> None:
    echoes = EchoFilter()
    assert echoes.feed("To fix a flat") == "To fix a flat"  # its first words decided it: no echo, no filler
    assert echoes.feed(" tyre, loosen") == " tyre, loosen"
    assert echoes.feed(" the nuts. I hope") == " the nuts."  # "I hope" may begin filler: held
    assert echoes.feed(" this helps.") == ""
    assert echoes.finish() == ""


def test_the_voice_saying_what_its_notes_state_is_no_echo() -> None:
    said = "The perception specialist's answer could not be read. Nothing is known about what it found."
    assert filtered(said, 5) == said
    assert not answer_problems(said)
