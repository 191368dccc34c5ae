"""The plan's share of each tensor-parallel voice rank: split weights and KV, replicated embeddings."""

from __future__ import annotations

import pytest

from shared.config.schema import ConfigError, parse_config
from shared.config.units import GB
from shared.planning.estimate import estimate_model
from shared.planning.inventory import architecture_shape
from shared.planning.ledger_bytes import estimate_per_gpu
from shared.planning.plan import assess
from shared.planning.rank_shares import exchange_bytes, rank_bytes, sharded_fraction


def config(architecture: str, parallel: str, **voice: object):
    return parse_config({
        "gpus": [{"index": 0, "budget_gb": 140.0}, {"index": 1, "budget_gb": 140.0}],
        "services": {"voice": {"gpus": [0, 1]}}, "router": {}, "specialists": {"pragmatist": {}},
        "voice": {"backend": "transformers", "path": "meta-llama/x", "architecture": architecture,
                  "dtype": "bfloat16", "parallel": parallel, "device_map": "" if parallel == "tensor" else "auto",
                  **voice},
    })


def voice_split(plan):
    return next(p for p in plan.placements if p.role == "voice")


@pytest.mark.parametrize("architecture", ["llama-3-8b", "llama-3-70b"])
def test_only_the_input_embeddings_stay_whole(architecture: str) -> None:
    shape = architecture_shape(architecture)
    assert shape is not None and not shape.tied_embeddings
    parameters = estimate_model(config(architecture, "tensor").voice).parameters
    replicated = shape.vocab_size * shape.hidden_size  # the input embeddings; the untied head is split (norms ~0)
    assert sharded_fraction(shape) == pytest.approx(1 - replicated / parameters, abs=1e-3)


def test_a_tied_head_stays_whole_with_the_embeddings() -> None:
    from dataclasses import replace

    shape = architecture_shape("llama-3-8b")
    tied = replace(shape, tied_embeddings=True)
    embeddings = shape.vocab_size * shape.hidden_size
    split = sharded_fraction(shape)  # untied: embeddings whole, head split
    parameters = embeddings / (1 - split)
    assert sharded_fraction(tied) == pytest.approx(1 - embeddings / (parameters - embeddings), abs=1e-3)


def test_each_rank_holds_half_the_layers_head_and_kv_plus_whole_embeddings() -> None:
    plan = assess(config("llama-3-8b", "tensor"))
    voice = voice_split(plan)
    estimate = voice.estimate
    assert set(voice.split.per_gpu) == {0, 1} and len(set(voice.split.per_gpu.values())) == 1
    share = voice.split.per_gpu[0]
    replicated = 128256 * 4096 * 2  # bytes of the input embeddings in bf16
    low = (estimate.weights - replicated) / 2 + replicated + estimate.kv_cache / 2
    assert low < share < low + estimate.activations + 0.05 * estimate.total
    assert 8.5 * GB < share < 10.1 * GB  # 8B bf16: 15 GB split + 1.05 GB whole, KV 0.27 GB, graphs, headroom


def test_pipeline_voice_is_placed_by_layers_as_before() -> None:
    tensor = voice_split(assess(config("llama-3-8b", "tensor"))).split.per_gpu
    pipeline = voice_split(assess(config("llama-3-8b", "pipeline"))).split.per_gpu
    assert sum(pipeline.values()) < sum(tensor.values())  # pipeline holds one copy of the embeddings
    assert pipeline != tensor


def test_the_ledger_gets_the_plans_rank_share() -> None:
    lyra = config("llama-3-70b", "tensor")
    planned = voice_split(assess(lyra)).split.per_gpu
    assert estimate_per_gpu(lyra.voice, [0, 1]) == {str(gpu): size for gpu, size in planned.items()}
    assert 70 * GB < planned[0] < 80 * GB  # 141 GB of weights over two ranks, 2.1 GB of it whole on each


def test_a_single_rank_is_the_whole_model() -> None:
    lyra = config("llama-3-8b", "tensor")
    estimate = estimate_model(lyra.voice)
    assert rank_bytes(estimate, lyra.voice, architecture_shape("llama-3-8b"), 1) == estimate.total


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_counts_its_all_reduces_own_buffers(world: int) -> None:
    shape = architecture_shape("llama-3-8b")
    shares = {kind: rank_bytes(estimate_model(config("llama-3-8b", "tensor", all_reduce=kind).voice),
                               config("llama-3-8b", "tensor", all_reduce=kind).voice, shape, world)
              for kind in ("nccl", "peer", "auto")}
    peer_words = 2 * world * 256 * 1024 * 8  # two slots per rank of 8-byte words, in every rank's buffer
    assert shares["peer"] - shares["nccl"] == exchange_bytes("peer", world) >= peer_words
    assert shares["auto"] == shares["peer"]  # auto tries the peer all-reduce first


def test_the_removed_symmetric_all_reduce_is_refused_with_what_to_write() -> None:
    with pytest.raises(ConfigError, match='write all_reduce = "peer" or "auto"'):
        parse_config({"router": {}, "specialists": {"pragmatist": {}}, "voice": {
            "backend": "transformers", "path": "x", "parallel": "tensor", "all_reduce": "symmetric"}})


def test_doctor_recommends_tensor_ranks_only_over_a_fast_peer_link() -> None:
    from shared.distributed.p2p import PeerLink, recommend, voice_parallel_check

    assert recommend(PeerLink(0, 1, True, 370.0), "none")[0] == "tensor"
    assert recommend(PeerLink(0, 1, True, 8.0), "none") == (
        "pipeline", "GPUs 0 and 1: only 8 GB/s; tensor ranks would wait on every all-reduce")
    assert recommend(PeerLink(0, 1, False, 40.0), "none")[0] == "pipeline"
    assert recommend(PeerLink(0, 1, True, 370.0), "int4")[0] == "pipeline"
    status, _, detail, _ = voice_parallel_check(config("llama-3-8b", "tensor"), has_cuda=False)
    assert status == "info" and "not measured" in detail
