"""The transformers vision-language backend: LLaVA-NeXT looks at the turn's image and answers in text.

The conversation goes through the processor's chat template in the llava-hf form (every content a list of
parts; the image is a `{"type": "image"}` part at the start of the last user turn), or, for a checkpoint
without a template, the documented Mistral format ``[INST] <image>\\n{text} [/INST]``. Without an image the
model answers text-only. Image bytes (PNG/JPEG) are decoded with Pillow; unreadable bytes are a BackendError.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    LlavaNextForConditionalGeneration,
)

from shared.config.schema import BNB_FORMS, LYRA_FORMS, ModelEntry
from shared.models.base import BackendError, LoadContext, LoadedModel, SpecialistOutput
from shared.models.hf_causal import TransformersModel, bitsandbytes_config, raise_if_cancelled, sampling_for
from shared.models.quantized_load import load_quantized
from shared.models.torch_common import pinned_gpus, release_memory, torch_dtype
from shared.planning import placement
from shared.wire.messages import ChatTurn, GenerationOptions

logger = logging.getLogger(__name__)



# ---------------------------------------------------------------- loading


def load(entry: ModelEntry, context: LoadContext) -> LoadedModel:
    """Load the LLaVA-NeXT checkpoint at `entry.path` and its processor onto this process's GPUs (or the CPU)."""
    started = time.perf_counter()
    if entry.kind != "vision_language":
        raise BackendError(f"model {entry.name!r}: hf_vision loads vision_language models, not {entry.kind}")
    try:
        kwargs = model_kwargs(entry, len(pinned_gpus(entry, context)))
        processor = AutoProcessor.from_pretrained(entry.path)
        if entry.quantization in LYRA_FORMS:  # the language model's decoder layers, one at a time on the GPU
            model = load_quantized(LlavaNextForConditionalGeneration, entry.path, entry.quantization,
                                   kwargs.pop("device_map"), **kwargs)
        else:
            model = LlavaNextForConditionalGeneration.from_pretrained(entry.path, **kwargs)
    except placement.PlacementError as exc:
        raise BackendError(f"model {entry.name!r}: {exc}") from exc
    except (OSError, ValueError, ImportError, RuntimeError, TypeError) as exc:
        raise BackendError(f"model {entry.name!r}: could not load a LLaVA-NeXT model from {entry.path}: {exc}") from exc
    loaded = HfVisionModel(entry, model.eval(), processor, list(context.physical_gpus))
    loaded.prepare()
    logger.info("loaded %s from %s in %.1f s, %s, placement %s, decode engine %s", entry.name, entry.path,
                time.perf_counter() - started, kwargs["dtype"], loaded.placement(), loaded.engine_kind())
    return loaded


def model_kwargs(entry: ModelEntry, gpu_count: int) -> dict[str, Any]:
    """`from_pretrained` arguments: dtype, attention, device map, memory limits and quantization."""
    dtype = torch_dtype(entry, gpu_count > 0)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": "sdpa" if entry.attn_implementation == "auto" else entry.attn_implementation,
        "device_map": placement.resolve_device_map(entry.device_map, gpu_count),
    }
    if kwargs["device_map"] in placement.STRATEGIES and entry.max_memory:
        kwargs["max_memory"] = placement.resolve_max_memory(entry.max_memory, gpu_count)
    if entry.quantization in BNB_FORMS:
        if not gpu_count:
            raise ValueError(f"quantization = {entry.quantization!r} needs a CUDA GPU and this service has none")
        kwargs["quantization_config"] = bitsandbytes_config(entry.quantization, dtype)
    if entry.quantization in LYRA_FORMS and kwargs["device_map"] in placement.STRATEGIES:
        raise ValueError(f"quantization = {entry.quantization!r} places whole layers by an explicit map: set "
                         "device_map = \"\" (one GPU) or a table of layers for a vision-language model")
    return kwargs


def decode_image(data: bytes) -> Image.Image:
    """Raw PNG/JPEG bytes -> an RGB PIL image; BackendError with a sentence when they are not a readable image."""
    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
            return picture.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BackendError(f"the image ({len(data)} bytes) could not be read as a picture: {exc}; "
                           "send a PNG or JPEG file") from exc


# ---------------------------------------------------------------- the resident model


class HfVisionModel(TransformersModel):
    """A LLaVA-NeXT model and its processor, resident in this process."""

    def __init__(self, entry: ModelEntry, model: Any, processor: Any, physical_gpus: list[int]) -> None:
        self.entry = entry
        self.model: Any = model
        self.processor: Any = processor
        self.physical_gpus = physical_gpus

    def unload(self) -> None:
        """Drop the model and processor and hand cached GPU blocks back to the driver."""
        self.drop_engine()
        self.model = self.processor = None
        release_memory()
        logger.info("unloaded %s", self.entry.name)

    def generate(self, messages: list[ChatTurn], options: GenerationOptions,
                 cancel: threading.Event) -> Iterator[str]:
        """Answer a text-only conversation, streamed piece by piece."""
        yield from self._answer(messages, None, options, cancel)

    def run_specialist(self, messages: list[ChatTurn], image: bytes | None, options: GenerationOptions,
                       cancel: threading.Event) -> Iterator[str | SpecialistOutput]:
        """Look at `image` (if any) and answer the last user turn: text pieces, then the whole description."""
        picture = decode_image(image) if image is not None else None
        pieces: list[str] = []
        for piece in self._answer(messages, picture, options, cancel):
            pieces.append(piece)
            yield piece
        yield SpecialistOutput(text="".join(pieces))

    # ------------------------------------------------------------ internals

    def _answer(self, messages: list[ChatTurn], picture: Image.Image | None, options: GenerationOptions,
                cancel: threading.Event) -> Iterator[str]:
        if self.model is None:
            raise BackendError(f"model {self.entry.name!r} has been unloaded")
        raise_if_cancelled(cancel, self.entry.name)
        sampling = sampling_for(self.entry.generation, options)
        inputs = self._fit(messages, picture, sampling.max_new_tokens)
        room = self.entry.max_context - inputs["input_ids"].shape[1]
        engine = self.decode_engine(self.processor.tokenizer)
        yield from engine.stream(inputs, replace(sampling, max_new_tokens=min(sampling.max_new_tokens, room)), cancel)

    def prepare(self) -> None:
        """Build the language model's decode engine (static cache, graphs) now rather than on the first answer."""
        if self.model is not None:
            self.decode_engine(self.processor.tokenizer).prepare()

    def _fit(self, messages: list[ChatTurn], picture: Image.Image | None, max_new: int) -> dict[str, Any]:
        """Model inputs for the whole conversation, or for system + last user turn when that is too long."""
        system = [turn for turn in messages if turn.role == "system"]
        last_user = [turn for turn in messages if turn.role == "user"][-1:]
        if not last_user:
            raise BackendError("the vision model needs a user message to answer, and the turn has none")
        limit = self.entry.max_context - min(max_new, self.entry.max_context // 2)
        self.truncation = whole = None
        for attempt in (messages, system + last_user):
            inputs = self._inputs(attempt, picture)
            if inputs["input_ids"].shape[1] <= limit:
                if whole is not None:  # reported to the client in the done event
                    self.truncation = (whole, int(inputs["input_ids"].shape[1]))
                return inputs
            whole = int(inputs["input_ids"].shape[1])
            logger.warning("%s: prompt of %d tokens over max_context %d; keeping only the system and last user turn",
                           self.entry.name, inputs["input_ids"].shape[1], self.entry.max_context)
        raise BackendError(f"the question and image take {inputs['input_ids'].shape[1]} tokens, more than this "
                           f"model's max_context of {self.entry.max_context} allows with room for the answer")

    def _inputs(self, messages: list[ChatTurn], picture: Image.Image | None) -> dict[str, Any]:
        prompt = self._prompt(messages, picture is not None)
        batch = self.processor(images=picture, text=prompt, return_tensors="pt")
        device = self.model.get_input_embeddings().weight.device
        inputs = {name: value.to(device) for name, value in batch.items() if isinstance(value, torch.Tensor)}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _prompt(self, messages: list[ChatTurn], with_image: bool) -> str:
        """The conversation rendered for the model, with the image placeholder on the last user turn."""
        token = self.processor.image_token
        # User text must not contain the image placeholder: the processor would expand it into image features.
        turns = [(turn.role, turn.content.replace(token, "[image]")) for turn in messages]
        last_user = max(i for i, (role, _) in enumerate(turns) if role == "user")
        if self.processor.chat_template is None:
            system = "".join(f"{text}\n\n" for role, text in turns if role == "system")
            image = f"{token}\n" if with_image else ""
            return f"{system}[INST] {image}{turns[last_user][1]} [/INST]"
        chat = []
        for i, (role, text) in enumerate(turns):
            parts: list[dict[str, str]] = [{"type": "image"}] if with_image and i == last_user else []
            chat.append({"role": role, "content": [*parts, {"type": "text", "text": text}]})
        return self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
