"""How fast `shared.kernels.gemv` reads each Llama weight shape, against cuBLAS, and which tiling is best.

    python bench/decode_gemv.py --out DIR [--quick]

For the weight shapes of the Llama-3-8B and -70B decoders (whole, and one rank's share of two), times
[1, K] x [K, N] in bf16 through cuBLAS (`linear`) and through the kernel with every tiling of a small
grid, and prints µs and TB/s. Each timing cycles through enough copies of the weight to overflow L2 (a
decode step reads every weight once, from HBM) and replays the calls from a CUDA graph, as the step does.
The best tilings, printed at the end, chose `gemv.TILING`. `--quick` times only the default
tiling, the gated gate/up product (SiLU on the way out) and the one-program residual sum and norm.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.kernels import gemv  # noqa: E402

SHAPES = {  # name: (N, K) of a weight as nn.Linear stores it
    "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (28672, 4096), "8b down": (4096, 14336),
    "8b head": (128256, 4096),
    "8b/2 qkv": (3072, 4096), "8b/2 o": (4096, 2048), "8b/2 gate_up": (14336, 4096), "8b/2 down": (4096, 7168),
    "8b/2 head": (64128, 4096),
    "70b/2 qkv": (5120, 8192), "70b/2 o": (8192, 4096), "70b/2 gate_up": (28672, 8192), "70b/2 down": (8192, 14336),
}
GRID = {"rows": (1, 2, 4, 8, 16), "columns": (256, 512, 1024), "warps": (2, 4, 8), "stages": (1, 3)}
COLD_BYTES = 400e6  # weight copies cycled per timing: more than the L2 cache many times over


def seconds(calls: list, repeats: int = 5) -> float:
    """Seconds per call of `calls`, replayed from a CUDA graph (median of `repeats` replays)."""
    for call in calls[:3]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / len(calls))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="the default tiling and the prologues only")
    args = parser.parse_args()
    device = torch.device("cuda")
    if not gemv.prepare(device, torch.bfloat16):
        raise SystemExit(f"the kernel failed its trial: {gemv.trial(device, torch.bfloat16)}")
    tiles = [gemv.Tiling(*values) for values in itertools.product(*GRID.values())] if not args.quick else []
    rows, best = [], {}
    for name, (n, k) in SHAPES.items():
        row = measure(name, n, k, tiles, device)
        if "best" in row:
            best[name] = row["best"][0]
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": _triton(), "rows": rows,
              "best": best}
    (args.out / "decode_gemv.json").write_text(json.dumps(result, indent=2))
    for name, pick in best.items():
        print(f"{name:14s} best {pick['us']:8.2f} us {pick['tb_s']:5.2f} TB/s {pick['tile']}")


def measure(name: str, n: int, k: int, tiles: list, device: torch.device) -> dict:
    """One weight shape: cuBLAS, the default tiling with and without prologues, and every tiling in `tiles`."""
    size = n * k * 2
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02
               for _ in range(max(2, int(COLD_BYTES // size)))]
    x, addend = (torch.randn(1, k, dtype=torch.bfloat16, device=device) for _ in range(2))
    gain = torch.ones(k, dtype=torch.bfloat16, device=device)

    def rate(call: Callable[[torch.Tensor], object]) -> dict:
        took = seconds([functools.partial(call, weight) for weight in weights])
        return {"us": round(took * 1e6, 2), "tb_s": round(size / took / 1e12, 2)}

    default = gemv.TILING
    row: dict = {"shape": name, "n": n, "k": k, "mb": round(size / 1e6, 1),
                 "linear": rate(lambda w: torch.nn.functional.linear(x, w)),
                 "default": {**rate(lambda w: gemv.gemv(x, w, tile=default)), "tile": vars(default)},
                 "add_norm of the input": rate(lambda w: gemv.add_norm(x, gain, 1e-5, addend))}
    if "gate_up" in name:
        row["default gated"] = rate(lambda w: gemv.gemv(x, w, gated=True))
    swept = []
    for tile in tiles:
        try:
            swept.append({**rate(functools.partial(_tiled, x=x, tile=tile)), "tile": vars(tile)})
        except Exception as exc:  # a tiling this GPU cannot run (registers, shared memory)
            print(f"{name} {tile}: {type(exc).__name__}", flush=True)
    if swept:
        row["best"] = sorted(swept, key=lambda timed: timed["us"])[:5]
    return row


def _tiled(weight: torch.Tensor, x: torch.Tensor, tile: gemv.Tiling) -> object:
    return gemv.gemv(x, weight, tile=tile)


def _triton() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    main()
