"""The VRAM estimator: exact on tiny saved checkpoints, close to published counts on real architectures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from shared.config.schema import ModelEntry
from shared.config.units import GB
from shared.planning.architectures import ARCHITECTURES, build_on_meta, get_architecture
from shared.planning.estimate import estimate_model, split_across_gpus
from shared.planning.inventory import inventory_for, inventory_from_architecture


def _state_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(elements, bytes) of the unique parameters: what save_pretrained writes."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique), sum(p.numel() * p.element_size() for p in unique)


def _tiny_llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype)


def _entry(path: Path | str = "", **fields: object) -> ModelEntry:
    backend = fields.pop("backend", "transformers" if path else "fake")
    return ModelEntry(name="m", backend=backend, path=str(path), **fields)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    model = _tiny_llama(torch.bfloat16)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return folder, model


# ----------------------------------------------------------------------------- safetensors headers


def test_single_file_checkpoint_is_exact(tiny_llama_dir: tuple[Path, torch.nn.Module]) -> None:
    folder, model = tiny_llama_dir
    elements, stored = _state_bytes(model)
    estimate = estimate_model(_entry(folder, max_context=128))
    assert estimate.source == "safetensors headers"
    assert (estimate.parameters, estimate.weights) == (elements, stored)
    # KV: 2 x layers x kv_heads x head_dim x context x 2 bytes (bf16 checkpoint)
    assert estimate.kv_cache == 2 * 3 * 2 * 16 * 128 * 2
    assert estimate_model(_entry(folder, dtype="float32")).weights == elements * 4


def test_sharded_checkpoint_is_exact(tmp_path: Path) -> None:
    model = _tiny_llama(torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    elements, stored = _state_bytes(model)
    estimate = estimate_model(_entry(tmp_path))
    assert (estimate.parameters, estimate.weights) == (elements, stored)
    assert estimate_model(_entry(tmp_path, dtype="bfloat16")).weights == elements * 2


def test_quantized_arithmetic_on_a_real_checkpoint(tiny_llama_dir: tuple[Path, torch.nn.Module]) -> None:
    folder, model = tiny_llama_dir
    linear = [m.weight for m in model.modules() if type(m) is torch.nn.Linear and m is not model.lm_head]
    linear_elements, rows = sum(w.numel() for w in linear), sum(w.shape[0] for w in linear)
    other = _state_bytes(model)[0] - linear_elements
    int8 = estimate_model(_entry(folder, quantization="bnb-int8", dtype="bfloat16")).weights
    nf4 = estimate_model(_entry(folder, quantization="bnb-nf4", dtype="bfloat16")).weights
    assert int8 == linear_elements + 4 * rows + 2 * other
    assert nf4 == math.ceil(linear_elements * 0.5625 + 2 * other)  # 4 bits + an fp32 absmax per 64 weights
    # Lyra's: a bf16 scale per row (int8), a bf16 scale and zero point per 128 weights of a row (int4)
    lyra8 = estimate_model(_entry(folder, quantization="int8", dtype="bfloat16")).weights
    lyra4 = estimate_model(_entry(folder, quantization="int4", dtype="bfloat16")).weights
    assert lyra8 == linear_elements + 2 * rows + 2 * other
    assert lyra4 == math.ceil(linear_elements / 2 + 2 * 2 * linear_elements / 128 + 2 * other)


def test_diffusers_pipeline_sums_its_component_folders(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=4)
    transformer.save_pretrained(tmp_path / "transformer")
    vae.save_pretrained(tmp_path / "vae")
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    estimate = estimate_model(_entry(tmp_path, kind="image_generation", backend="diffusers"))
    assert estimate.weights == _state_bytes(transformer)[1] + _state_bytes(vae)[1]
    # 3 GB at 1024 x 1024, scaled to the largest image a request may ask for (max_side 2048 by default).
    assert estimate.kv_cache == 0 and estimate.activations == 4 * 3 * GB
    small = _entry(tmp_path, kind="image_generation", backend="diffusers", image={"max_side": 1024})
    assert estimate_model(small).activations == 3 * GB
    tiled = _entry(tmp_path, kind="image_generation", backend="diffusers", image={"vae_tiling": True})
    assert estimate_model(tiled).activations == 2 * 3 * GB  # the decode stays at its 1024 x 1024 cost


# ----------------------------------------------------------------------------- GGUF


def test_gguf_metadata(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    file = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(file), "llama")
    for add, value in ((writer.add_block_count, 2), (writer.add_embedding_length, 32), (writer.add_head_count, 4),
                       (writer.add_head_count_kv, 2), (writer.add_feed_forward_length, 64),
                       (writer.add_context_length, 128)):
        add(value)
    tensors = {"token_embd.weight": (100, 32), "blk.0.attn_q.weight": (32, 32), "blk.0.ffn_up.weight": (64, 32),
               "blk.0.attn_norm.weight": (32,), "output.weight": (100, 32)}
    for name, shape in tensors.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    estimate = estimate_model(ModelEntry(name="g", backend="transformers", path=str(tmp_path), gguf_file=file.name,
                                         max_context=64))
    elements = sum(math.prod(shape) for shape in tensors.values())
    assert estimate.source == "gguf" and estimate.parameters == elements
    assert estimate.weights == elements * 4  # transformers dequantizes GGUF to float32 for dtype "auto"
    assert estimate.kv_cache == 2 * 2 * 2 * 8 * 64 * 4
    inventory = inventory_for(ModelEntry(name="g", backend="transformers", path=str(tmp_path), gguf_file=file.name))
    assert inventory.linear_elements == 32 * 32 + 64 * 32  # embeddings, head and norms stay unquantized


# ----------------------------------------------------------------------------- real architectures on meta


COMPONENTS = [(spec.name, c) for spec in ARCHITECTURES.values() for c in spec.components]


@pytest.mark.parametrize(("arch", "component"), COMPONENTS, ids=[f"{a}:{c.name}" for a, c in COMPONENTS])
def test_meta_device_matches_published_count(arch: str, component: object) -> None:
    model = build_on_meta(component)  # type: ignore[arg-type]
    count = sum(p.numel() for p in model.parameters())
    published = component.published_parameters_b * 1e9  # type: ignore[attr-defined]
    assert abs(count - published) / published < 0.02, f"{arch}: {count / 1e9:.3f}B vs {published / 1e9}B"
    assert next(model.parameters()).device.type == "meta"


def test_architecture_estimates_from_the_published_numbers() -> None:
    voice = estimate_model(_entry(architecture="llama-3-70b", dtype="bfloat16", max_context=8192))
    assert voice.source == "meta-device architecture"
    assert voice.weights == pytest.approx(141.1 * GB, rel=0.01)  # the design doc's "~141 GB"
    assert voice.kv_cache == 2 * 80 * 8 * 128 * 8192 * 2
    nf4 = estimate_model(_entry(architecture="llama-3-70b", quantization="bnb-nf4"))
    assert 38 * GB < nf4.weights < 45 * GB  # 0.5625 B per Linear weight + 16-bit embeddings and head
    int4 = estimate_model(_entry(architecture="llama-3-70b", quantization="int4"))
    assert int4.weights < nf4.weights  # 0.53125 B per Linear weight of the decoder layers
    # the loader holds one 16-bit layer beside the quantized ones: q, k, v, o, gate, up, down of one layer
    layer = 8192 * (8192 + 1024 + 1024 + 8192) + 3 * 8192 * 28672
    assert int4.load_transient == 2 * layer + 16 * 2**22


def test_sliding_window_and_mamba_state() -> None:
    gemma = estimate_model(_entry(architecture="gemma-3-12b", max_context=8192))
    assert gemma.kv_cache == 2 * 8 * 256 * (8 * 8192 + 40 * 1024) * 2  # 8 global layers, 40 local of 1024
    jamba = estimate_model(_entry(architecture="jamba-v0.1", max_context=8192))
    assert jamba.kv_cache == 2 * 4 * 8 * 128 * 8192 * 2  # attention in 4 of 32 layers
    assert jamba.recurrent_state == 28 * 8192 * (16 + 4) * 2  # d_inner x (d_state + d_conv) per Mamba layer


def test_fused_moe_experts_stay_16_bit_under_bitsandbytes() -> None:
    inventory = inventory_from_architecture("jamba-v0.1")
    assert inventory.other_elements > 40e9  # the 3-D expert tensors are not nn.Linear
    jamba = estimate_model(_entry(architecture="jamba-v0.1", quantization="bnb-nf4"))
    assert jamba.weights > 80 * GB and any("#1849" in note for note in jamba.notes)


def test_declared_and_parameter_count_sources() -> None:
    declared = estimate_model(_entry(architecture="llama-3-70b", memory_gb=12.5))
    assert (declared.source, declared.total) == ("declared", int(12.5 * GB))
    counted = estimate_model(_entry(parameters_b=7.0, dtype="float16"))
    assert (counted.source, counted.weights) == ("parameter count", 14 * GB)
    assert get_architecture("FLUX").name == "flux.1-schnell"


# ----------------------------------------------------------------------------- GPU split


def test_split_auto_balances_and_max_memory_spills() -> None:
    estimate = estimate_model(_entry(architecture="llama-3-70b", dtype="bfloat16", max_context=8192))
    balanced = split_across_gpus(estimate, [0, 1], "auto", {})
    assert balanced.spilled == 0 and sum(balanced.per_gpu.values()) == pytest.approx(
        estimate.total + estimate.activations, rel=0.01)  # activations needed on both GPUs
    capped = split_across_gpus(estimate, [0, 1], "auto", {"0": "47GB", "1": "48GB"})
    assert capped.spilled > 40 * GB
    only_first = split_across_gpus(estimate, [3, 5], "sequential", {"0": "200GB"})
    assert list(only_first.per_gpu) == [3]  # a GPU missing from max_memory gets nothing
    explicit = split_across_gpus(estimate, [0, 1], {f"model.layers.{i}": int(i >= 20) for i in range(80)}, {})
    assert explicit.per_gpu[1] > 2.5 * explicit.per_gpu[0]


def test_the_decode_graph_pool_is_planned_only_where_a_graph_is_captured() -> None:
    from shared.config.schema import parse_config
    from shared.planning.estimate import activation_bytes, decode_graph_bytes
    from shared.planning.inventory import inventory_for

    def entry(**extra: object) -> ModelEntry:
        fields = {"name": "s", "backend": "transformers", "path": "x", "architecture": "llama-3-8b",
                  "dtype": "bfloat16", "max_context": 4096, **extra}
        return ModelEntry(**fields)

    shape = inventory_for(entry()).shape
    assert shape is not None
    # Calibrated on the Llama-3-8B shape at 4096 tokens: 0.235 GB measured on an H200 beside the static cache.
    assert decode_graph_bytes(entry(), shape) / GB == pytest.approx(0.235, abs=0.01)
    assert decode_graph_bytes(entry(engine="eager"), shape) == 0
    assert decode_graph_bytes(entry(device_map="auto"), shape) == 0
    assert activation_bytes(entry(), shape, 2) - activation_bytes(entry(engine="eager"), shape, 2) > 0
    config = parse_config({"router": {"backend": "transformers", "path": "x", "engine": "graphs"}, "voice": {},
                           "specialists": {"a": {}}})
    assert config.router.engine == "eager"  # the router never decodes


def test_nemotron_kv_cache_counts_only_the_blocks_that_attend() -> None:
    from shared.config.schema import ModelEntry
    from shared.planning.estimate import estimate_model
    from shared.planning.inventory import inventory_for

    entry = ModelEntry(name="n", architecture="llama-3.3-nemotron-super-49b", max_context=8192)
    shape = inventory_for(entry).shape
    assert shape is not None and shape.num_layers == 80 and len(shape.attention_layers) == 49
    # 49 layers x 8 KV heads x 128 dims x (K and V) x 2 bytes per token
    assert estimate_model(entry).kv_cache == 8192 * 49 * 8 * 128 * 2 * 2


def test_cpu_offload_keeps_only_the_largest_pipeline_component_on_the_gpu() -> None:
    from shared.config.schema import ModelEntry
    from shared.planning.estimate import estimate_model

    def flux(offload: bool, quantization: str = "none") -> ModelEntry:
        return ModelEntry(name="artist", kind="image_generation", backend="diffusers", path="/nonexistent/flux",
                          architecture="flux.1-schnell", quantization=quantization, image={"cpu_offload": offload})

    whole, offloaded = estimate_model(flux(False)), estimate_model(flux(True))
    # bf16: transformer 11.9B params = 23.8 GB; T5-XXL (9.5 GB), CLIP and the VAE wait in host RAM
    assert 33.0e9 < whole.weights < 34.5e9 and 23.5e9 < offloaded.weights < 24.0e9
    assert offloaded.activations == whole.activations  # the working set still runs on the GPU
    assert any("cpu_offload" in note for note in offloaded.notes)
    # int8: the largest component is the quantized transformer (about 1 byte a weight)
    assert 11.5e9 < estimate_model(flux(True, "bnb-int8")).weights < 12.5e9
