"""Weight-only quantized products for decode steps: one row times an int8 or int4 weight, as Triton kernels.

A decode step reads every weight once per token, so its time is the weights' bytes over the memory's
bandwidth. Quantized weights read fewer bytes only if the product reads them packed and widens them in
registers; a kernel that first writes a bf16 copy (or a library path that cannot be captured in a CUDA
graph) reads more than the bf16 model did. The two forms:

- `int8`: one signed byte per weight, one scale per output row (symmetric): w = q * scale[row].
- `int4`: eight weights per 32-bit word, one scale and one zero point per row and group of `group` input
  columns (asymmetric, q in 0..15): w = (q - zero) * scale. A group's W = group/8 words hold its column
  k*W + j in nibble k of word j, so each nibble plane multiplies a contiguous slice of the input
  (checkpoints in other layouts, AWQ's and GPTQ's, are repacked to this one at load).

The kernels widen a nibble to float32 by its bits (q | 0x4B000000 is the float 2^23 + q; one subtraction
leaves q) instead of an int-to-float conversion, which runs at an eighth of the arithmetic rate on Hopper
and would bound an int4 product below the memory's speed.

`quantize_int8` / `quantize_int4` make them from a float weight by rounding to nearest; `dequantize` is
the reference; `product` runs the kernel (a custom op, so a graph or torch.compile takes it as one call).
They run on CUDA with Triton, or under Triton's interpreter (TRITON_INTERPRET=1), which the tests use.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch

FORMS = ("int8", "int4")
GROUP = 128  # input columns per int4 scale: the common AWQ/GPTQ group
_kernels: dict[str, Any] = {}  # made on first use (importing Triton takes a second)


@dataclass(frozen=True)
class Tiling:
    """How one product is cut: output rows per program; per inner step, input columns (int8) or groups (int4)."""

    rows: int = 4
    columns: int = 512
    groups: int = 2
    warps: int = 4


# The best of bench/quant_kernels.py's tilings over the Llama-3-8B and 70B projections, 1 x H100 (2026-12-06):
# int8 reads few rows of long runs; int4 wants more bytes per program and step (8 rows x 8 groups = 4 KB).
TILINGS = {"int8": Tiling(rows=2, columns=1024, warps=4), "int4": Tiling(rows=8, groups=8, warps=4)}


@dataclass(frozen=True)
class QuantizedWeight:
    """A [out_features, in_features] weight in one of FORMS; `zeros` and `group` only for int4."""

    form: Literal["int8", "int4"]
    packed: torch.Tensor  # int8 [out, in], or int32 [out, in // 8] for int4
    scales: torch.Tensor  # [out] for int8, [out, in // group] for int4; the activations' dtype
    zeros: torch.Tensor | None
    group: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def nbytes(self) -> int:
        """Bytes a product reads: packed weights, scales and zero points."""
        parts = [self.packed, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Round-to-nearest int8 with one symmetric scale per output row."""
    wide = weight.float()
    scales = (wide.abs().amax(dim=1) / 127).clamp(min=1e-8)
    packed = torch.round(wide / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", packed, scales.to(weight.dtype), None, 0, weight.shape[1])


def quantize_int4(weight: torch.Tensor, group: int = GROUP) -> QuantizedWeight:
    """Round-to-nearest int4 with a scale and a zero point per row and `group` input columns."""
    rows, columns = weight.shape
    if columns % group or group % 8:
        raise ValueError(f"int4: {columns} input columns are not a whole number of groups of {group}")
    wide = weight.float().view(rows, columns // group, group)
    low, high = wide.amin(dim=2), wide.amax(dim=2)
    scales = ((high - low) / 15).clamp(min=1e-8)
    zeros = torch.round(-low / scales).clamp(0, 15)
    q = (torch.round(wide / scales[..., None]) + zeros[..., None]).clamp(0, 15).to(torch.int32)
    planes = q.view(rows, columns // group, 8, group // 8)  # [rows, groups, nibble k, word j]
    shifts = (torch.arange(8, dtype=torch.int32, device=weight.device) * 4).view(1, 1, 8, 1)
    packed = (planes << shifts).sum(dim=2, dtype=torch.int64)  # each nibble in its own bits: a sum is an or
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).view(rows, columns // 8)
    return QuantizedWeight("int4", packed.contiguous(), scales.to(weight.dtype), zeros.to(weight.dtype), group,
                           columns)


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """The float32 weight a quantized one stands for (the reference every kernel is checked against)."""
    if weight.form == "int8":
        return weight.packed.float() * weight.scales.float()[:, None]
    rows, words = weight.out_features, weight.group // 8
    shifts = (torch.arange(8, dtype=torch.int32, device=weight.packed.device) * 4).view(1, 1, 8, 1)
    q = ((weight.packed.view(rows, -1, 1, words) >> shifts) & 15).float().view(rows, -1, weight.group)
    return ((q - weight.zeros.float()[..., None]) * weight.scales.float()[..., None]).view(rows, weight.in_features)


def product_reference(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x [1, in] times the dequantized weight, summed in float32, rounded to x's dtype as the kernel does."""
    return (x.float() @ dequantize(weight).T).to(x.dtype)


def product(x: torch.Tensor, weight: QuantizedWeight, tile: Tiling | None = None) -> torch.Tensor:
    """x [1, in] (bf16, fp16 or fp32) times a quantized weight: [1, out] in x's dtype (its form's tiling by default)."""
    tile = tile or TILINGS[weight.form]
    if x.shape != (1, weight.in_features):
        raise ValueError(f"quantized product: input {tuple(x.shape)} for a weight of {weight.in_features} columns")
    if weight.form == "int8":
        return torch.ops.lyra.int8_product(x, weight.packed, weight.scales, tile.rows, tile.columns, tile.warps)
    return torch.ops.lyra.int4_product(x, weight.packed, weight.scales, weight.zeros, weight.group, tile.rows,
                                       tile.groups, tile.warps)


@torch.library.custom_op("lyra::int8_product", mutates_args=())
def _int8_product(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, rows: int, columns: int,
                  warps: int) -> torch.Tensor:
    out = x.new_empty(1, packed.shape[0])
    with _on(x.device):
        _made("int8")[(_programs(packed.shape[0], rows),)](x, packed, scales, out, packed.shape[0], packed.shape[1],
                                                            ROWS=rows, COLUMNS=columns, num_warps=warps)
    return out


@_int8_product.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, rows: int, columns: int,
      warps: int) -> torch.Tensor:
    return x.new_empty(1, packed.shape[0])


@torch.library.custom_op("lyra::int4_product", mutates_args=())
def _int4_product(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                  rows: int, groups: int, warps: int) -> torch.Tensor:
    out = x.new_empty(1, packed.shape[0])
    with _on(x.device):
        _made("int4")[(_programs(packed.shape[0], rows),)](x, packed, scales, zeros, out, packed.shape[0],
                                                            packed.shape[1] * 8 // group, ROWS=rows, WORDS=group // 8,
                                                            GROUPS=groups, num_warps=warps)
    return out


@_int4_product.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, rows: int,
      groups: int, warps: int) -> torch.Tensor:
    return x.new_empty(1, packed.shape[0])


def _programs(count: int, rows: int) -> int:
    return (count + rows - 1) // rows


def _on(device: torch.device) -> Any:
    """The device context a launch needs (the interpreter needs none)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _made(form: str) -> Any:
    if not _kernels:
        _kernels.update(_make_kernels())
    return _kernels[form]


def _make_kernels() -> dict[str, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def int8_product(x, weight, scales, out, count, width, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        inside = rows < count
        steps = tl.arange(0, COLUMNS)
        sums = tl.zeros((ROWS, COLUMNS), tl.float32)
        for start in range(0, width, COLUMNS):
            columns = start + steps
            present = columns < width
            value = tl.load(x + columns, mask=present, other=0.0).to(tl.float32)
            both = inside[:, None] & present[None, :]
            sums += tl.load(weight + rows[:, None] * width + columns[None, :], mask=both, other=0).to(tl.float32) \
                * value[None, :]
        scale = tl.load(scales + rows, mask=inside, other=0.0).to(tl.float32)
        tl.store(out + rows, (tl.sum(sums, 1) * scale).to(out.dtype.element_ty), mask=inside)

    @triton.jit
    def int4_product(x, packed, scales, zeros, out, count, groups, ROWS: tl.constexpr, WORDS: tl.constexpr,
                     GROUPS: tl.constexpr):
        # One inner step reads GROUPS groups of each row: [ROWS, GROUPS, WORDS] words, eight weights a word.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        inside = rows < count
        in_step = tl.arange(0, GROUPS)
        word_at = tl.arange(0, WORDS)
        sums = tl.zeros((ROWS, GROUPS), tl.float32)
        for first in range(0, groups, GROUPS):
            group = first + in_step  # [GROUPS]
            present = group < groups
            both = inside[:, None, None] & present[None, :, None]
            word = tl.load(packed + rows[:, None, None] * (groups * WORDS) + group[None, :, None] * WORDS
                           + word_at[None, None, :], mask=both, other=0)
            products = tl.zeros((ROWS, GROUPS, WORDS), tl.float32)
            x_sum = tl.zeros((GROUPS, WORDS), tl.float32)
            for k in tl.static_range(8):  # nibble plane k: columns k*WORDS .. (k+1)*WORDS of each group
                value = tl.load(x + group[:, None] * (8 * WORDS) + k * WORDS + word_at[None, :],
                                mask=present[:, None], other=0.0).to(tl.float32)  # [GROUPS, WORDS]
                q = (((word >> (4 * k)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                products += q * value[None, :, :]
                x_sum += value
            at = rows[:, None] * groups + group[None, :]
            mask = inside[:, None] & present[None, :]
            scale = tl.load(scales + at, mask=mask, other=0.0).to(tl.float32)
            zero = tl.load(zeros + at, mask=mask, other=0.0).to(tl.float32)
            sums += scale * (tl.sum(products, 2) - zero * tl.sum(x_sum, 1)[None, :])
        tl.store(out + rows, tl.sum(sums, 1).to(out.dtype.element_ty), mask=inside)

    return {"int8": int8_product, "int4": int4_product}


def pack_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> QuantizedWeight:
    """An int4 QuantizedWeight from integer codes q [out, in] in 0..15 and a scale and zero per row and group.

    The one packer of the int4 layout for weights quantized elsewhere (a clipping search, an AWQ or GPTQ
    checkpoint). Zero points are stored as floats, so any value is kept exactly (GPTQ v1's reach 16).
    """
    rows, columns = q.shape
    if columns % group or group % 8:
        raise ValueError(f"int4: {columns} input columns are not a whole number of groups of {group}")
    if scales.shape != (rows, columns // group) or zeros.shape != scales.shape:
        raise ValueError(f"int4: scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} for codes "
                         f"{tuple(q.shape)} in groups of {group}: expected {(rows, columns // group)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("int4: codes outside 0..15")
    planes = q.to(torch.int64).reshape(rows, columns // group, 8, group // 8)  # [rows, groups, nibble k, word j]
    shifts = (torch.arange(8, dtype=torch.int64, device=q.device) * 4).view(1, 1, 8, 1)
    packed = (planes << shifts).sum(dim=2)  # each nibble in its own bits: a sum is an or
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).view(rows, columns // 8)
    return QuantizedWeight("int4", packed.contiguous(), scales.contiguous(), zeros.contiguous(), group, columns)


CLIP_RATIOS = tuple(1 - 0.025 * step for step in range(9))  # 1.0 (the group's own min or max) down to 0.8


def quantize_int4_clipped(weight: torch.Tensor, group: int = GROUP, ratios: tuple[float, ...] = CLIP_RATIOS,
                          rows_at_once: int = 1024) -> QuantizedWeight:
    """Int4 whose range [a * min, b * max] per row and group is the (a, b) of `ratios` x `ratios` of least weight MSE.

    Calibration-free: clipping a group's extreme weights on either side buys a finer grid for all the others,
    and the squared error of the group's own weights decides. The zero point is kept as the float -lo / scale
    (the int4 form stores zeros as floats), so the 16 levels span exactly the chosen range; rounding it to an
    integer as `quantize_int4` does shifts the grid, and with clipping that costs more than it saves. Scales and
    zeros are measured as they will be stored (the weight's dtype). `rows_at_once` bounds the scratch memory.
    """
    rows, columns = weight.shape
    if columns % group or group % 8:
        raise ValueError(f"int4: {columns} input columns are not a whole number of groups of {group}")
    codes, scales, zeros = [], [], []
    for first in range(0, rows, rows_at_once):
        wide = weight[first:first + rows_at_once].float().view(-1, columns // group, group)
        low, high = wide.amin(dim=2), wide.amax(dim=2)
        best = torch.full_like(low, float("inf"))
        best_scales, best_zeros = torch.ones_like(low), torch.zeros_like(low)
        for low_ratio in ratios:
            for high_ratio in ratios:
                span = (high * high_ratio - low * low_ratio).clamp(min=1e-8)
                scale = (span / 15).to(weight.dtype).float()
                zero = (-low * low_ratio / scale).to(weight.dtype).float()
                q = (torch.round(wide / scale[..., None] + zero[..., None])).clamp(0, 15)
                error = ((q - zero[..., None]) * scale[..., None] - wide).square().sum(dim=2)
                better = error < best
                best = torch.where(better, error, best)
                best_scales = torch.where(better, scale, best_scales)
                best_zeros = torch.where(better, zero, best_zeros)
        q = torch.round(wide / best_scales[..., None] + best_zeros[..., None]).clamp(0, 15).to(torch.int32)
        codes.append(q.view(-1, columns))
        scales.append(best_scales.to(weight.dtype))
        zeros.append(best_zeros.to(weight.dtype))
    return pack_int4(torch.cat(codes), torch.cat(scales), torch.cat(zeros), group)
