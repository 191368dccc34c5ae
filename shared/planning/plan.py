"""The VRAM plan: does a configuration fit its GPUs, and if not, what would.

Per physical GPU the persistent baseline is the router's share, the voice's share and one CUDA context
per worker process pinned to that GPU. Each specialist is checked alone on top of that baseline (the
specialist host keeps one resident at a time). For every specialist that does not fit, candidate changes
(quantize a model to int8 or int4, halve a context, move a service to another GPU, rebalance the voice's
split) are combined cheapest first, and each one offered is verified by rebuilding the changed
configuration through `parse_config` and re-running the same arithmetic. No GPU and no weights needed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache

from shared.config.schema import ConfigError, LyraConfig, ModelEntry, parse_config
from shared.config.units import GB, format_gb, parse_size
from shared.planning.estimate import (
    REMOTE_SOURCE,
    UNITS_WITHOUT_LAYERS,
    GpuSplit,
    MemoryEstimate,
    cuda_context_bytes,
    estimate_model,
)
from shared.planning.layout import place_model
from shared.planning.search import Alternative, quantization_forms, search_alternatives
from shared.wire.names import ROUTER, SPECIALIST_HOST, VOICE, WORKER_SERVICES

SERVICE_OF_ROLE = {"router": ROUTER, "voice": VOICE, "specialist": SPECIALIST_HOST}


@dataclass(frozen=True)
class Placement:
    """One model's estimate and where its bytes land."""

    role: str  # "router" | "voice" | "specialist"
    name: str
    estimate: MemoryEstimate
    split: GpuSplit


@dataclass(frozen=True)
class GpuBudget:
    """One physical GPU: its budget and what stays resident on it."""

    index: int
    name: str
    budget: int
    contexts: int  # CUDA context reserve of every process pinned here
    processes: tuple[str, ...]
    router: int
    voice: int

    @property
    def baseline(self) -> int:
        """Bytes resident whatever specialist is loaded."""
        return self.contexts + self.router + self.voice

    @property
    def free(self) -> int:
        """Bytes left for a specialist (negative when the baseline alone does not fit)."""
        return self.budget - self.baseline


@dataclass(frozen=True)
class Verdict:
    """Whether one specialist fits next to the baseline, and what would make it fit."""

    specialist: str
    fits: bool
    peak: dict[int, int]  # baseline + this specialist, per GPU
    shortfall: int  # bytes over budget on the worst GPU, or weights spilled off the GPUs (0 when it fits)
    reasons: tuple[str, ...]
    alternatives: tuple[Alternative, ...] = ()


@dataclass(frozen=True)
class Plan:
    """The whole verdict for one configuration."""

    source: str
    gpus: tuple[GpuBudget, ...]
    placements: tuple[Placement, ...]
    verdicts: tuple[Verdict, ...]
    problems: tuple[str, ...]  # what breaks the baseline itself (router, voice)

    @property
    def ok(self) -> bool:
        """True when the baseline and every specialist fit."""
        return not self.problems and all(v.fits for v in self.verdicts)

    def to_json(self) -> str:
        """The plan as JSON (bytes as integers)."""
        body = asdict(self)
        body["ok"] = self.ok
        for gpu, raw in zip(self.gpus, body["gpus"], strict=True):
            raw.update(baseline=gpu.baseline, free=gpu.free)
        for placement, raw in zip(self.placements, body["placements"], strict=True):
            raw["estimate"]["total"] = placement.estimate.total
        return json.dumps(body, indent=2, default=str)


# ----------------------------------------------------------------------------- assessment


@lru_cache(maxsize=512)
def _estimate(entry_json: str) -> MemoryEstimate:
    return estimate_model(ModelEntry.model_validate_json(entry_json))


def estimate_cached(entry: ModelEntry) -> MemoryEstimate:
    """`estimate_model`, memoised on the entry's full content."""
    return _estimate(entry.model_dump_json())


def _place(role: str, entry: ModelEntry, config: LyraConfig, taken: dict[int, int]) -> Placement:
    """Estimate and split one model; accelerate's default max_memory is what is free when it loads."""
    gpus = config.gpus_of(SERVICE_OF_ROLE[role])
    budgets = {g.index: int(g.budget_gb * GB) for g in config.gpus}
    free = {gpu: budgets.get(gpu, 0) - taken.get(gpu, 0) for gpu in gpus}
    check_placement(role, entry, config)
    try:
        estimate = estimate_cached(entry)
    except (KeyError, ValueError, OSError) as exc:  # unknown architecture, no size source, unreadable files
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise ConfigError(f"{config.source}: {role} {entry.name!r}: {message}") from exc
    uses_free = isinstance(entry.device_map, str) and entry.device_map and not entry.max_memory
    return Placement(role, entry.name, estimate, _split_cached(entry.model_dump_json(), tuple(gpus),
                                                               tuple(sorted(free.items())) if uses_free else ()))


@lru_cache(maxsize=512)
def _split_cached(entry_json: str, gpus: tuple[int, ...], free: tuple[tuple[int, int], ...]) -> GpuSplit:
    entry = ModelEntry.model_validate_json(entry_json)
    return place_model(entry, estimate_cached(entry), list(gpus), dict(free))


def check_placement(role: str, entry: ModelEntry, config: LyraConfig) -> None:
    """Raise ConfigError, in one line, for a device map or max_memory this model's process cannot use.

    The loader's own checks (shared.planning.placement) decide: an unknown strategy, a GPU index the
    service does not have, a range that runs backwards, an unreadable size.
    """
    from shared.planning.placement import PlacementError, resolve_device_map, resolve_max_memory

    gpus = config.gpus_of(SERVICE_OF_ROLE[role])
    where = f"{config.source}: {role} {entry.name!r}"
    try:
        resolve_device_map(entry.device_map, len(gpus))
        resolve_max_memory(entry.max_memory, len(gpus))
    except PlacementError as exc:
        raise ConfigError(f"{where}: {exc} (this service has GPUs {gpus or 'none'})") from exc


def max_memory_problems(config: LyraConfig) -> list[str]:
    """Every max_memory above its GPU's budget: the model could be placed where the budget has no room."""
    budgets = {g.index: int(g.budget_gb * GB) for g in config.gpus}
    problems = []
    for role, entry in (("router", config.router), ("voice", config.voice),
                        *(("specialist", e) for e in config.specialists.values())):
        gpus = config.gpus_of(SERVICE_OF_ROLE[role])
        for key, size in entry.max_memory.items():
            if key.isdigit() and int(key) < len(gpus) and parse_size(size) > budgets.get(gpus[int(key)], 0):
                problems.append(f"{entry.name}: max_memory[{key!r}] = {size} is more than GPU {gpus[int(key)]}'s "
                                f"budget of {format_gb(budgets.get(gpus[int(key)], 0))}")
    return problems


def _add(total: dict[int, int], split: GpuSplit) -> dict[int, int]:
    return {gpu: total.get(gpu, 0) + split.per_gpu.get(gpu, 0) for gpu in total.keys() | split.per_gpu.keys()}


def _baseline(config: LyraConfig) -> tuple[tuple[GpuBudget, ...], Placement, Placement]:
    contexts = cuda_context_bytes(config)
    router = _place("router", config.router, config, contexts)
    voice = _place("voice", config.voice, config, _add(contexts, router.split))
    gpus = tuple(
        GpuBudget(g.index, g.name, int(g.budget_gb * GB), contexts.get(g.index, 0),
                  tuple(s for s in WORKER_SERVICES if g.index in config.gpus_of(s)),
                  router.split.per_gpu.get(g.index, 0), voice.split.per_gpu.get(g.index, 0))
        for g in config.gpus
    )
    return gpus, router, voice


def _baseline_problems(gpus: tuple[GpuBudget, ...], router: Placement, voice: Placement) -> list[str]:
    problems = [f"{p.name}: {note}" for p in (router, voice) for note in p.split.notes if p.split.spilled]
    for gpu in gpus:
        if gpu.free < 0:
            held = (("router", gpu.router), ("voice", gpu.voice))
            parts = [f"{label} {format_gb(size)}" for label, size in held if size]
            parts.append(f"{len(gpu.processes)} CUDA contexts {format_gb(gpu.contexts)}")
            problems.append(f"GPU {gpu.index}: baseline {format_gb(gpu.baseline)} ({' + '.join(parts)}) exceeds its "
                            f"budget {format_gb(gpu.budget)} by {format_gb(-gpu.free)}")
    return problems


def _overflow_reason(gpu: GpuBudget, spec: Placement, peak: int) -> str:
    share = spec.split.per_gpu.get(gpu.index, 0)
    if not share:
        return (f"GPU {gpu.index}: the baseline alone needs {format_gb(peak)} > budget {format_gb(gpu.budget)}, "
                f"short by {format_gb(peak - gpu.budget)}")
    return (f"GPU {gpu.index}: needs {format_gb(peak)} (baseline {format_gb(gpu.baseline)} + {spec.name} "
            f"{format_gb(share)}) > budget {format_gb(gpu.budget)}, short by {format_gb(peak - gpu.budget)}")


def _verdict(gpus: tuple[GpuBudget, ...], spec: Placement, baseline_spill: int) -> Verdict:
    peak = {gpu.index: gpu.baseline + spec.split.per_gpu.get(gpu.index, 0) for gpu in gpus}
    over = {gpu.index: peak[gpu.index] - gpu.budget for gpu in gpus if peak[gpu.index] > gpu.budget}
    reasons = [_overflow_reason(gpu, spec, peak[gpu.index]) for gpu in gpus if gpu.index in over]
    reasons += [f"{spec.name}: {note}" for note in spec.split.notes if spec.split.spilled]
    if reasons:
        reasons += [f"{spec.name}: {note}" for note in spec.estimate.notes if "stay 16-bit" in note]
    # The specialist's own shortfall: on the GPUs it uses (another GPU's broken baseline is a problem of
    # its own, reported once above the verdicts), plus its weights that fit on no GPU.
    own = [amount for index, amount in over.items() if spec.split.per_gpu.get(index, 0)]
    spill = spec.split.spilled + baseline_spill
    shortfall = max([*own, spill, 0]) or max([*over.values(), 0])
    return Verdict(spec.name, not reasons and not baseline_spill, peak, shortfall, tuple(reasons))


def assess(config: LyraConfig) -> Plan:
    """The plan without alternatives: estimates, per-GPU baseline and one verdict per specialist."""
    gpus, router, voice = _baseline(config)
    problems = _baseline_problems(gpus, router, voice) + max_memory_problems(config)
    taken = {gpu.index: gpu.baseline for gpu in gpus}
    specialists = [_place("specialist", entry, config, taken) for entry in config.specialists.values()]
    spill = router.split.spilled + voice.split.spilled
    verdicts = tuple(_verdict(gpus, spec, spill) for spec in specialists)
    return Plan(config.source, gpus, (router, voice, *specialists), verdicts, tuple(problems))


def specialist_fits(config: LyraConfig, specialist: str) -> tuple[bool, dict[int, int]]:
    """(fits, spare bytes per GPU) for one specialist: the check alternatives are held to."""
    gpus, router, voice = _baseline(config)
    taken = {gpu.index: gpu.baseline for gpu in gpus}
    spec = _place("specialist", config.specialists[specialist], config, taken)
    verdict = _verdict(gpus, spec, router.split.spilled + voice.split.spilled)
    spare = {gpu.index: gpu.budget - verdict.peak[gpu.index] for gpu in gpus}
    fits = verdict.fits and not _baseline_problems(gpus, router, voice) and not max_memory_problems(config)
    return fits, spare


def voice_rebalance(config: LyraConfig) -> dict[str, str] | None:
    """A max_memory that fills the voice's GPUs not shared with the specialist host first, or None.

    With `device_map = "sequential"` each such GPU gets the largest max_memory (in 0.1 GB steps) under
    which the voice's bytes there, placed by the loader's own split, still fit what its budget leaves
    after CUDA contexts and the router; the host's GPUs, which come last, may take what they have free.
    """
    gpus, host = config.gpus_of(VOICE), set(config.gpus_of(SPECIALIST_HOST))
    lead = [gpu for gpu in gpus if gpu not in host]
    if len(gpus) < 2 or not lead or lead != gpus[: len(lead)]:
        return None
    contexts = cuda_context_bytes(config)
    router = _place("router", config.router, config, contexts)
    budgets = {g.index: int(g.budget_gb * GB) for g in config.gpus}
    room = {gpu: budgets[gpu] - contexts.get(gpu, 0) - router.split.per_gpu.get(gpu, 0) for gpu in gpus}
    tenths = {str(i): max(room[gpu] // 10**8, 0) for i, gpu in enumerate(gpus)}
    for relative, gpu in enumerate(lead):
        low, high = 0, tenths[str(relative)]
        while low < high:  # the largest cap whose placed share still fits this GPU
            middle = (low + high + 1) // 2
            share = _voice_share(config, {**tenths, str(relative): middle}, gpu)
            low, high = (middle, high) if share <= room[gpu] else (low, middle - 1)
        tenths[str(relative)] = low
    return _as_max_memory(tenths)


def _as_max_memory(tenths: dict[str, int]) -> dict[str, str]:
    return {key: f"{value / 10:.1f}GB" for key, value in tenths.items()}


def _voice_share(config: LyraConfig, tenths: dict[str, int], gpu: int) -> int:
    voice = config.voice.model_copy(update={"device_map": "sequential", "max_memory": _as_max_memory(tenths)})
    split = _split_cached(voice.model_dump_json(), tuple(config.gpus_of(VOICE)), ())
    return split.per_gpu.get(gpu, 0)


def reparse(config: LyraConfig) -> LyraConfig:
    """Round-trip a (changed) configuration through the validating parser."""
    raw = config.model_dump(exclude={"source"})
    return parse_config(raw, source=config.source or "<changed>")


def make_plan(config: LyraConfig) -> Plan:
    """Assess `config`, and for each specialist that does not fit, find verified alternatives."""
    plan = assess(config)
    verdicts = []
    for verdict in plan.verdicts:
        if not verdict.fits:
            found = search_alternatives(config, verdict.specialist, specialist_fits, reparse, voice_rebalance)
            reasons = verdict.reasons if found else verdict.reasons + _why_nothing_helps(config, verdict.specialist)
            verdict = Verdict(verdict.specialist, False, verdict.peak, verdict.shortfall, reasons, found)
        verdicts.append(verdict)
    return Plan(plan.source, plan.gpus, plan.placements, tuple(verdicts), plan.problems)


def _why_nothing_helps(config: LyraConfig, specialist: str) -> tuple[str, ...]:
    """What the specialist needs at its smallest, for a verdict no alternative could fix."""
    entry = config.specialists[specialist]
    form = (quantization_forms(entry) or ("none",))[-1]
    smallest = estimate_cached(entry.model_copy(update={"quantization": form}))
    budgets = ", ".join(format_gb(int(g.budget_gb * GB)) for g in config.gpus)
    notes = tuple(f"{specialist}: {note}" for note in smallest.notes if "stay 16-bit" in note)
    needs = f"{specialist}: even in {form} it needs {format_gb(smallest.total)} by itself (GPU budgets: {budgets})"
    return (needs, *notes)


# ----------------------------------------------------------------------------- rendering


def _num(value: int) -> str:
    return f"{value / GB:.1f}"


def render_table(plan: Plan) -> str:
    """A human-readable table of the plan (GB = 10^9 bytes)."""
    verdict = "FITS" if plan.ok else "DOES NOT FIT"
    lines = [f"VRAM plan for {plan.source or '<config>'}: {verdict}  (GB = 10^9 bytes)", ""]
    lines += [*_gpu_rows(plan), "", *_model_rows(plan), ""]
    lines += [f"PROBLEM {problem}" for problem in plan.problems] + ([""] if plan.problems else [])
    for v in plan.verdicts:
        lines += _verdict_rows(v)
    return "\n".join(lines)


def _gpu_rows(plan: Plan) -> list[str]:
    rows = [f"{'GPU':<4}{'budget':>8}{'contexts':>10}{'router':>8}{'voice':>8}{'baseline':>10}{'free':>8}  processes"]
    for gpu in plan.gpus:
        rows.append(f"{gpu.index:<4}{_num(gpu.budget):>8}{_num(gpu.contexts):>10}{_num(gpu.router):>8}"
                    f"{_num(gpu.voice):>8}{_num(gpu.baseline):>10}{_num(gpu.free):>8}  {', '.join(gpu.processes)}")
    return rows


def _model_rows(plan: Plan) -> list[str]:
    rows = [f"{'model':<13}{'role':<11}{'source':<26}{'dtype':<16}{'quant':<9}{'ctx':>7}{'params':>8}"
            f"{'weights':>9}{'kv':>6}{'act':>6}{'other':>7}{'total':>8}  per GPU"]
    for p in plan.placements:
        e = p.estimate
        per_gpu = ", ".join(f"{gpu}: {_num(size)}" for gpu, size in sorted(p.split.per_gpu.items()))
        spill = f", spilled {_num(p.split.spilled)}" if p.split.spilled else ""
        context = "-" if e.kv_cache == 0 and e.layers == UNITS_WITHOUT_LAYERS else str(e.context)
        rows.append(f"{p.name:<13}{p.role:<11}{e.source:<26}{e.dtype:<16}{e.quantization:<9}{context:>7}"
                    f"{e.parameters / 1e9:>7.1f}B{_num(e.weights):>9}{_num(e.kv_cache):>6}{_num(e.activations):>6}"
                    f"{_num(e.recurrent_state + e.load_excess + e.overhead):>7}{_num(e.total):>8}  "
                    f"{_where(e, per_gpu)}{spill}")
    return rows


def _where(estimate: MemoryEstimate, per_gpu: str) -> str:
    """Where a model's bytes land: per GPU, the CPU, or another machine (a remote model says which)."""
    return estimate.notes[0] if estimate.source == REMOTE_SOURCE else per_gpu or "CPU"


def _verdict_rows(v: Verdict) -> list[str]:
    peak = ", ".join(f"GPU {gpu} {_num(size)}" for gpu, size in sorted(v.peak.items())) or "no GPU (CPU only)"
    state = "fits" if v.fits else f"DOES NOT FIT by {format_gb(v.shortfall)}"
    rows = [f"specialist {v.specialist:<13} {state:<26} peak: {peak}"]
    rows += [f"    - {reason}" for reason in v.reasons]
    if not v.fits:
        rows += [f"    option {i}: {alt.describe()}" for i, alt in enumerate(v.alternatives, 1)]
        if not v.alternatives:
            rows.append("    no alternative found among quantization, shorter contexts and moves")
    return rows


def forget_memoised() -> None:
    """Forget the estimates and splits this process memoised (the on-disk planning cache stays)."""
    for memo in (_estimate, _split_cached):
        memo.cache_clear()
