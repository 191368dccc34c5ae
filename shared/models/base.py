"""The interface every model backend implements, whatever it runs on.

A worker process (router, specialist host, voice) holds `LoadedModel` objects made by `load_model`. The
worker's handlers compose prompts and talk to the coordinator; a backend only loads, runs and unloads
one model. Real backends (transformers, diffusers) and the `fake` test double sit behind the same API.
"""

from __future__ import annotations

import importlib
import re
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shared.config.schema import GenerationDefaults, LyraConfig, ModelEntry
from shared.wire.messages import (
    ChatTurn,
    ErrorCode,
    GenerationOptions,
    ImagePayload,
    MemoryReading,
    RouteLabel,
    Truncation,
)
from shared.wire.names import WorkerName


class BackendError(Exception):
    """A model could not be loaded or run; the message is shown to the user."""

    code = ErrorCode.worker_error  # what the worker puts on the wire (a remote server's 429 is `busy`)


class WireGarbage(Exception):
    """A test double asks its worker to put malformed bytes on the wire instead of a reply."""


@dataclass(frozen=True)
class LoadContext:
    """What a backend needs to know about the process it runs in."""

    service: WorkerName
    physical_gpus: list[int]  # the GPUs this process is pinned to (CUDA_VISIBLE_DEVICES order)
    config: LyraConfig


@dataclass(frozen=True)
class SpecialistOutput:
    """What a specialist produced: text, and an image for image generators."""

    text: str
    image: ImagePayload | None = None


class LoadedModel(ABC):
    """One model resident in this process."""

    entry: ModelEntry
    truncation: tuple[int, int] | None = None  # set by a backend that cut its last prompt to max_context

    @abstractmethod
    def memory(self) -> list[MemoryReading]:
        """Measured memory of this process per device right now."""

    def placement(self) -> dict[str, str]:
        """Resolved placement, e.g. {"model": "gpu:1"} or a layer-range summary."""
        return {}

    @abstractmethod
    def unload(self) -> None:
        """Free every byte this model holds (GPU memory really returned)."""

    def torch_modules(self) -> dict[str, Any]:
        """The nn.Modules holding this model's weights, for the host weight cache ({} = not cacheable)."""
        return {}

    def prepare(self) -> None:
        """Get ready to serve after a load or a swap in (e.g. build a decode engine's cache and graphs)."""
        return None

    def last_usage(self) -> tuple[int, int, str] | None:
        """(prompt tokens, completion tokens, "stop" or "length") of the last reply; None when not counted."""
        return None

    def last_truncation(self) -> tuple[int, int] | None:
        """(prompt tokens, tokens kept) when the last reply's prompt was cut to max_context; None when it was not."""
        return self.truncation

    def engine_kind(self) -> str:
        """What decodes this model's text ("graphs", "static (eager)", ...); "" when it does not decode."""
        return ""

    def release_device_memory(self) -> None:
        """Hand freed device memory back to the driver (after the weight cache moved weights to the host)."""
        torch = sys.modules.get("torch")  # only a process that already uses torch has anything to release
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # Role methods: a backend implements the ones its model kind supports.

    def classify(self, messages: list[ChatTurn], labels: list[RouteLabel], template: str,
                 cancel: threading.Event) -> dict[str, float]:
        """Probability per label name (summing to 1) that the conversation belongs to it."""
        raise BackendError(f"model {self.entry.name!r} ({self.entry.kind}) cannot classify")

    def embed(self, texts: list[str], cancel: threading.Event) -> list[list[float]]:
        """One unit-length vector per text, for routing by similarity to example prompts."""
        raise BackendError(f"model {self.entry.name!r} ({self.entry.kind}) cannot embed text")

    def generate(self, messages: list[ChatTurn], options: GenerationOptions,
                 cancel: threading.Event) -> Iterator[str]:
        """Stream the reply to a fully composed conversation, piece by piece."""
        raise BackendError(f"model {self.entry.name!r} ({self.entry.kind}) cannot generate text")

    def run_specialist(self, messages: list[ChatTurn], image: bytes | None, options: GenerationOptions,
                       cancel: threading.Event) -> Iterator[str | SpecialistOutput]:
        """Run as a specialist: stream text pieces, then end with one SpecialistOutput."""
        pieces: list[str] = []
        for piece in self.generate(messages, options, cancel):
            pieces.append(piece)
            yield piece
        yield self.specialist_output("".join(pieces), image)

    def specialist_output(self, text: str, image: bytes | None) -> SpecialistOutput:
        """The result of a streamed specialist run (a backend may attach more than the text)."""
        return SpecialistOutput(text=text)


def truncation(model: LoadedModel, stage: str) -> Truncation | None:
    """How the model's last prompt was cut to max_context, for the reply to the coordinator; None if it was not."""
    cut = model.last_truncation()
    if cut is None:
        return None
    return Truncation(stage=stage, model=model.entry.name, prompt_tokens=cut[0], kept_tokens=cut[1],
                      max_context=model.entry.max_context)

def render_template(template: str, labels: str, text: str) -> str:
    """Fill {labels} and {text} in one pass: other braces stay as written, inserted text is never re-read."""
    values = {"labels": labels, "text": text}
    return re.sub(r"\{(labels|text)\}", lambda match: values[match.group(1)], template)


def generation_settings(defaults: GenerationDefaults, options: GenerationOptions) -> dict[str, Any]:
    """The model's generation defaults with every option the request sets laid over them."""
    fields = ("max_new_tokens", "temperature", "top_p", "seed", "stop")
    return {name: getattr(defaults, name) if getattr(options, name) is None else getattr(options, name)
            for name in fields}


VISION_BACKEND = "shared.models.hf_vision:load"  # transformers + kind "vision_language"
BACKENDS: dict[str, str] = {
    "fake": "shared.testing.fake_backend:load",
    "transformers": "shared.models.hf_causal:load",
    "diffusers": "shared.models.diffusers_image:load",
    "openai": "shared.models.openai_remote:load",  # any OpenAI-compatible server; no local weights
}


def load_model(entry: ModelEntry, context: LoadContext) -> LoadedModel:
    """Load `entry` with its configured backend (imported lazily: the coordinator never imports torch)."""
    from shared.models.embedded import materialise

    entry = materialise(entry)
    target = VISION_BACKEND if (entry.backend, entry.kind) == ("transformers", "vision_language") else \
        BACKENDS.get(entry.backend)
    if target is None:
        raise BackendError(f"model {entry.name!r}: unknown backend {entry.backend!r}")
    module_name, func = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(f"model {entry.name!r}: backend {entry.backend!r} is not installed ({exc})") from exc
    return getattr(module, func)(entry, context)
