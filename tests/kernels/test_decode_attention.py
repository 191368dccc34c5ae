"""The decode attention kernel reads only the cache positions in use and equals plain attention.

Run by Triton's CPU interpreter (tests/kernels/conftest.py): the same kernel source a GPU compiles, one
program at a time. Positions past the newest are filled with NaN, so a kernel that read them would fail.
"""

from __future__ import annotations

import pytest
import torch

from shared.engine.decode import StaticRunner
from shared.kernels import decode_attention
from tests.models.test_fused_decode import greedy, rank_model

pytest.importorskip("triton", reason="Triton is not installed (the dev extra installs it on Linux x86-64)")
pytestmark = pytest.mark.models


def cache_of(kv: int, group: int, dim: int, length: int, position: int, dtype: torch.dtype) -> tuple:
    generator = torch.Generator().manual_seed(position * 31 + dim)
    query = torch.randn(kv, group, dim, generator=generator).to(dtype)
    keys, values = (torch.randn(kv, length, dim, generator=generator).to(dtype) for _ in range(2))
    keys[:, position + 1:] = float("nan")
    values[:, position + 1:] = float("nan")
    return query, keys, values


@pytest.mark.parametrize(("kv", "group", "dim", "length", "position", "dtype"), [
    (2, 4, 64, 300, 0, torch.float32),  # one position: the first chunk alone
    (2, 3, 32, 512, 255, torch.float32),  # the last position of the first chunk; a group padded to 16
    (2, 3, 32, 512, 256, torch.float32),  # the first of the second chunk
    (1, 8, 128, 600, 599, torch.float16),  # the whole cache, a partial last chunk
    (4, 8, 128, 1024, 300, torch.bfloat16),  # the 70B shape's group
    (8, 1, 64, 200, 130, torch.float32),  # multi-head attention (group of one)
])
def test_kernel_equals_attention_over_the_positions_in_use(kv: int, group: int, dim: int, length: int,
                                                           position: int, dtype: torch.dtype) -> None:
    assert decode_attention.prepare(torch.device("cpu"), dim, dtype)
    assert decode_attention.usable(torch.device("cpu"), dim, dtype)
    query, keys, values = cache_of(kv, group, dim, length, position, dtype)
    at = torch.tensor([position])
    out = decode_attention.decode_attention(query, keys, values, at, dim ** -0.5)
    expected = decode_attention.reference(query, keys.nan_to_num(), values.nan_to_num(), at, dim ** -0.5)
    assert out.dtype == dtype and out.shape == query.shape
    assert not out.isnan().any()
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)


def test_head_sizes_the_kernel_cannot_take_are_refused() -> None:
    assert not decode_attention.prepare(torch.device("cpu"), 80, torch.float32)
    assert not decode_attention.prepare(torch.device("cpu"), 8, torch.float32)
    assert not decode_attention.usable(torch.device("cpu"), 80, torch.float32)


def test_kernel_is_not_used_on_the_cpu_without_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    assert decode_attention.prepare(torch.device("cpu"), 64, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET")  # the verdict under the interpreter is not taken for the CPU's
    assert not decode_attention.prepare(torch.device("cpu"), 64, torch.float32)
    assert not decode_attention.usable(torch.device("cpu"), 64, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # and the refusal without it was not kept either
    assert decode_attention.usable(torch.device("cpu"), 64, torch.float32)


def test_a_kernel_that_answers_wrongly_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_attention, "_tried", {})
    monkeypatch.setattr(decode_attention, "decode_attention", lambda query, *_: torch.zeros_like(query))
    assert not decode_attention.prepare(torch.device("cpu"), 64, torch.float32)
    assert not decode_attention.usable(torch.device("cpu"), 64, torch.float32)


def test_a_cache_index_past_the_end_reads_nothing_beyond_the_cache() -> None:
    query, keys, values = cache_of(2, 4, 64, 300, 299, torch.float32)
    at = torch.tensor([5000])
    out = decode_attention.decode_attention(query, keys, values, at, 0.125)
    expected = decode_attention.reference(query, keys, values, torch.tensor([299]), 0.125)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def projection_of(kv: int, group: int, dim: int, length: int, position: int, dtype: torch.dtype) -> tuple:
    """q, k and v side by side, rotary tables, and a cache poisoned from `position` on (the step writes it)."""
    generator = torch.Generator().manual_seed(position * 17 + dim)
    qkv = torch.randn(1, (kv * group + 2 * kv) * dim, generator=generator).to(dtype)
    angles = torch.randn(length, dim, generator=generator)
    keys, values = (torch.randn(1, kv, length, dim, generator=generator).to(dtype) for _ in range(2))
    keys[:, :, position:] = float("nan")
    values[:, :, position:] = float("nan")
    return qkv, angles.cos().to(dtype), angles.sin().to(dtype), keys, values


@pytest.mark.parametrize(("kv", "group", "dim", "length", "position", "dtype"), [
    (2, 4, 64, 300, 0, torch.float32),  # the first token
    (2, 3, 32, 512, 255, torch.float32),  # the last position of the first chunk
    (2, 3, 32, 512, 256, torch.float32),  # the first of the second chunk: its program writes, the first reads
    (1, 8, 128, 600, 599, torch.float16),  # the cache's last position
    (1, 8, 128, 1024, 300, torch.bfloat16),  # the 70B shape's group on one rank
    (8, 1, 64, 200, 130, torch.float32),  # multi-head attention (group of one)
])
def test_step_rotates_writes_the_cache_and_attends(kv: int, group: int, dim: int, length: int, position: int,
                                                    dtype: torch.dtype) -> None:
    assert decode_attention.prepare(torch.device("cpu"), dim, dtype, step=True)
    qkv, cos, sin, keys, values = projection_of(kv, group, dim, length, position, dtype)
    expected_keys, expected_values = keys.nan_to_num(), values.nan_to_num()
    at = torch.tensor([position])
    out = decode_attention.attend_step(qkv, cos, sin, keys, values, at, dim ** -0.5, kv)
    expected = decode_attention.step_reference(qkv, cos, sin, expected_keys, expected_values, at, dim ** -0.5, kv)
    assert out.dtype == dtype and out.shape == (kv, group, dim)
    assert not out.isnan().any()
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)
    # the new k (rotated) and v are in the cache, bit for bit (bf16 within one step: the interpreter rounds
    # float32 to bf16 toward zero, a GPU to nearest); nothing past them was written
    step = 2 ** -7 if dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(keys[:, :, :position + 1], expected_keys[:, :, :position + 1], atol=step, rtol=step)
    torch.testing.assert_close(values[:, :, :position + 1], expected_values[:, :, :position + 1], atol=0, rtol=0)
    assert keys[:, :, position + 1:].isnan().all() and values[:, :, position + 1:].isnan().all()


def test_a_step_past_the_cache_writes_nothing_and_attends_over_the_whole_cache() -> None:
    qkv, cos, sin, keys, values = projection_of(2, 4, 64, 300, 300, torch.float32)
    before = keys.clone(), values.clone()
    out = decode_attention.attend_step(qkv, cos, sin, keys, values, torch.tensor([5000]), 0.125, 2)
    assert torch.equal(keys, before[0]) and torch.equal(values, before[1])
    rows = qkv.view(-1, 64)
    query = decode_attention.rotate(rows[:8], cos[-1], sin[-1]).view(2, 4, 64)  # the table's last angle
    expected = decode_attention.reference(query, keys[0], values[0], torch.tensor([299]), 0.125)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_a_step_kernel_that_answers_wrongly_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_attention, "_tried", {})
    monkeypatch.setattr(decode_attention, "attend_step",
                        lambda qkv, cos, sin, keys, *_: torch.zeros(2, 4, keys.shape[-1], dtype=qkv.dtype))
    assert not decode_attention.prepare(torch.device("cpu"), 64, torch.float32, step=True)
    assert not decode_attention.usable(torch.device("cpu"), 64, torch.float32, step=True)
    assert decode_attention.prepare(torch.device("cpu"), 64, torch.float32)  # the plain kernel is judged apart


def test_fused_step_with_the_kernel_equals_the_models_own_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import LlamaConfig

    from shared.distributed.tensor_parallel import Shard
    from shared.engine.fused_step import FusedStep
    from shared.kernels import gemv

    model = rank_model(LlamaConfig, Shard(0, 1))
    expected_tokens, expected_logits = greedy(model)
    monkeypatch.setattr(gemv, "_tried", {(torch.device("cpu"), torch.float32): False})  # torch's products
    with torch.inference_mode():
        step = FusedStep(model, 64)
    assert step.kernel and not step.products
    tokens, logits = greedy(model, step)
    assert tokens == expected_tokens
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_grouped_decode_attention_with_the_kernel_equals_it_without(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import LlamaConfig

    from shared.distributed.tensor_parallel import Shard

    def tokens() -> list[int]:
        model = rank_model(LlamaConfig, Shard(0, 1))
        StaticRunner(model, 64, graphs=False)  # switches the model to grouped decode attention
        assert model.config._attn_implementation == "lyra_sdpa"
        return greedy(model)[0]

    launched = []
    original = decode_attention.decode_attention
    monkeypatch.setattr(decode_attention, "decode_attention", lambda *a: launched.append(1) or original(*a))
    with_kernel = tokens()
    assert launched, "the grouped attention never ran the kernel"
    monkeypatch.delenv("TRITON_INTERPRET")  # the CPU without the interpreter: the masked matmuls
    launched.clear()
    assert tokens() == with_kernel
    assert not launched
