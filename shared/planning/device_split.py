"""What the loader will do with a model's parameters, decided once for the loader and for `lyra plan`.

- `quantized_weights`: the weights a quantization replaces. Lyra's int8 and int4: every plain `nn.Linear`
  inside the decoder layers (`decoder_layer_stack`, the layers `shared.engine.quantized_linear` converts;
  the head, embeddings and norms stay). bitsandbytes, by the libraries' own rules: transformers converts
  every plain `nn.Linear` except the modules `HfQuantizer.get_modules_to_not_convert` names (the output
  head, tied weights, `_keep_in_fp32_modules` such as T5's `wo`); diffusers converts `nn.Linear` outside
  its `_keep_in_fp32_modules`. Fused 3-D expert tensors are not Linear and stay in the compute dtype.
- `memory_bytes`: each parameter's bytes once loaded (Lyra int8: 1 byte + a compute-dtype scale per output
  row; Lyra int4: 0.5 byte + a compute-dtype scale and zero point per 128 weights of a row, `lyra_bytes`;
  NF4: 0.5 byte + an fp32 absmax per 64 weights; LLM.int8: 1 byte + an fp32 scale per output row; fp32
  where the model keeps modules in fp32).
- `infer_device_map`: for "auto"/"balanced"/"balanced_low_0"/"sequential", the map transformers'
  `from_pretrained` computes (`transformers.integrations.accelerate._get_device_map`, the same call on a
  meta-device model). bitsandbytes forms are sized the way transformers' bitsandbytes quantizers size them
  (0.5 byte per 4-bit weight, 1 per int8 weight, max_memory x 0.9); bitsandbytes itself is never imported:
  its quantizer needs CUDA kernels, and only these sizes are what it contributes to the map. Lyra's forms
  are sized as they load (`lyra_bytes`), with max_memory as given.

The transformers backends load with the explicit map this returns, so a plan and a load cannot disagree.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

# The FLUX pipeline components the diffusers backend quantizes (CLIP and the VAE stay in the compute dtype).
QUANTIZED_COMPONENTS = ("transformer", "text_encoder_2")
NF4_BLOCKSIZE = 64
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / NF4_BLOCKSIZE  # packed 4-bit + one fp32 absmax per block
INT8_SCALE_BYTES_PER_ROW = 4  # fp32 SCB per output row
SIZING_BYTES = {"bnb-int8": 1.0, "bnb-nf4": 0.5}  # what transformers' bnb quantizers report to accelerate per weight
QUANTIZER_MEMORY_SHARE = 0.9  # bnb quantizers' adjust_max_memory
LYRA_FORMS = ("int8", "int4")  # shared.config.schema.LYRA_FORMS
LYRA_GROUP = 128  # input columns per int4 scale and zero point (shared.kernels.quant_gemv.GROUP)
# Lyra's loader rounds weights this many at a time (shared.engine.quantized_linear): about 13 bytes of float32
# and int32 scratch a weight (a float copy, its rounded quotient, the nibbles), counted as 16.
QUANTIZE_CHUNK_ELEMENTS = 1 << 22
QUANTIZE_SCRATCH_BYTES = 16 * QUANTIZE_CHUNK_ELEMENTS

Layout = dict[str, int | str]


def lyra_bytes(form: str, elements: float, rows: float, element_bytes: float) -> float:
    """Bytes of `elements` weights over `rows` output rows in Lyra's `form`, scales and zero points in the compute
    dtype (`element_bytes`): int8 one byte a weight and a scale a row; int4 half a byte a weight and a scale and a
    zero point per LYRA_GROUP weights of a row."""
    if form == "int8":
        return elements + rows * element_bytes
    return elements / 2 + 2 * element_bytes * elements / LYRA_GROUP


def decoder_layer_stack(model: Any) -> tuple[str, torch.nn.ModuleList]:
    """The decoder layers Lyra's int8/int4 quantize (those of `model.get_decoder()`: a VLM's text model's), and
    their name inside `model`."""
    import torch

    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layers found to quantize")
    return next(name for name, module in model.named_modules() if module is layers), layers


def lyra_quantized_weights(model: torch.nn.Module) -> dict[int, list[str]]:
    """The weights Lyra's int8/int4 quantize, by decoder layer index: every plain nn.Linear inside the layers."""
    import torch

    prefix, layers = decoder_layer_stack(model)
    return {index: [f"{prefix}.{index}.{name}.weight" for name, module in layer.named_modules()
                    if type(module) is torch.nn.Linear] for index, layer in enumerate(layers)}


def quantized_weights(model: torch.nn.Module, quantization: str, library: str = "transformers") -> set[str]:
    """Names of the weight tensors the loader will quantize when it loads `model` in `quantization`."""
    if quantization == "none":
        return set()
    if quantization in LYRA_FORMS:
        return {name for names in lyra_quantized_weights(model).values() for name in names}
    import torch

    if library == "diffusers":
        keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
        return {f"{name}.weight" for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and not _diffusers_skips(name, keep)}
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    return {f"{name}.weight" for name, module in model.named_modules()
            if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip)}


def _diffusers_skips(name: str, keep: list[str]) -> bool:
    return any(f"{key}." in name or key == name for key in keep)


def fp32_tensors(model: torch.nn.Module, dtype: torch.dtype) -> set[str]:
    """Parameters transformers keeps in float32 at this dtype (`_keep_in_fp32_modules`, and `_strict`)."""
    if not hasattr(model, "_get_dtype_plan"):
        return set()
    from transformers.quantizers.quantizers_utils import should_convert_module

    patterns = list(model._get_dtype_plan(dtype))
    if not patterns:
        return set()
    return {name for name, _ in model.named_parameters() if not should_convert_module(name.rsplit(".", 1)[0], patterns)}


def memory_bytes(model: torch.nn.Module, quantization: str, element_bytes: float, quantized: set[str],
                 fp32: frozenset[str] | set[str] = frozenset()) -> dict[str, float]:
    """Bytes each parameter takes once loaded (tied parameters once)."""
    sizes: dict[str, float] = {}
    for name, param in model.named_parameters():
        count = param.numel()
        if name in quantized and quantization in LYRA_FORMS:
            sizes[name] = lyra_bytes(quantization, count, param.shape[0], element_bytes)
        elif name in quantized and quantization == "bnb-nf4":
            sizes[name] = count * NF4_BYTES_PER_WEIGHT
        elif name in quantized and quantization == "bnb-int8":
            sizes[name] = count + param.shape[0] * INT8_SCALE_BYTES_PER_ROW
        else:
            sizes[name] = count * (4 if name in fp32 else element_bytes)
    return sizes


class _SizingQuantizer:
    """Stands in for a quantizer in the device-map computation: bitsandbytes' sizes as transformers' quantizers
    report them (and their 0.9 share of max_memory), Lyra's as its forms load."""

    def __init__(self, quantized: set[str], quantization: str) -> None:
        self.quantized, self.quantization = quantized, quantization
        self.share = 1.0 if quantization in LYRA_FORMS else QUANTIZER_MEMORY_SHARE

    def param_element_size(self, model: Any, name: str, param: torch.Tensor) -> float:
        if name not in self.quantized:
            return param.element_size()
        if self.quantization in LYRA_FORMS:
            return lyra_bytes(self.quantization, param.numel(), param.shape[0], param.element_size()) / param.numel()
        return SIZING_BYTES[self.quantization]

    def adjust_max_memory(self, max_memory: dict[Any, int]) -> dict[Any, float]:
        return {key: value * self.share for key, value in max_memory.items()}

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """bitsandbytes' own check (no CPU offload when quantized) runs when the model really loads."""


def infer_device_map(model: torch.nn.Module, strategy: str, max_memory: Mapping[int | str, int | str] | None,
                     quantization: str = "none") -> Layout:
    """The {module: device} map `from_pretrained(device_map=strategy, max_memory=...)` computes for `model`.

    `model` is on the meta device in the dtype it will load in; max_memory None means what the visible GPUs
    have free (transformers asks CUDA), as in `from_pretrained`.
    """
    from transformers.integrations.accelerate import _get_device_map

    quantizer = None if quantization == "none" else _SizingQuantizer(quantized_weights(model, quantization),
                                                                       quantization)
    memory = None if max_memory is None else dict(max_memory)
    with _quiet():
        return dict(_get_device_map(model, strategy, memory, quantizer))


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence accelerate's "Device 0 is not available" when planning for GPUs this machine lacks."""
    names = ("accelerate.utils.modeling", "transformers.integrations.accelerate")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def device_of(name: str, layout: Mapping[str, int | str]) -> int | str | None:
    """The device a parameter lands on: the map's longest key that is the name or a module above it."""
    for key in _owners(name):
        if key in layout:
            return layout[key]
    return None


@functools.lru_cache(maxsize=1 << 16)
def _owners(name: str) -> tuple[str, ...]:
    """`name` and every module above it, longest first ("" last). The planner asks this of the same few
    hundred names thousands of times while it searches layouts."""
    parts = name.split(".")
    return tuple(".".join(parts[:end]) for end in range(len(parts), -1, -1))


def bytes_by_device(sizes: Mapping[str, float], layout: Mapping[str, int | str]) -> dict[int | str, float]:
    """Sum of `sizes` per device of `layout` (parameters the map does not place count under None)."""
    total: dict[Any, float] = {}
    for name, size in sizes.items():
        device = device_of(name, layout)
        total[device] = total.get(device, 0.0) + size
    return total


def layer_devices(layout: Mapping[str, int | str], names: list[str]) -> dict[int, int | str | None]:
    """Device of each decoder layer (by index) of the first `layers.<i>` stack among `names`."""
    stack = next((layer[0] for n in names if (layer := _layer_of(n))), None)
    if stack is None:
        return {}
    found: dict[int, int | str | None] = {}
    for name in names:
        layer = _layer_of(name)
        if layer and layer[0] == stack and layer[1] not in found:
            found[layer[1]] = device_of(name, layout)
    return found


@functools.lru_cache(maxsize=1 << 16)
def _layer_of(name: str) -> tuple[str, int] | None:
    """(the `layers` stack, the layer's index) a parameter belongs to, or None."""
    match = _LAYER.match(name)
    return (match["prefix"], int(match["index"])) if match else None


_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<index>\d+)\.")


def meta_model_from_checkpoint(auto_class: Any, source: str, dtype: torch.dtype, **config_args: Any) -> torch.nn.Module:
    """The model `auto_class.from_pretrained(source)` builds, on the meta device in `dtype` (no weights read)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, **config_args)
    with torch.device("meta"):
        model = auto_class.from_config(config)
    return model.to(dtype)


def loader_device_map(auto_class: Any, source: str, dtype: torch.dtype, strategy: str,
                      max_memory: Mapping[int | str, int | str] | None, quantization: str) -> Layout:
    """The explicit map a transformers backend loads `source` with, for an accelerate strategy."""
    model = meta_model_from_checkpoint(auto_class, source, dtype)
    return infer_device_map(model, strategy, max_memory, quantization)
