"""Generation settings of the embedded default: the sentence grace and the repetition penalty."""

from __future__ import annotations

import torch

from shared.backends.decode import Sampling, penalise_repeats
from shared.backends.hf_causal import finish_sentence, sampling_for
from shared.config import GenerationDefaults
from shared.messages import GenerationOptions


def run(pieces: list[str], budget: int, per_piece: int = 4) -> str:
    made = [0]

    def counted():
        for piece in pieces:
            made[0] += per_piece
            yield piece
    return "".join(finish_sentence(counted(), lambda: made[0], budget))


def test_past_the_budget_the_reply_ends_at_the_next_sentence_end() -> None:
    pieces = ["Boil the", " water. Add", " the tea and", " wait 3.5 min", "utes. Then", " pour it", " out."]
    assert run(pieces, budget=100) == "".join(pieces)  # within the budget nothing changes
    assert run(pieces, budget=4) == "Boil the water."
    assert run(pieces, budget=12) == "Boil the water. Add the tea and wait 3.5 minutes."  # "3.5" is no sentence end


def test_a_reply_without_a_sentence_end_keeps_every_piece() -> None:
    assert run(["a kettle,", " a kettle"], budget=2) == "a kettle, a kettle"


def test_repeated_tokens_lose_probability_and_others_keep_theirs() -> None:
    logits = torch.tensor([2.0, -1.0, 3.0])
    seen = torch.tensor([True, True, False])
    assert penalise_repeats(logits, seen, 2.0).tolist() == [1.0, -2.0, 3.0]


def test_the_penalty_comes_from_the_config_and_a_request_cannot_change_it() -> None:
    sampling = sampling_for(GenerationDefaults(repetition_penalty=1.2), GenerationOptions(max_new_tokens=5))
    assert sampling == Sampling(max_new_tokens=5, repetition_penalty=1.2)
