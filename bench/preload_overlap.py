"""How much a specialist preload (a large host -> GPU copy) slows voice decoding on the same GPU.

    python bench/preload_overlap.py --checkpoint DIR --out DIR

Decodes 128 tokens with a Llama-3-8B-shaped model, alone and while another thread copies a pinned
16 GB buffer to the same GPU in a loop (what the specialist host does when it preloads while voice
speaks). Prints ms/token for both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path


def decode_ms_per_token(model, tokens: int) -> float:
    import torch

    ids = torch.tensor([[1, 2, 3, 4]], device="cuda")
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / tokens * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gb", type=float, default=16.0)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    if not (Path(args.checkpoint) / "config.json").exists():
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from bench.swap import build

        build(Path(args.checkpoint).parent, Path(args.checkpoint).name, 32)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16, device_map={"": 0})
    host = torch.empty(int(args.gb * 1e9), dtype=torch.uint8, pin_memory=True)
    device = torch.empty_like(host, device="cuda")
    copies: list[float] = []
    decode_ms_per_token(model, 128)  # warm-up: kernels, allocator, clocks
    alone, overlapped = [], []
    for _ in range(3):  # interleaved, so drift hits both the same way
        alone.append(decode_ms_per_token(model, 128))
        overlapped.append(with_copy(model, host, device, copies))
    alone_ms, overlapped_ms = statistics.median(alone), statistics.median(overlapped)
    report = {"device": torch.cuda.get_device_name(0), "decode_ms_per_token_alone": round(alone_ms, 2),
              "decode_ms_per_token_during_copy": round(overlapped_ms, 2),
              "slowdown_percent": round((overlapped_ms / alone_ms - 1) * 100, 1),
              "runs_alone": [round(x, 2) for x in alone], "runs_during_copy": [round(x, 2) for x in overlapped],
              "copy_gb_s_during_decode": round(sum(copies) / max(len(copies), 1), 1)}
    print(json.dumps(report))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "preload_overlap.json").write_text(json.dumps(report, indent=2))
    return 0


def with_copy(model, host, device, copies: list[float]) -> float:
    """Decode while another thread copies `host` to `device` in a loop on its own stream."""
    import torch

    stop = threading.Event()

    def copy_loop() -> None:
        stream = torch.cuda.Stream()
        while not stop.is_set():
            t0 = time.perf_counter()
            with torch.cuda.stream(stream):
                device.copy_(host, non_blocking=True)
            stream.synchronize()
            copies.append(host.numel() / (time.perf_counter() - t0) / 1e9)

    thread = threading.Thread(target=copy_loop)
    thread.start()
    time.sleep(0.2)
    try:
        return decode_ms_per_token(model, 128)
    finally:
        stop.set()
        thread.join()


if __name__ == "__main__":
    raise SystemExit(main())
