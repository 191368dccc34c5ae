"""Decode attention over a static KV cache: the Triton kernel (positions in use) vs masked matmuls (whole cache).

    python bench/decode_attention.py [--out DIR]

One token's attention for one layer, replayed from a CUDA graph 200 times, at several cache lengths in
use, for the Llama-3-8B shape (8 KV heads, groups of 4) and one 70B tensor rank (4 KV heads, groups of 8),
with a 4096-position bf16 cache. Prints µs per layer and what the whole step would spend (x layers).
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {"8b": (8, 4, 32), "70b rank of 2": (4, 8, 80)}  # KV heads, query heads per KV head, layers
CACHE = 4096
DIM = 128
REPLAYS = 200


def masked(query, keys, values, position, scale):
    import torch

    visible = (torch.arange(keys.shape[1], device=keys.device) <= position).view(1, 1, -1)
    scores = torch.matmul(query, keys.transpose(1, 2)).float() * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)


def time_us(function, position, at: int) -> float:
    import torch

    position.fill_(at)
    function()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        function()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / REPLAYS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    from shared.kernels.decode_attention import decode_attention

    rows = []
    for name, (kv, group, layers) in SHAPES.items():
        query = torch.randn(kv, group, DIM, device="cuda", dtype=torch.bfloat16)
        keys, values = (torch.randn(kv, CACHE, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        position = torch.zeros(1, dtype=torch.long, device="cuda")
        compiled = torch.compile(masked, dynamic=False)
        inputs = (query, keys, values, position, DIM ** -0.5)
        for at in (128, 1024, 4095):
            kernel = time_us(partial(decode_attention, *inputs), position, at)
            plain = time_us(partial(compiled, *inputs), position, at)
            rows.append({"shape": name, "in_use": at + 1, "kernel_us": round(kernel, 2), "masked_us": round(plain, 2),
                         "kernel_ms_per_step": round(kernel * layers / 1000, 3),
                         "masked_ms_per_step": round(plain * layers / 1000, 3)})
            print(json.dumps(rows[-1]), flush=True)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cache": CACHE, "rows": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode_attention.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
