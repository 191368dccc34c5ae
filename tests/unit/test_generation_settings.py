"""Generation settings of the embedded default: the sentence grace and the repetition penalty."""

from __future__ import annotations

import torch

from shared.config.schema import GenerationDefaults
from shared.engine.endings import finish_sentence
from shared.engine.sampling import Sampling, penalisable_tokens, penalise_repeats
from shared.models.hf_causal import sampling_for
from shared.wire.messages import GenerationOptions


def run(pieces: list[str], budget: int, per_piece: int = 4, limit: int = 1000) -> str:
    """The reply `finish_sentence` hands out; the decoder made `per_piece` tokens a piece, at most `limit`."""
    made = [0]

    def counted():
        for piece in pieces:
            made[0] += per_piece
            yield piece
    return "".join(finish_sentence(counted(), lambda: made[0], budget, limit))


def test_past_the_budget_the_reply_ends_at_the_next_sentence_end() -> None:
    pieces = ["Boil the", " water. Add", " the tea and", " wait 3.5 min", "utes. Then", " pour it", " out."]
    assert run(pieces, budget=100) == "".join(pieces)  # within the budget nothing changes
    assert run(pieces, budget=4) == "Boil the water."
    assert run(pieces, budget=12) == "Boil the water. Add the tea and wait 3.5 minutes."  # "3.5" is no sentence end


def test_a_reply_without_a_sentence_end_keeps_every_piece() -> None:
    assert run(["a kettle,", " a kettle"], budget=2) == "a kettle, a kettle"


def test_list_numbers_and_initials_are_no_sentence_ends() -> None:
    pieces = ["Steps:\n1", ". Loosen", " the nuts,", " e.g. with", " a wrench.", "\n2. Lift", " the car."]
    assert run(pieces, budget=4) == "Steps:\n1. Loosen the nuts, e.g. with a wrench."


def test_a_mark_ending_a_piece_waits_for_the_next_piece() -> None:
    assert run(["It costs 3.", "5 euros. More", " text."], budget=1) == "It costs 3.5 euros."
    assert run(["It ends here.", " More."], budget=1) == "It ends here."


def test_past_the_budget_a_code_fence_ends_at_its_close_not_at_a_period_inside() -> None:
    pieces = ["Here:\n```python\n", "def f(s):\n", "    # reversed.", " Done\n", "    return s", "[::-1]\n```",
              "\nThat is all.", " More."]
    assert run(pieces, budget=4) == "Here:\n```python\ndef f(s):\n    # reversed. Done\n    return s[::-1]\n```"


def test_a_fence_open_when_the_grace_runs_out_is_closed_after_its_last_whole_line() -> None:
    pieces = ["Here:\n```python\n", "def f(s):\n    ret", "urn s[::"]
    assert run(pieces, budget=4, limit=12) == "Here:\n```python\ndef f(s):\n```"


def test_a_fence_open_when_the_model_ends_its_reply_is_closed() -> None:
    pieces = ["```python\ndef f(s):\n", "    return s[::-1]  # reversed."]
    assert run(pieces, budget=100) == "```python\ndef f(s):\n    return s[::-1]  # reversed.\n```"
    assert run(pieces, budget=4, limit=12) == "```python\ndef f(s):\n    return s[::-1]  # reversed.\n```"


class Vocabulary:
    """A tokenizer of five tokens, as `penalisable_tokens` reads it."""

    texts = (" kettle", ".", " 391", "\n", "Été")

    def __len__(self) -> int:
        return len(self.texts)

    def batch_decode(self, ids: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.texts[row[0]] for row in ids]


def test_only_tokens_with_a_letter_are_penalised() -> None:
    mask = penalisable_tokens(Vocabulary(), vocab=7)  # two padded rows past the tokenizer's vocabulary
    assert mask.tolist() == [True, False, False, False, True, True, True]


def test_repeated_tokens_lose_probability_and_others_keep_theirs() -> None:
    logits = torch.tensor([2.0, -1.0, 3.0])
    seen = torch.tensor([True, True, False])
    assert penalise_repeats(logits, seen, 2.0).tolist() == [1.0, -2.0, 3.0]


def test_the_penalty_comes_from_the_config_and_a_request_cannot_change_it() -> None:
    sampling = sampling_for(GenerationDefaults(repetition_penalty=1.2), GenerationOptions(max_new_tokens=5))
    assert sampling == Sampling(max_new_tokens=5, repetition_penalty=1.2)
