"""The `fake` backend: a deterministic test double with a memory footprint and switches to misbehave.

It is the development mode of the architecture (every process, no model loading) and what the
integration tests drive. It is never what a real config runs: its output is derived from the input
by rules, not by a model. Misbehaviour comes from the entry's `fake` table, or, when `fake.triggers` is
on, from a marker in the user's text: ``[[fake:<hang|crash|garbage|error|slow>:<service>]]``.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import threading
import time
from collections.abc import Iterator

from shared.config.schema import ModelEntry
from shared.config.units import GB
from shared.engine.cancel import Cancelled
from shared.models.base import BackendError, LoadContext, LoadedModel, SpecialistOutput, WireGarbage
from shared.planning.ledger_bytes import estimate_per_gpu
from shared.wire.messages import ChatTurn, GenerationOptions, ImagePayload, MemoryReading, RouteLabel
from shared.wire.names import VOICE

TRIGGER = re.compile(r"\[\[fake:(hang|crash|garbage|error|slow):(\w+)\]\]")

def _last_user(messages: list[ChatTurn]) -> str:
    for turn in reversed(messages):
        if turn.role == "user":
            return turn.content
    return ""


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2}


class FakeModel(LoadedModel):
    """A model that answers by rule, sleeps as configured, and misbehaves on demand."""

    def __init__(self, entry: ModelEntry, context: LoadContext) -> None:
        self.entry = entry
        self.context = context
        self.usage: tuple[int, int, str] | None = None
        self.truncation: tuple[int, int] | None = None
        self._misbehave("load", [])
        time.sleep(entry.fake.load_s)

    # ------------------------------------------------------------ misbehaviour

    def _misbehave(self, op: str, messages: list[ChatTurn]) -> None:
        fake = self.entry.fake
        action = fake.misbehave if fake.misbehave_on in (op, "any") else "none"
        if fake.triggers and op != "load":
            for found, service in TRIGGER.findall(_last_user(messages)):
                if service == self.context.service:
                    action = found
        if action == "hang":
            threading.Event().wait()  # ignores cancel on purpose: the worker's watchdog must act
        elif action == "crash":
            os._exit(17)
        elif action == "garbage":
            raise WireGarbage()
        elif action == "error":
            raise BackendError(f"fake model {self.entry.name!r} was told to fail at {op}")
        elif action == "slow":
            time.sleep(max(1.0, self.entry.fake.delay_s * 10))

    def _sleep(self, seconds: float, cancel: threading.Event) -> None:
        if seconds and cancel.wait(seconds):
            raise Cancelled()

    # ------------------------------------------------------------ LoadedModel

    def memory(self) -> list[MemoryReading]:
        """The declared footprint, placed the way the planner places it, reported as if measured."""
        gpus = self.context.physical_gpus
        if not gpus:
            size = int(self.entry.memory_gb * GB)
            return [MemoryReading(device="cpu", allocated_bytes=size, reserved_bytes=size)]
        return [MemoryReading(device=f"gpu:{g}", allocated_bytes=size, reserved_bytes=size)
                for g, size in estimate_per_gpu(self.entry, gpus).items()]

    def placement(self) -> dict[str, str]:
        gpus = self.context.physical_gpus
        return {self.entry.name: ",".join(f"gpu:{g}" for g in gpus) if gpus else "cpu"}

    def unload(self) -> None:
        """Nothing to free: the footprint is only reported."""

    def classify(self, messages: list[ChatTurn], labels: list[RouteLabel], template: str,
                 cancel: threading.Event) -> dict[str, float]:
        self._misbehave("classify", messages)
        self._sleep(self.entry.fake.delay_s, cancel)
        text = _words(_last_user(messages))
        logits = [2.0 * len(text & _words(f"{lab.name} {lab.description}")) for lab in labels]
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        total = sum(weights)
        return {lab.name: w / total for lab, w in zip(labels, weights, strict=True)}

    def embed(self, texts: list[str], cancel: threading.Event) -> list[list[float]]:
        """A hashed bag of words per text (unit length): texts sharing words are similar."""
        vectors = []
        for text in texts:
            vector = [0.0] * 64
            for word in _words(text):
                vector[int(hashlib.sha256(word.encode()).hexdigest(), 16) % 64] += 1.0
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            vectors.append([v / norm for v in vector])
        return vectors

    def generate(self, messages: list[ChatTurn], options: GenerationOptions,
                 cancel: threading.Event) -> Iterator[str]:
        self._misbehave("synthesize" if self.context.service == VOICE else "run", messages)
        self._sleep(self.entry.fake.delay_s, cancel)
        limit = options.max_new_tokens or self.entry.generation.max_new_tokens
        digest = hashlib.sha256(_last_user(messages).encode()).hexdigest()[:8]
        words = [f"[{self.entry.name}]", *_last_user(messages).split()[:limit], f"#{digest}"]
        prompt = sum(len(turn.content.split()) for turn in messages)  # the double's "tokens" are words
        keep = self.entry.max_context - min(limit, self.entry.max_context // 2)  # as the transformers backend
        self.truncation = (prompt, keep) if prompt > keep else None
        prompt = min(prompt, keep)
        for i, word in enumerate(words[:limit]):
            self._sleep(self.entry.fake.token_delay_s, cancel)
            self.usage = (prompt, i + 1, "length" if i + 1 == limit else "stop")
            yield word if i == 0 else " " + word

    def last_usage(self) -> tuple[int, int, str] | None:
        """Words read (after the cut to max_context) and written by the last reply (this double's tokens)."""
        return self.usage

    def specialist_output(self, text: str, image: bytes | None) -> SpecialistOutput:
        """The echoed text, noting an attached image; artists also return a small PNG."""
        if image is not None:
            text += f" (looked at an image of {len(image)} bytes)"
        picture = _png(text) if self.entry.kind == "image_generation" else None
        return SpecialistOutput(text=text, image=picture)


def _png(seed_text: str, size: int = 16) -> ImagePayload:
    """A small solid-colour PNG whose colour depends on the text (needs Pillow)."""
    from PIL import Image

    rgb = tuple(hashlib.sha256(seed_text.encode()).digest()[:3])
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return ImagePayload(data=buf.getvalue(), mime="image/png", width=size, height=size, prompt=seed_text)


def load(entry: ModelEntry, context: LoadContext) -> FakeModel:
    """Backend entry point."""
    return FakeModel(entry, context)
