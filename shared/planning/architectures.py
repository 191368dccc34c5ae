"""Known model architectures, written out by hand from their published configs (no model hub here).

Each entry is what the planner needs to size a checkpoint it cannot read: one or more components (a
transformers or diffusers class plus its config) that `build_on_meta` instantiates on the meta device, and
the parameter counts their authors published, which the tests hold the meta-device counts to (within 2%).

The first component is the one that runs over the context (its config gives the KV-cache shape); the
others are towers and encoders that only add weights. Numbers are from the models' `config.json` files
and model cards; where we approximate, the `notes` say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

Library = Literal["transformers", "diffusers"]


@dataclass(frozen=True)
class Component:
    """One model class of a checkpoint, with its config and the published parameter count."""

    name: str  # "model", "vision_tower", "transformer", "text_encoder_2", ...
    library: Library
    class_name: str  # e.g. "LlamaForCausalLM", "FluxTransformer2DModel"
    config: dict[str, Any]  # transformers: includes "model_type"; diffusers: the class's config dict
    published_parameters_b: float  # billions, as published for this component


@dataclass(frozen=True)
class ArchitectureSpec:
    """A named architecture: its components (first one runs the context) and notes on fidelity."""

    name: str
    components: tuple[Component, ...]
    torch_dtype: str = "bfloat16"  # dtype of the published checkpoint, used for dtype = "auto"
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def published_parameters_b(self) -> float:
        """Published parameters of the whole checkpoint, in billions."""
        return sum(c.published_parameters_b for c in self.components)


_LLAMA_3_VOCAB = 128256


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, **extra: Any) -> dict[str, Any]:
    return {
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "vocab_size": _LLAMA_3_VOCAB, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False, **extra,
    }


def _attention_blocks(layers: int, attending: int) -> list[dict[str, Any]]:
    """DeciLM-style `block_configs` where `attending` of `layers` blocks have attention, spread evenly."""
    skip = layers - attending
    return [{"attention": {"no_op": (i + 1) * skip // layers > i * skip // layers}} for i in range(layers)]


_MISTRAL_7B = {
    "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
}

_GEMMA_3_12B_TEXT = {
    "model_type": "gemma3_text", "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 262208,
    "sliding_window": 1024, "max_position_embeddings": 131072, "query_pre_attn_scalar": 256,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
}

_SIGLIP_SO400M_896 = {
    "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
    "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 896, "patch_size": 14,
    "vision_use_head": False,
}

_JAMBA_V01 = {
    "model_type": "jamba", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 65536, "num_experts": 16,
    "num_experts_per_tok": 2, "expert_layer_period": 2, "expert_layer_offset": 1, "attn_layer_period": 8,
    "attn_layer_offset": 4, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 256,
    "mamba_conv_bias": True, "mamba_proj_bias": False, "max_position_embeddings": 262144,
    "tie_word_embeddings": False,
}

_LLAVA_NEXT_MISTRAL_7B = {
    "model_type": "llava_next",
    "text_config": {**_MISTRAL_7B, "vocab_size": 32064, "sliding_window": None, "rope_theta": 1000000.0},
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
        "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
        "projection_dim": 768,
    },
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default", "use_image_newline_parameter": True,
}

_FLUX_SCHNELL_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": False, "axes_dims_rope": [16, 56, 56],
}

_T5_V1_1_XXL = {
    "model_type": "t5", "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
    "vocab_size": 32128, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
}

_CLIP_L_TEXT = {
    "model_type": "clip_text_model", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768,
    "hidden_act": "quick_gelu",
}

_FLUX_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 1024,
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
}

_SPECS = (
    ArchitectureSpec(
        "llama-3-70b",
        (Component("model", "transformers", "LlamaForCausalLM", _llama(8192, 28672, 80, 64, 8), 70.55),),
        notes="Llama 3 / 3.1 / 3.3 70B share this shape (3.1+ adds rope scaling, same weights size).",
        aliases=("llama-3.1-70b", "llama-3.3-70b"),
    ),
    ArchitectureSpec(
        "llama-3-8b",
        (Component("model", "transformers", "LlamaForCausalLM", _llama(4096, 14336, 32, 32, 8), 8.03),),
        aliases=("llama-3.1-8b",),
    ),
    ArchitectureSpec(
        "llama-3.3-nemotron-super-49b",
        # Intermediate size chosen so 80 Llama layers + embeddings reach the published 49.9B.
        (Component("model", "transformers", "LlamaForCausalLM",
                   _llama(8192, 18176, 80, 64, 8, block_configs=_attention_blocks(80, attending=49)), 49.9),),
        notes=(
            "APPROXIMATION of the weights: the real checkpoint (DeciLM, NAS-pruned from Llama-3.3-70B) has "
            "heterogeneous blocks (varying FFN widths). Modelled as 80 Llama layers whose sizes reach the "
            "published 49.9B. The KV cache is exact in size: 49 of the 80 blocks attend (the others have "
            "no attention, as the checkpoint's block_configs say); which blocks those are is spread evenly."
        ),
        aliases=("nemotron-super-49b",),
    ),
    ArchitectureSpec(
        "gemma-3-12b",
        (
            Component("model", "transformers", "Gemma3ForCausalLM", _GEMMA_3_12B_TEXT, 11.77),
            Component("vision_tower", "transformers", "SiglipVisionModel", _SIGLIP_SO400M_896, 0.417),
        ),
        notes=(
            "Text part as published in the Gemma 3 report (1,012M embedding + 10,759M non-embedding). "
            "The google/gemma-3-12b-it checkpoint also holds the 417M SigLIP vision tower, and "
            "AutoModelForCausalLM loads it (Gemma3ForConditionalGeneration), so it is counted too. "
            "40 of 48 layers use a 1024-token sliding window (5 local : 1 global)."
        ),
    ),
    ArchitectureSpec(
        "jamba-v0.1",
        (Component("model", "transformers", "JambaForCausalLM", _JAMBA_V01, 51.6),),
        notes=(
            "52B total / 12B active: 16 experts in every other layer, attention in 4 of 32 layers, "
            "Mamba in the other 28 (fixed-size state instead of a KV cache)."
        ),
        aliases=("jamba", "jamba-52b"),
    ),
    ArchitectureSpec(
        "mistral-7b",
        (Component("model", "transformers", "MistralForCausalLM", _MISTRAL_7B, 7.24),),
    ),
    ArchitectureSpec(
        "llava-v1.6-mistral-7b",
        (Component("model", "transformers", "LlavaNextForConditionalGeneration", _LLAVA_NEXT_MISTRAL_7B, 7.57),),
        torch_dtype="float16",
        notes="LLaVA-NeXT: Mistral-7B-Instruct-v0.2 + CLIP ViT-L/14-336 + 2-layer projector (llava-hf layout).",
        aliases=("llava-next-mistral-7b",),
    ),
    ArchitectureSpec(
        "flux.1-schnell",
        (
            Component("transformer", "diffusers", "FluxTransformer2DModel", _FLUX_SCHNELL_TRANSFORMER, 11.9),
            Component("text_encoder_2", "transformers", "T5EncoderModel", _T5_V1_1_XXL, 4.76),
            Component("text_encoder", "transformers", "CLIPTextModel", _CLIP_L_TEXT, 0.123),
            Component("vae", "diffusers", "AutoencoderKL", _FLUX_VAE, 0.0838),
        ),
        notes="Pipeline = 12B rectified-flow transformer + T5-XXL encoder (4.76B) + CLIP-L text (123M) + VAE (84M).",
        aliases=("flux-schnell", "flux"),
    ),
)

ARCHITECTURES: dict[str, ArchitectureSpec] = {spec.name: spec for spec in _SPECS}
_ALIASES: dict[str, str] = {alias: spec.name for spec in _SPECS for alias in spec.aliases}


def get_architecture(name: str) -> ArchitectureSpec:
    """The spec for a known architecture name (case-insensitive; aliases accepted)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise KeyError(f"unknown architecture {name!r}; known: {known}")
    return ARCHITECTURES[key]


def build_config(component: Component) -> Any:
    """The component's config object (a transformers PretrainedConfig, or the dict for diffusers)."""
    if component.library == "diffusers":
        return dict(component.config)
    from transformers import AutoConfig

    values = dict(component.config)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def build_on_meta(component: Component) -> torch.nn.Module:
    """Instantiate the component on the meta device: shapes only, no memory, no weights."""
    import torch

    if component.library == "diffusers":
        import diffusers

        cls = getattr(diffusers, component.class_name)
        with torch.device("meta"):
            return cls.from_config(dict(component.config))
    import transformers

    cls = getattr(transformers, component.class_name)
    config = build_config(component)
    with torch.device("meta"):
        return cls(config)
