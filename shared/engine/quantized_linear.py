"""A model's linear layers in a weight-only quantized form (int8, int4), decoded through Lyra's product kernels.

`quantize_linears(model, form)` replaces each `nn.Linear` of the decoder layers by a `QuantizedLinear`
holding its weight as `shared.kernels.quant_gemv` packs it; embeddings and the head stay as they are.
`quantize_layer` does one layer, freeing each 16-bit weight as soon as it is packed, so a loader can quantize a
model layer by layer on its GPU (shared.models.quantized_load). Weights are rounded a few rows at a time
(`CHUNK_ELEMENTS`), so the float32 scratch stays small whatever the matrix: the plan counts it. A
decode step multiplies one row by each weight: that row goes through the kernel, which reads the packed
bytes (a CUDA graph captures it like any op). A prompt of many rows goes through one dequantized copy of
the weight at a time (prefill is once per turn, and a matrix product there reads the weight once for all
rows). The packed weights are buffers, so `.to()`, the host weight cache and `state_dict` move them.
"""

from __future__ import annotations

from typing import Any

import torch

from shared.kernels import devices, quant_gemv
from shared.planning import device_split
from shared.planning.device_split import QUANTIZE_CHUNK_ELEMENTS as CHUNK_ELEMENTS  # the plan counts its scratch


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
    _check_form(form)
    return sum(quantize_layer(layer, form, group) for layer in decoder_layers(model))


def quantize_layer(layer: torch.nn.Module, form: str, group: int = quant_gemv.GROUP) -> int:
    """Replace every nn.Linear inside one decoder layer by its `form`, on the layer's device; returns how many.

    Each 16-bit weight is released as soon as its packed form exists, so the layer never needs more than its
    own 16-bit bytes and the rounding's scratch beside what it ends as.
    """
    _check_form(form)
    names = [name for name, module in layer.named_modules() if type(module) is torch.nn.Linear]
    with torch.no_grad():
        for name in names:
            parent_name, _, attribute = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            linear = getattr(parent, attribute)
            try:
                packed = quantize_weight(linear.weight.detach(), form, group)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}; int8 has no such limit") from None
            bias = linear.bias.detach() if linear.bias is not None else None
            setattr(parent, attribute, QuantizedLinear(packed, bias))
            del linear  # the last reference to the 16-bit weight
    return len(names)


def quantize_weight(weight: torch.Tensor, form: str, group: int = quant_gemv.GROUP) -> quant_gemv.QuantizedWeight:
    """`quant_gemv`'s rounding of a [out, in] weight, CHUNK_ELEMENTS at a time (rows are rounded independently,
    so the result is the same as in one go)."""
    rows, columns = weight.shape
    step = max(1, CHUNK_ELEMENTS // columns)
    first = _quantize_rows(weight[:step], form, group)
    if rows <= step:
        return first
    packed = first.packed.new_empty((rows, *first.packed.shape[1:]))
    scales = first.scales.new_empty((rows, *first.scales.shape[1:]))
    zeros = None if first.zeros is None else first.zeros.new_empty((rows, *first.zeros.shape[1:]))
    for start in range(0, rows, step):
        part = first if start == 0 else _quantize_rows(weight[start:start + step], form, group)
        packed[start:start + step] = part.packed
        scales[start:start + step] = part.scales
        if zeros is not None:
            zeros[start:start + step] = part.zeros
    return quant_gemv.QuantizedWeight(form, packed, scales, zeros, first.group, columns)


def _check_form(form: str) -> None:
    if form not in quant_gemv.FORMS:
        raise ValueError(f"quantized form {form!r}: expected one of {', '.join(quant_gemv.FORMS)}")


def _quantize_rows(weight: torch.Tensor, form: str, group: int) -> quant_gemv.QuantizedWeight:
    return quant_gemv.quantize_int8(weight) if form == "int8" else quant_gemv.quantize_int4(weight, group)


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (model.model.layers, or the text model's of a VLM)."""
    return device_split.decoder_layer_stack(model)[1]
