"""The tensor voice's all-reduce alone: µs per all-reduce of one token's hidden state, replayed from a CUDA graph.

    python bench/all_reduce.py [--out DIR]

Two ranks (one per GPU), bf16 vectors of the Llama-3-8B (4096) and -70B (8192) hidden sizes, 160
all-reduces captured in one graph (what one 70B decode step issues), replayed 20 times. Runs: NCCL as the
voice starts it, NCCL with a few environment settings a user could give supervisord, and PyTorch's
symmetric-memory one-shot all-reduce (the voice's `all_reduce = "symmetric"`). NVLink multicast stays off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COUNT = 160
REPLAYS = 20
SIZES = {"8b": 4096, "70b": 8192}
RUNS = [("nccl", {}), ("nccl", {"NCCL_PROTO": "LL"}), ("nccl", {"NCCL_MAX_NCHANNELS": "2"}),
        ("nccl", {"NCCL_MIN_NCHANNELS": "8"}), ("symmetric", {})]


def rank_main(rank: int, store_path: str, kind: str, env: dict, results) -> None:
    os.environ.update({"NCCL_NVLS_ENABLE": "0", **env})
    import torch
    import torch.distributed as dist

    from shared.backends.rank_runner import join
    from shared.backends.tensor_parallel import make_reduce

    device = torch.device("cuda", rank)
    join(rank, 2, device, dist.FileStore(store_path, 2))
    reduce = make_reduce(kind, device, torch.bfloat16)
    row = {"run": kind, "env": env}
    for name, size in SIZES.items():
        vector = torch.ones(1, size, dtype=torch.bfloat16, device=device)
        for _ in range(3):
            reduce(vector)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(COUNT):
                vector = reduce(vector) * 0.5
        graph.replay()
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPLAYS):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        row[f"{name}_us"] = round(start.elapsed_time(end) * 1000 / (REPLAYS * COUNT), 2)
    if rank == 0:
        results.put(row)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    rows = []
    for kind, env in RUNS:
        results = context.Queue()
        with tempfile.TemporaryDirectory() as folder:
            try:
                mp.start_processes(rank_main, nprocs=2, start_method="spawn",
                                   args=(f"{folder}/store", kind, env, results))
                rows.append(results.get(timeout=30))
            except Exception as exc:  # a run this machine cannot do (no P2P for symmetric memory)
                rows.append({"run": kind, "env": env, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    print("(one 8192-wide bf16 all-reduce includes the scaling kernel the graph adds after it, ~1 us)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "all_reduce.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
