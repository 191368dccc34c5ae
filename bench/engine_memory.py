"""GPU memory a decode engine's build leaves behind, for a random-weight model of a real shape (one GPU).

    python bench/engine_memory.py --engine fused [--shape llama-3-8b] [--keep-cache]

Prints one JSON line: torch's allocated and reserved bytes and the device's used memory (this process alone
on the GPU), after the weights are made and after `DecodeEngine.prepare()`, and the seconds that took.
`--keep-cache` replaces `torch.cuda.empty_cache` with a no-op, as the engine was before it handed the
build's freed blocks back (the fused step's first build copies q/k/v and gate/up side by side and frees
the originals).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def reading(label: str) -> dict:
    import torch

    free, total = torch.cuda.mem_get_info()
    return {"at": label, "allocated_gb": round(torch.cuda.memory_allocated() / 1e9, 3),
            "reserved_gb": round(torch.cuda.memory_reserved() / 1e9, 3),
            "device_used_gb": round((total - free) / 1e9, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="fused", choices=["graphs", "compiled", "fused", "eager"])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--keep-cache", action="store_true", help="the build's freed blocks stay with torch")
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from shared.engine import decode
    from shared.planning.architectures import build_config, get_architecture
    from tests.models import tiny

    if args.keep_cache:
        torch.cuda.empty_cache = lambda: None
    with torch.device("cuda:0"):
        model = AutoModelForCausalLM.from_config(build_config(get_architecture(args.shape).components[0]),
                                                 dtype=torch.bfloat16).eval()
    rows = [reading("loaded")]
    engine = decode.DecodeEngine(model, tiny.build_tokenizer(), "bench", args.engine, args.max_context)
    build_s = round(engine.prepare(), 1)
    rows.append(reading("engine built"))
    print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "shape": args.shape,
                      "engine": args.engine, "empty_cache": not args.keep_cache, "kind": engine.describe(),
                      "build_s": build_s, "rows": rows}))


if __name__ == "__main__":
    main()
