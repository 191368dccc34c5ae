"""Weight-only quantized products at decode (one row): Lyra's kernels beside the library ones, per weight shape.

    python bench/quant_kernels.py [--out DIR] [--shapes 8b,70b]

For each projection of a Llama-3-8B and a Llama-3-70B decoder layer (q/k/v stacked, o, gate/up stacked,
down), each contender multiplies one bf16 row by the weight, replayed from a CUDA graph (or timed eagerly
where the contender cannot be captured, said so); µs, the bytes it must read (packed weights, scales,
zeros), and x its floor (bytes / the card's bandwidth). The layer's sum times the model's layers is what a
token's products would cost.

Contenders (each where it installs and runs; otherwise the report says why):
- `bf16`: F.linear (cuBLAS) on the bf16 weight: the form to beat
- `lyra_int8`, `lyra_int4`: shared.kernels.quant_gemv, each of its tilings in TILINGS (the best is kept)
- `tinygemm_int4`: torch's own int4 weight-only kernel (`aten._weight_int4pack_mm`, group 128), what
  torchao's Int4WeightOnly uses
- `torch_int8`: `aten._weight_int8pack_mm` (per-channel int8)
- `torchao_int4`, `torchao_int8`: torchao's quantize_ on an nn.Linear, where torchao is installed
- `bnb_nf4`, `bnb_int8`: bitsandbytes' Linear4bit (NF4) and Linear8bitLt, where bitsandbytes is installed
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (out, in) per projection, and the model's layers
SHAPES = {
    "8b": ({"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}, 32),
    "70b": ({"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}, 80),
}
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "A6000": 0.768e12}
REPLAYS = 50


def bandwidth(name: str) -> float:
    return next((value for key, value in BANDWIDTH.items() if key in name), 3.35e12)


def time_us(call: Callable[[], object]) -> tuple[float, bool]:
    """(µs per call, captured in a graph); eager timing where capture fails."""
    import torch

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        call()
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        graph.replay()
        torch.cuda.synchronize()
        start.record()
        for _ in range(REPLAYS):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / REPLAYS, True
    except Exception:  # a contender that cannot be captured: time it as it would run, eagerly
        torch.cuda.synchronize()
        start.record()
        for _ in range(REPLAYS):
            call()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / REPLAYS, False


def contenders(weight, x) -> dict[str, tuple[Callable[[], object], int] | str]:
    """name -> (call, bytes it must read) or the reason it cannot run here."""
    import torch

    from shared.kernels import quant_gemv

    rows, columns = weight.shape
    found: dict[str, tuple[Callable[[], object], int] | str] = {}
    found["bf16"] = (lambda: torch.nn.functional.linear(x, weight), weight.numel() * 2)
    for form, make in (("int8", quant_gemv.quantize_int8), ("int4", quant_gemv.quantize_int4)):
        packed = make(weight)
        for tile in TILINGS[form]:
            found[f"lyra_{form} {tile}"] = (lambda p=packed, t=tile: quant_gemv.product(x, p, t), packed.nbytes())
    try:
        q = torch.randint(0, 256, (rows, columns // 2), dtype=torch.uint8, device="cuda")
        packed = torch.ops.aten._convert_weight_to_int4pack(q, 8)
        scale_zeros = torch.randn(columns // 128, rows, 2, dtype=torch.bfloat16, device="cuda") * 0.01
        found["tinygemm_int4"] = (lambda: torch.ops.aten._weight_int4pack_mm(x, packed, 128, scale_zeros),
                                  rows * columns // 2 + scale_zeros.numel() * 2)
    except Exception as exc:
        found["tinygemm_int4"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    try:
        q8 = torch.randint(-127, 127, (rows, columns), dtype=torch.int8, device="cuda")
        scales = torch.rand(rows, dtype=torch.bfloat16, device="cuda")
        torch.ops.aten._weight_int8pack_mm(x, q8, scales)
        found["torch_int8"] = (lambda: torch.ops.aten._weight_int8pack_mm(x, q8, scales), rows * columns + rows * 2)
    except Exception as exc:
        found["torch_int8"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    found.update(torchao_contenders(weight, x))
    found.update(bnb_contenders(weight, x))
    return found


def torchao_contenders(weight, x) -> dict:
    import torch

    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except Exception as exc:
        return {"torchao_int4": f"not installed ({exc})", "torchao_int8": f"not installed ({exc})"}
    found = {}
    rows, columns = weight.shape
    for name, config, nbytes in (("torchao_int4", lambda: Int4WeightOnlyConfig(group_size=128),
                                  rows * columns // 2 + rows * columns // 128 * 4),
                                 ("torchao_int8", Int8WeightOnlyConfig, rows * columns + rows * 2)):
        try:
            linear = torch.nn.Linear(columns, rows, bias=False, device="cuda", dtype=torch.bfloat16)
            linear.weight.data.copy_(weight)
            quantize_(linear, config())
            linear(x)
            found[name] = (lambda m=linear: m(x), nbytes)
        except Exception as exc:
            found[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return found


def bnb_contenders(weight, x) -> dict:
    import torch

    try:
        import bitsandbytes as bnb
    except Exception as exc:
        return {"bnb_nf4": f"not installed ({exc})", "bnb_int8": f"not installed ({exc})"}
    found = {}
    rows, columns = weight.shape
    try:
        nf4 = bnb.nn.Linear4bit(columns, rows, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        nf4.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4")
        nf4 = nf4.cuda()
        nf4(x)
        found["bnb_nf4"] = (lambda: nf4(x), rows * columns // 2 + rows * columns // 64 * 4)
    except Exception as exc:
        found["bnb_nf4"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    try:
        int8 = bnb.nn.Linear8bitLt(columns, rows, bias=False, has_fp16_weights=False, threshold=0.0)
        int8.weight = bnb.nn.Int8Params(weight.cpu().half(), requires_grad=False, has_fp16_weights=False)
        int8 = int8.cuda()
        int8(x)
        found["bnb_int8"] = (lambda: int8(x), rows * columns + rows * 4)
    except Exception as exc:
        found["bnb_int8"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return found


def tilings():
    from shared.kernels.quant_gemv import Tiling

    return {
        "int8": [Tiling(rows=r, columns=c, warps=w) for r, c, w in ((4, 512, 4), (8, 256, 4), (2, 1024, 4),
                                                                     (16, 256, 8), (4, 1024, 8), (1, 2048, 4))],
        "int4": [Tiling(rows=r, groups=g, warps=w) for r, g, w in ((8, 4, 4), (8, 8, 4), (16, 8, 8), (32, 4, 8),
                                                                    (16, 4, 4), (8, 16, 8), (4, 8, 4), (32, 8, 8))],
    }


TILINGS: dict = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--shapes", default="8b,70b")
    args = parser.parse_args()
    import torch
    import transformers

    TILINGS.update(tilings())
    device = torch.cuda.get_device_name(0)
    rate = bandwidth(device)
    rows_out, layers_out = [], {}
    for model in args.shapes.split(","):
        projections, layers = SHAPES[model]
        per_layer: dict[str, float] = {}
        for projection, (rows, columns) in projections.items():
            generator = torch.Generator(device="cuda").manual_seed(0)
            weight = (torch.randn(rows, columns, device="cuda", generator=generator) * 0.02).to(torch.bfloat16)
            x = torch.randn(1, columns, device="cuda", generator=generator).to(torch.bfloat16)
            best: dict[str, dict] = {}
            for name, entry in contenders(weight, x).items():
                row = {"model": model, "projection": projection, "shape": [rows, columns], "contender": name}
                if isinstance(entry, str):
                    row["skipped"] = entry
                else:
                    call, nbytes = entry
                    try:
                        us, captured = time_us(call)
                        floor_us = nbytes / rate * 1e6
                        row.update(us=round(us, 2), floor_us=round(floor_us, 2), x_floor=round(us / floor_us, 2),
                                   captured=captured, tb_per_s=round(nbytes / us / 1e6, 2))
                        family = name.split(" ")[0]
                        if family not in best or us < best[family]["us"]:
                            best[family] = row
                    except Exception as exc:
                        row["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                rows_out.append(row)
                print(json.dumps(row), flush=True)
            for family, row in best.items():
                per_layer[family] = per_layer.get(family, 0.0) + row["us"]
                per_layer[family + " floor"] = per_layer.get(family + " floor", 0.0) + row["floor_us"]
            del weight
            torch.cuda.empty_cache()
        layers_out[model] = {family: round(us * layers / 1000, 3) for family, us in per_layer.items()}
        print(json.dumps({"model": model, "ms_per_token_products_best_tiling": layers_out[model]}), flush=True)
    report = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
              "bandwidth_bytes_per_s": rate, "rows": rows_out, "per_token_ms": layers_out}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quant_kernels.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
