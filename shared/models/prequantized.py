"""Pre-quantized AWQ and GPTQ checkpoints (4-bit, grouped), repacked once at load into Lyra's int4 layout.

Both formats store, per output row and group of input columns, 4-bit codes q, a zero point z and an fp16
scale s, and both mean w = (q - z) * s: Lyra's int4 form (`shared.kernels.quant_gemv`) with the same three
numbers, packed differently. Repacking moves nibbles only, so the repacked weight dequantizes to the
checkpoint's own formula bit for bit (in float32); nothing is re-quantized. The layouts, as their packers
write them (AutoAWQ `WQLinear_GEMM.from_linear`, AutoGPTQ `QuantLinear.pack`):

- AWQ (GEMM): `qweight` int32 [in, out/8], word c of row i holding outputs 8c..8c+7 in the nibble order
  0, 2, 4, 6, 1, 3, 5, 7 (nibble k holds output 8c + AWQ_ORDER[k]); `qzeros` int32 [in/group, out/8] the same
  way; `scales` fp16 [in/group, out].
- GPTQ: `qweight` int32 [in/8, out], word r of column o holding inputs 8r..8r+7 in nibbles 0..7; `qzeros`
  int32 [in/group, out/8], nibble k of word c holding output 8c + k; `scales` fp16 [in/group, out]; `g_idx`
  int32 [in], each input's group. Checkpoints of the "gptq" format (v1, AutoGPTQ) store z - 1 and mean
  (nibble + 1); "gptq_v2" (GPTQModel) stores z.

Refused, with the line to act on: other bit widths, AWQ's GEMV layouts and checkpoints without zero points,
GPTQ act-order (`desc_act`: a group's inputs are scattered, and Lyra's product has no input permutation),
and any group that is not a power of two dividing a layer's inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from shared.engine.quantized_linear import QuantizedLinear
from shared.kernels import quant_gemv

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of an AWQ word holds the word's output AWQ_ORDER[k]
SEQUENTIAL = tuple(range(8))
GPTQ_ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}  # added to a stored zero point, by checkpoint format


class PrequantizedError(ValueError):
    """A pre-quantized checkpoint Lyra cannot repack exactly; the message says what and what to use instead."""


@dataclass(frozen=True)
class PrequantizedForm:
    """What a checkpoint's `quantization_config` declares, once Lyra has accepted it."""

    method: Literal["awq", "gptq"]
    bits: int
    group: int
    desc_act: bool
    zero_offset: int  # added to each stored zero point: 1 for GPTQ v1 ("gptq") checkpoints, else 0
    modules_to_not_convert: tuple[str, ...] = ()


def read_quantization_config(config: Mapping[str, Any]) -> PrequantizedForm:
    """The form a config.json (or its `quantization_config` alone) declares; PrequantizedError if unsupported."""
    quant = config.get("quantization_config", config)
    method = str(quant.get("quant_method", "")).lower()
    if method not in ("awq", "gptq"):
        raise PrequantizedError(f"quant_method {method or 'missing'!r}: Lyra repacks only AWQ and GPTQ checkpoints")
    bits = quant.get("bits", quant.get("w_bit"))
    if bits != 4:
        raise PrequantizedError(f"{method.upper()} with {bits} bits: Lyra repacks 4-bit checkpoints only")
    group = quant.get("group_size", quant.get("q_group_size", quant_gemv.GROUP))
    if not isinstance(group, int) or group < 8 or group & (group - 1):
        raise PrequantizedError(f"{method.upper()} group_size {group}: Lyra's int4 needs a power of two of 8 or more "
                                "(-1, one group per row, is not supported)")
    skipped = tuple(quant.get("modules_to_not_convert") or ())
    if method == "awq":
        layout = str(quant.get("version", quant.get("format", "gemm"))).lower()
        if layout != "gemm":
            raise PrequantizedError(f"AWQ version {layout!r}: Lyra repacks the GEMM layout only (version = \"gemm\")")
        if not quant.get("zero_point", True):
            raise PrequantizedError("AWQ without zero points (zero_point = false): Lyra repacks asymmetric AWQ only")
        return PrequantizedForm("awq", 4, group, False, 0, skipped)
    if quant.get("desc_act", False):
        raise PrequantizedError("GPTQ act-order (desc_act = true) is not supported: its groups are not contiguous "
                                "inputs and Lyra's int4 product cannot permute them; use a desc_act = false checkpoint")
    layout = str(quant.get("checkpoint_format") or quant.get("format") or "gptq").lower()
    if layout not in GPTQ_ZERO_OFFSETS:
        raise PrequantizedError(f"GPTQ format {layout!r}: Lyra repacks {' and '.join(GPTQ_ZERO_OFFSETS)} checkpoints")
    if str(quant.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise PrequantizedError(f"GPTQ pack_dtype {quant['pack_dtype']}: Lyra repacks int32 words only")
    return PrequantizedForm("gptq", 4, group, False, GPTQ_ZERO_OFFSETS[layout], skipped)


def awq_to_lyra(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int
                ) -> quant_gemv.QuantizedWeight:
    """An AWQ GEMM layer's tensors as Lyra's int4 weight [out, in] (scales and zeros in the scales' dtype)."""
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    _check_shapes("AWQ", in_features, out_features, group, qweight, qzeros, scales)
    codes = _unpack_along_words(qweight, AWQ_ORDER)  # [in, out]
    zeros = _unpack_along_words(qzeros, AWQ_ORDER)  # [in / group, out]
    return quant_gemv.pack_int4(codes.T, scales.T, zeros.T.to(scales.dtype), group)


def gptq_to_lyra(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                 group: int, zero_offset: int = 1) -> quant_gemv.QuantizedWeight:
    """A GPTQ layer's tensors as Lyra's int4 weight [out, in]; `zero_offset` 1 for v1 ("gptq"), 0 for "gptq_v2".

    `g_idx` may order the groups any way as long as each run of `group` inputs shares one (the trivial
    i // group among them); an act-order g_idx, which scatters a group's inputs, is refused.
    """
    in_features, out_features = qweight.shape[0] * 8, qweight.shape[1]
    _check_shapes("GPTQ", in_features, out_features, group, qweight, qzeros, scales)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    codes = ((qweight[:, None, :] >> shifts[None, :, None]) & 15).reshape(in_features, out_features)
    zeros = _unpack_along_words(qzeros, SEQUENTIAL) + zero_offset  # [in / group, out]
    runs = in_features // group
    owner = torch.arange(runs, device=qweight.device)
    if g_idx is not None:
        if g_idx.shape != (in_features,):
            raise PrequantizedError(f"GPTQ g_idx {tuple(g_idx.shape)} for {in_features} inputs")
        blocks = g_idx.to(torch.int64).view(runs, group)
        if bool((blocks != blocks[:, :1]).any()):
            raise PrequantizedError("GPTQ act-order g_idx (a group's inputs are not contiguous): Lyra's int4 product "
                                    "cannot permute its input; use a desc_act = false checkpoint")
        owner = blocks[:, 0]
        if bool((owner < 0).any() or (owner >= scales.shape[0]).any()):
            raise PrequantizedError(f"GPTQ g_idx names groups outside 0..{scales.shape[0] - 1}")
    return quant_gemv.pack_int4(codes.T, scales[owner].T, zeros[owner].T.to(scales.dtype), group)


def load_prequantized_linears(model: torch.nn.Module, state: Mapping[str, torch.Tensor],
                              config: Mapping[str, Any]) -> list[str]:
    """Replace each nn.Linear whose packed weight `state` holds by a repacked QuantizedLinear; returns their names.

    `state` is the checkpoint's tensors by name (safetensors), `config` its config.json. Only the packed
    layers are touched: the checkpoint's other tensors (embeddings, norms, a head left in float) are the
    caller's to load. A bias is cast to the replaced layer's dtype; scales stay in the checkpoint's dtype.
    """
    form = read_quantization_config(config)
    names = sorted(key.removesuffix(".qweight") for key in state if key.endswith(".qweight"))
    if not names:
        raise PrequantizedError(f"the checkpoint declares {form.method.upper()} but holds no .qweight tensors")
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if type(module) is not torch.nn.Linear:
            found = type(module).__name__ if module is not None else "no module"
            raise PrequantizedError(f"{name}: the checkpoint packs a weight for it, but the model has {found} there")
        try:
            weight = _repack(form, state, name)
        except (PrequantizedError, ValueError) as error:
            raise PrequantizedError(f"{name}: {error}") from error
        if (weight.out_features, weight.in_features) != (module.out_features, module.in_features):
            raise PrequantizedError(f"{name}: packed as {weight.out_features} x {weight.in_features}, the model's "
                                    f"layer is {module.out_features} x {module.in_features}")
        bias = state.get(f"{name}.bias")
        parent, _, leaf = name.rpartition(".")
        replacement = QuantizedLinear(weight, bias.to(module.weight.dtype) if bias is not None else None)
        setattr(model.get_submodule(parent) if parent else model, leaf, replacement)
    return names


def _repack(form: PrequantizedForm, state: Mapping[str, torch.Tensor], name: str) -> quant_gemv.QuantizedWeight:
    qweight, qzeros, scales = (state[f"{name}.{part}"] for part in ("qweight", "qzeros", "scales"))
    if form.method == "awq":
        return awq_to_lyra(qweight, qzeros, scales, form.group)
    return gptq_to_lyra(qweight, qzeros, scales, state.get(f"{name}.g_idx"), form.group, form.zero_offset)


def _unpack_along_words(words: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """int32 [rows, n] words of eight 4-bit values -> int32 [rows, 8n]: nibble k of word c is column 8c + order[k]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    nibbles = (words[:, :, None] >> shifts) & 15  # [rows, n, nibble k]
    at_column = [order.index(column) for column in range(8)]  # which nibble holds each column of the word
    return nibbles[:, :, at_column].reshape(words.shape[0], -1)


def _check_shapes(method: str, in_features: int, out_features: int, group: int, qweight: torch.Tensor,
                  qzeros: torch.Tensor, scales: torch.Tensor) -> None:
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise PrequantizedError(f"{method}: qweight {qweight.dtype} and qzeros {qzeros.dtype}: expected int32 words")
    if in_features % group:
        raise PrequantizedError(f"{method}: {in_features} inputs are not a whole number of groups of {group}")
    expected = (in_features // group, out_features)
    if tuple(scales.shape) != expected or tuple(qzeros.shape) != (expected[0], out_features // 8):
        raise PrequantizedError(f"{method}: scales {tuple(scales.shape)} and qzeros {tuple(qzeros.shape)} for "
                                f"{in_features} inputs, {out_features} outputs in groups of {group}: expected scales "
                                f"{expected}, qzeros {(expected[0], out_features // 8)}")
