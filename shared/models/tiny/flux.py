"""A tiny FLUX.1 pipeline (real architecture, random weights) for tests: a few hundred KB, 32x32 in a blink.

Every component is the class a real FLUX.1 checkpoint uses (FluxTransformer2DModel, AutoencoderKL, CLIP and
T5 text encoders, FlowMatchEulerDiscreteScheduler), shrunk to a layer or two. The tokenizers are built
offline: CLIP's from a hand-written byte-level vocab.json + merges.txt, T5's as a `tokenizers` WordLevel
model. Both get an explicit `model_max_length` (left unset it reads as a huge number and overflows).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerFast, T5Config, T5EncoderModel

CLIP_MAX_LENGTH = 32
T5_MAX_LENGTH = 64
TEXT_DIM = 32  # hidden size of both text encoders = the transformer's joint/pooled projection width
WORDS = ["a", "the", "cat", "dog", "red", "blue", "sky", "sunset", "over", "sea", "draw", "paint", "picture",
         "of", "in", "style", "watercolor", "bright", "lighthouse", "mountain", "portrait", "lyra"]
CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def write_clip_vocab(folder: Path) -> Path:
    """Write a byte-level CLIP vocab.json + merges.txt (every byte, plus merges spelling WORDS) into `folder`."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*alphabet, *(c + "</w>" for c in alphabet)])}
    merges: list[str] = []
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if f"{pieces[0]} {pieces[1]}" not in merges:
                merges.append(f"{pieces[0]} {pieces[1]}")
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    for special in CLIP_SPECIALS:
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def build_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """CLIPTokenizer over the hand-written vocabulary."""
    write_clip_vocab(folder)
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                         model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer() -> PreTrainedTokenizerFast:
    """A T5-style WordLevel tokenizer: <pad>=0, </s>=1, <unk>=2, then WORDS; every sequence ends in </s>."""
    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=T5_MAX_LENGTH)


def _clip_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, projection_dim=TEXT_DIM,
                            max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config)


def _t5_encoder(tokenizer: PreTrainedTokenizerFast) -> T5EncoderModel:
    config = T5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config)


def _vae() -> AutoencoderKL:
    # Four blocks: spatial factor 8 like the real VAE, so sizes go in multiples of 16 as with FLUX.1.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def _transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                  pooled_projection_dim=TEXT_DIM, axes_dims_rope=[4, 4, 8], guidance_embeds=False)


def build_pipeline(scratch: Path, seed: int = 0) -> FluxPipeline:
    """The tiny pipeline in memory, identical for the same seed (`scratch` holds the CLIP vocabulary files)."""
    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(scratch), build_t5_tokenizer()
    torch.manual_seed(seed)
    components = {
        "text_encoder": _clip_encoder(clip_tokenizer), "text_encoder_2": _t5_encoder(t5_tokenizer),
        "vae": _vae(), "transformer": _transformer(),
    }
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), tokenizer=clip_tokenizer,
                        tokenizer_2=t5_tokenizer, **components)


def build_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Save the tiny FLUX pipeline into `folder` (diffusers layout, safetensors); returns `folder`."""
    with tempfile.TemporaryDirectory() as scratch:
        build_pipeline(Path(scratch), seed).save_pretrained(folder)
    return Path(folder)
