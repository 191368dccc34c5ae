"""The tensor ranks' all-reduces alone: µs per call inside a CUDA graph, and whether each equals NCCL's sum.

    python bench/all_reduce.py --out DIR [--kinds nccl,peer] [--sizes 4096,8192,16384,65536]

A decode step of a tensor-parallel voice makes two all-reduces per layer of one token's hidden vector
(Llama-3-8B: 4096 values, 70B: 8192), one after another, each waiting for the matrix product before it.
This replays `--calls` of them chained (each call's output is the next one's input) from one CUDA graph
on each of two GPUs, so launch and synchronisation costs count as they do in the step. Every kind runs
in processes of its own. Run it under `timeout`: a broken exchange could wait for a peer that never
comes (the peer kernel gives up after some seconds; NCCL would wait longer).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REPLAYS = 20


def rank_main(rank: int, world: int, store_path: str, kind: str, sizes: list[int], calls: int, results: Any) -> None:
    import torch
    import torch.distributed as dist

    from shared.distributed.rank_runner import join
    from shared.distributed.tensor_parallel import make_reduce

    place = torch.device("cuda", rank)
    torch.cuda.set_device(place)
    join(rank, world, place, dist.FileStore(store_path, world))
    try:
        reduce = make_reduce(kind, place)
    except Exception as exc:  # the peer all-reduce needs P2P and a recent PyTorch
        if rank == 0:
            results.put({"kind": kind, "error": f"{type(exc).__name__}: {exc}"[:300]})
        return
    for size in sizes:
        generator = torch.Generator(device=place).manual_seed(rank * 1000 + size)
        part = torch.randn(size, device=place, generator=generator).to(torch.bfloat16)
        summed = part.clone()
        dist.all_reduce(summed)
        equal = bool(torch.equal(reduce(part.clone()), summed))
        start = torch.full((size,), 2.0 ** -100, device=place, dtype=torch.bfloat16)  # doubles each call
        stream = torch.cuda.Stream(place)
        stream.wait_stream(torch.cuda.current_stream(place))
        with torch.cuda.stream(stream):
            chained = start.clone()
            for _ in range(3):  # warm-up outside the graph (NCCL and Triton set themselves up)
                chained = reduce(chained)
        torch.cuda.current_stream(place).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chained = start
            for _ in range(calls):
                chained = reduce(chained)
        graph.replay()
        torch.cuda.synchronize(place)
        dist.barrier()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(REPLAYS):
            graph.replay()
        end.record()
        torch.cuda.synchronize(place)
        row = {"kind": kind, "elements": size, "bytes": size * 2, "equal_to_nccl": equal,
               "us_per_call": round(begin.elapsed_time(end) * 1000 / (REPLAYS * calls), 2)}
        if hasattr(reduce, "failures"):
            row["peer_waits_given_up"] = reduce.failures()
        if rank == 0:
            results.put(row)
            print(json.dumps(row), flush=True)
        del graph
    dist.barrier()
    dist.destroy_process_group()


def run_kind(kind: str, sizes: list[int], calls: int) -> list[dict]:
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").Queue()
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(rank_main, nprocs=2, start_method="spawn",
                           args=(2, f"{folder}/store", kind, sizes, calls, results))
    rows = []
    while True:
        try:
            rows.append(results.get(timeout=5))
        except queue.Empty:
            return rows


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kinds", default="nccl,peer")
    parser.add_argument("--sizes", default="4096,8192,16384,65536")
    parser.add_argument("--calls", type=int, default=64)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    rows = [row for kind in args.kinds.split(",") for row in run_kind(kind, sizes, args.calls)]
    machine = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "all_reduce.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"\n{'kind':<11}{'elements':>9}{'µs/call':>9}  equal to NCCL")
    for row in rows:
        if "error" in row:
            print(f"{row['kind']:<11}unavailable: {row['error'][:80]}")
            continue
        print(f"{row['kind']:<11}{row['elements']:>9}{row['us_per_call']:>9.2f}  {row['equal_to_nccl']}")


if __name__ == "__main__":
    main()
