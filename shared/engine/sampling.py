"""How the next token is chosen: greedy or sampled (temperature, top-p, seed), and the repetition penalty.

Everything here runs on the logits' device without a host sync, so a graph-replayed decode step is never
waited on to pick a token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Sampling:
    """How one reply is decoded."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0  # > 1: tokens the reply already holds become less likely (CTRL-style)


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Logits of tokens marked in `seen` ([vocab] bool) divided by `penalty` (multiplied when negative)."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def penalisable_tokens(tokenizer: Any, vocab: int) -> torch.Tensor:
    """[vocab] bool: the tokens a repetition penalty may touch, those whose text holds a letter.

    Punctuation, digits, whitespace and symbols are never penalised: a penalised "." lost to the unpenalised
    end-of-reply token, so replies ended mid-sentence, and penalised digits change arithmetic ("391").
    Ids past the tokenizer's vocabulary (padded embedding rows) count as words.
    """
    known = min(len(tokenizer), vocab)
    texts = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=False)
    wordy = [any(ch.isalpha() for ch in text) for text in texts] + [True] * (vocab - known)
    return torch.tensor(wordy, dtype=torch.bool)


def pick_token(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The next token id ([1], on the logits' device) from last-position logits [1, vocab]; no host sync."""
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / sampling.temperature
    if sampling.top_p < 1.0:
        # Nucleus: drop the least likely tokens whose total mass stays within 1 - top_p; keep at least one.
        ordered, order = torch.sort(scaled, dim=-1)
        dropped = torch.softmax(ordered, dim=-1).cumsum(dim=-1) <= 1.0 - sampling.top_p
        dropped[..., -1] = False
        scaled = scaled.scatter(-1, order, ordered.masked_fill(dropped, float("-inf")))
    return torch.multinomial(torch.softmax(scaled, dim=-1), 1).view(-1)
