"""Tiny real-architecture checkpoints (Llama, Gemma 3 text, Jamba) for tests, a few MB each.

Each is built from its transformers config with seeded random weights and a byte-level BPE tokenizer
trained by the `tokenizers` library on a few sentences, then saved with `save_pretrained` exactly like a
downloaded checkpoint, so tests load it through the production path (`hf_causal.load`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    JambaConfig,
    JambaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from shared.config.schema import GenerationDefaults, LyraConfig, ModelEntry, parse_config
from shared.models.base import LoadContext

ARCHITECTURES = ("llama", "gemma3", "jamba")
MODEL_CLASSES = {"llama": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM", "jamba": "JambaForCausalLM"}
MAX_POSITIONS = 512
SPECIALS = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Which specialist should handle the user's message? Answer with the name only.",
    "pragmatist: practical tasks, facts, how-to, math and code.",
    "philosopher: meaning, ethics, consciousness and existential questions.",
    "artist: images, drawing, painting and design. perception: looking at pictures.",
    "What is 17 times 23? How do I fix a flat tyre? Is free will an illusion?",
    "The quick brown fox jumps over the lazy dog while Lyra answers every question.",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer over CORPUS with ChatML-style special tokens and a chat template."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|bos|>", eos_token="<|im_end|>",
                                        pad_token="<|pad|>", model_max_length=MAX_POSITIONS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def common_settings(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": 0.1, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def build_model(architecture: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised model of `architecture`, identical for the same seed."""
    common = common_settings(tokenizer)
    torch.manual_seed(seed)
    if architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if architecture == "gemma3":
        config = Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                                  layer_types=["sliding_attention", "full_attention"])
        return Gemma3ForCausalLM(config)
    if architecture == "jamba":
        config = JambaConfig(**{**common, "num_hidden_layers": 4}, attn_layer_period=2, attn_layer_offset=1,
                             expert_layer_period=2, expert_layer_offset=1, num_experts=2, num_experts_per_tok=1,
                             mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8)
        # No use_mamba_kernels: transformers 5 ignores it (deprecated) and falls back to the PyTorch scan
        # when mamba-ssm / causal-conv1d are absent, which is what a CPU test wants.
        return JambaForCausalLM(config)
    raise ValueError(f"unknown tiny architecture {architecture!r}")


def build_checkpoint(architecture: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny `architecture` model and its tokenizer into `folder` (safetensors); returns `folder`."""
    tokenizer = build_tokenizer()
    model = build_model(architecture, tokenizer, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_wide_llama(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama whose projections all take a multiple of 128 inputs (Lyra's int4 rounds groups of 128), saved
    into `folder` with its tokenizer; returns `folder`."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(**{**common_settings(tokenizer), "hidden_size": 128, "intermediate_size": 256})
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def entry(name: str, path: Path | str, **overrides: Any) -> ModelEntry:
    """A transformers ModelEntry for a tiny checkpoint (CPU-friendly defaults, greedy, short replies)."""
    fields: dict[str, Any] = {
        "name": name, "backend": "transformers", "path": str(path), "max_context": 256,
        "generation": GenerationDefaults(max_new_tokens=16, temperature=0.0),
    }
    return ModelEntry(**{**fields, **overrides})


def lyra_config() -> LyraConfig:
    """A minimal valid configuration (fake models) for LoadContext."""
    return parse_config({"router": {}, "specialists": {"pragmatist": {}}, "voice": {}})


def cpu_context(gpus: list[int] | None = None) -> LoadContext:
    """The LoadContext of a worker pinned to `gpus` (none: CPU only)."""
    return LoadContext(service="specialist_host", physical_gpus=list(gpus or []), config=lyra_config())
