"""Alternatives for a specialist that does not fit: small sets of config changes, cheapest first.

Changes considered: quantize the router, the voice or the specialist (int8 costs 1, 4-bit 2: Lyra's int8 and
int4 for a transformers text model, bitsandbytes' for an image model; none for a GGUF checkpoint), halve or
quarter the voice's or the specialist's context (1 per halving), move the router or the specialist host
to another single GPU (1), and rebalance the voice (1): `device_map = "sequential"` with a max_memory
that fills the GPUs it does not share with the specialist host first. Combinations are tried in order of
cost; a combination containing an already found (weaker or equal) one is skipped. Each alternative
returned has been re-checked on a configuration rebuilt through the validating parser.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from shared.config.schema import BNB_FORMS, LYRA_FORMS, LyraConfig, ModelEntry, ServicePlacement
from shared.config.units import format_gb
from shared.wire.names import ROUTER, SPECIALIST_HOST, VOICE

QUANT_LEVEL = {"none": 0, "int8": 1, "bnb-int8": 1, "int4": 2, "bnb-nf4": 2}
MAX_EVALUATIONS = 4000
MIN_CONTEXT = 512

FitCheck = Callable[[LyraConfig, str], tuple[bool, dict[int, int]]]  # (fits, spare bytes per GPU)
Reparse = Callable[[LyraConfig], LyraConfig]
Rebalance = Callable[[LyraConfig], dict[str, str] | None]  # voice max_memory, or None when not applicable


@dataclass(frozen=True)
class Change:
    """One edit to the configuration."""

    target: str  # "router", "voice", a specialist's name, or a service ("router", "specialist_host")
    field: str  # "quantization" | "max_context" | "device_map" | "gpus" | "rebalance"
    value: str | int | tuple[int, ...] | tuple[tuple[str, str], ...]
    cost: int

    def describe(self) -> str:
        """The change as a sentence fragment an operator can act on."""
        if self.field == "gpus":
            return f"move [services.{self.target}] to gpus = {list(self.value)}"  # type: ignore[arg-type]
        if self.field == "rebalance":
            caps = ", ".join(f'"{k}" = "{v}"' for k, v in self.value)  # type: ignore[misc]
            return f'{self.target}: device_map = "sequential", max_memory = {{{caps}}}'
        if self.field == "device_map":
            return f'{self.target}: device_map = "{self.value}"'
        return f"{self.target}: {self.field} = {self.value!r}"

    def covers(self, other: Change) -> bool:
        """True when this change goes at least as far as `other` on the same setting."""
        if (self.target, self.field) != (other.target, other.field):
            return False
        if self.field == "quantization":
            return QUANT_LEVEL[str(self.value)] >= QUANT_LEVEL[str(other.value)]
        if self.field == "max_context":
            return int(self.value) <= int(other.value)  # type: ignore[arg-type]
        return self.field == "rebalance" or self.value == other.value


@dataclass(frozen=True)
class Alternative:
    """A verified set of changes under which the specialist fits."""

    changes: tuple[Change, ...]
    headroom: dict[int, int]  # spare bytes on each GPU whose load the changes alter (all GPUs if none does)

    @property
    def cost(self) -> int:
        """Sum of the changes' costs (lower = closer to what was asked for)."""
        return sum(change.cost for change in self.changes)

    def describe(self) -> str:
        """All changes on one line, with the headroom left on each GPU they change."""
        room = ", ".join(f"GPU {gpu} {format_gb(spare)}" for gpu, spare in sorted(self.headroom.items()))
        return "; ".join(change.describe() for change in self.changes) + f"  (headroom {room})"


def quantization_forms(entry: ModelEntry) -> tuple[str, ...]:
    """The quantized forms `entry` could load in, lightest last: Lyra's for text models, bitsandbytes' for images."""
    if entry.gguf_file or entry.embedded or entry.backend == "openai":
        return ()  # a GGUF checkpoint is dequantized on load and not quantized again; a remote one is not ours
    return BNB_FORMS if entry.kind == "image_generation" or entry.backend == "diffusers" else LYRA_FORMS


def _entry_dimensions(config: LyraConfig, specialist: str) -> list[list[Change | None]]:
    spec = config.specialists[specialist]
    dims: list[list[Change | None]] = []
    for target, entry in (("router", config.router), ("voice", config.voice), (specialist, spec)):
        level = QUANT_LEVEL[entry.quantization]
        dims.append([None] + [Change(target, "quantization", q, QUANT_LEVEL[q] - level)
                              for q in quantization_forms(entry) if QUANT_LEVEL[q] > level])
    for target, entry, service in (("voice", config.voice, VOICE), (specialist, spec, SPECIALIST_HOST)):
        if len(config.gpus_of(service)) > 1 and entry.device_map != "sequential" and entry.kind != "image_generation":
            dims.append([None, Change(target, "device_map", "sequential", 1)])
        if entry.kind != "image_generation":
            dims.append([None] + [Change(target, "max_context", entry.max_context // factor, cost)
                                  for factor, cost in ((2, 1), (4, 2)) if entry.max_context // factor >= MIN_CONTEXT])
    return dims


def _placement_dimensions(config: LyraConfig, rebalance: Rebalance) -> list[list[Change | None]]:
    dims: list[list[Change | None]] = []
    for service in (ROUTER, SPECIALIST_HOST):
        current = config.gpus_of(service)
        dims.append([None] + [Change(service, "gpus", (g.index,), 1) for g in config.gpus if [g.index] != current])
    if rebalance(config) is not None:
        dims.append([None, Change("voice", "rebalance", (), 1)])
    return dims


def _candidates(config: LyraConfig, specialist: str, rebalance: Rebalance) -> list[tuple[Change, ...]]:
    dims = _entry_dimensions(config, specialist) + _placement_dimensions(config, rebalance)
    combos = {tuple(c for c in combo if c is not None) for combo in itertools.product(*dims)}
    combos.discard(())
    return sorted(combos, key=lambda cs: (sum(c.cost for c in cs), len(cs), [c.describe() for c in cs]))


def apply_changes(config: LyraConfig, changes: tuple[Change, ...],
                  rebalance: Rebalance) -> tuple[LyraConfig, tuple[Change, ...]]:
    """The configuration with `changes` applied (unvalidated copy), and the changes as resolved."""
    resolved: list[Change] = []
    for change in sorted(changes, key=lambda c: c.field == "rebalance"):
        if change.field == "rebalance":
            caps = rebalance(config) or {}
            voice = config.voice.model_copy(update={"device_map": "sequential", "max_memory": caps})
            config = config.model_copy(update={"voice": voice})
            change = Change("voice", "rebalance", tuple(sorted(caps.items())), change.cost)
        elif change.field == "gpus":
            services = {**config.services, change.target: ServicePlacement(gpus=list(change.value))}  # type: ignore[arg-type]
            config = config.model_copy(update={"services": services})
        elif change.target in ("router", "voice"):
            entry = getattr(config, change.target).model_copy(update={change.field: change.value})
            config = config.model_copy(update={change.target: entry})
        else:
            entry = config.specialists[change.target].model_copy(update={change.field: change.value})
            config = config.model_copy(update={"specialists": {**config.specialists, change.target: entry}})
        resolved.append(change)
    return config, tuple(resolved)


def search_alternatives(config: LyraConfig, specialist: str, fits: FitCheck, reparse: Reparse,
                        rebalance: Rebalance, limit: int = 3) -> tuple[Alternative, ...]:
    """Up to `limit` cheapest verified change sets under which `specialist` fits."""
    found: list[Alternative] = []
    before = fits(config, specialist)[1]
    for evaluated, changes in enumerate(_candidates(config, specialist, rebalance)):
        if len(found) >= limit or evaluated >= MAX_EVALUATIONS:
            break
        if any(all(any(c.covers(f) for c in changes) for f in alt.changes) for alt in found):
            continue  # contains a cheaper solution already offered
        changed, resolved = apply_changes(config, changes, rebalance)
        if not fits(changed, specialist)[0]:
            continue
        verified, spare = fits(reparse(changed), specialist)
        if verified:
            altered = {gpu: room for gpu, room in spare.items() if room != before.get(gpu)}
            found.append(Alternative(resolved, altered or spare))
    return tuple(found)
