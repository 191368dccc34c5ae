"""AWQ and GPTQ layers, packed here by each format's own rules, repack to Lyra's int4 and dequantize bit for bit.

The packers and dequantizers below follow the formats' documented formulas (AutoAWQ's WQLinear_GEMM.from_linear
and dequantize_gemm, AutoGPTQ's QuantLinear.pack and its torch forward), written as plain loops over nibbles,
independently of shared.models.prequantized's unpacking.
"""

from __future__ import annotations

import pytest
import torch

from shared.kernels import quant_gemv
from shared.models.prequantized import (
    PrequantizedError,
    awq_to_lyra,
    gptq_to_lyra,
    read_quantization_config,
)

IN, OUT, GROUP = 512, 48, 128


def as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (in int64) as the int32 a checkpoint stores."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_pack(columns: torch.Tensor) -> torch.Tensor:
    """AutoAWQ: [rows, out] values -> [rows, out/8] words; nibble i of word c holds column 8c + [0,2,4,6,1,3,5,7][i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    words = torch.zeros(columns.shape[0], columns.shape[1] // 8, dtype=torch.int64)
    for c in range(words.shape[1]):
        for i in range(8):
            words[:, c] |= columns[:, 8 * c + order[i]].long() << (4 * i)
    return as_int32(words)


def gptq_pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ qweight: [in, out] codes -> [in/8, out] words; nibble j of word r holds input 8r + j."""
    words = torch.zeros(codes.shape[0] // 8, codes.shape[1], dtype=torch.int64)
    for r in range(words.shape[0]):
        for j in range(8):
            words[r] |= codes[8 * r + j].long() << (4 * j)
    return as_int32(words)


def gptq_pack_columns(values: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ qzeros: [groups, out] values -> [groups, out/8] words; nibble j of word c holds output 8c + j."""
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for c in range(words.shape[1]):
        for j in range(8):
            words[:, c] |= values[:, 8 * c + j].long() << (4 * j)
    return as_int32(words)


def random_layer(seed: int, zeros_low: int = 0, zeros_high: int = 15) -> tuple[torch.Tensor, ...]:
    """Codes [in, out] in 0..15, zero points [groups, out] and fp16 scales [groups, out] (every nibble value occurs)."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (IN, OUT), generator=generator)
    zeros = torch.randint(zeros_low, zeros_high + 1, (IN // GROUP, OUT), generator=generator)
    scales = (torch.rand(IN // GROUP, OUT, generator=generator) * 0.02 + 1e-3).half()
    return codes, zeros, scales


def formula(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """w[o, i] = (q[i, o] - z[g(i), o]) * s[g(i), o] in float32, as [out, in]."""
    return ((codes - zeros[groups]).float() * scales[groups].float()).T


def test_an_awq_layer_repacked_dequantizes_to_awqs_formula_bit_for_bit() -> None:
    codes, zeros, scales = random_layer(0)
    weight = awq_to_lyra(awq_pack(codes), awq_pack(zeros), scales, GROUP)
    assert (weight.form, weight.group, weight.out_features, weight.in_features) == ("int4", GROUP, OUT, IN)
    expected = formula(codes, zeros, scales, torch.arange(IN) // GROUP)
    assert torch.equal(quant_gemv.dequantize(weight), expected)


def test_a_gptq_v1_layer_keeps_the_plus_one_zero_points_up_to_16() -> None:
    codes, zeros, scales = random_layer(1, zeros_low=1, zeros_high=16)  # v1 stores z - 1: 16 is stored as 15
    g_idx = (torch.arange(IN) // GROUP).to(torch.int32)
    weight = gptq_to_lyra(gptq_pack_rows(codes), gptq_pack_columns(zeros - 1), scales, g_idx, GROUP, zero_offset=1)
    assert int(weight.zeros.max()) == 16
    assert torch.equal(quant_gemv.dequantize(weight), formula(codes, zeros, scales, g_idx.long()))


def test_a_gptq_v2_layer_stores_its_zero_points_as_they_are() -> None:
    codes, zeros, scales = random_layer(2)
    weight = gptq_to_lyra(gptq_pack_rows(codes), gptq_pack_columns(zeros), scales, None, GROUP, zero_offset=0)
    assert torch.equal(quant_gemv.dequantize(weight), formula(codes, zeros, scales, torch.arange(IN) // GROUP))


def test_gptq_groups_stored_out_of_order_but_contiguous_repack_exactly() -> None:
    codes, zeros, scales = random_layer(3)
    order = torch.tensor([2, 0, 3, 1])  # inputs 0..127 use group 2, 128..255 group 0, ...
    g_idx = order.repeat_interleave(GROUP).to(torch.int32)
    weight = gptq_to_lyra(gptq_pack_rows(codes), gptq_pack_columns(zeros), scales, g_idx, GROUP, zero_offset=0)
    assert torch.equal(quant_gemv.dequantize(weight), formula(codes, zeros, scales, g_idx.long()))


def test_a_gptq_act_order_g_idx_is_refused_in_one_line() -> None:
    codes, zeros, scales = random_layer(4)
    g_idx = (torch.randperm(IN, generator=torch.Generator().manual_seed(0)) // GROUP).to(torch.int32)
    with pytest.raises(PrequantizedError, match="act-order") as refusal:
        gptq_to_lyra(gptq_pack_rows(codes), gptq_pack_columns(zeros), scales, g_idx, GROUP)
    assert "\n" not in str(refusal.value)


def test_an_awq_layer_quantized_from_a_float_weight_stays_within_half_a_step() -> None:
    """The whole road: AutoAWQ's own quantization of a float weight, its packing, Lyra's repacking."""
    weight = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(5)) * 0.05
    wide = weight.view(OUT, IN // GROUP, GROUP)
    low, high = wide.amin(dim=2), wide.amax(dim=2)
    scales = ((high - low) / 15).clamp(min=1e-5).half()
    zeros = torch.round(-low / scales.float()).clamp(0, 15)
    codes = (torch.round(wide / scales.float()[..., None]) + zeros[..., None]).clamp(0, 15).view(OUT, IN)
    repacked = awq_to_lyra(awq_pack(codes.T), awq_pack(zeros.T.long()), scales.T.contiguous(), GROUP)
    step = scales.float().repeat_interleave(GROUP, dim=1)
    assert bool(((quant_gemv.dequantize(repacked) - weight).abs() <= step * 0.5 + 1e-6).all())


def test_a_layer_whose_tensors_do_not_agree_is_refused() -> None:
    codes, zeros, scales = random_layer(6)
    with pytest.raises(PrequantizedError, match="expected scales"):
        awq_to_lyra(awq_pack(codes), awq_pack(zeros), scales[:, :8], GROUP)
    with pytest.raises(PrequantizedError, match="not a whole number of groups of 96"):
        awq_to_lyra(awq_pack(codes), awq_pack(zeros), scales, 96)


AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq"}


def test_the_common_awq_and_gptq_configs_are_read() -> None:
    assert read_quantization_config({"quantization_config": AWQ}) == read_quantization_config(AWQ)
    awq = read_quantization_config({"quantization_config": {**AWQ, "modules_to_not_convert": ["lm_head"]}})
    assert (awq.method, awq.bits, awq.group, awq.desc_act, awq.zero_offset) == ("awq", 4, 128, False, 0)
    assert awq.modules_to_not_convert == ("lm_head",)
    gptq = read_quantization_config(GPTQ)
    assert (gptq.method, gptq.group, gptq.zero_offset) == ("gptq", 128, 1)
    assert read_quantization_config({**GPTQ, "sym": False}).zero_offset == 1  # asymmetric v1: same layout
    v2 = {key: value for key, value in GPTQ.items() if key != "checkpoint_format"}
    assert read_quantization_config({**v2, "format": "gptq_v2"}).zero_offset == 0
    assert read_quantization_config({**GPTQ, "group_size": 64}).group == 64


@pytest.mark.parametrize(("config", "reason"), [
    ({**AWQ, "bits": 8}, "4-bit checkpoints only"),
    ({**GPTQ, "bits": 3}, "4-bit checkpoints only"),
    ({**GPTQ, "group_size": -1}, "one group per row"),
    ({**AWQ, "group_size": 96}, "power of two"),
    ({**AWQ, "version": "gemv"}, "GEMM layout only"),
    ({**AWQ, "zero_point": False}, "asymmetric AWQ only"),
    ({**GPTQ, "desc_act": True}, "act-order"),
    ({**GPTQ, "checkpoint_format": "marlin"}, "gptq and gptq_v2"),
    ({**GPTQ, "pack_dtype": "int64"}, "int32 words only"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "only AWQ and GPTQ"),
    ({"model_type": "llama"}, "missing"),
])
def test_what_cannot_be_repacked_exactly_is_refused_in_one_line(config: dict, reason: str) -> None:
    with pytest.raises(PrequantizedError, match=reason) as refusal:
        read_quantization_config(config)
    assert "\n" not in str(refusal.value)
