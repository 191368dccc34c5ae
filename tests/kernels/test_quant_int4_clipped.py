"""Int4 with a searched clipping range: less weight error than round-to-nearest; the kernel takes its float zeros."""

from __future__ import annotations

import pytest
import torch

from shared.kernels import quant_gemv

pytestmark = pytest.mark.models


def heavy_tailed(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """A weight with a few large entries per row, as trained projections have."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * 0.02
    outliers = torch.rand(rows, columns, generator=generator) < 0.01
    return torch.where(outliers, weight * 8, weight)


def squared_error(packed: quant_gemv.QuantizedWeight, weight: torch.Tensor) -> float:
    return float((quant_gemv.dequantize(packed) - weight.float()).square().sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clipping_leaves_less_weight_error_than_round_to_nearest(dtype: torch.dtype) -> None:
    weight = heavy_tailed(96, 512).to(dtype)
    plain = quant_gemv.quantize_int4(weight, group=64)
    clipped = quant_gemv.quantize_int4_clipped(weight, group=64, rows_at_once=40)  # three chunks of rows
    assert (clipped.scales.dtype, clipped.zeros.dtype, clipped.nbytes()) == (dtype, dtype, plain.nbytes())
    assert squared_error(clipped, weight) < 0.9 * squared_error(plain, weight)


def test_without_clipping_the_grid_spans_each_group_exactly() -> None:
    weight = heavy_tailed(8, 256, seed=1)
    packed = quant_gemv.quantize_int4_clipped(weight, group=128, ratios=(1.0,))
    wide = quant_gemv.dequantize(packed).view(8, 2, 128)
    torch.testing.assert_close(wide.amin(dim=2), weight.view(8, 2, 128).amin(dim=2), atol=1e-6, rtol=0)
    torch.testing.assert_close(wide.amax(dim=2), weight.view(8, 2, 128).amax(dim=2), atol=1e-6, rtol=0)


def test_the_int4_kernel_multiplies_a_clipped_weight_as_its_dequantized_reference() -> None:
    weight = heavy_tailed(40, 512, seed=2)
    packed = quant_gemv.quantize_int4_clipped(weight, group=128)
    assert not torch.equal(packed.zeros, packed.zeros.round())  # float zero points reach the kernel
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(quant_gemv.product(x, packed), quant_gemv.product_reference(x, packed),
                               atol=1e-5, rtol=1e-5)


def test_packing_refuses_codes_outside_four_bits_and_mismatched_scales() -> None:
    codes = torch.full((4, 128), 16)
    ones = torch.ones(4, 1)
    with pytest.raises(ValueError, match=r"outside 0\.\.15"):
        quant_gemv.pack_int4(codes, ones, ones, 128)
    with pytest.raises(ValueError, match="expected"):
        quant_gemv.pack_int4(codes - 1, torch.ones(4, 2), torch.ones(4, 2), 128)
