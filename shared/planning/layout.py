"""Where each of a model's bytes lands on its GPUs, decided by the loader's own code.

For a model the planner can build on the meta device (a known `architecture`, or a local checkpoint's
config.json), the split is exact per parameter: an explicit device map is expanded by the loader's range
expansion, and "auto"/"balanced"/"balanced_low_0"/"sequential" are computed by
`shared.planning.device_split.infer_device_map`, the call the transformers backend loads with. Each
parameter then costs its loaded size (quantized or not, `shared.planning.device_split.memory_bytes`); the
KV cache follows the attention layers, the Mamba state the other layers, fragmentation each GPU's own
bytes, and the activation working set (or, where larger, a quantizing load's one 16-bit layer) is needed on
every GPU holding layers. Models without a buildable
shape (a bare parameter count, a declared size) keep the uniform per-layer split of
`shared.planning.estimate.split_across_gpus`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.config.schema import ModelEntry
from shared.config.units import format_gb, parse_size
from shared.planning import device_split, disk_cache
from shared.planning.architectures import build_on_meta, get_architecture
from shared.planning.estimate import FRAGMENTATION, GpuSplit, MemoryEstimate, load_excess, split_across_gpus
from shared.planning.inventory import locate_checkpoint
from shared.planning.placement import STRATEGIES, resolve_device_map
from shared.planning.rank_shares import voice_split

if TYPE_CHECKING:
    import torch


def place_model(entry: ModelEntry, estimate: MemoryEstimate, gpus: list[int],
                free: dict[int, int] | None = None) -> GpuSplit:
    """Split `entry` over its process's physical `gpus` (`free`: what each has left when it loads); tensor
    ranks get one equal share per GPU."""
    if entry.parallel == "tensor" and len(gpus) > 1:
        return voice_split(estimate, entry, gpus, entry.device_map, entry.max_memory, free)
    device_map = entry.device_map
    single = not device_map or (isinstance(device_map, str) and device_map not in STRATEGIES)
    key = None if single or not gpus or estimate.source == "declared" else model_key(entry)
    if key is None:
        return split_across_gpus(estimate, gpus, device_map, entry.max_memory, free)
    if isinstance(device_map, str):
        caps = tuple(_caps(entry, gpus, free).items())
        layout = _strategy_layout(key, device_map, caps, entry.quantization)
    else:
        layout = resolve_device_map(device_map, len(gpus))
    return _split(estimate, gpus, _sizes(key, entry.quantization), layout)


@lru_cache(maxsize=256)
def _strategy_layout(key: ModelKey, strategy: str, caps: tuple[tuple[int | str, int], ...],
                     quantization: str) -> dict[str, int | str]:
    return disk_cache.cached(f"layout|{_described(key)}|{strategy}|{caps!r}|{quantization}",
                             lambda: device_split.infer_device_map(_meta_model(*key), strategy, dict(caps),
                                                                   quantization))


def _caps(entry: ModelEntry, gpus: list[int], free: dict[int, int] | None) -> dict[int | str, int]:
    """max_memory as transformers receives it: the config's, else what each GPU has free."""
    if entry.max_memory:
        return {int(k) if k.isdigit() else k: parse_size(v) for k, v in entry.max_memory.items()}
    return {i: max((free or {}).get(gpu, 10**15), 0) for i, gpu in enumerate(gpus)}


def _split(estimate: MemoryEstimate, gpus: list[int], sizes: dict[str, float],
           layout: dict[str, int | str]) -> GpuSplit:
    by_device = device_split.bytes_by_device(sizes, layout)
    scale = estimate.weights / max(sum(sizes.values()), 1)  # the estimate's source (headers, dtype) wins
    layers = device_split.layer_devices(layout, list(sizes))
    attention = set(estimate.attention_indices) & set(layers) or set(layers)
    per_gpu, weight_bytes, spilled = {}, {}, 0.0
    for device, size in by_device.items():
        if not isinstance(device, int):
            spilled += size * scale
            continue
        weights = size * scale
        weight_bytes[gpus[device]] = round(weights)
        kv = estimate.kv_cache * _share(layers, attention, device)
        state = estimate.recurrent_state * _share(layers, set(layers) - attention, device)
        per_gpu[gpus[device]] = round(weights + kv + state + FRAGMENTATION * (weights + kv)) + estimate.activations + \
            load_excess(estimate, kv, state)
    notes = (f"{format_gb(spilled)} of weights do not fit max_memory on GPUs {gpus}",) if spilled else ()
    return GpuSplit(per_gpu, round(spilled), notes, weight_bytes)


def _share(layers: dict[int, Any], chosen: set[int], device: int) -> float:
    """Fraction of the `chosen` layers placed on `device`."""
    return sum(1 for i in chosen if layers.get(i) == device) / len(chosen) if chosen else 0.0


# ----------------------------------------------------------------------------- the model the loader builds


@lru_cache(maxsize=32)
def _sizes(key: ModelKey, quantization: str) -> dict[str, float]:
    """Loaded bytes of each parameter of the meta-device model, quantized as the loader quantizes it."""
    return disk_cache.cached(f"sizes|{_described(key)}|{quantization}", lambda: _count_sizes(key, quantization))


def _described(key: ModelKey) -> str:
    """What a model key stands for, for the disk cache: the architecture's spec or the config.json's text."""
    architecture, config_dir, dtype = key
    if config_dir:
        return f"config|{disk_cache.file_text(str(Path(config_dir) / 'config.json'))}|{dtype}"
    return f"architecture|{get_architecture(architecture)!r}|{dtype}"


def _count_sizes(key: ModelKey, quantization: str) -> dict[str, float]:
    import torch

    model = _meta_model(*key)
    dtype = getattr(torch, key[2])
    element = torch.empty((), dtype=dtype).element_size()
    quantized = device_split.quantized_weights(model, quantization)
    return device_split.memory_bytes(model, quantization, element, quantized, device_split.fp32_tensors(model, dtype))


ModelKey = tuple[str, str, str]  # (architecture, local checkpoint folder with config.json, dtype)


def model_key(entry: ModelEntry) -> ModelKey | None:
    """What identifies the text model the transformers backend builds for `entry`; None when unknown."""
    if entry.kind == "image_generation" or entry.backend != "transformers":
        return None
    location = locate_checkpoint(entry) if entry.path else None
    from_files = location is not None and (location / "config.json").is_file() and entry.kind == "causal_lm"
    if not (entry.architecture or from_files):
        return None
    if from_files:
        return ("", str(location), _dtype_name(entry))
    return (entry.architecture, "", _dtype_name(entry))


def loader_model(entry: ModelEntry) -> torch.nn.Module | None:
    """The text model the transformers backend builds for `entry`, on the meta device; None when unknown."""
    key = model_key(entry)
    return None if key is None else _meta_model(*key)


def _dtype_name(entry: ModelEntry) -> str:
    if entry.dtype != "auto":
        return entry.dtype
    return get_architecture(entry.architecture).torch_dtype if entry.architecture else "bfloat16"


@lru_cache(maxsize=16)
def _meta_model(architecture: str, config_dir: str, dtype: str) -> torch.nn.Module:
    import torch

    if config_dir:
        from transformers import AutoModelForCausalLM

        return device_split.meta_model_from_checkpoint(AutoModelForCausalLM, config_dir, getattr(torch, dtype),
                                                       local_files_only=True)
    return build_on_meta(get_architecture(architecture).components[0]).to(getattr(torch, dtype))



def forget_memoised() -> None:
    """Forget the layouts, sizes and meta models this process memoised (the on-disk planning cache stays)."""
    for memo in (_strategy_layout, _sizes, _meta_model):
        memo.cache_clear()
