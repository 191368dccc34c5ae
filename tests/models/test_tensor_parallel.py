"""Tensor-parallel ranks on the CPU (gloo, two processes, tiny Llama): the same answers as one process.

Each rank loads its share of the checkpoint through the production loader (`load_voice_rank`); rank 0
decodes through the decode engine and the follower replays its commands. Compared with the whole model
in one process: prefill logits, greedy replies, and a seeded sampled reply.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from shared.distributed.tensor_parallel import Shard, TensorParallelError, split_problems
from shared.models import hf_causal
from shared.wire.messages import ChatTurn, GenerationOptions
from tests.models import tiny

pytestmark = pytest.mark.models

PROMPTS = ["How do I fix a flat tyre?", "Is free will an illusion? Answer in one word."]
SAMPLED = GenerationOptions(temperature=0.9, top_p=0.95, seed=7, max_new_tokens=12)
WORLD = 2


def replies(model: hf_causal.HfCausalModel) -> list[str]:
    """Greedy replies to PROMPTS, then one seeded sampled reply."""
    texts = []
    for options in [*(GenerationOptions() for _ in PROMPTS), SAMPLED]:
        prompt = PROMPTS[len(texts) % len(PROMPTS)]
        texts.append("".join(model.generate([ChatTurn(role="user", content=prompt)], options, threading.Event())))
    return texts


def prefill_logits(model: hf_causal.HfCausalModel) -> torch.Tensor:
    ids = torch.tensor([model._prompt_ids([{"role": "user", "content": PROMPTS[0]}])])
    engine = model.decode_engine(model.tokenizer)
    with torch.inference_mode():
        return engine.ready_runner().prefill({"input_ids": ids}).clone()


def load_rank(rank: int, store_path: str, checkpoint: str) -> tuple:
    import torch.distributed as dist

    from shared.distributed.rank_runner import join
    from shared.distributed.tensor_parallel import load_voice_rank

    group = join(rank, WORLD, torch.device("cpu"), dist.FileStore(store_path, WORLD))
    return group, load_voice_rank(tiny.entry("voice", checkpoint, parallel="tensor", ranks=WORLD), None, group)


def follower(store_path: str, checkpoint: str) -> None:
    """Rank 1, in a process of its own: load its share, then follow rank 0 until told to stop."""
    import torch.distributed as dist

    from shared.distributed.rank_runner import follow

    group, model = load_rank(1, store_path, checkpoint)
    try:
        follow(model.engine.runner, group)
    finally:  # leave the groups before the interpreter exits: gloo may abort in its destructors otherwise
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_checkpoint("llama", tmp_path_factory.mktemp("tp") / "llama", seed=3)


@pytest.fixture(scope="module")
def two_ranks(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """Rank 0 in this process (torch is already imported here), rank 1 in a spawned one."""
    import torch.distributed as dist

    from shared.distributed.rank_runner import STOP

    store = str(tmp_path_factory.mktemp("store") / "rendezvous")
    other = mp.get_context("spawn").Process(target=follower, args=(store, str(checkpoint)), daemon=True)
    other.start()
    try:
        group, model = load_rank(0, store, str(checkpoint))
        yield replies(model), prefill_logits(model), model.engine_kind(), model.placement()
        group.command(STOP)
        other.join(timeout=30)
        assert other.exitcode == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if other.is_alive():
            other.kill()


@pytest.fixture(scope="module")
def one_process(checkpoint: Path) -> hf_causal.HfCausalModel:
    return hf_causal.load(tiny.entry("voice", checkpoint), tiny.cpu_context())


def test_ranks_compute_the_logits_of_the_whole_model(two_ranks: tuple, one_process: hf_causal.HfCausalModel) -> None:
    expected = prefill_logits(one_process)
    torch.testing.assert_close(two_ranks[1], expected, rtol=1e-4, atol=1e-4)


def test_ranks_give_the_same_replies_as_one_process(two_ranks: tuple, one_process: hf_causal.HfCausalModel) -> None:
    expected = replies(one_process)
    assert all(expected), "the tiny model should say something for every prompt"
    assert two_ranks[0] == expected


def test_rank_zero_says_how_it_decodes(two_ranks: tuple) -> None:
    assert two_ranks[2] == "dynamic, tensor x2 (CPU)"
    assert two_ranks[3]["model"] == "cpu (rank 0 of 2)"


def test_shapes_that_do_not_split_evenly_are_refused_with_the_reason() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=96, intermediate_size=200, num_attention_heads=6, num_key_value_heads=3)
    problems = split_problems(config, 4)
    assert any("num_attention_heads = 6" in p for p in problems)
    assert any("num_key_value_heads = 3" in p for p in problems)
    assert split_problems(config, 3) == ["intermediate_size = 200 is not divisible by 3 ranks"]
    assert Shard(1, 4).span(8) == slice(2, 4)
    assert issubclass(TensorParallelError, Exception)


def test_random_weights_need_no_weight_files_and_are_the_seeded_model(tmp_path: Path) -> None:
    """A folder with config.json and a tokenizer only: the rank is made with the benchmark's seeded weights."""
    from transformers import LlamaConfig

    from shared.distributed.tensor_parallel import build_rank_model, load_rank, random_rank_weights

    config = LlamaConfig(**tiny.common_settings(tiny.build_tokenizer()))
    config.save_pretrained(tmp_path)
    shard = Shard(1, WORLD)
    with pytest.raises(TensorParallelError, match="no safetensors"):
        load_rank(tmp_path, torch.float32, "sdpa", shard, torch.device("cpu"), lambda t: t)
    made = load_rank(tmp_path, torch.float32, "sdpa", shard, torch.device("cpu"), lambda t: t, random=True)
    expected = build_rank_model(config, torch.float32, "sdpa", shard, torch.device("cpu"), lambda t: t)
    random_rank_weights(expected, shard)
    for (name, param), (_, want) in zip(made.named_parameters(), expected.named_parameters(), strict=True):
        assert torch.equal(param, want), name
    assert made.model.layers[0].self_attn.q_proj.weight.shape[0] == config.hidden_size // WORLD


def test_random_weights_are_refused_outside_tensor_parallel_voices() -> None:
    with pytest.raises(ValueError, match="random_weights = true is for tensor-parallel voices"):
        tiny.entry("voice", "/nowhere", random_weights=True)
    with pytest.raises(ValueError, match="random_weights = true is for tensor-parallel voices"):
        tiny.entry("voice", "/nowhere", random_weights=True, backend="openai",
                   remote={"base_url": "http://127.0.0.1:9/v1", "model": "m"})
    assert tiny.entry("voice", "/nowhere", random_weights=True, parallel="tensor").random_weights


def test_random_weights_are_for_the_voice_only() -> None:
    from shared.config.schema import ConfigError, parse_config

    random = {"backend": "transformers", "path": "/nowhere", "parallel": "tensor", "random_weights": True}
    assert parse_config({"router": {}, "specialists": {"pragmatist": {}}, "voice": random}).voice.random_weights
    for config in ({"router": random, "specialists": {"pragmatist": {}}, "voice": {}},
                   {"router": {}, "specialists": {"pragmatist": random}, "voice": {}}):
        with pytest.raises(ConfigError, match="for the voice only"):
            parse_config(config)


def test_the_lm_head_is_split_by_vocabulary_rows_and_gathered_whole() -> None:
    """An uneven vocabulary (421 over 2 ranks: 211 + 210 rows); a tied head stays whole."""
    from transformers import LlamaConfig

    from shared.distributed.tensor_parallel import build_rank_model, gather_logits, random_rank_weights, splits_head

    config = LlamaConfig(**{**tiny.common_settings(tiny.build_tokenizer()), "vocab_size": 421})
    whole = build_rank_model(config, torch.float32, "sdpa", Shard(0, 1), torch.device("cpu"), lambda t: t)
    random_rank_weights(whole, Shard(0, 1))
    hidden = torch.randn(1, 3, config.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = whole.lm_head(hidden)
    parts = []
    for rank in range(WORLD):
        shard = Shard(rank, WORLD)
        model = build_rank_model(config, torch.float32, "sdpa", shard, torch.device("cpu"), lambda t: t)
        random_rank_weights(model, shard)
        span = shard.vocab_span(421)
        assert torch.equal(model.lm_head.weight, whole.lm_head.weight[span])
        parts.append(gather_logits(hidden @ model.lm_head.weight.t(), span, 421, lambda t: t))
    assert [Shard(rank, WORLD).vocab_span(421) for rank in range(WORLD)] == [slice(0, 211), slice(211, 421)]
    torch.testing.assert_close(parts[0] + parts[1], expected)
    assert splits_head(config) and not splits_head(LlamaConfig(tie_word_embeddings=True))


def test_a_reply_whose_all_reduce_gave_up_on_a_rank_is_an_error(one_process: hf_causal.HfCausalModel) -> None:
    """The peer all-reduce counts waits that gave up; the reply they spoiled fails with what to do."""
    from shared.distributed.rank_runner import RankGroup
    from shared.distributed.tensor_parallel import RankModel

    class CountingReduce:
        given_up = 0

        def failures(self) -> int:
            return self.given_up

    rank = RankModel(one_process.entry, one_process.model, one_process.tokenizer, [],
                     RankGroup(1, WORLD, torch.device("cpu"), None))
    rank.reduce = CountingReduce()
    turn = [ChatTurn(role="user", content=PROMPTS[0])]
    options = GenerationOptions(max_new_tokens=3)
    assert "".join(rank.generate(turn, options, threading.Event()))
    rank.reduce.given_up = 2
    with pytest.raises(TensorParallelError, match="2 peer all-reduce wait"):
        "".join(rank.generate(turn, options, threading.Event()))
    assert "".join(rank.generate(turn, options, threading.Event()))  # counted once: the next reply is served
