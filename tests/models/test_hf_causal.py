"""The transformers backend on tiny Llama, Gemma 3 and Jamba checkpoints, loaded like real ones."""

from __future__ import annotations

import importlib.util
import logging
import threading
import weakref
from pathlib import Path

import pytest
import torch

from shared.engine.cancel import Cancelled
from shared.models import hf_causal
from shared.models.base import BackendError
from shared.wire.messages import ChatTurn, GenerationOptions, RouteLabel
from tests.models import tiny

pytestmark = pytest.mark.models

QUESTION = [ChatTurn(role="system", content="You are Lyra."), ChatTurn(role="user", content="What is 17 times 23?")]
LABELS = [
    RouteLabel(name="pragmatist", description="practical tasks, facts, how-to, math, code"),
    RouteLabel(name="philosopher", description="meaning, ethics, consciousness, existential questions"),
    RouteLabel(name="artist", description="drawing, painting, making images"),
]
TEMPLATE = "Which specialist should handle the user's message?\n{labels}\n\nUser's message: {text}\n\nName only."
GREEDY = GenerationOptions(temperature=0.0, max_new_tokens=24)


def run(model: hf_causal.HfCausalModel, options: GenerationOptions = GREEDY,
        messages: list[ChatTurn] = QUESTION) -> list[str]:
    return list(model.generate(messages, options, threading.Event()))


def test_loads_the_real_architecture_on_cpu(tiny_model: hf_causal.HfCausalModel, architecture: str) -> None:
    assert type(tiny_model.model).__name__ == tiny.MODEL_CLASSES[architecture]
    assert tiny_model.model.dtype == torch.float32  # "auto" on the CPU
    assert tiny_model.placement() == {"model": "cpu", "engine": "dynamic (CPU)"}
    [reading] = tiny_model.memory()
    weights = sum(p.numel() * p.element_size() for p in tiny_model.model.parameters())
    assert reading.device == "cpu" and reading.allocated_bytes > weights


def test_greedy_generation_is_repeatable_and_matches_transformers(tiny_model: hf_causal.HfCausalModel) -> None:
    first, second = run(tiny_model), run(tiny_model)
    assert first == second
    answer = "".join(first)
    assert answer.strip()
    # Reference: plain transformers generate + decode, no streamer, no threads.
    tokenizer = tiny_model.tokenizer
    chat = [turn.model_dump() for turn in QUESTION]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = tiny_model.model.generate(**inputs, do_sample=False, max_new_tokens=GREEDY.max_new_tokens,
                                       pad_token_id=tokenizer.pad_token_id)
    assert answer == tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_streaming_yields_several_pieces(tiny_model: hf_causal.HfCausalModel) -> None:
    pieces = run(tiny_model, GenerationOptions(temperature=0.0, max_new_tokens=64))
    assert len(pieces) > 1 and all(pieces)


def test_seeded_sampling_is_repeatable(tiny_model: hf_causal.HfCausalModel) -> None:
    options = GenerationOptions(temperature=1.0, top_p=0.9, seed=1234, max_new_tokens=16)
    assert run(tiny_model, options) == run(tiny_model, options)


def test_cancel_stops_generation_midway(tiny_model: hf_causal.HfCausalModel) -> None:
    steps: list[int] = []
    hook = tiny_model.model.register_forward_hook(lambda *_: steps.append(1))
    try:
        run(tiny_model, GenerationOptions(temperature=0.0, max_new_tokens=64))
        uncancelled, steps[:] = len(steps), []
        cancel = threading.Event()
        stream = tiny_model.generate(QUESTION, GenerationOptions(temperature=0.0, max_new_tokens=64), cancel)
        next(stream)
        cancel.set()
        with pytest.raises(Cancelled):
            list(stream)
    finally:
        hook.remove()
    assert uncancelled > 30  # the reference run really was long ...
    assert len(steps) < 10  # ... and the cancelled one stopped within a few decoding steps
    assert not [t for t in threading.enumerate() if t.name.startswith("generate-")]


def test_cancel_before_start_raises(tiny_model: hf_causal.HfCausalModel) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        list(tiny_model.generate(QUESTION, GREEDY, cancel))
    with pytest.raises(Cancelled):
        tiny_model.classify(QUESTION, LABELS, TEMPLATE, cancel)


def test_classify_returns_a_distribution_over_all_labels(tiny_model: hf_causal.HfCausalModel) -> None:
    scores = tiny_model.classify(QUESTION, LABELS, TEMPLATE, threading.Event())
    assert list(scores) == [label.name for label in LABELS]
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 < p < 1.0 for p in scores.values())


def test_batched_classify_equals_one_forward_pass_per_label(tiny_model: hf_causal.HfCausalModel) -> None:
    """Padding must not change any label's score: compare with unpadded, one-label-at-a-time passes."""
    tokenizer, model = tiny_model.tokenizer, tiny_model.model
    listing = "\n".join(f"- {label.name}: {label.description}" for label in LABELS)
    prompt = hf_causal.render_template(TEMPLATE, listing, QUESTION[-1].content)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    prefix = tokenizer(text, add_special_tokens=False).input_ids
    label_ids = [tokenizer(label.name, add_special_tokens=False).input_ids for label in LABELS]
    assert len({len(ids) for ids in label_ids}) > 1  # labels of different lengths: padding is exercised
    totals = []
    for ids in label_ids:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prefix + ids])).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        totals.append(sum(log_probs[len(prefix) - 1 + i, token].item() for i, token in enumerate(ids)))
    expected = torch.softmax(torch.tensor(totals, dtype=torch.double), dim=0).tolist()
    scores = tiny_model.classify(QUESTION, LABELS, TEMPLATE, threading.Event())
    assert list(scores.values()) == pytest.approx(expected, abs=1e-4)


def test_classify_refuses_duplicate_labels(tiny_model: hf_causal.HfCausalModel) -> None:
    with pytest.raises(BackendError, match="distinct"):
        tiny_model.classify(QUESTION, LABELS + LABELS[:1], TEMPLATE, threading.Event())


def test_long_prompts_are_cut_from_the_left(tiny_checkpoints: dict[str, Path],
                                            caplog: pytest.LogCaptureFixture) -> None:
    loaded = hf_causal.load(tiny.entry("short", tiny_checkpoints["llama"], max_context=48), tiny.cpu_context())
    long_turn = [ChatTurn(role="user", content="the quick brown fox " * 60)]
    with caplog.at_level(logging.WARNING, logger="shared.models.hf_causal"):
        pieces = run(loaded, GenerationOptions(temperature=0.0, max_new_tokens=8), long_turn)
        scores = loaded.classify(long_turn, LABELS, TEMPLATE, threading.Event())
    assert "truncated to its last 40" in caplog.text  # 48 - 8 new tokens
    assert "dropped" in caplog.text and pieces
    whole, kept = loaded.last_truncation()  # what the worker reports in its reply and the done event carries
    assert kept == 40 and whole > 200
    run(loaded, GenerationOptions(temperature=0.0, max_new_tokens=8), [ChatTurn(role="user", content="hi")])
    assert loaded.last_truncation() is None
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    loaded.unload()


@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
def test_unload_drops_the_model(arch: str, tiny_checkpoints: dict[str, Path]) -> None:
    loaded = hf_causal.load(tiny.entry(arch, tiny_checkpoints[arch]), tiny.cpu_context())
    run(loaded)
    model_ref = weakref.ref(loaded.model)
    loaded.unload()
    assert model_ref() is None
    assert loaded.placement() == {}
    with pytest.raises(BackendError, match="unloaded"):
        run(loaded)


def test_explicit_device_map_with_layer_ranges_loads(tiny_checkpoints: dict[str, Path]) -> None:
    # On the CPU transformers keeps no per-module map; tests/models/test_hf_causal_gpu.py checks real splits.
    device_map = {"model.embed_tokens": "cpu", "model.layers.0-1": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    loaded = hf_causal.load(tiny.entry("mapped", tiny_checkpoints["llama"], device_map=device_map), tiny.cpu_context())
    assert loaded.placement() == {"model": "cpu", "engine": "dynamic (CPU)"}
    assert "".join(run(loaded)).strip()
    loaded.unload()


def test_explicit_device_map_naming_a_gpu_is_refused_on_cpu(tiny_checkpoints: dict[str, Path]) -> None:
    entry = tiny.entry("mapped", tiny_checkpoints["llama"], device_map={"model.layers.0-1": 0, "lm_head": "cpu"})
    with pytest.raises(BackendError, match="GPU 0 does not exist"):
        hf_causal.load(entry, tiny.cpu_context())


def test_check_entry_accepts_a_good_entry(tiny_checkpoints: dict[str, Path]) -> None:
    assert hf_causal.check_entry(tiny.entry("ok", tiny_checkpoints["llama"]), has_cuda=False) == []


def test_check_entry_reports_a_missing_path() -> None:
    [problem] = hf_causal.check_entry(tiny.entry("gone", "/nonexistent/model"), has_cuda=False)
    assert "does not exist" in problem


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_the_package_names_the_fix(tiny_checkpoints: dict[str, Path]) -> None:
    entry = tiny.entry("fa", tiny_checkpoints["llama"], attn_implementation="flash_attention_2")
    assert any("pip install flash-attn" in p for p in hf_causal.check_entry(entry, has_cuda=True))
    with pytest.raises(BackendError, match="pip install flash-attn"):
        hf_causal.load(entry, tiny.cpu_context())


@pytest.mark.parametrize("quantization", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_without_a_gpu_is_refused(quantization: str, tiny_checkpoints: dict[str, Path]) -> None:
    entry = tiny.entry("q", tiny_checkpoints["llama"], quantization=quantization)
    with pytest.raises(BackendError, match="CUDA GPU"):
        hf_causal.load(entry, tiny.cpu_context())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_gpu_service_without_cuda_is_refused(tiny_checkpoints: dict[str, Path]) -> None:
    with pytest.raises(BackendError, match="CUDA is not available"):
        hf_causal.load(tiny.entry("gpu", tiny_checkpoints["llama"]), tiny.cpu_context(gpus=[1]))
