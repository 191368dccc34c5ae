"""Decode attention: Lyra's kernel beside the maintained ones, one token over a static bf16 KV cache.

    python bench/attention_peers.py [--out DIR]

Each contender attends one query token of one layer to the first `in_use` positions of a 4096-position
cache and is replayed from a CUDA graph 200 times; µs per layer, and what a whole step would spend (x
layers). Shapes: Llama-3-8B (8 KV heads, groups of 4, 32 layers) and one 70B tensor rank of two (4 KV
heads, groups of 8, 80 layers). Every contender's output is checked against a float32 reference first.

- `lyra`: shared.kernels.decode_attention (the cache in Lyra's [kv heads, positions, dim] layout)
- `masked_sdpa`: the whole cache with a mask, compiled (what transformers' static cache does)
- `flash2_torch`: FlashAttention-2 as torch bundles it (`aten._flash_attention_forward`, varlen with
  `seqused_k`: the kernel behind flash-attn's `flash_attn_with_kvcache`), the cache in its [positions,
  kv heads, dim] layout; paged (`block_table`, 256 positions a page) when torch exposes it
- `flash_attn`: the flash-attn package's `flash_attn_with_kvcache`, where it is installed
- `flashinfer`: FlashInfer's `single_decode_with_kv_cache`, where it is installed

A contender that is missing or fails says why in the report instead of a number.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {"8b": (8, 4, 32), "70b rank of 2": (4, 8, 80)}  # KV heads, query heads per KV head, layers
CACHE = 4096
DIM = 128
PAGE = 256
REPLAYS = 200
IN_USE = (128, 1024, 4096)


def time_us(function: Callable[[], object]) -> float:
    """µs per call of `function`, replayed from a CUDA graph."""
    import torch

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm up (and let lazy initialisation happen) off the capture
        function()
    torch.cuda.synchronize()
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


def contenders(query, keys, values, in_use: int) -> dict[str, Callable[[], object]]:
    """name -> a call returning [kv heads x group, dim] for each contender that can be built, else the reason."""
    import torch

    from shared.kernels.decode_attention import decode_attention

    kv, group, dim = query.shape
    scale = dim ** -0.5
    position = torch.full((1,), in_use - 1, dtype=torch.long, device="cuda")
    flat_query = query.reshape(1, kv * group, dim)  # [tokens, heads, dim], head h reads KV head h // group
    keys_by_position = keys.transpose(0, 1).contiguous()  # [positions, kv heads, dim]
    values_by_position = values.transpose(0, 1).contiguous()
    used = torch.tensor([in_use], dtype=torch.int32, device="cuda")
    found: dict[str, Callable[[], object] | str] = {}

    found["lyra"] = lambda: decode_attention(query, keys, values, position, scale).reshape(kv * group, dim)

    def masked() -> torch.Tensor:
        visible = (torch.arange(keys.shape[1], device=keys.device) <= position).view(1, 1, -1)
        scores = torch.matmul(query, keys.transpose(1, 2)).float() * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values).reshape(kv * group, dim)

    found["masked_sdpa"] = torch.compile(masked, dynamic=False)

    cum_q = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    cum_k = torch.tensor([0, CACHE], dtype=torch.int32, device="cuda")
    flash = torch.ops.aten._flash_attention_forward

    def flash2() -> torch.Tensor:
        out = flash(flat_query, keys_by_position, values_by_position, cum_q, cum_k, 1, CACHE, 0.0, False, False,
                    scale=scale, seqused_k=used)[0]
        return out.reshape(kv * group, dim)

    found["flash2_torch"] = flash2
    pages = CACHE // PAGE
    paged_keys = keys_by_position.view(pages, PAGE, kv, dim)
    paged_values = values_by_position.view(pages, PAGE, kv, dim)
    table = torch.arange(pages, dtype=torch.int32, device="cuda").view(1, pages)

    def flash2_paged() -> torch.Tensor:
        out = flash(flat_query, paged_keys, paged_values, cum_q, None, 1, CACHE, 0.0, False, False, scale=scale,
                    seqused_k=used, block_table=table)[0]
        return out.reshape(kv * group, dim)

    found["flash2_torch_paged"] = flash2_paged

    try:
        from flash_attn import flash_attn_with_kvcache

        cache_k, cache_v = keys_by_position.unsqueeze(0), values_by_position.unsqueeze(0)
        found["flash_attn"] = lambda: flash_attn_with_kvcache(flat_query.unsqueeze(0), cache_k, cache_v,
                                                              cache_seqlens=used, softmax_scale=scale
                                                              ).reshape(kv * group, dim)
    except ImportError as exc:
        found["flash_attn"] = f"not installed ({exc})"
    try:
        import flashinfer

        found["flashinfer"] = lambda: flashinfer.single_decode_with_kv_cache(
            flat_query[0], keys_by_position[:in_use], values_by_position[:in_use], sm_scale=scale)
    except ImportError as exc:
        found["flashinfer"] = f"not installed ({exc})"
    return found


def reference(query, keys, values, in_use: int):
    import torch

    kv, group, dim = query.shape
    scores = torch.matmul(query.float(), keys[:, :in_use].float().transpose(1, 2)) * dim ** -0.5
    return torch.matmul(torch.softmax(scores, dim=-1), values[:, :in_use].float()).reshape(kv * group, dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch
    import transformers

    rows = []
    for name, (kv, group, layers) in SHAPES.items():
        generator = torch.Generator(device="cuda").manual_seed(0)
        query = torch.randn(kv, group, DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
        keys, values = (torch.randn(kv, CACHE, DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
                        for _ in range(2))
        for in_use in IN_USE:
            expected = reference(query, keys, values, in_use)
            for contender, call in contenders(query, keys, values, in_use).items():
                row = {"shape": name, "in_use": in_use, "contender": contender}
                if isinstance(call, str):
                    row["skipped"] = call
                else:
                    try:
                        error = (call().float() - expected).abs().max().item()
                        if error > 0.05:
                            raise ValueError(f"wrong answer: max error {error:.3g} against float32")
                        us = time_us(call)
                        row.update(us=round(us, 2), ms_per_step=round(us * layers / 1000, 3), max_error=error)
                    except Exception as exc:  # a contender this torch build cannot run: say why, go on
                        row["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "transformers": transformers.__version__, "cache": CACHE, "rows": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention_peers.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
