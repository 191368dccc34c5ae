"""A model's linear layers in a weight-only quantized form (int8, int4), decoded through Lyra's product kernels.

`quantize_linears(model, form)` replaces each `nn.Linear` of the decoder layers by a `QuantizedLinear`
holding its weight as `shared.kernels.quant_gemv` packs it; embeddings and the head stay as they are. A
decode step multiplies one row by each weight: that row goes through the kernel, which reads the packed
bytes (a CUDA graph captures it like any op). A prompt of many rows goes through one dequantized copy of
the weight at a time (prefill is once per turn, and a matrix product there reads the weight once for all
rows). The packed weights are buffers, so `.to()`, the host weight cache and `state_dict` move them.
"""

from __future__ import annotations

from typing import Any

import torch

from shared.kernels import devices, quant_gemv


class QuantizedLinear(torch.nn.Module):
    """nn.Linear's forward over an int8 or int4 weight; the kernel for one row, a dequantized copy for many."""

    def __init__(self, weight: quant_gemv.QuantizedWeight, bias: torch.Tensor | None,
                 tile: quant_gemv.Tiling | None = None) -> None:
        super().__init__()
        self.form, self.group, self.tile = weight.form, weight.group, tile
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)
        self.register_buffer("bias", bias)

    def quantized_weight(self) -> quant_gemv.QuantizedWeight:
        """The packed weight as the kernels take it (the buffers wherever they now are)."""
        return quant_gemv.QuantizedWeight(self.form, self.packed, self.scales, self.zeros, self.group,
                                          self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        weight = self.quantized_weight()
        if rows.shape[0] == 1 and devices.runs_here(x.device):
            out = quant_gemv.product(rows, weight, self.tile)
        else:
            out = torch.nn.functional.linear(rows, quant_gemv.dequantize(weight).to(x.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.form == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, form={self.form}{group}"


def quantize_linears(model: Any, form: str, group: int = quant_gemv.GROUP) -> int:
    """Replace every nn.Linear inside the decoder layers of `model` by its `form` in place; returns how many."""
    if form not in quant_gemv.FORMS:
        raise ValueError(f"quantized form {form!r}: expected one of {', '.join(quant_gemv.FORMS)}")
    layers = decoder_layers(model)
    count = 0
    for layer in layers:
        for name, module in list(layer.named_modules()):
            if type(module) is not torch.nn.Linear:
                continue
            weight = module.weight.detach()
            packed = quant_gemv.quantize_int8(weight) if form == "int8" else quant_gemv.quantize_int4(weight, group)
            bias = module.bias.detach() if module.bias is not None else None
            parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
            setattr(parent, name.rpartition(".")[2], QuantizedLinear(packed, bias))
            del weight, module
            count += 1
    return count


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (model.model.layers, or the text model's of a VLM)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layers found to quantize")
    return layers
