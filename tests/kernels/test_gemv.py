"""The decode step's product and norm kernels equal torch, and the fused step built on them equals the model's.

Run by Triton's CPU interpreter (tests/kernels/conftest.py). The interpreter rounds bfloat16 toward zero
where a GPU rounds to nearest, so exact comparisons use float32 and float16.
"""

from __future__ import annotations

import pytest
import torch

from shared.distributed.tensor_parallel import Shard
from shared.engine import fused_step as fused_decode
from shared.engine.fused_step import FusedStep
from shared.kernels import gemv
from tests.models.test_fused_decode import CONTEXT, greedy, rank_model

pytest.importorskip("triton", reason="Triton is not installed (the dev extra installs it on Linux x86-64)")
pytestmark = pytest.mark.models

CPU = torch.device("cpu")
COARSE = gemv.Tiling(rows=16, columns=256, warps=4, stages=1)  # the interpreter runs programs one by one: fewer


@pytest.fixture
def coarse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemv, "TILING", COARSE)


def draw(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "columns"), [(1, 1), (37, 700), (64, 2048), (130, 1030)])
@pytest.mark.parametrize("tile", [gemv.TILING, gemv.Tiling(rows=16, columns=256, warps=4, stages=3)])
def test_product_equals_linear(dtype: torch.dtype, rows: int, columns: int, tile: gemv.Tiling) -> None:
    weight, bias, x = draw(rows, columns, dtype=dtype) * 0.05, draw(rows, dtype=dtype, seed=1), draw(1, columns,
                                                                                                 dtype=dtype, seed=2)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-3}
    torch.testing.assert_close(gemv.gemv(x, weight, tile=tile), gemv.gemv_reference(x, weight), **tolerance)
    torch.testing.assert_close(gemv.gemv(x, weight, bias, tile=tile), gemv.gemv_reference(x, weight, bias),
                               **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_product_is_silu_of_gate_times_up(dtype: torch.dtype) -> None:
    weight, x = draw(2 * 75, 300, dtype=dtype) * 0.2, draw(1, 300, dtype=dtype, seed=1)
    got = gemv.gemv(x, weight, gated=True)
    assert got.shape == (1, 75)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-3}
    torch.testing.assert_close(got, gemv.gemv_reference(x, weight, gated=True), **tolerance)


def test_a_gated_product_needs_equal_halves_and_no_bias() -> None:
    with pytest.raises(ValueError, match="equal count"):
        gemv.gemv(draw(1, 8), draw(5, 8), gated=True)
    with pytest.raises(ValueError, match="equal count"):
        gemv.gemv(draw(1, 8), draw(4, 8), draw(4), gated=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("width", [64, 700, 4096])
def test_add_norm_sums_the_residual_and_normalises_it(dtype: torch.dtype, width: int) -> None:
    hidden, addend, gain = draw(1, width, dtype=dtype), draw(1, width, dtype=dtype, seed=1), draw(width, dtype=dtype,
                                                                                                   seed=2)
    for given in (None, addend):
        residual, normed = gemv.add_norm(hidden, gain, 1e-5, given)
        expected_residual, expected = gemv.add_norm_reference(hidden, gain, 1e-5, given)
        assert torch.equal(residual, expected_residual)  # one rounded sum, exactly the model's
        torch.testing.assert_close(normed, expected, atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=1e-3)
        assert residual.data_ptr() != hidden.data_ptr()


def test_products_are_used_where_they_pass_their_trial_and_not_where_they_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemv, "_tried", {})
    assert gemv.prepare(CPU, torch.float32) and gemv.usable(CPU, torch.float32)
    monkeypatch.setattr(gemv, "_tried", {})
    monkeypatch.setattr(gemv, "add_norm", lambda hidden, gain, eps, addend=None: (hidden, hidden))
    assert not gemv.prepare(CPU, torch.float32)
    assert not gemv.usable(CPU, torch.float32)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_step_on_the_kernels_equals_the_models_own_step(kind: str, coarse: None) -> None:
    from transformers import LlamaConfig, Qwen2Config  # Qwen2: q/k/v biases

    model = rank_model({"llama": LlamaConfig, "qwen2": Qwen2Config}[kind], Shard(0, 1))
    expected_tokens, expected_logits = greedy(model)
    with torch.inference_mode():
        step = FusedStep(model, CONTEXT)
    assert step.products
    tokens, logits = greedy(model, step)
    assert tokens == expected_tokens and len(set(tokens)) > 2
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_the_step_keeps_torchs_operations_where_the_kernels_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import LlamaConfig

    model = rank_model(LlamaConfig, Shard(0, 1))
    expected = greedy(model)[0]
    monkeypatch.setattr(gemv, "_tried", {(CPU, torch.float32): False})
    with torch.inference_mode():
        step = FusedStep(model, CONTEXT)
    assert not step.products and step.kernel
    assert greedy(model, step)[0] == expected


def test_ranks_keep_inductors_products() -> None:
    from transformers import LlamaConfig

    model = rank_model(LlamaConfig, Shard(0, 1))
    setattr(model, fused_decode.REDUCE_ATTRIBUTE, lambda tensor: tensor)  # as a rank of two is built
    with torch.inference_mode():
        assert not FusedStep(model, CONTEXT).products
