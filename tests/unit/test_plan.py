"""The VRAM planner: verdicts for the shipped configs, exact arithmetic, verified alternatives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.config.schema import LyraConfig, load_config, parse_config
from shared.config.units import GB
from shared.planning.plan import Plan, assess, make_plan, render_table, reparse, voice_rebalance
from shared.planning.search import apply_changes

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def fp16_plan() -> Plan:
    return make_plan(load_config(CONFIGS / "a6000x2-fp16.toml"))


def _declared(budget: float = 10.0, specialist: float = 2.5, **voice: object) -> LyraConfig:
    """Two GPUs, three workers, every footprint declared: arithmetic with round numbers."""
    model = {"backend": "fake"}
    return parse_config({
        "gpus": [{"index": 0, "budget_gb": budget, "context_reserve_gb": 0.5},
                 {"index": 1, "budget_gb": budget, "context_reserve_gb": 0.5}],
        "services": {"router": {"gpus": [0]}, "specialist_host": {"gpus": [1]}, "voice": {"gpus": [0, 1]}},
        "router": {**model, "memory_gb": 3.0},
        "voice": {**model, "memory_gb": 8.0, "device_map": "auto", **voice},
        "specialists": {"small": {**model, "memory_gb": specialist}, "big": {**model, "memory_gb": 6.0}},
    })


# ----------------------------------------------------------------------------- shipped configs


def test_fp16_reference_box_is_rejected_with_reasons(fp16_plan: Plan) -> None:
    assert not fp16_plan.ok
    assert not any(v.fits for v in fp16_plan.verdicts)
    problems = "\n".join(fp16_plan.problems)
    assert "GPU 0: baseline" in problems and "exceeds its budget 48.0 GB" in problems
    assert "voice:" in problems and "do not fit max_memory" in problems  # 141 GB of bf16 voice > 47 + 48 GB
    voice = next(p for p in fp16_plan.placements if p.role == "voice")
    assert voice.estimate.weights > 140 * GB
    table = render_table(fp16_plan)
    assert "DOES NOT FIT" in table and "option 1:" in table


def test_fp16_alternatives_are_verified_and_jamba_has_none(fp16_plan: Plan) -> None:
    config = load_config(CONFIGS / "a6000x2-fp16.toml")
    verdicts = {v.specialist: v for v in fp16_plan.verdicts}
    assert verdicts["perception"].alternatives and verdicts["pragmatist"].alternatives
    for name in ("perception", "pragmatist", "artist"):
        for alternative in verdicts[name].alternatives:
            changed, _ = apply_changes(config, alternative.changes, voice_rebalance)
            replanned = {v.specialist: v for v in assess(reparse(changed)).verdicts}
            assert replanned[name].fits, alternative.describe()
            assert any(c.target == "voice" and c.value == "int4" for c in alternative.changes)
    philosopher = verdicts["philosopher"]
    assert philosopher.alternatives == ()
    assert any("fused MoE experts) and stay 16-bit" in reason for reason in philosopher.reasons)


@pytest.mark.parametrize("name", ["a6000x2", "h100x1"])
def test_shipped_quantized_configs_fit(name: str) -> None:
    plan = make_plan(load_config(CONFIGS / f"{name}.toml"))
    assert plan.ok, render_table(plan)
    assert [v.specialist for v in plan.verdicts] == ["pragmatist", "philosopher", "artist", "perception"]
    for gpu in plan.gpus:
        assert gpu.free >= 0 and all(v.peak[gpu.index] <= gpu.budget for v in plan.verdicts)
    body = json.loads(plan.to_json())
    assert body["ok"] is True and {g["index"] for g in body["gpus"]} == {g.index for g in plan.gpus}


def test_a6000x2_voice_spans_both_gpus() -> None:
    plan = make_plan(load_config(CONFIGS / "a6000x2.toml"))
    voice = next(p for p in plan.placements if p.role == "voice")
    assert set(voice.split.per_gpu) == {0, 1} and voice.split.spilled == 0
    assert voice.estimate.quantization == "int4"


# ----------------------------------------------------------------------------- arithmetic


def test_baseline_and_verdicts_with_declared_sizes() -> None:
    plan = make_plan(_declared(specialist=2.5))
    gpu0, gpu1 = plan.gpus
    assert gpu0.contexts == gpu1.contexts == 1 * GB  # router + voice on 0, host + voice on 1
    assert gpu0.router == 3 * GB and gpu0.voice + gpu1.voice == pytest.approx(8 * GB, abs=0.1 * GB)
    verdicts = {v.specialist: v for v in plan.verdicts}
    assert verdicts["small"].fits
    big = verdicts["big"]
    assert not big.fits and not plan.ok
    assert big.shortfall == gpu1.baseline + 6 * GB - 10 * GB
    assert any(reason.startswith("GPU 1: needs") for reason in big.reasons)


def test_nothing_fits_when_the_baseline_does_not() -> None:
    plan = make_plan(_declared(budget=5.0))
    assert plan.problems and not plan.ok
    assert not any(v.fits for v in plan.verdicts)


def test_voice_spill_beyond_max_memory_is_a_problem() -> None:
    plan = make_plan(_declared(budget=40.0, max_memory={"0": "2GB", "1": "2GB"}))
    assert any("do not fit max_memory" in problem for problem in plan.problems)
    assert not plan.ok


def test_alternatives_for_architecture_sized_models() -> None:
    config = parse_config({
        "gpus": [{"index": 0, "budget_gb": 30.0}],
        "services": {"router": {"gpus": [0]}, "specialist_host": {"gpus": [0]}, "voice": {"gpus": [0]}},
        "router": {"backend": "fake", "memory_gb": 1.0},
        "voice": {"backend": "fake", "architecture": "llama-3-8b", "dtype": "bfloat16", "max_context": 4096},
        "specialists": {"coder": {"backend": "fake", "architecture": "mistral-7b", "dtype": "bfloat16"}},
    })
    plan = make_plan(config)
    (verdict,) = plan.verdicts
    assert not verdict.fits and verdict.alternatives
    cheapest = verdict.alternatives[0]
    (change,) = cheapest.changes
    assert (change.field, change.value) == ("quantization", "int8")
    assert cheapest.headroom and all(spare >= 0 for spare in cheapest.headroom.values())


def test_process_shares_never_overlap_and_leave_each_neighbour_its_plan() -> None:
    from shared.planning.plan import assess
    from shared.planning.shares import planned_bytes, process_shares

    config = load_config(CONFIGS / "a6000x2.toml")
    plan = assess(config)
    planned = planned_bytes(plan)
    for gpu in plan.gpus:
        for service in ("router", "specialist_host", "voice"):
            share = process_shares(config, service, plan).get(gpu.index)
            if share is None:
                continue
            own = planned.get(service, {}).get(gpu.index, 0)
            assert share >= own  # a process always gets at least its own plan (the config fits)
            others = sum(p.get(gpu.index, 0) for s, p in planned.items() if s != service)
            assert share + others + gpu.contexts <= gpu.budget


def test_alternatives_offer_lyra_forms_to_text_models_and_bitsandbytes_to_images() -> None:
    from shared.config.schema import ModelEntry
    from shared.planning.search import quantization_forms

    assert quantization_forms(ModelEntry(backend="transformers", path="x")) == ("int8", "int4")
    assert quantization_forms(ModelEntry(kind="vision_language", backend="transformers", path="x")) == ("int8", "int4")
    assert quantization_forms(ModelEntry(kind="image_generation", backend="diffusers", path="x")) == ("bnb-int8",
                                                                                                        "bnb-nf4")
    assert quantization_forms(ModelEntry(backend="transformers", path="x", gguf_file="m.gguf")) == ()
