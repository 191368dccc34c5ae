"""What Lyra's weight-only forms cost in quality: perplexity and top-1 agreement of SmolLM2-135M on a fixed text.

    python bench/quant_quality.py [--out bench/results/cpu_quant_quality.json] [--forms float,int8,...] [--threads 1]

The embedded default's weights (`shared.models.embedded`: the SmolLM2-135M-Instruct GGUF converted once to a
float32 safetensors copy), loaded with transformers in float32 on the CPU. Each form replaces every nn.Linear
of the decoder layers (embeddings, norms and the tied head stay float32), Lyra's forms by `QuantizedLinear`,
so the text goes through the same module a served model runs. Int4 groups are 128 input columns where 128
divides the layer's inputs (down_proj, 1536) and 64 where it does not (hidden size 576 = 4.5 x 128).

The text is bench/data/quality_text.txt, scored in windows of 512 tokens every 256 (each token scored once,
with at least 256 tokens of context after the first window). Per form: perplexity; its change against the
float model, with a standard error from the per-token differences of log-likelihood (the same tokens, so
the text's own spread cancels); top-1 agreement (the share of scored positions where the form's most
likely next token is the float model's, teacher-forced on the text); the mean KL divergence from the float
model's next-token distribution. NF4 is emulated in torch (bitsandbytes' codebook, blocks of 64, a float32
absmax each, as Lyra's `quantization = "4bit"` asks for) where bitsandbytes does not import, as on a
CPU-only machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEXT = ROOT / "bench" / "data" / "quality_text.txt"
OUT = ROOT / "bench" / "results" / "cpu_quant_quality.json"
WINDOW, STRIDE = 512, 256
FORMS = ("float", "int8", "int4", "int4-clipped", "int4-g64", "int4-clipped-g64", "nf4-emulated")
DESCRIPTIONS = {
    "float": "float32 weights (the embedded checkpoint as converted)",
    "int8": "Lyra int8: per-row symmetric scale, round-to-nearest",
    "int4": "Lyra int4: asymmetric, group 128 (64 where 128 does not divide), round-to-nearest",
    "int4-clipped": "Lyra int4, same groups, each group's range the weight-MSE-best of 9 x 9 clippings",
    "int4-g64": "Lyra int4, group 64 in every layer, round-to-nearest",
    "int4-clipped-g64": "Lyra int4, group 64 in every layer, clipped as int4-clipped",
    "nf4-emulated": "NF4 as bitsandbytes makes it (blocks of 64, float32 absmax), emulated in torch",
}
# Paired on the same tokens: does clipping help, and the target, Lyra's int4 no worse than NF4.
COMPARISONS = (("int4-clipped", "int4"), ("int4-clipped-g64", "int4-g64"), ("int4", "nf4-emulated"),
               ("int4-clipped", "nf4-emulated"), ("int4-g64", "nf4-emulated"), ("int4-clipped-g64", "nf4-emulated"))
# bitsandbytes' NF4 code book (the 16 quantiles of a standard normal, scaled to [-1, 1]).
NF4_CODES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0)


def group_for(in_features: int) -> int:
    """Lyra's int4 group for a layer: 128 where it divides the inputs, else 64."""
    return 128 if in_features % 128 == 0 else 64


def nf4_roundtrip(weight: Any) -> Any:
    """The weight bitsandbytes' NF4 (blocks of 64 along the flattened weight, float32 absmax) stands for."""
    import torch

    blocks = weight.float().reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    codes = torch.tensor(NF4_CODES)
    nearest = (blocks / absmax).unsqueeze(-1).sub(codes).abs().argmin(dim=-1)
    return (codes[nearest] * absmax).reshape(weight.shape).to(weight.dtype)


def replace_linears(model: Any, form: str) -> int:
    """Put `form` in place of every nn.Linear of the decoder layers; returns the bytes those weights now take."""
    import torch

    from shared.engine.quantized_linear import QuantizedLinear, decoder_layers
    from shared.kernels import quant_gemv

    makers: dict[str, Callable[[Any], Any]] = {
        "int8": quant_gemv.quantize_int8,
        "int4": lambda w: quant_gemv.quantize_int4(w, group_for(w.shape[1])),
        "int4-clipped": lambda w: quant_gemv.quantize_int4_clipped(w, group_for(w.shape[1])),
        "int4-g64": lambda w: quant_gemv.quantize_int4(w, 64),
        "int4-clipped-g64": lambda w: quant_gemv.quantize_int4_clipped(w, 64),
    }
    total = 0
    for layer in decoder_layers(model):
        for name, module in list(layer.named_modules()):
            if type(module) is not torch.nn.Linear:
                continue
            weight = module.weight.detach()
            if form == "float":
                total += weight.numel() * weight.element_size()
                continue
            if form == "nf4-emulated":
                module.weight.data = nf4_roundtrip(weight)
                total += weight.numel() // 2 + weight.numel() // 64 * 4
                continue
            packed = makers[form](weight)
            total += packed.nbytes()
            parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
            bias = module.bias.detach() if module.bias is not None else None
            setattr(parent, name.rpartition(".")[2], QuantizedLinear(packed, bias))
    return total


def windows(count: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window: every position after the first scored once."""
    spans, scored_to = [], 1
    for begin in range(0, count, STRIDE):
        end = min(begin + WINDOW, count)
        spans.append((begin, end, scored_to))
        scored_to = end
        if end == count:
            break
    return spans


def score(model: Any, ids: Any) -> tuple[Any, list[Any]]:
    """Each scored token's negative log-likelihood, and each window's next-token log-probs at the scored positions."""
    import torch

    losses, logprobs = [], []
    with torch.inference_mode():
        for begin, end, first in windows(ids.shape[0]):
            logits = model(ids[None, begin:end]).logits[0].float()
            window = torch.log_softmax(logits[first - 1 - begin:end - 1 - begin], dim=-1)  # predicts first..end-1
            losses.append(-window.gather(1, ids[first:end, None])[:, 0])
            logprobs.append(window)
    return torch.cat(losses), logprobs


def paired_change(losses: Any, base: Any) -> tuple[float, float]:
    """Perplexity of `losses` against `base` on the same tokens: the change in percent and its standard error."""
    change = losses - base  # per token, so the spread of the text's own difficulty cancels
    ratio = math.exp(float(change.mean()))
    return round((ratio - 1) * 100, 3), round(ratio * float(change.std()) / math.sqrt(change.numel()) * 100, 3)


def compare(losses: Any, logprobs: list[Any], float_losses: Any, float_logprobs: list[Any]) -> dict[str, float]:
    """Perplexity, its change against the float model (with the paired standard error), top-1 agreement, KL."""
    change, error = paired_change(losses, float_losses)
    pairs = list(zip(logprobs, float_logprobs, strict=True))
    agree = sum(int((mine.argmax(-1) == base.argmax(-1)).sum()) for mine, base in pairs)
    kl = sum(float((base.exp() * (base - mine)).sum()) for mine, base in pairs)
    return {"perplexity": round(math.exp(float(losses.mean())), 4),
            "perplexity_change_pct": change, "perplexity_change_se_pct": error,
            "top1_agreement": round(agree / losses.numel(), 4),
            "kl_nats_per_token": round(kl / losses.numel(), 5)}


def bitsandbytes_note() -> str:
    """Whether bitsandbytes' own NF4 could be measured here, in a sentence."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # an ImportError, or a library that fails on a machine without CUDA
        return f"bitsandbytes NF4 not measured on CPU: bitsandbytes does not import ({type(error).__name__})"
    return "bitsandbytes imports, but this benchmark measures NF4 by emulation only"


def main() -> None:
    """Score every form on the text, write the JSON report and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--forms", default=",".join(FORMS))
    # One thread by default: on the shared 2-core VM two threads wait at every op for a core another job holds.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.config.schema import ModelEntry
    from shared.models.embedded import materialise

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    path = materialise(ModelEntry(name="smollm2", backend="transformers", embedded="smollm2")).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor(tokenizer(TEXT.read_text(encoding="ascii"))["input_ids"])
    forms = args.forms.split(",")
    if forms[0] != "float":
        forms.insert(0, "float")  # every other form is compared with it
    rows, reference, every_loss = [], None, {}
    for form in forms:
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        weight_bytes = replace_linears(model, form)
        losses, logprobs = score(model, ids)
        reference = reference or (losses, logprobs)
        every_loss[form] = losses
        row = {"form": form, "description": DESCRIPTIONS[form], **compare(losses, logprobs, *reference),
               "decoder_linear_mb": round(weight_bytes / 1e6, 2), "seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model, logprobs
    comparisons = []
    for form, other in COMPARISONS:
        if form in every_loss and other in every_loss:
            change, error = paired_change(every_loss[form], every_loss[other])
            comparisons.append({"form": form, "against": other, "perplexity_change_pct": change,
                                "perplexity_change_se_pct": error})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    report = {
        "date": datetime.date.today().isoformat(), "commit": commit.stdout.strip(), "machine": "2-core CPU VM",
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "model": "SmolLM2-135M-Instruct, the embedded default (dequantized from its Q4_1 GGUF)",
        "text": str(TEXT.relative_to(ROOT)), "text_tokens": int(ids.shape[0]),
        "scored_tokens": int(reference[0].numel()), "window": WINDOW, "stride": STRIDE,
        "nf4": bitsandbytes_note(), "rows": rows, "comparisons": comparisons,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{report['model']}; {report['text_tokens']} tokens; torch {torch.__version__}, "
          f"transformers {transformers.__version__}\n")
    print("| form | perplexity | vs float (± s.e.) | top-1 agreement | KL (nats/token) | decoder linears MB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['form']} | {row['perplexity']:.3f} | {row['perplexity_change_pct']:+.2f}% "
              f"± {row['perplexity_change_se_pct']:.2f} | "
              f"{row['top1_agreement'] * 100:.1f}% | {row['kl_nats_per_token']:.4f} | {row['decoder_linear_mb']} |")
    print()
    for pair in comparisons:
        print(f"{pair['form']} against {pair['against']}: perplexity {pair['perplexity_change_pct']:+.2f}% "
              f"± {pair['perplexity_change_se_pct']:.2f}")
    print(f"\n{report['nf4']}")


if __name__ == "__main__":
    main()
