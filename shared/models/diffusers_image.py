"""The diffusers image backend: a FLUX.1 pipeline that turns the user's turn into a PNG.

The prompt is the last user message (the subject), followed by the specialist's system prompt read as a
style description ("watercolour, soft light"), not as chat instructions. The subject goes first on purpose:
CLIP sees only 77 tokens and T5 `max_sequence_length`, the pipeline cuts the end, so a long style is what
gets dropped, never the subject. Size, steps and seed come from the request options when it sets them
(`width`, `height`, `steps`, `seed`), else from the entry's image settings; a size is rounded down to what
the VAE and the transformer's 2x2 patches accept (16 px for FLUX.1). Without a seed one is drawn and
reported, so every picture can be reproduced.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FluxPipeline
from diffusers.utils import deprecation_utils

from shared.config.schema import ImageDefaults, ModelEntry
from shared.engine.cancel import Cancelled
from shared.models import memory
from shared.models.base import BackendError, LoadContext, LoadedModel, SpecialistOutput
from shared.models.torch_common import pinned_gpus, release_memory, torch_dtype
from shared.planning import placement
from shared.wire.messages import ChatTurn, GenerationOptions, ImagePayload, MemoryReading

logger = logging.getLogger(__name__)

# diffusers renamed from_pretrained's `torch_dtype` to `dtype` (and warns on the old name) in the release
# that added this message; older releases know only `torch_dtype`.
_DTYPE_KWARG = "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
_DESCRIBED_CHARS = 300  # longest prompt quoted back in the text that goes to the voice


@dataclass(frozen=True)
class ImageRequest:
    """One picture to draw, with every choice resolved."""

    prompt: str
    width: int
    height: int
    steps: int
    seed: int


# ---------------------------------------------------------------- loading


def load(entry: ModelEntry, context: LoadContext) -> LoadedModel:
    """Load the FLUX pipeline at `entry.path` onto this process's first GPU (relative cuda:0) or the CPU."""
    started = time.perf_counter()
    settings = checked_settings(entry)
    gpus = [] if entry.device_map == "cpu" else pinned_gpus(entry, context)
    dtype = torch_dtype(entry, bool(gpus))
    try:
        pipe = FluxPipeline.from_pretrained(entry.path, **{_DTYPE_KWARG: dtype}, **_quantization(entry, gpus, dtype))
    except (OSError, ValueError, ImportError, RuntimeError, TypeError) as exc:
        raise BackendError(f"model {entry.name!r}: could not load a FLUX pipeline from {entry.path}: {exc}") from exc
    _place(pipe, settings, bool(gpus), entry.name)
    pipe.set_progress_bar_config(disable=True)
    loaded = DiffusersImageModel(entry, pipe, settings, gpus)
    logger.info("loaded %s from %s in %.1f s, %s, placement %s", entry.name, entry.path,
                time.perf_counter() - started, dtype, loaded.placement())
    return loaded


def checked_settings(entry: ModelEntry) -> ImageDefaults:
    """The entry's image settings; BackendError for anything this backend cannot honour."""
    if entry.kind != "image_generation":
        raise BackendError(f"model {entry.name!r}: the diffusers backend runs image_generation models, "
                           f"not {entry.kind}")
    if entry.device_map not in ("", "cpu") or entry.max_memory:
        raise BackendError(f"model {entry.name!r}: the diffusers backend puts the whole pipeline on the service's "
                           "first GPU; remove device_map/max_memory and set image.cpu_offload if memory is short")
    return entry.image


def _quantization(entry: ModelEntry, gpus: list[int], dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained arguments that quantize the transformer and T5 with bitsandbytes (CLIP and the VAE
    are small and stay in `dtype`); BackendError where bitsandbytes cannot run."""
    if entry.quantization == "none":
        return {}
    if not gpus:
        raise BackendError(f"model {entry.name!r}: quantization = {entry.quantization!r} needs a CUDA GPU "
                           "(bitsandbytes); run the artist unquantized on the CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackendError(f"model {entry.name!r}: quantization = {entry.quantization!r} needs bitsandbytes: "
                           "pip install bitsandbytes")
    from diffusers import PipelineQuantizationConfig

    eight = entry.quantization == "bnb-int8"
    kwargs: dict[str, Any] = {"load_in_8bit": True} if eight else {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype}
    return {"quantization_config": PipelineQuantizationConfig(
        quant_backend="bitsandbytes_8bit" if eight else "bitsandbytes_4bit", quant_kwargs=kwargs,
        components_to_quantize=["transformer", "text_encoder_2"])}


def _place(pipe: Any, settings: ImageDefaults, on_gpu: bool, name: str) -> None:
    """Move the pipeline to relative cuda:0 (or keep it on the CPU) and apply the memory switches."""
    if settings.vae_tiling:
        pipe.vae.enable_tiling()
    if settings.vae_slicing:
        pipe.vae.enable_slicing()
    if settings.cpu_offload and on_gpu:
        pipe.enable_model_cpu_offload(gpu_id=0)
        return
    if settings.cpu_offload:
        logger.warning("%s: image.cpu_offload has no effect without a GPU; running on the CPU", name)
    pipe.to("cuda:0" if on_gpu else "cpu")


# ---------------------------------------------------------------- the resident pipeline


class DiffusersImageModel(LoadedModel):
    """A FLUX pipeline resident in this process; draws one picture per specialist run."""

    def __init__(self, entry: ModelEntry, pipe: Any, settings: ImageDefaults, physical_gpus: list[int]) -> None:
        self.entry = entry
        self.pipe: Any = pipe
        self.settings = settings
        self.physical_gpus = physical_gpus

    def memory(self) -> list[MemoryReading]:
        """Measured memory of this process: per GPU it is pinned to, or its RSS on the CPU."""
        return memory.readings(self.physical_gpus)

    def placement(self) -> dict[str, str]:
        """Where each component's weights are, e.g. {"transformer": "gpu:1", "vae": "gpu:1", ...}."""
        if self.pipe is None:
            return {}
        found = {}
        for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                found[name] = placement.device_label(next(module.parameters()).device, self.physical_gpus)
        if self.settings.cpu_offload and self.physical_gpus:
            target = placement.device_label(0, self.physical_gpus)
            found = {name: f"{where} (offloaded; runs on {target})" for name, where in found.items()}
        return found

    def torch_modules(self) -> dict[str, Any]:
        """The pipeline's weight-holding components (transformer, VAE, text encoders) for the host cache.

        With CPU offload the components already live in host RAM and move on their own: not cached.
        """
        if self.pipe is None or self.settings.cpu_offload:
            return {}
        return {name: module for name, module in self.pipe.components.items() if isinstance(module, torch.nn.Module)}

    def unload(self) -> None:
        """Drop the pipeline (offload hooks first) and hand cached GPU blocks back to the driver."""
        if self.pipe is not None and self.settings.cpu_offload:
            self.pipe.remove_all_hooks()  # accelerate's hooks hold references to every component
        self.pipe = None
        release_memory()
        logger.info("unloaded %s", self.entry.name)

    def run_specialist(self, messages: list[ChatTurn], image: bytes | None, options: GenerationOptions,
                       cancel: threading.Event) -> Iterator[str | SpecialistOutput]:
        """Draw the picture the turn asks for; yields the description once, then the PNG with it."""
        if self.pipe is None:
            raise BackendError(f"model {self.entry.name!r} has been unloaded")
        if image is not None:
            logger.info("%s: the turn's input image is ignored (text-to-image pipeline)", self.entry.name)
        request = self.resolve(messages, options)
        payload = self._draw(request, cancel)
        text = describe(request)
        yield text
        yield SpecialistOutput(text=text, image=payload)

    def resolve(self, messages: list[ChatTurn], options: GenerationOptions) -> ImageRequest:
        """Prompt, size, steps and seed for this turn: request options over the entry's defaults, checked."""
        settings = self.settings
        multiple = int(self.pipe.vae_scale_factor) * 2
        width = _fit_side(getattr(options, "width", None) or settings.width, multiple, settings.max_side, "width")
        height = _fit_side(getattr(options, "height", None) or settings.height, multiple, settings.max_side, "height")
        steps = getattr(options, "steps", None) or settings.steps
        if not 1 <= steps <= settings.max_steps:
            raise BackendError(f"{steps} steps requested; this model allows 1 to {settings.max_steps}")
        seed = options.seed if options.seed is not None else self.entry.generation.seed
        if seed is not None and not 0 <= seed < 2**63:
            raise BackendError(f"seed {seed} is out of range; use a whole number from 0 to {2**63 - 1}")
        return ImageRequest(prompt=compose_prompt(messages), width=width, height=height, steps=steps,
                            seed=secrets.randbelow(2**31) if seed is None else seed)

    def _draw(self, request: ImageRequest, cancel: threading.Event) -> ImagePayload:
        if cancel.is_set():
            raise Cancelled(f"model {self.entry.name!r}: cancelled")

        def check_cancel(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if cancel.is_set():
                raise Cancelled(f"model {self.entry.name!r}: cancelled at step {step + 1}")
            return tensors

        started = time.perf_counter()
        # A CPU generator draws the same starting noise whatever device the pipeline runs on.
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        with torch.inference_mode():
            picture = self.pipe(prompt=request.prompt, width=request.width, height=request.height,
                                num_inference_steps=request.steps, guidance_scale=self.settings.guidance,
                                generator=generator, max_sequence_length=self._sequence_length(),
                                callback_on_step_end=check_cancel, output_type="pil").images[0]
        logger.info("%s: drew %dx%d in %d steps (seed %d) in %.2f s", self.entry.name, request.width,
                    request.height, request.steps, request.seed, time.perf_counter() - started)
        return png_payload(picture, request.prompt)

    def _sequence_length(self) -> int:
        limit = getattr(self.pipe.tokenizer_2, "model_max_length", 512)
        return min(self.settings.max_sequence_length, limit if 0 < limit <= 512 else 512)


# ---------------------------------------------------------------- pure helpers


def compose_prompt(messages: list[ChatTurn]) -> str:
    """The image prompt: the last user message, then the system turns as a style description."""
    subject = next((turn.content.strip() for turn in reversed(messages) if turn.role == "user"), "")
    if not subject:
        raise BackendError("the image model needs a description of what to draw, and the turn has no user text")
    style = " ".join(turn.content.strip() for turn in messages if turn.role == "system" and turn.content.strip())
    if not style:
        return subject
    return f"{subject} {style}" if subject.endswith((".", "!", "?")) else f"{subject}. {style}"


def _fit_side(pixels: int, multiple: int, max_side: int, name: str) -> int:
    """`pixels` rounded down to a multiple the pipeline accepts (at least one multiple), within max_side."""
    if pixels > max_side:
        raise BackendError(f"{name} {pixels} px requested; this model allows at most {max_side} px")
    return max(multiple, pixels - pixels % multiple)


def describe(request: ImageRequest) -> str:
    """What was drawn, for the voice: "I drew: <prompt> (WxH, N steps, seed S)"."""
    prompt = request.prompt if len(request.prompt) <= _DESCRIBED_CHARS else request.prompt[:_DESCRIBED_CHARS] + "…"
    return f"I drew: {prompt} ({request.width}x{request.height}, {request.steps} steps, seed {request.seed})"


def png_payload(picture: Any, prompt: str | None = None) -> ImagePayload:
    """A PIL image as PNG bytes with its size and the prompt it was drawn from."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return ImagePayload(data=buffer.getvalue(), mime="image/png", width=picture.width, height=picture.height,
                        prompt=prompt)
