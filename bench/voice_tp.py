"""The voice on two GPUs: one GPU vs pipeline placement vs tensor ranks, ms/token beside the HBM floor.

    python bench/voice_tp.py --out DIR [--shapes 8b,70b] [--tokens 128] [--max-context 4096] [--engine compiled]
    python bench/voice_tp.py --out DIR --shapes tiny --device cpu      # a smoke run of the same code (gloo)

Random weights of the real shape (Llama-3-8B, Llama-3-70B; bf16 on GPUs) are made directly on each device,
no checkpoint: 70B is 141 GB, more than the GPU machine's disk. Every tensor is drawn whole from a generator
seeded by its name and each rank keeps its slice, so all placements hold the same model and their greedy
tokens can be compared. Each run decodes through the production engine (`shared.engine.decode`):
- one GPU: static cache, step replayed from a CUDA graph (8B only: 70B does not fit one GPU);
- pipeline: layers 0..n/2-1 and the embeddings on GPU 0, the rest and the head on GPU 1 (what
  `device_map = "auto"` does); the engine runs its static cache eagerly (one graph cannot span devices);
- tensor: two processes, NCCL, each holding half of every layer; the step, all-reduces included, is
  replayed from a CUDA graph; once with each all-reduce: NCCL, and Lyra's one-shot over peer memory
  (`shared.distributed.peer_reduce`) where CUDA P2P works.
ms/token = (time for N+1 tokens - time for 1) / N, median of 3 runs each. HBM floors: the bytes one GPU
reads per token over its bandwidth (tensor: its rank's share, head and embeddings included), and the
ideal split (all weights / (2 x bandwidth)). Targets: tensor >= 1.6x one GPU (8B); 70B tensor <= 1.3x
the ideal floor (<= 19 ms on 2 x H200).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REPEATS = 3
WHOLE_HEAD_ENV = "LYRA_BENCH_WHOLE_HEAD"  # set: tensor ranks keep the LM head whole (to compare with the split)
ENGINE_ENV = "LYRA_BENCH_ENGINE"
PROFILE_ENV = "LYRA_BENCH_PROFILE"
SEED = 1234
BANDWIDTH_TB_S = {"H200": 4.8, "H100": 3.35, "A100": 2.0, "A6000": 0.768}
SHAPES = {"8b": "llama-3-8b", "70b": "llama-3-70b", "tiny": "tiny"}
AGREE = 32  # greedy tokens compared between placements


def model_config(shape: str) -> Any:
    """The transformers config of a shape name."""
    if shape == "tiny":
        from transformers import LlamaConfig

        from tests.models import tiny

        return LlamaConfig(**tiny.common_settings(tiny.build_tokenizer()))
    from shared.planning.architectures import build_config, get_architecture

    return build_config(get_architecture(SHAPES[shape]).components[0])


def engine_for(model: Any, max_context: int, wrap: Any = None) -> Any:
    from shared.engine.decode import DecodeEngine

    kind = os.environ.get(ENGINE_ENV, "graphs")  # an environment variable: the spawned ranks read it too
    engine = DecodeEngine(model, SimpleNamespace(eos_token_id=None), "voice", kind, max_context, wrap=wrap)
    engine.eos = set()  # random weights: never stop early, every run makes the same number of tokens
    return engine


def products(engine: Any) -> str:
    """How the fused step multiplies: each product's tuned tiling (or cuBLAS), or inductor's products (ranks)."""
    from shared.engine.fused_step import tiling_name
    from shared.kernels import overlap

    step = getattr(engine, "fused", None)
    if step is None or not step.products:
        return "inductor"
    launch = "dependent launch" if overlap.enabled(step.embed.device) else "stream order"
    return ", ".join(f"{name} {tiling_name(tile)}" for name, tile in step.tiles.items()) + f"; {launch}"


def decode(engine: Any, prompt: Any, count: int) -> list[int]:
    import torch

    from shared.engine.decode import Sampling

    with torch.inference_mode():
        batches = engine.token_batches(engine.ready_runner(), {"input_ids": prompt}, Sampling(count), threading.Event())
        return [token for batch in batches for token in batch]


def ms_per_token(engine: Any, prompt: Any, tokens: int) -> float:
    """(t(tokens + 1) - t(1)) / tokens in ms, medians of REPEATS; the engine reads its tokens to the host."""
    def seconds(count: int) -> float:
        started = time.perf_counter()
        decode(engine, prompt, count)
        return time.perf_counter() - started

    seconds(tokens + 1)
    long = statistics.median(seconds(tokens + 1) for _ in range(REPEATS))
    short = statistics.median(seconds(1) for _ in range(REPEATS))
    return round((long - short) / tokens * 1000, 3)


def profile(engine: Any, prompt: Any, name: str) -> None:
    """With LYRA_BENCH_PROFILE=DIR: the GPU kernels of 16 decode steps, heaviest first, into DIR/<name>.txt."""
    folder = os.environ.get(PROFILE_ENV)
    if not folder:
        return
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    decode(engine, prompt, 4)
    with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        decode(engine, prompt, 17)
    table = trace.key_averages().table(sort_by="device_time_total", row_limit=40, max_name_column_width=90)
    count = sum(event.count for event in trace.key_averages() if event.device_type.name == "CUDA")
    Path(folder, f"{name.replace(' ', '_')}.txt").write_text(f"{count} device events in 16 steps\n{table}\n")


def prompt_ids(device: Any, vocab: int) -> Any:
    import torch

    return torch.arange(7, 7 + 24, device=device).remainder(vocab).view(1, -1)


def dtype_of(device: str, precision: str = "") -> Any:
    import torch

    return getattr(torch, precision) if precision else torch.bfloat16 if device == "cuda" else torch.float32


def weight_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def streamed_bytes(model: Any) -> int:
    """What one token reads: every weight except the input embeddings (one row of them)."""
    return weight_bytes(model) - weight_bytes(model.get_input_embeddings())


# ----------------------------------------------------------------------------- one GPU and pipeline


def one_device(shape: str, device: str, tokens: int, max_context: int, precision: str = "", share: int = 1) -> dict:
    """The whole model on one device; with `share` 2, rank 0's share of two alone, its sums left out.

    A share alone is what one tensor rank computes without its exchanges (the peer's part is never added,
    so its tokens mean nothing): the tensor step minus it is what the exchanges cost. It needs one GPU.
    """
    import torch

    from shared.distributed.tensor_parallel import Shard, build_rank_model, random_rank_weights

    place = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    model = build_rank_model(model_config(shape), dtype_of(device, precision), "sdpa", Shard(0, share), place,
                             lambda t: t, split_head=not os.environ.get(WHOLE_HEAD_ENV))
    random_rank_weights(model, Shard(0, share), SEED)
    engine = engine_for(model, max_context)
    prompt = prompt_ids(place, model.config.vocab_size)
    run = "one device" if share == 1 else f"rank alone (1/{share}, no exchange)"
    row = {"run": run, "engine": engine.describe(), "ms_per_token": ms_per_token(engine, prompt, tokens),
           "read_gb": streamed_bytes(model) / 1e9, "tokens": decode(engine, prompt, AGREE)}
    row["engine"] = engine.describe()
    row["products"] = products(engine)
    profile(engine, prompt, f"{shape}_one_{os.environ.get(ENGINE_ENV)}")
    del engine, model
    return row


def pipeline(shape: str, tokens: int, max_context: int) -> dict:
    """Layers split in two halves over cuda:0 and cuda:1, inputs moved at the boundary."""
    import torch
    from transformers import AutoModelForCausalLM

    from shared.distributed.tensor_parallel import Shard, _restore_buffers, random_rank_weights

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape), dtype=torch.bfloat16, attn_implementation="sdpa")
    layers = model.model.layers
    half = len(layers) // 2
    first, second = torch.device("cuda", 0), torch.device("cuda", 1)
    for module in [model.model.embed_tokens, model.model.rotary_emb, *layers[:half]]:
        module.to_empty(device=first)
    for module in [*layers[half:], model.model.norm, model.lm_head]:
        module.to_empty(device=second)
    _restore_buffers(model.model.rotary_emb, first)
    for layer in layers[half:]:  # the model hands every layer its cos/sin and mask from GPU 0, as accelerate's hooks
        layer.register_forward_pre_hook(lambda _m, args, kwargs: _moved(args, kwargs, second), with_kwargs=True)
    random_rank_weights(model, Shard(0, 1), SEED)
    model.eval()
    engine = engine_for(model, max_context)
    prompt = prompt_ids(first, model.config.vocab_size)
    row = {"run": "pipeline x2", "ms_per_token": ms_per_token(engine, prompt, tokens),
           "read_gb": streamed_bytes(model) / 1e9, "tokens": decode(engine, prompt, AGREE),
           "engine": engine.describe()}
    del engine, model
    torch.cuda.empty_cache()
    return row


def _moved(args: tuple, kwargs: dict, device: Any) -> tuple[tuple, dict]:
    import torch

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, tuple):
            return tuple(move(item) for item in value)
        return value

    return move(args), {name: move(value) for name, value in kwargs.items()}


# ----------------------------------------------------------------------------- tensor ranks


def tensor_rank(rank: int, world: int, store_path: str, shape: str, device: str, all_reduce: str, tokens: int,
                max_context: int, precision: str, results: Any) -> None:
    """One rank: its share with random weights; rank 0 times the decode, the other follows."""
    import torch
    import torch.distributed as dist

    from shared.distributed.rank_runner import STOP, LeadRunner, follow, join
    from shared.distributed.tensor_parallel import Shard, build_rank_model, make_reduce, random_rank_weights

    place = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    group = join(rank, world, place, dist.FileStore(store_path, world))
    shard, dtype = Shard(rank, world), dtype_of(device, precision)
    try:
        reduce = make_reduce(all_reduce, place)
    except Exception as exc:  # the peer all-reduce needs P2P-capable GPUs and a recent PyTorch
        if rank == 0:
            results.put({"run": f"tensor x{world} ({all_reduce})", "error": f"{type(exc).__name__}: {exc}"[:300]})
        return
    model = build_rank_model(model_config(shape), dtype, "sdpa", shard, place, reduce,
                             split_head=not os.environ.get(WHOLE_HEAD_ENV))
    random_rank_weights(model, shard, SEED)
    engine = engine_for(model, max_context, wrap=(lambda runner: LeadRunner(runner, group)) if rank == 0 else None)
    started = time.perf_counter()
    with torch.inference_mode():
        engine.ready_runner()  # every rank captures its graph together
    prepared = round(time.perf_counter() - started, 1)
    if rank != 0:
        follow(engine.runner, group)
        results.put(rank_memory(rank, place))
        return
    prompt = prompt_ids(place, model.config.vocab_size)
    row = {"run": f"tensor x{world} ({all_reduce})", "engine": engine.describe(), "prepare_s": prepared,
           "ms_per_token": ms_per_token(engine, prompt, tokens), "read_gb": streamed_bytes(model) / 1e9,
           "tokens": decode(engine, prompt, AGREE), "products": products(engine)}
    profile(engine, prompt, f"{shape}_tensor_{all_reduce}_{os.environ.get(ENGINE_ENV)}")
    group.command(STOP)
    results.put({**row, **rank_memory(0, place)})


def rank_memory(rank: int, place: Any) -> dict:
    """What a rank holds on its GPU after decoding (torch's allocator: allocated and reserved, GB)."""
    import torch

    if place.type != "cuda":
        return {"rank": rank}
    return {"rank": rank, "allocated_gb": torch.cuda.memory_allocated(place) / 1e9,
            "reserved_gb": torch.cuda.memory_reserved(place) / 1e9}


def tensor(shape: str, device: str, all_reduce: str, tokens: int, max_context: int, precision: str = "",
           world: int = 2) -> dict:
    """Rank 0's row, with every rank's memory under "ranks"."""
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").Queue()
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(tensor_rank, nprocs=world, start_method="spawn", args=(
            world, f"{folder}/store", shape, device, all_reduce, tokens, max_context, precision, results))
    reported = []
    while True:
        try:
            reported.append(results.get(timeout=5))
        except queue.Empty:
            break
    row = next(r for r in reported if "run" in r)
    memory = ("rank", "allocated_gb", "reserved_gb")  # rank 0's row carries its own memory too: copy, never nest
    row["ranks"] = sorted(({k: r[k] for k in memory if k in r} for r in reported if "rank" in r),
                          key=lambda r: r["rank"])
    return row


# ----------------------------------------------------------------------------- the table


def bandwidth(device: str) -> float:
    if device != "cuda":
        return 0.0
    import torch

    name = torch.cuda.get_device_name(0)
    return next((tb for key, tb in BANDWIDTH_TB_S.items() if key in name), 3.35) * 1e12


def run_shape(shape: str, device: str, tokens: int, max_context: int, runs: set[str]) -> list[dict]:
    rows = []
    if shape != "70b" and "one" in runs:
        rows.append(one_device(shape, device, tokens, max_context))
    if "alone" in runs:
        rows.append(one_device(shape, device, tokens, max_context, share=2))
    if device == "cuda" and "pipeline" in runs:
        rows.append(pipeline(shape, tokens, max_context))
    kinds = ("nccl", "peer")
    reductions = [kind for kind in kinds if kind in runs and (device == "cuda" or kind == "nccl")]
    rows += [tensor(shape, device, kind, tokens, max_context) for kind in reductions]
    whole = next((r["read_gb"] for r in rows if r["run"] == "pipeline x2" and "read_gb" in r),
                 rows[0].get("read_gb", 0.0))
    per_second = bandwidth(device)
    reference = rows[0]["tokens"] if rows else []
    for row in rows:
        row["shape"] = shape
        if "ms_per_token" not in row:
            continue
        if per_second:
            row["floor_ms"] = round(row["read_gb"] * 1e9 / per_second * 1000, 2)
            row["ideal_split_floor_ms"] = round(whole * 1e9 / (2 * per_second) * 1000, 2)
        row["agrees_with_first_run_tokens"] = next(
            (i for i, (a, b) in enumerate(zip(row["tokens"], reference, strict=False)) if a != b), len(reference))
        one = next((r for r in rows if r["run"] == "one device"), None)
        if one is not None:
            row["speedup_vs_one"] = round(one["ms_per_token"] / row["ms_per_token"], 2)
        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'shape':<6}{'run':<32}{'engine':<34}{'ms/token':>9}{'floor':>8}{'ideal':>8}{'vs one':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<6}{r['run']:<32}{'unavailable: ' + r['error'][:60]}")
            continue
        print(f"{r['shape']:<6}{r['run']:<32}{r['engine'][:33]:<34}{r['ms_per_token']:>9.2f}"
              f"{r.get('floor_ms', 0):>8.2f}{r.get('ideal_split_floor_ms', 0):>8.2f}{r.get('speedup_vs_one', 0):>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="8b,70b")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--runs", default="one,pipeline,nccl,peer",
                        help="which placements to time (also: alone, rank 0's share of two without its exchanges, "
                             "on one GPU)")
    parser.add_argument("--engine", default="graphs", choices=["graphs", "compiled", "fused", "eager"],
                        help="the decode engine of every run (compiled: torch.compile before graph capture)")
    parser.add_argument("--profile", action="store_true", help="write each run's heaviest GPU kernels under --out")
    parser.add_argument("--whole-head", action="store_true", help="tensor ranks keep the LM head whole on each rank")
    parser.add_argument("--no-overlap", action="store_true",
                        help="Lyra's kernels without programmatic dependent launch (shared/kernels/overlap.py)")
    args = parser.parse_args()
    if args.no_overlap:
        from shared.kernels import overlap

        os.environ[overlap.ENV] = "0"  # the spawned ranks read it too
    if args.whole_head:
        os.environ[WHOLE_HEAD_ENV] = "1"
    os.environ[ENGINE_ENV] = args.engine
    if args.profile:
        args.out.mkdir(parents=True, exist_ok=True)
        os.environ[PROFILE_ENV] = str(args.out)
    rows = []
    for shape in args.shapes.split(","):
        context = min(args.max_context, 256) if shape == "tiny" else args.max_context
        rows += run_shape(shape, args.device, args.tokens, context, set(args.runs.split(",")))
        for row in rows:
            row.setdefault("shape", shape)
    print_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "voice_tp.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
