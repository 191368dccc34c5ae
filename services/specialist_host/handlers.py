"""Specialist host: exactly one resident specialist at a time; load, unload, run.

The coordinator decides every swap (it owns the VRAM ledger): it unloads the resident specialist before
asking for another, and this host refuses a load that would make two resident.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator

from shared.config.schema import ModelEntry
from shared.config.units import GB
from shared.models.base import BackendError, LoadContext, LoadedModel, SpecialistOutput, load_model, truncation
from shared.runtime.worker_loop import Handler, Worker
from shared.wire.messages import (
    ChatTurn,
    LoadReply,
    LoadRequest,
    MemoryReading,
    Message,
    RunSpecialistRequest,
    SpecialistReply,
    TokenEvent,
    UnloadRequest,
)
from shared.wire.names import SPECIALIST_HOST

log = logging.getLogger(__name__)


class SpecialistHost(Worker):
    """Loads, unloads and runs the configured specialists, one resident at a time."""

    service = SPECIALIST_HOST

    def __init__(self, context: LoadContext) -> None:
        super().__init__(context)
        self.entries = context.config.specialists
        self.backend = ",".join(sorted({e.backend for e in self.entries.values()}))
        self.loaded: dict[str, LoadedModel] = {}  # resident on the device (at most one)
        self.parked: dict[str, LoadedModel] = {}  # weights in the host cache, modules kept alive
        settings = context.config.weight_cache
        self.cache = None
        if settings.size_gb > 0 and any(e.backend != "fake" for e in self.entries.values()):
            from services.specialist_host.weight_cache import HostWeightCache

            self.cache = HostWeightCache(int(settings.size_gb * GB), settings.pin)

    def cached(self) -> dict[str, int]:
        return self.cache.sizes() if self.cache else {}

    def handlers(self) -> dict[type[Message], Handler]:
        return {LoadRequest: self.load, UnloadRequest: self.unload, RunSpecialistRequest: self.run}

    def capabilities(self) -> list[str]:
        return list(self.entries)

    def resident(self) -> list[str]:
        return list(self.loaded)

    def memory(self) -> list[MemoryReading]:
        for model in self.loaded.values():
            return model.memory()
        return []

    def placement(self) -> dict[str, str]:
        return {k: v for model in self.loaded.values() for k, v in model.placement().items()}

    def _entry(self, name: str):
        if name not in self.entries:
            raise BackendError(f"unknown specialist {name!r}; this host serves {', '.join(self.entries)}")
        return self.entries[name]

    def load(self, msg: LoadRequest, cancel: threading.Event) -> Iterator[Message]:
        """Make `msg.model` resident (a no-op when it already is)."""
        entry = self._entry(msg.model)
        started = time.perf_counter()
        source = "resident"
        if msg.model not in self.loaded:
            if self.loaded:
                raise BackendError(f"{', '.join(self.loaded)} is resident; unload it before loading {msg.model}")
            swapped = self._swap_in(msg.model)
            source = "host_cache" if swapped is not None else "checkpoint"
            self.loaded[msg.model] = swapped or self._load_fresh(msg.model, entry)
        yield self._reply(msg, started).model_copy(update={"source": source})

    def _swap_in(self, name: str) -> LoadedModel | None:
        """Bring a parked model back from the host cache: one host -> device copy."""
        copy = self.cache.touch(name) if self.cache else None
        model = self.parked.pop(name, None)
        if copy is None or model is None or copy.device is None:
            return None
        seconds = copy.to_device(copy.device)
        started = time.perf_counter()
        model.prepare()  # the weights moved: the decode engine re-captures its graphs against them
        log.info("swapped %s in from the host cache: %.2f GB in %.3fs (%.1f GB/s); decode engine %s ready in %.3fs",
                 name, copy.nbytes / GB, seconds, copy.nbytes / GB / max(seconds, 1e-9), model.engine_kind(),
                 time.perf_counter() - started)
        return model

    def _load_fresh(self, name: str, entry: ModelEntry) -> LoadedModel:
        started = time.perf_counter()
        model = load_model(entry, self.context)
        log.info("loaded specialist %s from its checkpoint in %.2fs", name, time.perf_counter() - started)
        modules = model.torch_modules() if self.cache else {}
        if modules:
            _, evicted = self.cache.admit(name, modules)  # type: ignore[union-attr]
            for victim in evicted:
                dropped = self.parked.pop(victim, None)
                if dropped is not None:
                    dropped.unload()
        return model

    def unload(self, msg: UnloadRequest, cancel: threading.Event) -> Iterator[Message]:
        """Free `msg.model` (a no-op when it is not resident)."""
        self._entry(msg.model)
        started = time.perf_counter()
        model = self.loaded.pop(msg.model, None)
        copy = self.cache.touch(msg.model) if self.cache else None
        if model is not None and copy is not None:
            copy.to_host()  # weights stay in host RAM; the device copy goes
            self.parked[msg.model] = model
            gc.collect()
            model.release_device_memory()
            log.info("parked specialist %s in the host cache in %.3fs", msg.model, time.perf_counter() - started)
        elif model is not None:
            model.unload()
            del model
            gc.collect()
            log.info("unloaded specialist %s in %.2fs", msg.model, time.perf_counter() - started)
        yield self._reply(msg, started)

    def _reply(self, msg: LoadRequest | UnloadRequest, started: float) -> LoadReply:
        return LoadReply(parent_id=msg.id, model=msg.model, resident=self.resident(),
                         seconds=time.perf_counter() - started, memory=self.memory(), placement=self.placement())

    def run(self, msg: RunSpecialistRequest, cancel: threading.Event) -> Iterator[Message]:
        """Run the resident specialist on the turn, streaming its text as progress."""
        model = self.loaded.get(msg.model)
        if model is None:
            raise BackendError(f"specialist {msg.model!r} is not resident (resident: {self.resident() or 'none'})")
        turns = [t for t in msg.messages if t.role != "system"]
        if model.entry.system_prompt:
            turns.insert(0, ChatTurn(role="system", content=model.entry.system_prompt))
        for item in model.run_specialist(turns, msg.image, msg.options, cancel):
            if isinstance(item, SpecialistOutput):
                yield SpecialistReply(parent_id=msg.id, model=msg.model, text=item.text, image=item.image,
                                      truncated=truncation(model, "specialist"))
                return
            yield TokenEvent(parent_id=msg.id, text=item, stage="specialist")
        raise BackendError(f"specialist {msg.model!r} ended without a result")
