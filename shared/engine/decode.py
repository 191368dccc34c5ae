"""The decode engine every transformers causal LM runs: prefill, then one token a step, handed out in batches.

`auto` (the default) picks the fastest step a model allows: the fused step where it runs on Lyra's kernels (a
Llama-family model in float weights on one GPU with Triton), else transformers' own step in a CUDA graph, and
says why in `describe()`, which `lyra status` shows. Three runners share one loop:
- `graphs` (a CUDA device holding the whole model): a static KV cache of `max_context` tokens and the
  one-token forward replayed from a CUDA graph. The step reads its token from a fixed buffer, marks its
  position in a fixed attention mask and advances the cache's own position counter, all on the GPU, so
  the host only launches replays.
- `static` (the eager engine on CUDA, or graphs that could not be captured): the same static cache and
  step, run eagerly.
- `dynamic` (the CPU, hybrid Mamba or sliding-window caches): transformers' default cache grown a token at
  a time, exactly what `model.generate` does.

The loop never waits on the GPU for each token. Chosen tokens are copied to pinned host memory as they
are made; every `BATCH` steps an event is recorded, and the host reads the batch before last, so the GPU
always has the next batch queued. Text is detokenized a batch at a time while the GPU works, so no thread
wakes once per token. EOS and stop strings end the reply at the exact token; the GPU may have run up to
two batches past it, which are dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from shared.engine.attention import use_grouped_decode
from shared.engine.cancel import Cancelled
from shared.engine.detokenize import IncrementalText
from shared.engine.fused_step import REDUCE_ATTRIBUTE, FusedStep
from shared.engine.fused_step import problems as fused_problems
from shared.engine.sampling import Sampling, penalisable_tokens, penalise_repeats, pick_token

logger = logging.getLogger(__name__)

ENGINES = ("auto", "graphs", "compiled", "fused", "eager")
BATCH = 4  # tokens per host read: one event and one detokenization per batch, never per token
# Inductor times Triton kernels against cuBLAS for each matrix shape and fuses norms into the products:
# 4% faster per token than the default mode on an H200 (8B), for a longer first compile.
FUSED_COMPILE_MODE = "max-autotune-no-cudagraphs"
WARMUP_STEPS = 2  # eager steps before capture (cuBLAS and allocator state settle on a side stream)


def cache_keyword(model: Any) -> str:
    """The forward keyword for the KV cache: `cache` in newer transformers, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def without_mask(inputs: dict[str, Any]) -> dict[str, Any]:
    """Model inputs less the processor's attention mask: a runner passes its own (one unpadded row)."""
    return {name: value for name, value in inputs.items() if name != "attention_mask"}


def output_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


# ---------------------------------------------------------------- runners


class DynamicRunner:
    """Eager decoding with transformers' default cache (what `generate` does), for any model and device."""

    kind = "dynamic"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.keyword = cache_keyword(model)
        self.cache: Any = None
        self.length = 0

    def prefill(self, inputs: dict[str, Any]) -> torch.Tensor:
        inputs = without_mask(inputs)
        ids = inputs["input_ids"]
        self.length = ids.shape[1]
        mask = torch.ones((1, self.length), dtype=torch.long, device=ids.device)
        output = self.model(**inputs, attention_mask=mask, use_cache=True, logits_to_keep=1)
        self.cache = output_cache(output)
        return output.logits[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.length += 1
        mask = torch.ones((1, self.length), dtype=torch.long, device=token.device)
        output = self.model(input_ids=token.view(1, 1), attention_mask=mask, use_cache=True,
                            **{self.keyword: self.cache})
        self.cache = output_cache(output)
        return output.logits[:, -1]

    def release(self) -> None:
        self.cache = None


class StaticRunner:
    """A static KV cache of `max_len` tokens and a fixed-shape one-token step, eager or from a CUDA graph.

    The step is self-advancing: its position is the cache's own on-device counter, so a replay needs no
    input from the host except the token, which sits in a fixed buffer.
    """

    def __init__(self, model: Any, max_len: int, graphs: bool, step_function: Any = None) -> None:
        from transformers import StaticCache

        self.model = model
        self.step_function = step_function or decode_step
        self.max_len = max_len
        self.keyword = cache_keyword(model)
        device = model.get_input_embeddings().weight.device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        unsupported = sorted({type(layer).__name__ for layer in self.cache.layers
                              if not hasattr(layer, "cumulative_length") or getattr(layer, "is_sliding", False)})
        if unsupported:
            raise UnsupportedModel(f"its cache layers ({', '.join(unsupported)}) are not plain static layers")
        use_grouped_decode(model)  # without it, masked SDPA copies every KV head per query head, every step
        self.mask = torch.zeros((1, max_len), dtype=torch.long, device=device)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.kind = "static"
        self.fingerprint = weights_fingerprint(model)
        self._initialise()
        if graphs:
            self._capture()
            self.kind = "graphs"

    def _forward_step(self) -> torch.Tensor:
        return self.step_function(self.model, self.token, self.mask, self.cache, self.keyword)

    def _initialise(self) -> None:
        """One tiny prefill allocates the cache tensors (lazily made by transformers) before any capture."""
        self.prefill({"input_ids": self.token})

    def _capture(self) -> None:
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._forward_step()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._forward_step()
        self.graph = graph

    def prefill(self, inputs: dict[str, Any]) -> torch.Tensor:
        inputs = without_mask(inputs)
        length = inputs["input_ids"].shape[1]
        self.cache.reset()
        self.mask.zero_()
        self.mask[:, :length] = 1
        output = self.model(**inputs, attention_mask=self.mask, use_cache=True, logits_to_keep=1,
                            **{self.keyword: self.cache})
        return output.logits[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token.view(1, 1))
        if self.graph is None:
            return self._forward_step()
        self.graph.replay()
        assert self.logits is not None
        return self.logits

    def release(self) -> None:
        self.graph = self.logits = None
        self.cache = None


def decode_step(model: Any, token: torch.Tensor, mask: torch.Tensor, cache: Any, keyword: str) -> torch.Tensor:
    """One token through the model at the cache's own position; marks that position in the mask first."""
    mask.index_fill_(1, cache.layers[0].cumulative_length.view(1), 1)
    return model(input_ids=token, attention_mask=mask, use_cache=True, **{keyword: cache}).logits[:, -1]


class UnsupportedModel(Exception):
    """The static runner cannot hold this model's cache; the dynamic runner serves it instead."""


def weights_fingerprint(model: Any) -> tuple[int, ...]:
    """Where the weights live on the device: a captured graph is valid only while this is unchanged."""
    params = list(model.parameters())
    return (params[0].data_ptr(), params[-1].data_ptr(), len(params))


def single_cuda_device(model: Any) -> bool:
    devices = {p.device for p in model.parameters()}
    return len(devices) == 1 and next(iter(devices)).type == "cuda"


# ---------------------------------------------------------------- the engine


class DecodeEngine:
    """Decodes replies for one resident causal LM with the fastest runner its placement allows."""

    def __init__(self, model: Any, tokenizer: Any, name: str, engine: str, max_context: int,
                 wrap: Any = None) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.wanted = engine
        self.max_context = max_context
        self.runner: DynamicRunner | StaticRunner | None = None
        self.reason = ""  # why the runner is not what was asked for
        self.eos = eos_ids(model, tokenizer)
        self.lock = threading.Lock()
        self.last_usage: tuple[int, int, str] | None = None  # (prompt, completion tokens, finish reason)
        self.compiled: Any = None  # made once: it survives swaps (weights are its inputs, not constants)
        self.fused: FusedStep | None = None  # the fused engine's step; re-bound to the weights on each build
        self.fallback = ""  # why the fused step does not run this model (it is then compiled as transformers' step)
        self.penalisable: torch.Tensor | None = None  # [vocab] bool, made on the first penalised reply
        self.wrap = wrap or (lambda runner: runner)  # e.g. tensor-parallel rank 0 announcing each step

    def _step_function(self) -> Any:
        if self.wanted == "auto":
            return self._auto_step()
        if self.wanted == "fused" and not self.fallback:
            try:
                return self.fused_step()
            except ValueError as exc:
                self.fallback = f"fused step unsupported: {exc}"
                logger.warning("%s: %s; decoding with the compiled engine", self.name, self.fallback)
        if self.wanted not in ("compiled", "fused"):
            return None
        if self.compiled is None:
            self.compiled = torch.compile(decode_step, dynamic=False)
        return self.compiled

    def _auto_step(self) -> Any:
        """`auto`: the fused step where it runs on Lyra's kernels (no compile, the fastest); else transformers' own
        step in a CUDA graph (None). `fallback` says why not fused, and then stays: later builds skip the try."""
        if not self.fallback:
            try:
                if self._fusable():
                    return self.fused.__call__  # type: ignore[union-attr]
            except Exception as exc:  # the step's build failed: graphs serve
                logger.warning("%s: the fused step failed to build, decoding with graphs: %s", self.name, exc)
                self.fallback = f"fused step failed: {str(exc).splitlines()[0][:200]}"
        self.fused = None
        return None

    def _fusable(self) -> bool:
        """Whether the fused step runs on Lyra's kernels here, bound to the weights; `fallback` says why not."""
        found = fused_problems(self.model)
        if found:
            self.fallback = f"fused step unsupported: {'; '.join(found)}"
            return False
        if getattr(self.model, REDUCE_ATTRIBUTE, None) is not None:  # Lyra's products run on one GPU only
            self.fallback = "a tensor rank: Lyra's kernels run on one GPU; engine = \"fused\" compiles the step"
            return False
        if self.fused is None:
            self.fused = FusedStep(self.model, self.max_context)
        else:
            self.fused.bind(self.model)
        if not self.fused.products:  # the fused step would then be compiled with torch.compile: minutes at first load
            self.fallback = "Lyra's kernels do not run here (Triton, this GPU or dtype); engine = \"fused\" compiles"
            return False
        return True

    def fused_step(self) -> Any:
        if self.fused is None:
            self.fused = FusedStep(self.model, self.max_context)
        else:
            self.fused.bind(self.model)
        # On Lyra's kernels the step is kernel launches that the captured graph replays, with nothing left for
        # inductor to fuse: it runs as it is, without a compile. Otherwise (no kernels here, or projections the
        # host weight cache laid apart, as Qwen2's biased q/k/v after a swap) it is compiled, once: its
        # tensors are inputs, so a re-bind replays the same code.
        if self.fused.products:
            return self.fused.__call__
        if self.compiled is None:
            self.compiled = torch.compile(self.fused.__call__, dynamic=False, mode=FUSED_COMPILE_MODE)
        return self.compiled

    def describe(self) -> str:
        """What decodes now, e.g. "graphs", "static (eager)", "dynamic (CPU)"."""
        kind = self.runner.kind if self.runner is not None else "not prepared"
        return f"{kind} ({self.reason})" if self.reason else kind

    def prepare(self) -> float:
        """Build the runner (cache, graph) now rather than on the first request; returns seconds taken."""
        started = time.perf_counter()
        with self.lock, torch.inference_mode():
            self.ready_runner()
        return time.perf_counter() - started

    def release(self) -> None:
        """Drop the cache and graphs (the weights are leaving the device); the next reply rebuilds them."""
        with self.lock:
            if self.runner is not None:
                self.runner.release()
            self.runner = None
            if self.fused is not None:
                self.fused.unbind()

    def ready_runner(self) -> DynamicRunner | StaticRunner:
        runner = self.runner
        if isinstance(runner, StaticRunner) and runner.fingerprint != weights_fingerprint(self.model):
            runner.release()  # the weights moved (a swap in from the host cache): re-capture
            runner = None
        if runner is None:
            started = time.perf_counter()
            runner = self.runner = self.wrap(self._build())
            if single_cuda_device(self.model):
                # What the build freed goes back to the driver. The fused step's first build copies q/k/v and
                # gate/up side by side and frees the originals: kept by torch's allocator, they held 7.4 GB
                # beside the 8B shape's 16.1 GB of weights (device use 24.9 GB, 17.5 GB with this; graphs
                # 17.8; 1 x H200), which the ledger measured and no other model on the GPU could use.
                torch.cuda.empty_cache()
            logger.info("%s: decode engine %s ready in %.3fs", self.name, self.describe(),
                        time.perf_counter() - started)
        return runner

    def _build(self) -> DynamicRunner | StaticRunner:
        if not single_cuda_device(self.model):
            on_cpu = all(p.device.type == "cpu" for p in self.model.parameters())
            self.reason = "CPU" if on_cpu else "split over devices"
            if not on_cpu:
                try:  # a split model still gains from the static cache, eagerly
                    return StaticRunner(self.model, self.max_context, graphs=False)
                except UnsupportedModel as exc:
                    self.reason = f"split over devices; {exc}"
            return DynamicRunner(self.model)
        try:
            graphs = self.wanted in ("auto", "graphs", "compiled", "fused")
            runner = StaticRunner(self.model, self.max_context, graphs=graphs, step_function=self._step_function())
            fused = self.fused is not None and not self.fallback
            if self.wanted in ("compiled", "fused") or fused:
                runner.kind = f"{'fused' if fused else 'compiled'} graphs"
            self.reason = self.fallback if self.wanted == "fused" else "" if graphs else "eager"
            if self.wanted == "auto":
                model_type = getattr(self.model.config, "model_type", "?")
                self.reason = f"auto: {self.fallback}" if self.fallback else \
                    f"auto: a {model_type} model, on Lyra's kernels"
            return runner
        except UnsupportedModel as exc:
            self.reason = str(exc)
        except Exception as exc:  # a forward that cannot be captured or compiled: serve eagerly, say why
            if self.wanted == "auto" and self.fused is not None and not self.fallback:  # transformers' step next
                logger.warning("%s: the fused step failed to capture, decoding with graphs: %s", self.name, exc)
                self.fallback, self.fused = f"fused step failed: {str(exc).splitlines()[0][:200]}", None
                return self._build()
            logger.warning("%s: %s decode step failed to build, decoding eagerly: %s", self.name, self.wanted, exc,
                           exc_info=True)
            self.reason = f"{self.wanted} failed: {str(exc).splitlines()[0][:120]}"
            try:
                return StaticRunner(self.model, self.max_context, graphs=False)
            except Exception:
                pass
        return DynamicRunner(self.model)

    def stream(self, inputs: dict[str, Any], sampling: Sampling, cancel: threading.Event) -> Iterator[str]:
        """Yield the reply's text in pieces, a batch of tokens at a time; raises Cancelled."""
        with self.lock, torch.inference_mode():
            runner = self.ready_runner()
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            text = IncrementalText(self.tokenizer, sampling.stop)
            prompt = int(inputs["input_ids"].shape[1])
            self.last_usage = (prompt, 0, "stop")
            for ids in self.token_batches(runner, inputs, sampling, cancel):
                piece = text.push(ids)
                made = len(text.ids)
                self.last_usage = (prompt, made, "length" if made >= sampling.max_new_tokens else "stop")
                if piece:
                    yield piece
                if text.stopped:
                    self.last_usage = (prompt, made, "stop")
                    break
            tail = text.finish()
            if tail:
                yield tail
            if cancel.is_set():  # a cancel that came as the reply ended still ends the call as cancelled
                raise Cancelled(f"model {self.name!r}: cancelled")

    def token_batches(self, runner: DynamicRunner | StaticRunner, inputs: dict[str, Any], sampling: Sampling,
                       cancel: threading.Event) -> Iterator[list[int]]:
        """Token ids in batches of BATCH, ending at EOS (excluded) or max_new_tokens."""
        total = sampling.max_new_tokens
        logits = runner.prefill(inputs)
        device = logits.device
        on_gpu = device.type == "cuda"
        chosen = torch.empty(total, dtype=torch.long, pin_memory=on_gpu)
        penalty = sampling.repetition_penalty
        seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device) if penalty != 1.0 else None
        penalisable = self._penalisable(logits.shape[-1], device) if seen is not None else None
        queued: list[tuple[int, int, Any]] = []  # (first, end, event) of batches the GPU may still be making
        start = 0
        for index in range(total):
            if cancel.is_set():
                raise Cancelled(f"model {self.name!r}: cancelled")
            if seen is not None:  # on the device, no host sync: the graph-replayed step is unaffected
                logits = penalise_repeats(logits, seen, penalty)
            token = pick_token(logits, sampling)
            if seen is not None and penalisable is not None:  # a token without a letter is never marked
                seen.scatter_(0, token.view(-1), penalisable.gather(0, token.view(-1)))
            chosen[index:index + 1].copy_(token, non_blocking=on_gpu)
            last = index + 1 == total
            if (index + 1) % BATCH == 0 or last:
                event = torch.cuda.Event() if on_gpu else None
                if event is not None:
                    event.record()
                queued.append((start, index + 1, event))
                start = index + 1
            # Read the batch before last: the GPU keeps the newest batch to work on meanwhile.
            while queued and (len(queued) > 1 or last):
                first, end, done = queued.pop(0)
                if done is not None:
                    done.synchronize()
                ids = chosen[first:end].tolist()
                ended = next((at for at, token_id in enumerate(ids) if token_id in self.eos), None)
                yield ids if ended is None else ids[:ended]
                if ended is not None:
                    return
            if not last:
                logits = runner.step(token)

    def _penalisable(self, vocab: int, device: torch.device) -> torch.Tensor:
        """The tokens the repetition penalty may touch, on `device` (built once per engine)."""
        if self.penalisable is None or self.penalisable.shape[0] != vocab:
            self.penalisable = penalisable_tokens(self.tokenizer, vocab)
        if self.penalisable.device != device:
            self.penalisable = self.penalisable.to(device)
        return self.penalisable


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end a reply: the generation config's EOS (as `generate` uses), else the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return set()
    return set(configured) if isinstance(configured, (list, tuple)) else {int(configured)}
