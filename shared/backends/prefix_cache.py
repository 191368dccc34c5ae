"""Reuse of a prompt's shared beginning: the router's instructions and labels are encoded once, not per turn.

Every routing prompt is the same template and label list with a different message at the end (about 80
of SmolLM2's ~100 tokens are the same each turn), and label calibration scores three more. `PrefixCache`
keeps the KV cache of the tokens that consecutive prompts share and runs only the rest of each new one on
a copy of it. The shared part is learned from the prompts themselves (the longest common token prefix of
the last two), so any template works; when a prompt shares less (another system prompt, another label
set), the kept part shrinks to what it does share, at the cost of one extra pass over it.

Models whose caches cannot be copied and continued (Jamba's Mamba layers) get every prompt whole.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from shared.backends.decode import _output_cache, cache_keyword, weights_fingerprint

logger = logging.getLogger(__name__)

MIN_SHARED = 8  # tokens: a shorter shared beginning is not worth a cache copy


def common_length(first: list[int], second: list[int]) -> int:
    """How many tokens two id lists share from their start."""
    count = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        count += 1
    return count


class PrefixCache:
    """The KV cache of the beginning that recent prompts share, for one model."""

    def __init__(self) -> None:
        self.ids: list[int] = []  # the shared beginning held in `cache`
        self.cache: Any = None
        self.fingerprint: tuple[int, ...] = ()
        self.last: list[int] = []  # the previous prompt (where a shared beginning is first found)
        self.usable = True  # False once a model's cache could not be copied and continued

    def clear(self) -> None:
        """Forget everything (the model is unloaded or its weights moved)."""
        self.__init__()

    def forward(self, model: Any, ids: list[int]) -> Any:
        """`model(ids)` with the cache and the last position's logits; reuses the shared beginning when there is one.

        Call under torch.inference_mode(). The output's cache holds the whole prompt and is the caller's to change.
        """
        if self.fingerprint != weights_fingerprint(model):
            self.clear()
            self.fingerprint = weights_fingerprint(model)
        known = self.ids if self.cache is not None else self.last
        shared = min(common_length(known, ids), len(ids) - 1)  # at least one token runs: its logits score
        self.last = list(ids)
        if not self.usable or shared < MIN_SHARED:
            return _run(model, ids)
        if self.cache is None or shared != len(self.ids):
            output = _run(model, ids[:shared])
            reason = _not_continuable(_output_cache(output), len(ids))
            if reason:
                self.usable = reason.startswith("length")  # a longer prompt than the window: this one only
                logger.info("prompt prefixes are not reused for this %s: %s", "prompt" if self.usable else "model",
                            reason)
                self.cache, self.ids = None, []
                return _run(model, ids)
            self.cache, self.ids = _output_cache(output), list(ids[:shared])
        return _run(model, ids[shared:], copy.deepcopy(self.cache))


def _run(model: Any, ids: list[int], cache: Any = None) -> Any:
    device = model.get_input_embeddings().weight.device
    extra = {cache_keyword(model): cache} if cache is not None else {}
    return model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1, **extra)


def _not_continuable(cache: Any, length: int) -> str:
    """Why a prompt of `length` tokens cannot continue `cache` ("" = it can): only plain attention KV is kept."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return f"{type(cache).__name__} has no attention layers to continue"
    for layer in layers:
        kind = type(layer).__name__
        window = getattr(layer, "sliding_window", None)
        if kind == "DynamicSlidingWindowLayer" and window and length >= window:
            return f"length {length} reaches the sliding window ({window})"
        if kind not in ("DynamicLayer", "DynamicSlidingWindowLayer"):
            return f"{kind} layers (only attention KV caches are continued)"
    return ""
