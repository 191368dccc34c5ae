"""classify reuses the prompt beginning it shares with the previous prompt, and scores exactly as without it.

Tiny real-architecture checkpoints: Llama (plain KV cache), Gemma 3 (sliding-window layers: continued
only while the prompt is shorter than the window) and Jamba (Mamba layers, never continued). Scores are
compared with the same model scoring every prompt whole; the forward calls are counted to show what ran.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from shared.engine.prefix_cache import MIN_SHARED, PrefixCache, common_length
from shared.models import hf_causal
from shared.wire.messages import ChatTurn, RouteLabel
from tests.models import tiny

pytestmark = pytest.mark.models

TEMPLATE = "You route messages to specialists.\n{labels}\n\nRoute this message: {text}\n\nName only."
LABELS = [RouteLabel(name="pragmatist", description="practical tasks, how-to questions"),
          RouteLabel(name="philosopher", description="questions about meaning and ethics"),
          RouteLabel(name="artist", description="pictures and drawings")]
TURNS = ["How do I fix a flat tyre?", "Is free will an illusion?", "Draw me a cat.", "How do I fix a flat tyre?"]


def scores(model: hf_causal.HfCausalModel, text: str, labels: list[RouteLabel] = LABELS) -> dict[str, float]:
    return model.classify([ChatTurn(role="user", content=text)], labels, TEMPLATE, threading.Event())


def counted(model: hf_causal.HfCausalModel) -> list[int]:
    """Input lengths of every forward call from now on."""
    lengths: list[int] = []
    model.model.register_forward_pre_hook(
        lambda _module, _args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    return lengths


def test_common_length() -> None:
    assert common_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_length([], [1]) == 0
    assert common_length([1, 2], [1, 2]) == 2


def test_shared_beginning_runs_once_and_scores_are_unchanged(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["llama"]
    reused = hf_causal.load(tiny.entry("r", path), tiny.cpu_context())
    whole = hf_causal.load(tiny.entry("w", path), tiny.cpu_context())
    whole.prefixes.usable = False
    lengths = counted(reused)
    per_turn = []
    for text in TURNS:
        start = len(lengths)
        assert scores(reused, text) == pytest.approx(scores(whole, text), abs=1e-5)
        per_turn.append(lengths[start:])
    shared = len(reused.prefixes.ids)
    assert shared >= MIN_SHARED and reused.prefixes.cache is not None
    # Turn 1 runs whole; turn 2 finds the shared part (one pass over it, one over the rest); later turns
    # run only what follows it (and the label batch, a few tokens).
    assert max(per_turn[0]) > shared
    assert shared in per_turn[1]
    assert all(n < shared for turn in per_turn[2:] for n in turn), (per_turn, shared)


def test_another_label_set_shrinks_the_shared_part_and_it_grows_back(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["llama"]
    reused = hf_causal.load(tiny.entry("r", path), tiny.cpu_context())
    whole = hf_causal.load(tiny.entry("w", path), tiny.cpu_context())
    whole.prefixes.usable = False
    for text in TURNS[:2]:
        scores(reused, text)
    before = len(reused.prefixes.ids)
    others = [LABELS[1], LABELS[0]]
    assert scores(reused, TURNS[2], others) == pytest.approx(scores(whole, TURNS[2], others), abs=1e-5)
    assert MIN_SHARED <= len(reused.prefixes.ids) < before
    for text in TURNS[2:]:  # back to the first label set: two prompts show the longer shared part again
        assert scores(reused, text) == pytest.approx(scores(whole, text), abs=1e-5)
    assert len(reused.prefixes.ids) == before


@pytest.mark.parametrize(("architecture", "usable"), [("jamba", False), ("gemma3", True)])
def test_caches_that_cannot_be_continued_are_not(architecture: str, usable: bool,
                                                 tiny_checkpoints: dict[str, Path]) -> None:
    """Jamba's Mamba state is never continued; a Gemma 3 prompt as long as its sliding window (16 tokens in
    the tiny shape) runs whole, and a later, shorter one could still be continued."""
    path = tiny_checkpoints[architecture]
    reused = hf_causal.load(tiny.entry("r", path), tiny.cpu_context())
    whole = hf_causal.load(tiny.entry("w", path), tiny.cpu_context())
    whole.prefixes.usable = False
    for text in TURNS[:3]:
        assert scores(reused, text) == pytest.approx(scores(whole, text), abs=1e-5)
    assert reused.prefixes.usable is usable and reused.prefixes.cache is None


def test_unload_forgets_the_cache(tiny_checkpoints: dict[str, Path]) -> None:
    model = hf_causal.load(tiny.entry("r", tiny_checkpoints["llama"]), tiny.cpu_context())
    for text in TURNS[:2]:
        scores(model, text)
    assert model.prefixes.cache is not None
    model.unload()
    assert model.prefixes.cache is None and model.prefixes.ids == []
    assert isinstance(model.prefixes, PrefixCache)
