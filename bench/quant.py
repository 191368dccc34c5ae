"""Decode through the engine with Lyra's weight-only forms beside bf16, each beside the floor of its bytes.

    python bench/quant.py --out DIR [--shapes 8b,70b-16] [--tokens 64] [--forms bf16,int8,int4]

A random-weight Llama-3 model built directly on the GPU (`8b`: Llama-3-8B; `70b-16`: Llama-3-70B with 16
of its 80 layers), its decoder layers' linear layers quantized in place (shared.engine.quantized_linear;
embeddings, norms and the head stay bf16), decoded greedily by the `graphs` engine (static cache, the step
captured in a CUDA graph); for bf16 also the `fused` engine. ms/token = (t(N+1) - t(1)) / N, medians of
three, and the floor: the bytes a token reads (packed weights, scales, zeros, the bf16 head and norms, one
embedding row) over the card's bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.voice_tp import engine_for, model_config, ms_per_token, prompt_ids  # noqa: E402

BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "A6000": 0.768e12}
SHAPES = {"8b": ("8b", None), "70b-16": ("70b", 16)}
SEED = 0


def streamed_bytes(model) -> int:
    """Bytes one token reads: every parameter and quantized buffer except the input embeddings (one row)."""
    import torch

    packed = [b for b in model.buffers() if b.dtype in (torch.int8, torch.int32)]
    scales = [b for name, b in model.named_buffers() if name.endswith((".scales", ".zeros", ".bias"))]
    embeddings = model.get_input_embeddings().weight
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *packed, *scales])
    return total - embeddings.numel() * embeddings.element_size() + embeddings.shape[1] * embeddings.element_size()


def build(shape: str):
    import torch

    from shared.distributed.tensor_parallel import Shard, build_rank_model, random_rank_weights

    name, layers = SHAPES[shape]
    config = model_config(name)
    if layers:
        config.num_hidden_layers = layers
    model = build_rank_model(config, torch.bfloat16, "sdpa", Shard(0, 1), torch.device("cuda", 0), lambda t: t)
    random_rank_weights(model, Shard(0, 1), SEED)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--shapes", default="8b,70b-16")
    parser.add_argument("--forms", default="bf16,int8,int4")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    import os

    import torch
    import transformers

    from shared.engine.quantized_linear import quantize_linears

    device = torch.cuda.get_device_name(0)
    rate = next((value for key, value in BANDWIDTH.items() if key in device), 3.35e12)
    rows = []
    for shape in args.shapes.split(","):
        for form in args.forms.split(","):
            engines = ("graphs", "fused") if form == "bf16" else ("graphs",)
            for engine_kind in engines:
                model = build(shape)
                if form != "bf16":
                    quantize_linears(model, form)
                torch.cuda.empty_cache()
                os.environ["LYRA_BENCH_ENGINE"] = engine_kind  # bench.voice_tp.engine_for reads it
                engine = engine_for(model, 512)
                prompt = prompt_ids(torch.device("cuda", 0), model.config.vocab_size)
                ms = ms_per_token(engine, prompt, args.tokens)
                floor_ms = streamed_bytes(model) / rate * 1000
                row = {"shape": shape, "form": form, "engine": engine.describe(), "ms_per_token": ms,
                       "floor_ms": round(floor_ms, 3), "x_floor": round(ms / floor_ms, 2),
                       "read_gb": round(streamed_bytes(model) / 1e9, 2),
                       "device_gb": round(torch.cuda.memory_allocated() / 1e9, 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                del engine, model
                torch.cuda.empty_cache()
    report = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
              "tokens": args.tokens, "rows": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quant.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
