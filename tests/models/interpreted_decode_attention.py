"""The decode attention kernel reads only the cache positions in use and equals plain attention.

Run by Triton's CPU interpreter: the same kernel source a GPU compiles, one program at a time. Triton
reads TRITON_INTERPRET when it is imported, so tests/models/test_decode_attention.py runs this file in a
pytest of its own with the variable set (the name keeps the suite from collecting it directly). Positions
past the newest are filled with NaN, so a kernel that read them would fail.
"""

from __future__ import annotations

import pytest
import torch

from shared.backends import decode_attention
from shared.backends.decode import StaticRunner
from tests.models.test_fused_decode import greedy, rank_model

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
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(decode_attention, "_tried", {})
    assert not decode_attention.prepare(torch.device("cpu"), 64, torch.float32)
    assert not decode_attention.usable(torch.device("cpu"), 64, torch.float32)


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


def test_fused_step_with_the_kernel_equals_the_models_own_step() -> None:
    from transformers import LlamaConfig

    from shared.backends.fused_decode import FusedStep
    from shared.backends.tensor_parallel import Shard

    model = rank_model(LlamaConfig, Shard(0, 1))
    expected_tokens, expected_logits = greedy(model)
    with torch.inference_mode():
        step = FusedStep(model, 64)
    assert step.kernel
    tokens, logits = greedy(model, step)
    assert tokens == expected_tokens
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_grouped_decode_attention_with_the_kernel_equals_it_without(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import LlamaConfig

    from shared.backends.tensor_parallel import Shard

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
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(decode_attention, "_tried", {})  # prepare() decides again, without the interpreter
    launched.clear()
    assert tokens() == with_kernel
    assert not launched
