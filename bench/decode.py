"""Decode speed on one GPU: plain transformers, the decode engine in process, and through the whole stack.

    python bench/decode.py --out DIR [--work /tmp/lyra-decode] [--tokens 128] [--layers 32] [--no-stack]

Random-weight Llama-3-8B-shaped checkpoint (bf16), greedy, EOS off so every run makes the same number of
tokens. ms/token is (time for N+1 new tokens - time for 1) / N, so prefill and the first token are not
counted; each figure is the median of REPEATS runs. Printed beside the HBM floor (weight bytes / the card's
memory bandwidth):
  - `generate`, default dynamic cache, and with `cache_implementation="static"` (eager);
  - the engine in process, eager (static cache) and graphs, ids only and streamed as text;
  - first token after a swap out and in through the host weight cache (graphs re-captured);
  - greedy agreement of the engine with `generate`;
  - the engine through the stack: `lyra up` with this checkpoint as the only GPU model, a forced
    specialist turn, token timestamps taken at the client.
Targets (8B shape, H100/H200): engine >= 60% of the floor; through the stack <= 1.1x in process; first token
after a cache swap <= 1 s.
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

REPEATS = 3
BANDWIDTH_TB_S = {"H200": 4.8, "H100": 3.35, "A100": 2.0, "A6000": 0.768}  # HBM/GDDR, as published
PROMPT = "How do I boil an egg so that the yolk stays soft? Please explain every step carefully."


def full_vocab_tokenizer(folder: Path) -> None:
    """Give the checkpoint a word-level tokenizer with one word per id of its vocabulary.

    Random weights pick ids anywhere in the 128k vocabulary; the tests' small tokenizer would decode most
    of them to nothing, and the stack would stream no text to time.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    from tests.models.tiny import CHAT_TEMPLATE, SPECIALS

    size = AutoConfig.from_pretrained(folder).vocab_size
    words = [*SPECIALS, *(f"w{i}" for i in range(size - len(SPECIALS)))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=SPECIALS[0]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=SPECIALS[1], eos_token=SPECIALS[3],
                                        pad_token=SPECIALS[0], model_max_length=1 << 20)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)


def card_bandwidth(name: str) -> float:
    return next((tb for key, tb in BANDWIDTH_TB_S.items() if key in name), 3.35) * 1e12


def median_ms_per_token(run, tokens: int) -> float:
    """(t(tokens + 1) - t(1)) / tokens, medians of REPEATS runs each, in ms."""
    import torch

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(n)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(tokens + 1)  # warm-up
    long = statistics.median(timed(tokens + 1) for _ in range(REPEATS))
    short = statistics.median(timed(1) for _ in range(REPEATS))
    return round((long - short) / tokens * 1000, 3)


def load(folder: Path, engine: str, max_context: int):
    from shared.config.schema import parse_config
    from shared.models import hf_causal
    from shared.models.base import LoadContext

    raw = {"router": {}, "voice": {}, "specialists": {"a": {}}}
    context = LoadContext(service="specialist_host", physical_gpus=[0], config=parse_config(raw))
    entry = parse_config({**raw, "specialists": {"a": {
        "backend": "transformers", "path": str(folder), "dtype": "bfloat16", "engine": engine,
        "max_context": max_context}}}).specialists["a"]
    return hf_causal.load(entry, context)


def in_process(folder: Path, tokens: int, max_context: int) -> dict:
    import torch

    from shared.engine.decode import Sampling

    row: dict = {}
    started = time.perf_counter()
    loaded = load(folder, "graphs", max_context)
    row["load_with_capture_s"] = round(time.perf_counter() - started, 2)
    row["engine"] = loaded.engine_kind()
    model, tokenizer = loaded.model, loaded.tokenizer
    engine = loaded.decode_engine(tokenizer)
    engine.eos = set()  # random weights: never stop early, every run makes the same number of tokens
    ids = torch.tensor([tokenizer(PROMPT).input_ids], device="cuda")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    row["weights_gb"] = round(weights / 1e9, 2)
    cancel = threading.Event()

    def plain(n: int, **extra) -> list[int]:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0, eos_token_id=None, **extra)
        return out[0, ids.shape[1]:].tolist()

    def engine_ids(n: int) -> list[int]:
        with torch.inference_mode():
            runner = engine.ready_runner()
            batches = engine.token_batches(runner, {"input_ids": ids}, Sampling(n), cancel)
            return [t for batch in batches for t in batch]

    def engine_text(n: int) -> str:
        return "".join(engine.stream({"input_ids": ids}, Sampling(n), cancel))

    print(json.dumps(row), flush=True)
    row["generate_dynamic_ms"] = median_ms_per_token(lambda n: plain(n), tokens)
    row["generate_static_ms"] = median_ms_per_token(
        lambda n: plain(n, cache_implementation="static", disable_compile=True), tokens)
    reference = plain(tokens, cache_implementation="static", disable_compile=True)
    dynamic_reference = plain(tokens)
    row["engine_graphs_ids_ms"] = median_ms_per_token(engine_ids, tokens)
    row["engine_graphs_streamed_ms"] = median_ms_per_token(engine_text, tokens)
    print(json.dumps(row), flush=True)
    graph_ids = engine_ids(tokens)
    row["graphs_agree_with_generate_static_tokens"] = _common_prefix(graph_ids, reference)
    row["graphs_agree_with_generate_dynamic_tokens"] = _common_prefix(graph_ids, dynamic_reference)
    # Eager engine: the same static cache and step, no graph.
    engine.wanted = "eager"
    engine.release()
    row["engine_eager_ids_ms"] = median_ms_per_token(engine_ids, tokens)
    row["eager_agree_with_generate_static_tokens"] = _common_prefix(engine_ids(tokens), reference)
    row["engine_eager_kind"] = engine.describe()
    print(json.dumps(row), flush=True)
    engine.wanted = "graphs"
    engine.release()
    row["prepare_s"] = round(engine.prepare(), 3)
    row["swap_in_then_first_token"] = swap_cycles(loaded, engine, ids, tokens, weights)
    row["after_swap_agree_tokens"] = _common_prefix(engine_ids(tokens), graph_ids)
    row["graph_pool_and_cache_gb"] = round((torch.cuda.memory_allocated() - weights) / 1e9, 3)
    print(json.dumps(row), flush=True)
    # Compiled: the same step through torch.compile (fused kernels), then captured.
    engine.wanted = "compiled"
    engine.release()
    row["compiled_prepare_s"] = round(engine.prepare(), 1)
    row["compiled_kind"] = engine.describe()
    row["engine_compiled_streamed_ms"] = median_ms_per_token(engine_text, tokens)
    row["compiled_agree_with_graphs_tokens"] = _common_prefix(engine_ids(tokens), graph_ids)
    row["compiled_swap_in_then_first_token"] = swap_cycles(loaded, engine, ids, tokens, weights, cycles=2)
    loaded.unload()
    torch.cuda.empty_cache()
    return row


def swap_cycles(loaded, engine, ids, tokens: int, weights: int, cycles: int = 3) -> list[dict]:
    """Swap out and in through the host weight cache, then time until the first batch of tokens."""
    import torch

    from services.specialist_host.weight_cache import HostWeightCache
    from shared.engine.decode import Sampling

    cache = HostWeightCache(int(weights * 1.2))
    copy, _ = cache.admit("a", loaded.torch_modules())
    rows = []
    for _ in range(cycles):
        copy.to_host()
        loaded.release_device_memory()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        copy.to_device(torch.device("cuda", 0))
        moved = time.perf_counter() - t0
        loaded.prepare()
        prepared = time.perf_counter() - t0
        with torch.inference_mode():
            next(engine.token_batches(engine.ready_runner(), {"input_ids": ids}, Sampling(tokens), threading.Event()))
        rows.append({"copy_s": round(moved, 3), "ready_s": round(prepared, 3),
                     "first_token_s": round(time.perf_counter() - t0, 3)})
        print("swap in", engine.describe(), rows[-1], flush=True)
    return rows


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# ---------------------------------------------------------------- through the stack


def stack_config(work: Path, folder: Path, tokens: int, max_context: int, gpus: str = "[0]") -> Path:
    text = f"""
[runtime]
run_dir = "{work / 'run'}"
heartbeat_timeout_s = 60
[deadlines]
route = 60
load = 600
specialist = 300
voice = 60
[[gpus]]
index = 0
budget_gb = 70
[services.router]
gpus = []
[services.specialist_host]
gpus = {gpus}
[services.voice]
gpus = []
[router]
backend = "fake"
[voice]
backend = "fake"
[specialists.pragmatist]
backend = "transformers"
path = "{folder}"
dtype = "{"bfloat16" if gpus != "[]" else "float32"}"
engine = "graphs"
max_context = {max_context}
description = "practical tasks"
generation = {{ max_new_tokens = {tokens}, temperature = 0.0 }}
"""
    path = work / "decode.toml"
    path.write_text(text)
    return path


def lyra(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "shared.cli", *args], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT)
    if result.returncode != 0:
        print(f"lyra {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}", flush=True)
    return result


def through_stack(work: Path, folder: Path, tokens: int, max_context: int, gpus: str = "[0]") -> dict:
    from shared.client import Client
    from shared.wire.messages import DoneEvent, TokenEvent

    config = stack_config(work, folder, tokens, max_context, gpus)
    row: dict = {}
    started = time.perf_counter()
    up = lyra("up", "-c", str(config), "--timeout", "600")
    row["up_s"] = round(time.perf_counter() - started, 1)
    if up.returncode != 0:
        row["error"] = up.stdout[-1500:] + up.stderr[-1500:]
        return row
    try:
        def turn(n: int) -> tuple[float, dict]:
            stamps, done = [], None
            with Client(timeout_s=600) as client:
                t0 = time.perf_counter()
                for event in client.stream(PROMPT, specialist="pragmatist", max_new_tokens=n, temperature=0.0):
                    if isinstance(event, TokenEvent) and event.stage == "specialist":
                        stamps.append(time.perf_counter() - t0)
                    if isinstance(event, DoneEvent):
                        done = event
            return (stamps[-1] if stamps else float("nan")), {"events": len(stamps),
                                                               "timings": done.timings if done else None}
        turn(tokens + 1)
        longs = [turn(tokens + 1) for _ in range(REPEATS)]
        shorts = [turn(1) for _ in range(REPEATS)]
        row["stack_ms"] = round((statistics.median(t for t, _ in longs) - statistics.median(t for t, _ in shorts))
                                / tokens * 1000, 3)
        row["token_events_per_turn"] = longs[0][1]["events"]
        row["timings_long_turn"] = longs[0][1]["timings"]
        row["status_engine"] = [line for line in lyra("status").stdout.splitlines() if "engine" in line.lower()]
    finally:
        lyra("down")
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/lyra-decode")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--no-stack", action="store_true")
    args = parser.parse_args()
    import torch
    import transformers

    from bench.swap import build

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0)
    report: dict = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
                    "tokens": args.tokens, "max_context": args.max_context}
    folder = build(work, f"8b-{args.layers}", args.layers)
    full_vocab_tokenizer(folder)
    report["in_process"] = row = in_process(folder, args.tokens, args.max_context)
    floor = row["weights_gb"] * 1e9 / card_bandwidth(name) * 1000
    report["hbm_floor_ms"] = round(floor, 3)
    report["engine_vs_floor"] = round(floor / row["engine_graphs_streamed_ms"], 2)
    print(json.dumps(report, indent=1), flush=True)
    if not args.no_stack:
        report["stack"] = through_stack(work, folder, args.tokens, args.max_context)
        if "stack_ms" in report["stack"]:
            report["stack_vs_in_process"] = round(report["stack"]["stack_ms"] / row["engine_graphs_streamed_ms"], 2)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode.json").write_text(json.dumps(report, indent=2, default=str))
    print_table(report)
    return 0


def print_table(report: dict) -> None:
    row = report["in_process"]
    print(f"\n{report['device']}, torch {report['torch']}, transformers {report['transformers']}, "
          f"{row['weights_gb']} GB of weights, {report['tokens']} tokens, ms/token")
    lines = [("HBM floor", report["hbm_floor_ms"]), ("generate, dynamic cache", row["generate_dynamic_ms"]),
             ("generate, static cache (eager)", row["generate_static_ms"]),
             ("engine eager (static cache), in process", row["engine_eager_ids_ms"]),
             ("engine graphs, in process, ids", row["engine_graphs_ids_ms"]),
             ("engine graphs, in process, streamed text", row["engine_graphs_streamed_ms"]),
             ("engine compiled graphs, in process, streamed text", row.get("engine_compiled_streamed_ms")),
             ("engine graphs, through the stack (client timestamps)", report.get("stack", {}).get("stack_ms"))]
    for label, value in lines:
        print(f"| {label} | {value} |")
    print(f"engine at {report['engine_vs_floor']:.0%} of the floor; stack/in-process "
          f"{report.get('stack_vs_in_process')}; first token after swap in: "
          f"{[s['first_token_s'] for s in row['swap_in_then_first_token']]} s")


if __name__ == "__main__":
    raise SystemExit(main())
