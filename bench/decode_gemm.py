"""How fast a decode token's matrix products read their weights: one row times each Llama weight shape.

    python bench/decode_gemm.py --out DIR

For every weight shape of the Llama-3-8B and -70B decoder (whole, and each rank's half under tensor
parallelism), times three ways of computing [1, K] x [K, N] in bf16 and prints the bandwidth each reaches:
`linear` (what transformers and the fused step call), `weight-left` ([N, K] @ [K, 1]: cuBLAS sees the
weight as the tall operand) and `autotuned` (torch.compile's max-autotune, which benchmarks Triton
templates against cuBLAS). The decode engines pick their formulation from these numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SHAPES = {  # name: (K, N) of the whole model's layer
    "8b qkv": (4096, 6144), "8b o": (4096, 4096), "8b gate_up": (4096, 28672), "8b down": (14336, 4096),
    "70b qkv": (8192, 10240), "70b o": (8192, 8192), "70b gate_up": (8192, 57344), "70b down": (28672, 8192),
}


AUTOTUNED = ("8b gate_up", "70b gate_up", "70b down")


def seconds(fn, *args, repeats: int = 200) -> float:
    for _ in range(10):
        fn(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(repeats // 20):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ways = {
        "linear": lambda x, w: torch.nn.functional.linear(x, w),
        "weight-left": lambda x, w: (w @ x.t()).t(),
        "autotuned": torch.compile(lambda x, w: torch.nn.functional.linear(x, w), mode="max-autotune-no-cudagraphs",
                                   dynamic=False),
    }
    rows = []
    for name, (k, n) in SHAPES.items():
        for split, (kk, nn) in {"whole": (k, n), "rank of 2": (k // 2, n) if "down" in name or " o" in name
                                else (k, n // 2)}.items():
            weight = torch.randn(nn, kk, dtype=torch.bfloat16, device="cuda") * 0.02
            x = torch.randn(1, kk, dtype=torch.bfloat16, device="cuda")
            row = {"shape": name, "split": split, "mb": weight.numel() * 2 / 1e6}
            for way, fn in ways.items():
                if way == "autotuned" and name not in AUTOTUNED:  # each shape takes its own tuning run
                    continue
                took = seconds(fn, x, weight)
                row[way] = {"us": round(took * 1e6, 2), "tb_s": round(weight.numel() * 2 / took / 1e12, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_gemm.json").write_text(json.dumps({"device": torch.cuda.get_device_name(0),
                                                           "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
