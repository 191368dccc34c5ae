"""A tiny LLaVA-NeXT (real architecture, random weights) for tests: a CLIP vision tower, a Mistral text model.

Shaped like llava-hf/llava-v1.6-mistral-7b-hf, shrunk: 16x16 crops of 4x4 patches, a grid of up to 2x2
crops, two layers each. The tokenizer is a byte-level BPE trained by the `tokenizers` library with `<image>`
and the Mistral `[INST]` markers as special tokens; the processor carries a chat template in the llava-hf
style (content as a list of parts, `{"type": "image"}` rendered as `<image>`). Everything is saved with
`save_pretrained`, so tests load it through the same `from_pretrained` path as the real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
)

CROP = 16  # vision tower input side = crop size = shortest edge after resize
PATCH = 4
GRID_PINPOINTS = [[CROP, 2 * CROP], [2 * CROP, CROP], [2 * CROP, 2 * CROP]]
MAX_POSITIONS = 1024
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "[INST]", "[/INST]"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + '\n\n' }}{% endfor %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{{ ' [/INST]' }}"
    "{% else %}{% for part in message['content'] if part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
)
CORPUS = [
    "What is shown in this image? Describe the picture in one sentence.",
    "The image shows a red square, a blue circle and a green triangle on a white background.",
    "A cat sits on a mat next to a lighthouse by the sea at sunset.",
    "There is a dog, a tree, a car and a person walking in the park.",
    "Lyra looks at pictures and tells what she sees: colours, shapes, objects and text.",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE over CORPUS; every encoding starts with <s>; `<image>` is one special token."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS, trainer=trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                        special_tokens=[("<s>", core.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   model_max_length=MAX_POSITIONS)


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaNextProcessor:
    """Image processor (tiny crops and grid) + tokenizer + chat template."""
    # Without torchvision transformers hands out its Pillow backend under this name.
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP},
                                              image_grid_pinpoints=GRID_PINPOINTS)
    # num_additional_image_tokens=1: the CLIP tower's CLS token, dropped again by the "default" strategy
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=CHAT_TEMPLATE)


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlavaNextForConditionalGeneration:
    """The tiny model with seeded random weights (identical for the same seed)."""
    text = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=MAX_POSITIONS, sliding_window=None, initializer_range=0.1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(image_size=CROP, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    config = LlavaNextConfig(text_config=text, vision_config=vision, image_grid_pinpoints=GRID_PINPOINTS,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             vision_feature_select_strategy="default", vision_feature_layer=-2,
                             tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def build_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Save the tiny LLaVA-NeXT model and its processor into `folder` (safetensors); returns `folder`."""
    folder = Path(folder)
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed).save_pretrained(folder)
    build_processor(tokenizer).save_pretrained(folder)
    return folder
