"""Whole turns through the running stack (`lyra up`, supervisord), per stage, beside the original design.

    python bench/e2e.py --out DIR [--work /tmp/lyra-e2e] [--tokens 128] [--tiny] [--voice 70b] [--voice-engine fused]
                        [--engine fused] [--gpus 1]

Two GPUs: the router (Gemma-3-12B shape, 8 of its 48 layers) on GPU 0, the specialists on GPU 1 (a
Llama-3-8B-shaped pragmatist, a Jamba-shaped philosopher with 6 layers and 4 experts), the voice
(Llama-3-8B shape) on GPU 0; random bf16 weights, greedy, `max_new_tokens` = --tokens for specialist and
voice. Turns alternate the specialists: the first visit of each loads it from its checkpoint (cold), later
visits swap it in from the host weight cache (cached). One unforced turn at each end times the router.
`--voice 70b`: the voice is the Llama-3-70B shape instead, tensor-parallel over both GPUs (one rank per
GPU) with `random_weights = true`: its folder holds config.json and a tokenizer only (141 GB of weights
fit neither the GPU machine's disk nor the benchmark's time), each rank makes its share on its GPU.
`--gpus 1`: every service on GPU 0 (one-GPU boxes; not with the 70B voice). `--engine`: the specialists'
decode engine (the voice's is --voice-engine). Client-side times are wall clock from sending the request to
its DoneEvent. After `lyra down`, the same run times the plain-transformers way in process: the 8B-shaped
checkpoint's `model.generate` (dynamic cache, greedy) for as many tokens from a prompt as long as the
voice's, the stage a user would wait for without Lyra. `--tiny` runs the same script on the CPU with the
tests' tiny checkpoints (a check of the script, not a benchmark).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.decode import card_bandwidth, full_vocab_tokenizer, lyra  # noqa: E402

ORIGINAL = {"cold turn": "20-40 s", "cached turn": "5-10 s", "swap": "15-30 s", "router": "0.2-0.5 s",
            "specialist": "2-5 s", "voice": "3-5 s"}
VOICE_SHAPE = "llama-3-70b"
TURNS = [(None, "How do I boil an egg so that the yolk stays soft?"),
         ("pragmatist", "How do I fix a flat bicycle tyre?"), ("philosopher", "Is free will an illusion?"),
         ("pragmatist", "Write a function that reverses a string."), ("philosopher", "What makes a life good?"),
         ("pragmatist", "How do I remove a coffee stain?"), ("philosopher", "Can a machine understand?"),
         (None, "How do I make tea?")]


def shape_only_folder(folder: Path, tiny: bool) -> Path:
    """config.json and a tokenizer, no weights: the random-weight voice (Llama-3-70B shape; tiny on the CPU)."""
    from transformers import LlamaConfig

    from shared.planning.architectures import build_config, get_architecture
    from tests.models import tiny as tiny_models

    if not (folder / "config.json").exists():
        if tiny:
            LlamaConfig(**tiny_models.common_settings(tiny_models.build_tokenizer())).save_pretrained(folder)
            tiny_models.build_tokenizer().save_pretrained(folder)
        else:
            build_config(get_architecture(VOICE_SHAPE).components[0]).save_pretrained(folder)
            full_vocab_tokenizer(folder)
    return folder


def build_checkpoints(work: Path, tiny: bool, voice: str) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM

    from shared.planning.architectures import build_config, get_architecture
    from tests.models import tiny as tiny_models

    extra = {"voice70b": shape_only_folder(work / "voice70b", tiny)} if voice == "70b" else {}
    if tiny:
        return {**extra, **{name: tiny_models.build_checkpoint(arch, work / name) if not (work / name).exists()
                            else work / name
                            for name, arch in (("router", "gemma3"), ("llama", "llama"), ("jamba", "jamba"))}}
    shapes = {"router": ("gemma-3-12b", {"num_hidden_layers": 8}), "llama": ("llama-3-8b", {}),
              "jamba": ("jamba-v0.1", {"num_hidden_layers": 6, "num_experts": 4})}
    out = dict(extra)
    for name, (arch, overrides) in shapes.items():
        folder = out[name] = work / name
        if (folder / "config.json").exists():
            continue
        config = build_config(get_architecture(arch).components[0])
        text = getattr(config, "text_config", None) or config
        for key, value in overrides.items():
            setattr(text, key, value)
        if isinstance(vars(text).get("layer_types"), list):
            text.layer_types = text.layer_types[:text.num_hidden_layers]
        started = time.perf_counter()
        with torch.device("cuda:0"):
            model = AutoModelForCausalLM.from_config(text, dtype=torch.bfloat16)
        model.save_pretrained(folder, max_shard_size="5GB")
        del model
        torch.cuda.empty_cache()
        full_vocab_tokenizer(folder)
        print(f"built {name} ({arch}) in {time.perf_counter() - started:.1f}s", flush=True)
    return out


def write_config(work: Path, ckpt: dict[str, Path], tokens: int, tiny: bool, voice: str, engine: str,
                 specialist_engine: str = "graphs", gpus: int = 2) -> Path:
    gpu0, gpu1 = ("[]", "[]") if tiny else ("[0]", "[1]") if gpus == 2 else ("[0]", "[0]")
    dtype = "float32" if tiny else "bfloat16"

    def model(path: Path, **extra: str) -> str:
        lines = ['backend = "transformers"', f'path = "{path}"', f'dtype = "{dtype}"', "max_context = 2048",
                 f"generation = {{ max_new_tokens = {tokens}, temperature = 0.0 }}"]
        return "\n".join(lines + [f"{k} = {v}" for k, v in extra.items()])

    second_gpu = "" if gpus == 1 else "[[gpus]]\nindex = 1\nbudget_gb = 130"
    voice_entry = model(ckpt["llama"], engine=f'"{engine}"')
    if voice == "70b":
        voice_entry = model(ckpt["voice70b"], engine=f'"{engine}"', parallel='"tensor"', random_weights="true",
                            **({"ranks": "2"} if tiny else {"architecture": f'"{VOICE_SHAPE}"'}))
    text = f"""
[runtime]
run_dir = "{work / 'run'}"
heartbeat_timeout_s = 60
[deadlines]
route = 120
load = 600
specialist = 300
voice = 300
[weight_cache]
size_gb = {2 if tiny else 40}
[[gpus]]
index = 0
budget_gb = 130
{second_gpu}
[services.router]
gpus = {gpu0}
[services.specialist_host]
gpus = {gpu1}
[services.voice]
gpus = {gpu0 if voice != "70b" else "[]" if tiny else "[0, 1]"}
[router]
{model(ckpt['router'])}
[specialists.pragmatist]
{model(ckpt['llama'], engine=f'"{specialist_engine}"')}
description = "practical tasks"
[specialists.philosopher]
{model(ckpt['jamba'], engine=f'"{specialist_engine}"')}
description = "philosophical questions"
[voice]
{voice_entry}
system_prompt = "You are Lyra."
"""
    path = work / "e2e.toml"
    path.write_text(text)
    return path


def run_turns() -> list[dict]:
    from shared.client import Client
    from shared.wire.messages import DoneEvent, TokenEvent

    rows, seen = [], set()
    for forced, text in TURNS:
        first_voice = None
        with Client(timeout_s=900) as client:
            t0 = time.perf_counter()
            done = None
            for event in client.stream(text, specialist=forced):
                if isinstance(event, TokenEvent) and event.stage == "voice" and first_voice is None:
                    first_voice = time.perf_counter() - t0
                if isinstance(event, DoneEvent):
                    done = event
            wall = time.perf_counter() - t0
        assert done is not None
        rows.append({"forced": forced, "specialist": done.specialist, "cold": done.specialist not in seen,
                     "client_s": round(wall, 3), "first_voice_token_s": first_voice,
                     "timings": {k: round(v, 3) for k, v in done.timings.items()},
                     "voice_prompt_tokens": done.usage.prompt_tokens if done.usage else None})
        seen.add(done.specialist)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def floors(config_path: Path, tokens: int, device: str) -> dict[str, float]:
    """Seconds the HBM floor allows the 8B-shaped pragmatist's and the voice's tokens: every weight byte read
    once per token, a tensor voice's split over its GPUs (the dense stages; Jamba's experts are not dense)."""
    from shared.config.schema import load_config
    from shared.planning.estimate import estimate_model

    if not device.startswith("NVIDIA"):
        return {}
    config = load_config(config_path)
    per_second = card_bandwidth(device)
    voice = config.voice
    ranks = max(len(config.gpus_of("voice")), 1) if voice.parallel == "tensor" else 1
    return {"specialist_floor_s": round(estimate_model(config.specialists["pragmatist"]).weights * tokens
                                        / per_second, 3),
            "voice_floor_s": round(estimate_model(voice).weights * tokens / (ranks * per_second), 3)}


def plain_transformers(folder: Path, tokens: int, prompt_tokens: int, tiny: bool) -> dict:
    """The plain-transformers way in process, one GPU: `generate` with its default dynamic cache, greedy, of
    `tokens` from a `prompt_tokens` prompt (prefill included, as in a stage), medians of 3 runs."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cpu" if tiny else "cuda:0"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32 if tiny else torch.bfloat16,
                                                 device_map=device)
    ids = torch.arange(7, 7 + prompt_tokens, device=device).remainder(model.config.vocab_size).view(1, -1)

    def seconds(count: int) -> float:
        if not tiny:
            torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=count,
                       min_new_tokens=count, pad_token_id=0)  # min: random weights may pick an end token
        if not tiny:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    seconds(2)
    whole = statistics.median(seconds(tokens) for _ in range(3))
    first = statistics.median(seconds(1) for _ in range(3))
    return {"prompt_tokens": prompt_tokens, "tokens": tokens, "generate_s": round(whole, 3),
            "ms_per_token": round((whole - first) / max(tokens - 1, 1) * 1000, 2)}


def summarize(rows: list[dict]) -> dict:
    def median(values: list[float]) -> float | None:
        return round(statistics.median(values), 3) if values else None

    cached = [r for r in rows if not r["cold"]]
    cold = [r for r in rows if r["cold"]]
    return {
        "cold_turn_s": median([r["client_s"] for r in cold]),
        "cached_turn_s": median([r["client_s"] for r in cached]),
        "cached_text_turn_s_by_specialist": {s: median([r["client_s"] for r in cached if r["specialist"] == s])
                                             for s in sorted({r["specialist"] for r in cached})},
        "swap_in_s": median([r["timings"].get("load", 0) for r in cached if r["forced"]]),
        "router_s": median([r["timings"]["route"] for r in rows if r["forced"] is None]),
        "specialist_s": median([r["timings"]["specialist"] for r in cached]),
        "voice_s": median([r["timings"]["voice"] for r in cached]),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/lyra-e2e")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--voice", default="8b", choices=["8b", "70b"],
                        help="70b: the Llama-3-70B shape, tensor ranks on both GPUs, random weights")
    parser.add_argument("--voice-engine", default="graphs", choices=["graphs", "compiled", "fused", "eager"])
    parser.add_argument("--engine", default="graphs", choices=["graphs", "compiled", "fused", "eager"],
                        help="the specialists' decode engine")
    parser.add_argument("--gpus", type=int, default=2, choices=[1, 2], help="1: every service on GPU 0")
    args = parser.parse_args()
    if args.gpus == 1 and args.voice == "70b":
        parser.error("the 70B voice is tensor ranks over two GPUs: --gpus 2")
    import torch
    import transformers

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or "cpu",
                    "torch": torch.__version__, "transformers": transformers.__version__, "tokens": args.tokens,
                    "voice": args.voice, "voice_engine": args.voice_engine, "engine": args.engine,
                    "gpus": args.gpus}
    checkpoints = build_checkpoints(work, args.tiny, args.voice)
    config = write_config(work, checkpoints, args.tokens, args.tiny, args.voice, args.voice_engine, args.engine,
                          args.gpus)
    started = time.perf_counter()
    up = lyra("up", "-c", str(config), "--timeout", "600")
    report["up_s"] = round(time.perf_counter() - started, 1)
    if up.returncode != 0:
        report["error"] = up.stdout[-3000:] + up.stderr[-3000:]
    else:
        try:
            report["status"] = lyra("status").stdout
            report["turns"] = run_turns()
            report["summary"] = summarize(report["turns"])
            report["floors"] = floors(config, args.tokens, str(report["device"][0]) if
                                      isinstance(report["device"], list) else "")
        finally:
            lyra("down")
        prompts = [r["voice_prompt_tokens"] for r in report.get("turns", []) if r.get("voice_prompt_tokens")]
        report["plain_transformers"] = plain_transformers(checkpoints["llama"], args.tokens,
                                                          int(statistics.median(prompts)) if prompts else 160,
                                                          args.tiny)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "e2e.json").write_text(json.dumps(report, indent=2, default=str))
    print_table(report)
    return 0 if "summary" in report else 1


def print_table(report: dict) -> None:
    summary = report.get("summary")
    if not summary:
        print(report.get("error", "no result"))
        return
    print(f"\n{report['device']}, torch {report['torch']}, transformers {report['transformers']}, "
          f"{report['tokens']} specialist + {report['tokens']} voice tokens; voice {report['voice']} "
          f"({report['voice_engine']}), specialists {report.get('engine', 'graphs')}, "
          f"{report.get('gpus', 2)} GPU(s); lyra up {report['up_s']} s")
    print(report["status"])
    print("| what | original design | Lyra |")
    rows = [("cold turn", "cold_turn_s"), ("cached turn", "cached_turn_s"), ("swap", "swap_in_s"),
            ("router", "router_s"), ("specialist", "specialist_s"), ("voice", "voice_s")]
    for label, key in rows:
        print(f"| {label} | {ORIGINAL[label]} | {summary[key]} s |")
    print("cached turn by specialist:", summary["cached_text_turn_s_by_specialist"])
    plain = report.get("plain_transformers")
    if plain:
        print(f"plain transformers (`generate`, dynamic cache, 8B shape, one GPU), {plain['tokens']} tokens after "
              f"{plain['prompt_tokens']}: {plain['generate_s']} s ({plain['ms_per_token']} ms a token)")
    floor = report.get("floors") or {}
    if floor:
        print(f"HBM floor for the same tokens: pragmatist {floor['specialist_floor_s']} s, "
              f"voice {floor['voice_floor_s']} s")


if __name__ == "__main__":
    raise SystemExit(main())
