"""Lyra's int8 and int4 through the production loaders on the CPU: the plan's bytes, the host cache, the refusals.

The wide tiny Llama has 128 columns where the other tiny models have 64: int4 rounds whole groups of 128.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from services.specialist_host.handlers import SpecialistHost
from shared.config.schema import ModelEntry, parse_config
from shared.engine.fused_step import problems
from shared.engine.quantized_linear import QuantizedLinear, decoder_layers, quantize_linears
from shared.models import hf_causal, hf_vision
from shared.models.base import BackendError, LoadContext
from shared.models.quantized_load import check_placement
from shared.models.tiny import llava as tiny_llava
from shared.planning.estimate import estimate_model
from shared.wire.messages import ChatTurn, GenerationOptions, LoadRequest, RunSpecialistRequest, UnloadRequest
from tests.models import tiny

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lyra-quantized")
    return {"llama128": tiny.build_wide_llama(root / "llama128"),
            "llama128b": tiny.build_wide_llama(root / "llama128b", seed=1),
            "llama64": tiny.build_checkpoint("llama", root / "llama64"),
            "llava": tiny_llava.build_checkpoint(root / "llava")}


def router_context() -> LoadContext:
    """A CPU worker that never decodes (no static cache): the model holds its weights alone."""
    return LoadContext(service="router", physical_gpus=[], config=tiny.lyra_config())


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and persistent buffer the loaded model holds, shared storage once.

    Non-persistent buffers (the rotary tables, 128 bytes here) are made from the config, not read from the
    checkpoint, and the plan does not count them.
    """
    unique = {(t.data_ptr(), t.dtype, tuple(t.shape)): t.numel() * t.element_size()
              for t in model.state_dict().values()}
    return sum(unique.values())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("form", ["int8", "int4"])
def test_the_plan_counts_every_byte_the_loader_leaves(checkpoints: dict[str, Path], form: str, dtype: str) -> None:
    entry = tiny.entry("q", checkpoints["llama128"], quantization=form, dtype=dtype)
    loaded = hf_causal.load(entry, router_context())
    try:
        model = loaded.model
        assert estimate_model(entry).weights == state_bytes(model)
        layers = [m for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, QuantizedLinear)]
        assert len(layers) == 2 * 7 and {m.form for m in layers} == {form}
        assert not any(type(m) is torch.nn.Linear for layer in decoder_layers(model) for m in layer.modules())
        assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == getattr(torch, dtype)
    finally:
        loaded.unload()


def test_a_vision_language_model_quantizes_its_language_model_only(checkpoints: dict[str, Path]) -> None:
    entry = ModelEntry(name="perception", kind="vision_language", backend="transformers",
                       path=str(checkpoints["llava"]), max_context=256, quantization="int8")
    loaded = hf_vision.load(entry, tiny.cpu_context())
    try:
        model = loaded.model
        assert estimate_model(entry).weights == state_bytes(model)
        assert all(isinstance(layer.self_attn.q_proj, QuantizedLinear) for layer in decoder_layers(model))
        vision = model.model.vision_tower
        assert any(type(m) is torch.nn.Linear for m in vision.modules())  # the vision tower stays float
        assert not any(isinstance(m, QuantizedLinear) for m in vision.modules())
    finally:
        loaded.unload()


def specialist_host(checkpoints: dict[str, Path], cache_gb: float) -> SpecialistHost:
    specialists = {name: {"backend": "transformers", "path": str(checkpoints[folder]), "quantization": form,
                          "max_context": 256, "generation": {"max_new_tokens": 12, "temperature": 0.0}}
                   for name, folder, form in (("pragmatist", "llama128", "int4"), ("philosopher", "llama128b", "int8"))}
    config = parse_config({"router": {}, "voice": {}, "specialists": specialists,
                           "weight_cache": {"size_gb": cache_gb}})
    return SpecialistHost(LoadContext(service="specialist_host", physical_gpus=[], config=config))


def answer(host: SpecialistHost, name: str) -> str:
    for resident in host.resident():
        list(host.unload(UnloadRequest(model=resident), threading.Event()))
    list(host.load(LoadRequest(model=name), threading.Event()))
    request = RunSpecialistRequest(model=name, messages=[ChatTurn(role="user", content="How do I boil an egg?")],
                                   options=GenerationOptions(seed=5))
    return list(host.run(request, threading.Event()))[-1].text


def test_swaps_through_the_host_cache_keep_the_tokens_and_move_the_packed_weights(
        checkpoints: dict[str, Path]) -> None:
    fresh_host = specialist_host(checkpoints, cache_gb=0)
    fresh = {name: answer(fresh_host, name) for name in ("pragmatist", "philosopher")}
    cached = specialist_host(checkpoints, cache_gb=1.0)
    for step, name in enumerate(["pragmatist", "philosopher", "pragmatist", "philosopher"]):
        assert answer(cached, name) == fresh[name], (step, name)
    assert set(cached.cached()) == {"pragmatist", "philosopher"} and set(cached.parked) == {"pragmatist"}
    copy = cached.cache.touch("pragmatist")
    model = cached.parked["pragmatist"].torch_modules()["model"]  # parked: its tensors point at the host copy
    packed = [m.packed for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert packed and all(copy.host.data_ptr() <= t.data_ptr() < copy.host.data_ptr() + copy.nbytes for t in packed)


def test_int4_names_the_projection_whose_inputs_are_not_whole_groups(checkpoints: dict[str, Path]) -> None:
    entry = tiny.entry("q", checkpoints["llama64"], quantization="int4")
    with pytest.raises(BackendError, match=r"q_proj: int4: 64 input columns are not a whole number of groups of 128"):
        hf_causal.load(entry, router_context())
    loaded = hf_causal.load(tiny.entry("q", checkpoints["llama64"], quantization="int8"), router_context())
    loaded.unload()  # int8 has no group


def test_an_offloading_device_map_is_refused_before_anything_loads() -> None:
    with pytest.raises(ValueError, match=r"sends 'model\.layers\.1' to 'cpu'"):
        check_placement({"model.layers.0": 0, "model.layers.1": "cpu"})
    check_placement({"": 0})
    check_placement("cpu")


@pytest.mark.parametrize("form", ["int8", "int4"])
def test_the_fused_step_refuses_lyra_projections_so_auto_decodes_with_graphs(form: str) -> None:
    model = tiny.build_model("llama", tiny.build_tokenizer())
    quantize_linears(model, form, group=32)
    assert any(f"quantized projections (Lyra {form})" in problem for problem in problems(model))
