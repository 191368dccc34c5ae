"""The weight-only int8 and int4 products equal their dequantized references, and the forms round-trip."""

from __future__ import annotations

import pytest
import torch

from shared.kernels import quant_gemv

pytestmark = pytest.mark.models


def draw(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "columns"), [(1, 128), (37, 512), (64, 1024)])
@pytest.mark.parametrize("form", quant_gemv.FORMS)
def test_quantized_product_equals_the_dequantized_reference(form: str, rows: int, columns: int,
                                                            dtype: torch.dtype) -> None:
    weight, x = (draw(rows, columns) * 0.05).to(dtype), draw(1, columns, seed=1).to(dtype)
    packed = quant_gemv.quantize_int8(weight) if form == "int8" else quant_gemv.quantize_int4(weight)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-3}
    for tile in (None, quant_gemv.Tiling(rows=16, columns=256, groups=4, warps=4)):
        torch.testing.assert_close(quant_gemv.product(x, packed, tile), quant_gemv.product_reference(x, packed),
                                   **tolerance)


def test_round_to_nearest_stays_within_half_a_step_of_the_weight() -> None:
    weight = draw(8, 256) * 0.05
    int8, int4 = quant_gemv.quantize_int8(weight), quant_gemv.quantize_int4(weight, group=128)
    assert (quant_gemv.dequantize(int8) - weight).abs().max() <= int8.scales.max() / 2 + 1e-6
    steps = int4.scales.repeat_interleave(128, dim=1)
    assert ((quant_gemv.dequantize(int4) - weight).abs() <= steps / 2 + 1e-6).all()


def test_int4_reads_an_eighth_of_float32_plus_its_scales() -> None:
    packed = quant_gemv.quantize_int4(draw(64, 1024).to(torch.bfloat16))
    assert packed.packed.dtype == torch.int32 and packed.packed.shape == (64, 128)
    assert packed.nbytes() == 64 * 1024 // 2 + 2 * (64 * 8 * 2)


def test_a_weight_that_is_not_whole_groups_is_refused() -> None:
    with pytest.raises(ValueError, match="whole number of groups"):
        quant_gemv.quantize_int4(draw(4, 200))
