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

from shared.engine.decode import cache_keyword, output_cache, weights_fingerprint

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
        kept = common_length(self.ids, ids) if self.cache is not None else 0
        seen = common_length(self.last, ids)  # the previous prompt may share more than the kept part
        self.last = list(ids)
        # Keep what is kept unless the previous prompt shares clearly more (a pass over it is the cost).
        shared = kept if self.cache is not None and seen < kept + MIN_SHARED else seen
        shared = min(shared, len(ids) - 1)  # at least one token runs: its logits score the labels
        window = _window(model)
        if not self.usable or shared < MIN_SHARED or (window and len(ids) >= window):
            return _run(model, ids)  # a prompt as long as a sliding window: evicted positions cannot be resumed
        if self.cache is None or shared != len(self.ids):
            self.cache, self.ids = output_cache(_run(model, ids[:shared])), list(ids[:shared])
            reason = _not_continuable(self.cache)
            if reason:
                logger.info("prompt prefixes are not reused for this model: %s", reason)
                self.usable, self.cache, self.ids = False, None, []
                return _run(model, ids)
        return _run(model, ids[shared:], copy.deepcopy(self.cache))


def _run(model: Any, ids: list[int], cache: Any = None) -> Any:
    device = model.get_input_embeddings().weight.device
    extra = {cache_keyword(model): cache} if cache is not None else {}
    return model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1, **extra)


def _window(model: Any) -> int | None:
    """The smallest sliding attention window of the model's layers, or None."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "sliding_window", None)


def _not_continuable(cache: Any) -> str:
    """Why `cache` cannot be continued ("" = it can): only attention KV layers are kept."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return f"{type(cache).__name__} has no attention layers to continue"
    for layer in layers:
        kind = type(layer).__name__
        if kind not in ("DynamicLayer", "DynamicSlidingWindowLayer"):
            return f"{kind} layers (only attention KV caches are continued)"
    return ""
