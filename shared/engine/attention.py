"""Attention for one-token decode steps over a static KV cache, registered with transformers as "lyra_sdpa".

PyTorch's SDPA handles grouped-query attention without copying only when no mask is given; a static cache
always needs one (its tail is empty), so transformers then repeats every KV head for each query head it
serves: for an 8B Llama with 4096 cached positions that is about 270 MB written and read per layer per
token, more than the layer's weights. Here a decode step groups the query heads by the KV head they share
and attends with two small matmuls over the cache as it is. Prefill (more than one query token) is
transformers' own SDPA path unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from shared.kernels import decode_attention

NAME = "lyra_sdpa"
_registered = False


def grouped_decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query [B, H, q, D], key/value [B, KV, L, D] -> ([B, q, H, D], None), like transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    groups = key.shape[1]
    if length != 1 or heads % groups or getattr(module, "is_causal", True) is False:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    scale = scaling if scaling is not None else dim ** -0.5
    grouped = query.reshape(batch, groups, heads // groups, dim)  # head h reads KV head h // (heads // groups)
    position = kwargs.get("position_ids")  # [1, 1]: the cache index; 3-D (multimodal rotary) positions are not
    if (batch == 1 and position is not None and position.dim() == 2 and attends_to_everything(module, kwargs)
            and decode_attention.usable(query.device, dim, query.dtype)):
        output = decode_attention.decode_attention(grouped[0], key[0], value[0], position.reshape(-1)[-1:], scale)
        return output.reshape(batch, 1, heads, dim), None
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale  # [B, KV, H/KV, L]
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, :key.shape[-2]]  # [B, 1, 1, L]: one query row
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probabilities = torch.softmax(scores, dim=-1).to(value.dtype)
    output = torch.matmul(probabilities, value)  # [B, KV, H/KV, D]
    return output.reshape(batch, 1, heads, dim), None


def attends_to_everything(module: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a layer attends to every earlier position (else its mask limits it: a window, chunks)."""
    config = getattr(module, "config", None)
    kinds = getattr(config, "layer_types", None)
    index = getattr(module, "layer_idx", None)
    if kinds is not None and index is not None and index < len(kinds) and kinds[index] != "full_attention":
        return False
    limited = (kwargs.get("sliding_window"), getattr(module, "sliding_window", None),
               getattr(config, "attention_chunk_size", None))
    return all(limit is None for limit in limited)


def register() -> str:
    """Make "lyra_sdpa" known to transformers (attention and mask interfaces); returns the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, grouped_decode_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    return NAME


def use_grouped_decode(model: Any) -> bool:
    """Switch a model on plain SDPA to the grouped decode attention; False when it runs something else."""
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    model.set_attn_implementation(register())
    if model.config._attn_implementation != NAME:
        return False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    for device, dtype in {(p.device, p.dtype) for p in model.parameters() if p.is_floating_point()}:
        decode_attention.prepare(device, dim, dtype)  # now, not inside a graph capture
    return True
