"""Specialist swap speed: the host weight cache against from_pretrained and against the PCIe limit.

    python bench/swap.py --out DIR [--models 8b,14b] [--work /tmp/lyra-swap]

On one GPU machine, for random-weight Llama-3-8B-shaped (16 GB) and larger checkpoints, through the
specialist host's own code path (SpecialistHost handlers in process):
  - pinned host -> GPU bandwidth (2 GiB copy, best of 5);
  - from_pretrained(device_map) with the files in the page cache, and cold when caches can be dropped;
  - first load into the cache; swap out (park); swap in from the cache; time to first token after each;
  - targets: swap in <= 1.25 x bytes / bandwidth, and >= 5x faster than from_pretrained (page cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {"8b": 32, "14b": 56}  # Llama-3-8B shape with this many layers


def pinned_bandwidth() -> float:
    import torch

    host = torch.empty(2 * 1024**3, dtype=torch.uint8, pin_memory=True)
    device = torch.empty_like(host, device="cuda")
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, host.numel() / (time.perf_counter() - t0))
    return best


def build(work: Path, name: str, layers: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from shared.planning.architectures import build_config, get_architecture
    from tests.models.tiny import build_tokenizer

    folder = work / name
    if not (folder / "config.json").exists():
        config = build_config(get_architecture("llama-3-8b").components[0])
        config.num_hidden_layers = layers
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder, max_shard_size="5GB")
        build_tokenizer().save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
    return folder


def warm_page_cache(folder: Path) -> None:
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as fh:
            while fh.read(64 * 1024 * 1024):
                pass


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def host_for(folder: Path, cache_gb: float):
    from services.specialist_host.handlers import SpecialistHost
    from shared.config.schema import parse_config
    from shared.models.base import LoadContext

    raw = {"weight_cache": {"size_gb": cache_gb}, "router": {}, "voice": {},
           "gpus": [{"index": 0, "budget_gb": 79}], "services": {"specialist_host": {"gpus": [0]}},
           "specialists": {"a": {"backend": "transformers", "path": str(folder), "dtype": "bfloat16",
                                 "max_context": 512, "generation": {"max_new_tokens": 8, "temperature": 0.0}}}}
    config = parse_config(raw)
    return SpecialistHost(LoadContext(service="specialist_host", physical_gpus=[0], config=config))


def timed(handler, msg) -> tuple[float, object]:
    t0 = time.perf_counter()
    last = None
    for item in handler(msg, threading.Event()):
        last = item
    return time.perf_counter() - t0, last


def first_token(host) -> tuple[float, str]:
    from shared.wire.messages import ChatTurn, RunSpecialistRequest, SpecialistReply, TokenEvent

    msg = RunSpecialistRequest(model="a", messages=[ChatTurn(role="user", content="How do I boil an egg?")])
    t0, ttft, text = time.perf_counter(), None, ""
    for item in host.run(msg, threading.Event()):
        if isinstance(item, TokenEvent) and ttft is None:
            ttft = time.perf_counter() - t0
        if isinstance(item, SpecialistReply):
            text = item.text
    return (ttft if ttft is not None else time.perf_counter() - t0), text


def measure(folder: Path, bandwidth: float) -> dict:
    import torch

    from shared.wire.messages import LoadRequest, UnloadRequest

    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    row: dict = {"checkpoint_gb": round(size / 1e9, 2)}
    plain = host_for(folder, 0)
    warm_page_cache(folder)
    row["from_pretrained_page_cache_s"], _ = timed(plain.load, LoadRequest(model="a"))
    row["ttft_after_from_pretrained_s"], fresh_text = first_token(plain)
    timed(plain.unload, UnloadRequest(model="a"))
    row["drop_caches"] = drop_caches()
    if row["drop_caches"]:
        row["from_pretrained_cold_s"], _ = timed(plain.load, LoadRequest(model="a"))
        timed(plain.unload, UnloadRequest(model="a"))
    del plain
    torch.cuda.empty_cache()
    cached = host_for(folder, size / 1e9 * 1.2)
    row["first_load_into_cache_s"], _ = timed(cached.load, LoadRequest(model="a"))
    swap_in, swap_out, ttfts, texts = [], [], [], []
    for _ in range(3):
        out_s, _ = timed(cached.unload, UnloadRequest(model="a"))
        swap_out.append(out_s)
        row.setdefault("gpu_allocated_after_swap_out_gb", round(torch.cuda.memory_allocated() / 1e9, 3))
        in_s, _ = timed(cached.load, LoadRequest(model="a"))
        swap_in.append(in_s)
        ttft, text = first_token(cached)
        ttfts.append(ttft)
        texts.append(text)
    steady = [first_token(cached)[0] for _ in range(3)]  # no swap in between: the steady state
    floor = size / bandwidth
    row.update({
        "swap_out_s": round(statistics.median(swap_out), 3), "swap_in_s": round(statistics.median(swap_in), 3),
        "swap_in_best_s": round(min(swap_in), 3), "ttft_after_swap_in_s": round(statistics.median(ttfts), 3),
        "ttft_steady_state_s": round(statistics.median(steady), 3),
        "pcie_floor_s": round(floor, 3), "swap_in_vs_floor": round(statistics.median(swap_in) / floor, 2),
        "speedup_vs_page_cache": round(row["from_pretrained_page_cache_s"] / statistics.median(swap_in), 1),
        "outputs_equal_after_swap": all(t == fresh_text for t in texts),
    })
    row["meets_targets"] = row["swap_in_vs_floor"] <= 1.25 and row["speedup_vs_page_cache"] >= 5
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="8b,14b")
    parser.add_argument("--work", default="/tmp/lyra-swap")
    args = parser.parse_args()
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(0), "pinned_h2d_gb_s": round(pinned_bandwidth() / 1e9, 1)}
    print(f"{report['device']}: pinned host->GPU {report['pinned_h2d_gb_s']} GB/s", flush=True)
    for name in args.models.split(","):
        folder = build(work, name, SHAPES[name])
        report[name] = measure(folder, report["pinned_h2d_gb_s"] * 1e9)
        print(name, json.dumps(report[name]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "swap.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
