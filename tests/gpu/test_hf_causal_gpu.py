"""The transformers backend on a real CUDA GPU: placement in physical numbers, measured memory, real unload."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import pytest
import torch

from shared.models import hf_causal
from shared.wire.messages import ChatTurn, GenerationOptions, RouteLabel
from tests.gpu.memory import settle
from tests.models import tiny

pytestmark = [pytest.mark.models, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

QUESTION = [ChatTurn(role="user", content="What is 17 times 23?")]
LABELS = [RouteLabel(name="pragmatist", description="facts"), RouteLabel(name="philosopher", description="ethics")]
PHYSICAL = [3]  # as if CUDA_VISIBLE_DEVICES=3: the process sees it as cuda:0, summaries say gpu:3


def where(loaded: hf_causal.HfCausalModel) -> dict[str, str]:
    """The weights' placement, without the decode engine's entry."""
    return {k: v for k, v in loaded.placement().items() if k != "engine"}


def _exercise(loaded: hf_causal.HfCausalModel) -> None:
    answer = "".join(loaded.generate(QUESTION, GenerationOptions(temperature=0.0, max_new_tokens=16),
                                     threading.Event()))
    assert answer.strip()
    scores = loaded.classify(QUESTION, LABELS, "{labels}\n{text}", threading.Event())
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)


def test_whole_model_on_the_first_gpu_and_unload_returns_memory(tiny_checkpoints: dict[str, Path]) -> None:
    settle()  # what earlier tests left is freed now, not by this test's unload
    baseline = torch.cuda.memory_allocated(0)
    loaded = hf_causal.load(tiny.entry("gpu", tiny_checkpoints["llama"]), tiny.cpu_context(gpus=PHYSICAL))
    assert loaded.model.device == torch.device("cuda", 0)
    assert loaded.model.dtype == torch.bfloat16  # "auto" on a GPU
    assert where(loaded) == {"model": "gpu:3"}
    _exercise(loaded)
    [reading] = loaded.memory()
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    assert reading.device == "gpu:3" and reading.allocated_bytes - baseline >= weights
    assert reading.reserved_bytes >= reading.allocated_bytes
    model_ref = weakref.ref(loaded.model)
    loaded.unload()
    assert model_ref() is None
    assert torch.cuda.memory_allocated(0) == baseline, torch.cuda.memory_summary(0, abbreviated=True)
    assert torch.cuda.memory_reserved(0) <= reading.reserved_bytes - weights


def test_layer_ranges_split_between_gpu_and_cpu(tiny_checkpoints: dict[str, Path]) -> None:
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0-1": 0, "model.norm": "cpu",
                  "lm_head": "cpu"}
    entry = tiny.entry("split", tiny_checkpoints["llama"], device_map=device_map)
    loaded = hf_causal.load(entry, tiny.cpu_context(gpus=PHYSICAL))
    assert where(loaded) == {"model.embed_tokens": "gpu:3", "model.rotary_emb": "gpu:3",
                                  "model.layers.0-1": "gpu:3", "model.norm": "cpu", "lm_head": "cpu"}
    _exercise(loaded)
    loaded.unload()


@pytest.mark.parametrize("architecture_name", ["gemma3", "jamba"])
def test_other_architectures_run_on_the_gpu(architecture_name: str, tiny_checkpoints: dict[str, Path]) -> None:
    entry = tiny.entry(architecture_name, tiny_checkpoints[architecture_name])
    loaded = hf_causal.load(entry, tiny.cpu_context(gpus=PHYSICAL))
    assert where(loaded) == {"model": "gpu:3"}
    _exercise(loaded)
    loaded.unload()


def test_the_compiled_engine_generates(tiny_checkpoints: dict[str, Path]) -> None:
    loaded = hf_causal.load(tiny.entry("compiled", tiny_checkpoints["llama"], engine="compiled"),
                            tiny.cpu_context(gpus=PHYSICAL))
    assert loaded.engine_kind() == "compiled graphs"
    _exercise(loaded)
    loaded.unload()


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@two_gpus
def test_explicit_split_over_two_gpus_uses_physical_numbers(tiny_checkpoints: dict[str, Path]) -> None:
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.norm": 1, "lm_head": 1}
    loaded = hf_causal.load(tiny.entry("pair", tiny_checkpoints["llama"], device_map=device_map),
                            tiny.cpu_context(gpus=[2, 5]))
    assert where(loaded) == {"model.embed_tokens": "gpu:2", "model.rotary_emb": "gpu:2",
                                  "model.layers.0": "gpu:2", "model.layers.1": "gpu:5", "model.norm": "gpu:5",
                                  "lm_head": "gpu:5"}
    assert [r.device for r in loaded.memory()] == ["gpu:2", "gpu:5"]
    _exercise(loaded)
    loaded.unload()


@two_gpus
def test_auto_map_with_max_memory(tiny_checkpoints: dict[str, Path]) -> None:
    entry = tiny.entry("auto", tiny_checkpoints["llama"], device_map="auto", max_memory={"0": "1GB", "1": "1GB"})
    loaded = hf_causal.load(entry, tiny.cpu_context(gpus=[2, 5]))
    assert set(where(loaded).values()) <= {"gpu:2", "gpu:5"}
    _exercise(loaded)
    loaded.unload()
