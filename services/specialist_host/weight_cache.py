"""A host-RAM weight cache that turns a specialist swap into one large host -> GPU copy.

Each cached model's parameters and buffers live in ONE pinned host buffer (`HostCopy`). Swapping in
allocates one device buffer, copies the whole host buffer in a single transfer, and re-points every
parameter and buffer of the model's modules at views of it; swapping out re-points them at the host
views and drops the device buffer, so the GPU memory is returned and nothing is copied back (weights do
not change at inference). The module objects themselves stay alive, so nothing is rebuilt, re-quantized
or re-compiled: tensor shapes, dtypes and devices are unchanged and compiled graphs stay valid. Without
CUDA the same code runs with ordinary memory.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from shared.config.units import GB

log = logging.getLogger(__name__)

ALIGN = 256  # bytes; keeps every view aligned for any dtype and for fast copies


@dataclass
class _Slot:
    offset: int
    dtype: torch.dtype
    shape: torch.Size


PARAMETER, BUFFER, ATTRIBUTE = "parameter", "buffer", "attribute"


@dataclass
class HostCopy:
    """One model's tensors packed in one host buffer, and where each module's tensor lives in it."""

    host: torch.Tensor  # uint8
    slots: list[_Slot]
    holders: list[tuple[object, str, str, int]]  # (owner, attribute, PARAMETER|BUFFER|ATTRIBUTE, slot index)
    device: torch.device | None = None
    device_buffer: torch.Tensor | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return self.host.numel()

    def _point_at(self, buffer: torch.Tensor) -> None:
        views = [buffer[s.offset:s.offset + _nbytes(s)].view(s.dtype).view(s.shape) for s in self.slots]
        for owner, name, kind, index in self.holders:
            if kind == PARAMETER:
                owner._parameters[name].data = views[index]  # type: ignore[attr-defined]
            elif kind == BUFFER:
                owner._buffers[name] = views[index]  # type: ignore[attr-defined]
            else:
                setattr(owner, name, views[index])

    def to_device(self, device: torch.device) -> float:
        """One host -> device copy, then every tensor points at the device copy; returns seconds."""
        started = time.perf_counter()
        buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        buffer.copy_(self.host, non_blocking=self.host.is_pinned())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self._point_at(buffer)
        self.device, self.device_buffer = device, buffer
        return time.perf_counter() - started

    def to_host(self) -> None:
        """Every tensor points at the host copy; the device memory is released."""
        self._point_at(self.host)
        self.device_buffer = None


def _nbytes(slot: _Slot) -> int:
    return slot.shape.numel() * torch.empty((), dtype=slot.dtype).element_size()


QUANT_ATTRIBUTES = ("SCB", "CB", "absmax", "code", "offset")  # bitsandbytes state kept beside the weights


def _quant_state(owner: object, depth: int = 0) -> list[tuple[object, str]]:
    """Tensors bitsandbytes keeps outside `_parameters`: int8 scales, 4-bit quant states (nested)."""
    extra = {n for n, v in getattr(owner, "__dict__", {}).items() if isinstance(v, torch.Tensor)}
    names = set(QUANT_ATTRIBUTES) | extra
    found = [(owner, name) for name in sorted(names)  # properties are views of the quant state: skip them
             if isinstance(getattr(owner, name, None), torch.Tensor)
             and not isinstance(getattr(type(owner), name, None), property)]
    for child in ("quant_state", "state2"):
        nested = getattr(owner, child, None)
        if nested is not None and depth < 3:
            found += _quant_state(nested, depth + 1)
    return found


UNCACHEABLE = {"Linear8bitLt": "bitsandbytes int8 layers keep GPU state the cache cannot move (measured: the GPU "
                                "memory was not returned on swap out)"}


def uncacheable(modules: dict[str, nn.Module]) -> str | None:
    """Why these modules cannot be cached (None when they can)."""
    for module in modules.values():
        for sub in module.modules():
            if type(sub).__name__ in UNCACHEABLE:
                return UNCACHEABLE[type(sub).__name__]
    return None


def _tensors(modules: dict[str, nn.Module]) -> list[tuple[object, str, str, torch.Tensor]]:
    """Every tensor the modules compute with: parameters, buffers, and quantization state."""
    found: list[tuple[object, str, str, torch.Tensor]] = []
    for module in modules.values():
        for sub in module.modules():
            for name, tensor in sub._parameters.items():
                if tensor is not None:
                    found.append((sub, name, PARAMETER, tensor))
                    found += [(o, a, ATTRIBUTE, getattr(o, a)) for o, a in _quant_state(tensor)]
            found += [(sub, name, BUFFER, t) for name, t in sub._buffers.items() if t is not None]
            state = getattr(sub, "state", None)  # bitsandbytes Linear8bitLt keeps CB/SCB here too
            if state is not None and not isinstance(state, (torch.Tensor, dict)):
                found += [(o, a, ATTRIBUTE, getattr(o, a)) for o, a in _quant_state(state)]
    return found


def _key(tensor: torch.Tensor) -> tuple:
    """Identity of a tensor's storage: two tensor objects over the same memory share one slot."""
    return (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))


def pack(modules: dict[str, nn.Module], pin: bool) -> HostCopy:
    """Copy every tensor of `modules` (quantized ones as they are) into one new host buffer, shared ones once."""
    slots: list[_Slot] = []
    holders: list[tuple[object, str, str, int]] = []
    index_of: dict[tuple, int] = {}
    sources: list[torch.Tensor] = []
    offset = 0
    for owner, name, kind, tensor in _tensors(modules):
        key = _key(tensor)
        if key not in index_of:
            index_of[key] = len(slots)
            slots.append(_Slot(offset, tensor.dtype, tensor.shape))
            sources.append(tensor.detach())
            offset += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
        holders.append((owner, name, kind, index_of[key]))
    host = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
    for slot, source in zip(slots, sources, strict=True):
        host[slot.offset:slot.offset + _nbytes(slot)].view(slot.dtype).view(slot.shape).copy_(source)
    return HostCopy(host=host, slots=slots, holders=holders)


class HostWeightCache:
    """Host copies of specialist weights, bounded in bytes, evicting the least recently used."""

    def __init__(self, capacity_bytes: int, pin: bool | None = None) -> None:
        self.capacity = capacity_bytes
        self.pin = torch.cuda.is_available() if pin is None else (pin and torch.cuda.is_available())
        self.copies: OrderedDict[str, HostCopy] = OrderedDict()

    def used(self) -> int:
        return sum(c.nbytes for c in self.copies.values())

    def holds(self, name: str) -> bool:
        return name in self.copies

    def sizes(self) -> dict[str, int]:
        """Bytes held per model, least recently used first."""
        return {name: c.nbytes for name, c in self.copies.items()}

    def admit(self, name: str, modules: dict[str, nn.Module]) -> tuple[HostCopy | None, list[str]]:
        """Pack `modules` under `name`, evicting least recently used copies to make room.

        Returns the copy (None when the model cannot be cached) and the names evicted: their owners
        must drop those models, whose tensors still point at the evicted host buffers.
        """
        if name in self.copies:
            self.copies.move_to_end(name)
            return self.copies[name], []
        reason = uncacheable(modules)
        if reason:
            log.info("not caching %s: %s; it reloads from its checkpoint on each swap", name, reason)
            return None, []
        unique = {_key(t): t for *_, t in _tensors(modules)}
        size = sum(t.numel() * t.element_size() for t in unique.values())
        if size > self.capacity:
            log.info("not caching %s: %.2f GB exceeds the cache size", name, size / GB)
            return None, []
        evicted = []
        for victim in list(self.copies):
            if self.used() + size <= self.capacity:
                break
            log.info("weight cache full: evicting %s (%.2f GB)", victim, self.copies[victim].nbytes / GB)
            del self.copies[victim]
            evicted.append(victim)
        started = time.perf_counter()
        copy = pack(modules, self.pin)
        first = next((t for m in modules.values() for t in m.parameters()), None)
        copy.device = first.device if first is not None else torch.device("cpu")
        self.copies[name] = copy
        log.info("cached %s in host RAM (%.2f GB, %s) in %.2fs", name, copy.nbytes / GB,
                 "pinned" if copy.host.is_pinned() else "pageable", time.perf_counter() - started)
        return copy, evicted

    def touch(self, name: str) -> HostCopy | None:
        """The cached copy of `name`, marked most recently used."""
        copy = self.copies.get(name)
        if copy is not None:
            self.copies.move_to_end(name)
        return copy

    def evict(self, name: str) -> None:
        self.copies.pop(name, None)
