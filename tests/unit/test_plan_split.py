"""The plan places bytes as the loader will: accelerate's split, per-component quantization, one Jamba verdict.

bitsandbytes cannot run here (it needs CUDA), so the reference for a 4-bit split is accelerate's public
`infer_auto_device_map` fed with the sizes transformers' bitsandbytes quantizers report (0.5 byte per
4-bit Linear weight, every other parameter at its dtype, max_memory x 0.9): the way transformers 4.x
called it, and what transformers 5 computes through its own copy. The planner takes the other road
(transformers' `_get_device_map` on the meta model), so the two must agree.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from shared.config.schema import load_config, parse_config
from shared.config.units import GB
from shared.planning.architectures import build_config, build_on_meta, get_architecture
from shared.planning.estimate import estimate_model
from shared.planning.inventory import inventory_from_architecture
from shared.planning.layout import place_model
from shared.planning.plan import assess, estimate_cached, make_plan

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _voice(architecture: str, quantization: str, device_map: object, max_memory: dict[str, str]) -> object:
    raw = {"gpus": [{"index": 0, "budget_gb": 200}, {"index": 1, "budget_gb": 200}],
           "services": {"voice": {"gpus": [0, 1]}}, "router": {}, "specialists": {"a": {}},
           "voice": {"backend": "transformers", "path": "x", "architecture": architecture, "dtype": "bfloat16",
                     "quantization": quantization, "device_map": device_map, "max_memory": max_memory}}
    return parse_config(raw).voice


def _accelerate_reference(architecture: str, quantization: str, strategy: str,
                          max_memory: dict[int, int]) -> dict[int, float]:
    """Loaded weight bytes per GPU of the split accelerate computes with the quantizer's sizes."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import CustomDtype

    model = build_on_meta(get_architecture(architecture).components[0]).to(torch.bfloat16)
    head = model.get_output_embeddings()
    linear = {f"{n}.weight" for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head}
    quantized = linear if quantization == "bnb-nf4" else set()
    dtype = CustomDtype.INT4 if quantized else torch.bfloat16
    special = {n: torch.bfloat16 for n, _ in model.named_parameters() if n not in quantized}
    no_split = list(model._no_split_modules)
    if strategy != "sequential":
        max_memory = _balanced(model, max_memory, no_split, dtype, special)
    if quantized:
        max_memory = {k: v * 0.9 for k, v in max_memory.items()}
    layout = infer_auto_device_map(model, max_memory, no_split_module_classes=no_split, dtype=dtype,
                                   special_dtypes=special)
    loaded: dict[int, float] = {}
    for name, param in model.named_parameters():
        device = next(layout[k] for k in sorted(layout, key=len, reverse=True) if name == k or name.startswith(k + "."))
        size = param.numel() * (0.5625 if name in quantized else 2)
        loaded[device] = loaded.get(device, 0.0) + size
    return loaded


def _balanced(model: torch.nn.Module, max_memory: dict[int, int], no_split: list[str], dtype: object,
              special: dict) -> dict[int, int]:
    """transformers' balancing rule: every GPU but the last capped at total/n + 1.25 x a buffer.

    The buffer is the largest no-split block or leaf module: transformers 5.24 takes the biggest leaf,
    5.17 (and accelerate) the mean leaf; the installed version's rule is the reference.
    """
    import inspect

    from accelerate.utils import compute_module_sizes
    from transformers.integrations import accelerate as hf_accelerate

    sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special)
    leaves: dict[str, int] = {}
    for name, _ in model.named_parameters():
        parent = name.rsplit(".", 1)[0]
        leaves[parent] = leaves.get(parent, 0) + sizes[name]
    blocks = max(sizes[n] for n, m in model.named_modules() if type(m).__name__ in no_split)
    biggest = "biggest_leaf" in inspect.getsource(hf_accelerate.get_balanced_memory)
    leaf = max(leaves.values()) if biggest else sum(leaves.values()) // len(leaves)
    per_gpu = sizes[""] // len(max_memory) + int(1.25 * max(blocks, leaf))
    last = max(max_memory)
    return {gpu: cap if gpu == last else min(cap, per_gpu) for gpu, cap in max_memory.items()}


@pytest.mark.parametrize(("architecture", "quantization", "strategy", "max_memory"), [
    ("llama-3-70b", "bnb-nf4", "sequential", {"0": "36GB", "1": "48GB"}),  # the a6000x2 voice in bitsandbytes
    ("llama-3-70b", "bnb-nf4", "auto", {"0": "37.5GB", "1": "48GB"}),
    ("llama-3-8b", "none", "auto", {"0": "140GB", "1": "140GB"}),  # the measured 2 x H200 split
])
def test_strategy_splits_match_accelerate_within_2_percent(architecture: str, quantization: str, strategy: str,
                                                         max_memory: dict[str, str]) -> None:
    entry = _voice(architecture, quantization, strategy, max_memory)
    split = place_model(entry, estimate_cached(entry), [0, 1])
    reference = _accelerate_reference(architecture, quantization, strategy,
                                      {int(k): int(float(v[:-2]) * GB) for k, v in max_memory.items()})
    assert set(split.weights) == set(reference)
    for gpu, expected in reference.items():
        assert split.weights[gpu] == pytest.approx(expected, rel=0.02), (gpu, split.weights, reference)


def test_the_readme_range_map_puts_40_layers_on_each_gpu() -> None:
    readme = {"model.layers.0-39": 0, "model.layers.40-79": 1, "model.embed_tokens": 0, "model.norm": 1,
              "lm_head": 1}
    entry = _voice("llama-3-70b", "bnb-nf4", readme, {})
    estimate = estimate_cached(entry)
    split = place_model(entry, estimate, [0, 1])
    assert sum(split.weights.values()) == pytest.approx(estimate.weights, abs=2)
    # embed_tokens and lm_head are the same size, so 40/40 layers is an even split of the weights
    assert split.weights[0] == pytest.approx(split.weights[1], rel=1e-6)


def test_flux_quantizes_only_the_transformer_and_t5_and_keeps_t5_wo() -> None:
    spec = get_architecture("flux.1-schnell")
    expected = 0
    for component in spec.components:
        module = build_on_meta(component)
        if component.name == "transformer":
            expected += sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
        elif component.name == "text_encoder_2":
            expected += sum(m.weight.numel() for n, m in module.named_modules()
                            if type(m) is torch.nn.Linear and not n.endswith(".wo"))
    assert inventory_from_architecture("flux.1-schnell").linear_elements == expected
    t5 = build_config(spec.components[1])
    assert t5.num_layers * t5.d_ff * t5.d_model > 1e9  # the wo weights kept: a billion parameters at 16 bits


def test_a_pipeline_folder_applies_the_same_rule_by_component(tmp_path: Path) -> None:
    tensors = {"transformer": {"blocks.0.proj.weight": [8, 8]},
               "text_encoder_2": {"encoder.block.0.layer.1.DenseReluDense.wi_0.weight": [16, 8],
                                  "encoder.block.0.layer.1.DenseReluDense.wo.weight": [8, 16]},
               "text_encoder": {"text_model.encoder.layers.0.mlp.fc1.weight": [32, 8]}}
    classes = {"transformer": ("diffusers", "FluxTransformer2DModel"),
               "text_encoder_2": ("transformers", "T5EncoderModel"), "text_encoder": ("transformers", "CLIPTextModel")}
    for folder, names in tensors.items():
        _write_header(tmp_path / folder / "model.safetensors", names)
        library, cls = classes[folder]
        key = "_class_name" if library == "diffusers" else "architectures"
        (tmp_path / folder / "config.json").write_text(json.dumps({key: cls if library == "diffusers" else [cls]}))
    (tmp_path / "model_index.json").write_text(json.dumps({k: list(v) for k, v in classes.items()}))
    entry = parse_config({"router": {}, "voice": {}, "specialists": {"artist": {
        "kind": "image_generation", "backend": "diffusers", "path": str(tmp_path), "quantization": "bnb-int8"}}})
    estimate = estimate_model(entry.specialists["artist"])
    quantized = 8 * 8 + 16 * 8  # transformer + T5 wi_0; T5 wo and CLIP stay 16-bit
    assert estimate.weights == quantized + 4 * (8 + 16) + 2 * (8 * 16 + 32 * 8)


def _write_header(file: Path, shapes: dict[str, list[int]], dtype: str = "BF16", width: int = 2) -> None:
    """A safetensors file whose data region is sparse: the planner reads headers only."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = width
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)


def test_jamba_gets_one_verdict_from_hub_style_headers_and_from_the_architecture(tmp_path: Path) -> None:
    component = get_architecture("jamba-v0.1").components[0]
    shapes: dict[str, list[int]] = {}
    for name, param in build_on_meta(component).named_parameters():
        if param.dim() == 3 and ".experts." in name:  # the Hub checkpoint stores each expert as 2-D weights
            stem, _, kind = name.rpartition(".")
            for expert in range(param.shape[0]):
                shapes[f"{stem}.{expert}.{kind}.weight"] = list(param.shape[1:])
        else:
            shapes[name] = list(param.shape)
    _write_header(tmp_path / "model.safetensors", shapes)
    build_config(component).to_json_file(tmp_path / "config.json")

    def plan(source: dict) -> object:
        philosopher = {"backend": "transformers", "quantization": "bnb-nf4", "dtype": "bfloat16", **source}
        raw = {"gpus": [{"index": 0, "budget_gb": 80}], "services": {"specialist_host": {"gpus": [0]}},
               "router": {}, "voice": {}, "specialists": {"philosopher": philosopher}}
        return make_plan(parse_config(raw))

    from_headers = plan({"path": str(tmp_path)})
    from_architecture = plan({"path": str(tmp_path / "absent"), "architecture": "jamba-v0.1"})
    headers, architecture = (p.placements[-1].estimate for p in (from_headers, from_architecture))
    assert (headers.source, architecture.source) == ("safetensors headers", "meta-device architecture")
    assert headers.weights == pytest.approx(architecture.weights, rel=0.01)
    assert headers.weights > 90 * GB  # fused experts are not nn.Linear: bitsandbytes leaves them at 16 bits
    assert from_headers.verdicts[0].fits == from_architecture.verdicts[0].fits is False


@pytest.mark.parametrize(("name", "fits"), [("a6000x2", True), ("h100x1", True), ("a6000x2-fp16", False)])
def test_every_shipped_config_keeps_its_documented_verdict(name: str, fits: bool) -> None:
    assert assess(load_config(CONFIGS / f"{name}.toml")).ok is fits  # verdicts only; alternatives in test_plan


@pytest.mark.parametrize("form", ["int8", "int4"])
def test_lyra_forms_size_every_tensor_as_the_estimate_counts_the_whole(form: str) -> None:
    from shared.planning.device_split import memory_bytes, quantized_weights
    from shared.planning.layout import loader_model

    entry = _voice("llama-3-8b", form, "sequential", {})
    model = loader_model(entry)
    sizes = memory_bytes(model, form, 2, quantized_weights(model, form))
    assert sum(sizes.values()) == pytest.approx(estimate_cached(entry).weights, abs=1)
    assert sizes["lm_head.weight"] == sizes["model.embed_tokens.weight"] == 128256 * 4096 * 2  # the head stays 16-bit


def test_a_lyra_split_takes_max_memory_as_given_where_bitsandbytes_keeps_nine_tenths() -> None:
    entry = _voice("llama-3-70b", "int4", "sequential", {"0": "35.5GB", "1": "48GB"})  # the shipped a6000x2 voice
    split = place_model(entry, estimate_cached(entry), [0, 1])
    assert 0.9 * 35.5 * GB < split.weights[0] <= 35.5 * GB
