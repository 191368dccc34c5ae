"""Loading a transformers model in Lyra's int8 or int4: its decoder layers quantized one at a time on their GPUs.

`from_pretrained` builds the model on the CPU in its compute dtype (a checkpoint stored in that dtype stays
mapped from its files rather than copied into RAM). Then each decoder layer in turn moves to the GPU the
placement gives it, its Linear modules are quantized there (`shared.engine.quantized_linear.quantize_layer`)
and its 16-bit copy is freed before the next layer comes; the embeddings, norms and head follow last, and a
model over several GPUs gets accelerate's hooks as `from_pretrained` gives them. So a GPU's peak while loading
is its share of the quantized model plus one 16-bit layer and the rounding's scratch: what the plan counts as
the load transient (`shared.planning.estimate`). Without a GPU the same path quantizes on the CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch

from shared.engine.quantized_linear import quantize_layer
from shared.planning import device_split

logger = logging.getLogger(__name__)

Placement = str | Mapping[str, int | str]  # "cpu", or {module: relative GPU} as the loader resolved it


def load_quantized(model_class: Any, source: str, form: str, device_map: Placement, **kwargs: Any) -> Any:
    """`model_class.from_pretrained(source, **kwargs)` with its decoder layers in Lyra's `form`, placed by
    `device_map` ("cpu", or a map of modules to relative GPU indices)."""
    check_placement(device_map)
    started = time.perf_counter()
    model = model_class.from_pretrained(source, device_map="cpu", **kwargs)
    prefix, layers = device_split.decoder_layer_stack(model)
    for index, layer in enumerate(layers):
        device = layer_device(f"{prefix}.{index}", device_map)
        layer.to(device)
        quantize_layer(layer, form)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the 16-bit layer's blocks go back before the next layer arrives
    _place_the_rest(model, device_map)
    logger.info("%s: %d decoder layers quantized to %s on load in %.1fs", source, len(layers), form,
                time.perf_counter() - started)
    return model


def check_placement(device_map: Placement) -> None:
    """Raise ValueError, in one line, for a placement Lyra's forms cannot load into (offload to CPU or disk)."""
    if isinstance(device_map, str):
        if device_map != "cpu":
            raise ValueError(f"device_map {device_map!r} must be resolved to a map of modules before loading")
        return
    for module, device in device_map.items():
        if not isinstance(device, int) or isinstance(device, bool):
            where = repr(module) if module else "the model"
            raise ValueError(f"Lyra's int8/int4 keep every weight on a GPU, and the device map sends {where} to "
                             f"{device!r}; give the model more GPU memory, or load it unquantized or in bitsandbytes")


def layer_device(name: str, device_map: Placement) -> torch.device:
    """The device decoder layer `name` is quantized and kept on."""
    if isinstance(device_map, str):
        return torch.device("cpu")
    device = device_split.device_of(name, device_map)
    if not isinstance(device, int):
        raise ValueError(f"{name}: the device map places parts of this decoder layer apart; Lyra's int8/int4 place "
                         "whole layers")
    return torch.device("cuda", device)


def _place_the_rest(model: Any, device_map: Placement) -> None:
    """Embeddings, norms and head to their GPUs; hooks that carry activations between GPUs for a split model."""
    if isinstance(device_map, str):
        return
    devices = set(device_map.values())
    if len(devices) == 1:
        model.to(torch.device("cuda", next(iter(devices))))
        model.hf_device_map = dict(device_map)
        return
    from accelerate import dispatch_model

    dispatch_model(model, device_map=dict(device_map), skip_keys=getattr(model, "_skip_keys_device_placement", None))
