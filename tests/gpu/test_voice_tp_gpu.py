"""Tensor-parallel voice on two GPUs (CUDA graphs): one GPU's greedy tokens with NCCL and with the peer
all-reduce, the peer all-reduce equal to NCCL's, the plan's memory per rank.

Random weights of the Llama-3-8B shape, made on each GPU by `bench/voice_tp.py`'s code (each tensor drawn
whole from a generator seeded by its name, each rank keeping its slice, so both placements hold the same
model). Greedy tokens are compared in float32: in bf16 a different summation order (two partial matmuls
and an all-reduce instead of one matmul) picks another near-tie within a few dozen tokens.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


def two_gpus() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


needs_two = pytest.mark.skipif(not two_gpus(), reason="needs two CUDA GPUs")


@needs_two
def test_tensor_ranks_give_one_gpus_greedy_tokens_for_the_8b_shape() -> None:
    from bench.voice_tp import one_device, tensor

    one = one_device("8b", "cuda", tokens=8, max_context=512, precision="float32")
    split = tensor("8b", "cuda", "nccl", tokens=8, max_context=512, precision="float32")
    assert split["engine"] == "graphs, tensor x2"
    assert split["tokens"] == one["tokens"]


@needs_two
def test_peer_all_reduce_equals_nccl_inside_a_graph() -> None:
    from bench.all_reduce import run_kind

    rows = run_kind("peer", [4096, 8192, 300_000], calls=8)  # 300,000 is past the buffer: NCCL's path
    assert [row["elements"] for row in rows] == [4096, 8192, 300_000], rows
    for row in rows:
        assert row["equal_to_nccl"], row
        assert row["peer_waits_given_up"] == 0, row


@needs_two
def test_peer_all_reduce_ranks_give_one_gpus_greedy_tokens() -> None:
    from bench.voice_tp import one_device, tensor

    one = one_device("8b", "cuda", tokens=8, max_context=512, precision="float32")
    split = tensor("8b", "cuda", "peer", tokens=8, max_context=512, precision="float32")
    assert split["tokens"] == one["tokens"]


@needs_two
def test_memory_per_rank_matches_the_plan_within_ten_percent() -> None:
    from bench.voice_tp import tensor
    from shared.config.schema import parse_config
    from shared.planning.plan import assess

    config = parse_config({
        "gpus": [{"index": 0, "budget_gb": 140.0}, {"index": 1, "budget_gb": 140.0}],
        "services": {"voice": {"gpus": [0, 1]}}, "router": {}, "specialists": {"pragmatist": {}},
        "voice": {"backend": "transformers", "path": "meta-llama/x", "architecture": "llama-3-8b",
                  "dtype": "bfloat16", "parallel": "tensor", "max_context": 4096},
    })
    planned = next(p for p in assess(config).placements if p.role == "voice").split.per_gpu
    split = tensor("8b", "cuda", "nccl", tokens=8, max_context=4096)
    assert len(split["ranks"]) == 2
    for rank in split["ranks"]:
        share = planned[rank["rank"]] / 1e9
        assert abs(rank["reserved_gb"] - share) <= 0.1 * share, (rank, share)


@needs_two
def test_fused_ranks_give_one_gpus_greedy_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused step on two ranks (inductor's products, the peer all-reduce) against one GPU's (Lyra's kernels)."""
    from bench.voice_tp import ENGINE_ENV, one_device, tensor

    monkeypatch.setenv(ENGINE_ENV, "fused")  # the spawned ranks read it too
    one = one_device("8b", "cuda", tokens=8, max_context=512, precision="float32")
    split = tensor("8b", "cuda", "peer", tokens=8, max_context=512, precision="float32")
    assert one["products"] != "inductor" and split["products"] == "inductor"
    assert split["tokens"] == one["tokens"]
