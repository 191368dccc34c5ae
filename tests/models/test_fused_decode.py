"""The fused decode step computes what transformers' own step does, alone and as two tensor-parallel ranks.

Run eagerly on the CPU (the engine captures and compiles it only on a GPU): greedy tokens and logits over
a static cache after a real prefill, for Llama and Qwen2 (q/k/v biases) tiny shapes, and across two gloo
ranks whose all-reduces the step issues itself.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

from shared.distributed.tensor_parallel import Shard, build_rank_model, nccl_reduce, random_rank_weights
from shared.engine.decode import DecodeEngine, StaticRunner
from shared.engine.fused_step import FusedStep, problems
from tests.models import tiny

pytestmark = pytest.mark.models

CONTEXT = 64
PROMPT = list(range(3, 14))
STEPS = 12
SEED = 5


def config_of(kind: type) -> object:
    return kind(**tiny.common_settings(tiny.build_tokenizer()))


def rank_model(kind: type, shard: Shard, reduce: object = None) -> torch.nn.Module:
    model = build_rank_model(config_of(kind), torch.float32, "sdpa", shard, torch.device("cpu"),
                             reduce or (lambda t: t))
    random_rank_weights(model, shard, SEED, std=0.2)  # large enough that greedy tokens differ step to step
    return model


def greedy(model: torch.nn.Module, step: object = None, steps: int = STEPS) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens after a prefill of PROMPT, and the last step's logits."""
    with torch.inference_mode():
        runner = StaticRunner(model, CONTEXT, graphs=False, step_function=step)
        logits = runner.prefill({"input_ids": torch.tensor([PROMPT])})
        tokens = []
        for _ in range(steps):
            token = logits.argmax(-1)
            tokens.append(int(token))
            logits = runner.step(token)
        return tokens, logits.clone()


def test_on_the_cpu_the_step_runs_torchs_operations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Triton's interpreter the CPU never runs Lyra's kernels, whatever the kernel tests left behind."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with torch.inference_mode():
        step = FusedStep(rank_model(LlamaConfig, Shard(0, 1)), CONTEXT)
    assert not step.kernel and not step.products


@pytest.mark.parametrize("kind", [LlamaConfig, Qwen2Config])
def test_fused_step_equals_the_models_own_step(kind: type) -> None:
    model = rank_model(kind, Shard(0, 1))
    expected_tokens, expected_logits = greedy(model)
    with torch.inference_mode():
        step = FusedStep(model, CONTEXT)
    tokens, logits = greedy(model, step)
    assert tokens == expected_tokens and len(set(tokens)) > 2
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


def test_projections_are_laid_side_by_side_in_place() -> None:
    model = rank_model(LlamaConfig, Shard(0, 1))
    before = sum(p.numel() for p in model.parameters())
    attention = model.model.layers[0].self_attn
    with torch.inference_mode():
        first = FusedStep(model, CONTEXT).layers[0].qkv
        again = FusedStep(model, CONTEXT).layers[0].qkv  # a second build finds them stacked and copies nothing
    assert first.data_ptr() == again.data_ptr() == attention.q_proj.weight.data_ptr()
    assert attention.k_proj.weight.data_ptr() == first[attention.q_proj.weight.shape[0]:].data_ptr()
    assert sum(p.numel() for p in model.parameters()) == before


@pytest.mark.parametrize("kind,reason", [(Qwen3Config, "qwen3"), (Gemma3TextConfig, "gemma3_text")])
def test_other_architectures_are_named_and_keep_the_general_step(kind: type, reason: str) -> None:
    config = config_of(kind)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    assert any(reason in problem for problem in problems(model))
    engine = DecodeEngine(model, tiny.build_tokenizer(), "voice", "fused", CONTEXT)
    with pytest.raises(ValueError, match=reason):
        engine.fused_step()


def test_quantized_projections_are_named_and_left_as_they_are() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config_of(LlamaConfig))
    attention = model.model.layers[0].self_attn
    packed = torch.zeros(attention.q_proj.weight.numel() // 2, 1, dtype=torch.uint8)  # as bitsandbytes packs 4 bits
    attention.q_proj.weight = torch.nn.Parameter(packed, requires_grad=False)
    assert any("quantized projections (torch.uint8" in problem for problem in problems(model))
    engine = DecodeEngine(model, tiny.build_tokenizer(), "voice", "fused", CONTEXT)
    with pytest.raises(ValueError, match="quantized"):
        engine.fused_step()
    assert attention.q_proj.weight.data_ptr() == packed.data_ptr()  # never stacked with k and v
    attention.q_proj.weight = torch.nn.Parameter(torch.zeros(attention.o_proj.weight.shape, dtype=torch.float8_e4m3fn),
                                                 requires_grad=False)  # float, but scaled beside the weight
    assert any("float8_e4m3fn" in problem for problem in problems(model))


def test_the_step_is_compiled_only_where_it_does_not_run_on_lyras_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    engine = DecodeEngine(AutoModelForCausalLM.from_config(config_of(LlamaConfig)), tiny.build_tokenizer(), "voice",
                          "fused", CONTEXT)
    on_kernels = [False]
    bind = FusedStep.bind

    def bind_as(step: FusedStep, model: object, copy: bool = False) -> None:
        bind(step, model, copy)
        step.products = on_kernels[0]  # as on a GPU with the kernels, or after a swap laid q/k/v apart

    monkeypatch.setattr(FusedStep, "bind", bind_as)
    compiled = engine.fused_step()
    assert compiled is engine.compiled and compiled != engine.fused.__call__
    on_kernels[0] = True
    assert engine.fused_step() == engine.fused.__call__  # kernel launches: nothing for inductor to fuse
    on_kernels[0] = False
    assert engine.fused_step() is compiled  # compiled once, whenever the kernels are off


def test_mlp_biases_are_named() -> None:
    from transformers import AutoModelForCausalLM

    config = config_of(LlamaConfig)
    config.mlp_bias = True
    assert any("MLP biases" in problem for problem in problems(AutoModelForCausalLM.from_config(config)))


def rank_tokens(rank: int, store: str, results: object) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    try:
        model = rank_model(LlamaConfig, Shard(rank, 2), nccl_reduce())
        with torch.inference_mode():
            step = FusedStep(model, CONTEXT)
        tokens, logits = greedy(model, step)
        results.put((rank, tokens, logits.tolist()))  # plain lists: the process ends
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_the_fused_step_decode_as_one_process() -> None:
    expected_tokens, expected_logits = greedy(rank_model(LlamaConfig, Shard(0, 1)))
    results = mp.get_context("spawn").Queue()
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(rank_tokens, nprocs=2, start_method="spawn", args=(f"{folder}/store", results))
    reported = sorted((results.get(timeout=30) for _ in range(2)), key=lambda item: item[0])
    for _rank, tokens, logits in reported:
        assert tokens == expected_tokens
        torch.testing.assert_close(torch.tensor(logits), expected_logits, rtol=1e-4, atol=1e-4)


def test_the_step_follows_the_weights_through_the_host_cache() -> None:
    from services.specialist_host.weight_cache import HostWeightCache

    model = rank_model(LlamaConfig, Shard(0, 1))
    expected = greedy(model)[0]
    with torch.inference_mode():  # as the engine builds it: the first build stacks the projections
        step = FusedStep(model, CONTEXT)
    copy, _ = HostWeightCache(1 << 30).admit("voice", {"model": model})
    assert copy is not None
    for _ in range(2):
        copy.to_host()
        step.unbind()
        copy.to_device(torch.device("cpu"))
        with torch.inference_mode():
            step.bind(model)
        assert greedy(model, step)[0] == expected
