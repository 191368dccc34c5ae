"""The planner places bytes where the loader will, and config mistakes are one-line errors (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shared.config.schema import ConfigError, parse_config
from shared.planning.estimate import split_across_gpus
from shared.planning.plan import estimate_cached, make_plan

README_MAP = {"model.layers.0-39": 0, "model.layers.40-79": 1, "model.embed_tokens": 0, "model.norm": 1,
              "lm_head": 1}


def config(**voice: object) -> dict:
    return {"gpus": [{"index": 0, "budget_gb": 80}, {"index": 1, "budget_gb": 80}],
            "services": {"voice": {"gpus": [0, 1]}, "specialist_host": {"gpus": [1]}},
            "router": {}, "specialists": {"a": {}},
            "voice": {"backend": "transformers", "path": "x", "architecture": "llama-3-70b", "quantization": "bnb-nf4",
                      "dtype": "bfloat16", **voice}}


def test_the_readme_range_map_is_planned_as_the_loader_places_it() -> None:
    entry = parse_config(config(device_map=README_MAP)).voice
    estimate = estimate_cached(entry)
    split = split_across_gpus(estimate, [0, 1], entry.device_map, entry.max_memory)
    variable = estimate.weights + estimate.kv_cache + estimate.recurrent_state + estimate.overhead
    # 40 of 80 layers on each GPU: each holds half of the per-layer bytes plus the shared activations.
    assert split.per_gpu[0] == split.per_gpu[1] == round(variable * 40 / 80) + estimate.activations


@pytest.mark.parametrize(("voice", "says"), [
    ({"device_map": "sequentail"}, "device_map 'sequentail'"),
    ({"device_map": {"model.layers.0-79": 2}}, "GPU 2 does not exist"),
    ({"device_map": {"model.layers.9-3": 0}}, "range start 9 is after its end 3"),
    ({"device_map": "auto", "max_memory": {"0": "lots"}}, "max_memory['0'] = 'lots'"),
    ({"architecture": "no-such-model"}, "unknown architecture 'no-such-model'"),
])
def test_config_mistakes_are_one_line_errors_naming_the_field(voice: dict, says: str) -> None:
    with pytest.raises(ConfigError, match="voice 'voice'") as raised:
        make_plan(parse_config(config(**voice)))
    assert says in str(raised.value) and "\n" not in str(raised.value)


def test_a_max_memory_above_the_budget_is_a_problem_of_the_plan() -> None:
    plan = make_plan(parse_config(config(device_map="auto", max_memory={"0": "90GB", "1": "40GB"})))
    assert not plan.ok
    assert any("max_memory['0'] = 90GB is more than GPU 0's budget of 80.0 GB" in p for p in plan.problems)


def test_lyra_plan_exits_2_on_a_config_mistake_and_1_when_it_does_not_fit(tmp_path: Path) -> None:
    def plan(text: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "c.toml"
        path.write_text(text)
        return subprocess.run([sys.executable, "-m", "shared.cli", "plan", "-c", str(path)], capture_output=True,
                              text=True, timeout=120)

    base = ('[[gpus]]\nindex = 0\nbudget_gb = 20\n[services.specialist_host]\ngpus = [0]\n[router]\n[voice]\n'
            '[specialists.a]\nbackend = "transformers"\npath = "/nonexistent"\n')
    mistake = plan(base + 'architecture = "llama-3-8b"\ndevice_map = "sequentail"\n')
    assert mistake.returncode == 2 and "Traceback" not in mistake.stderr and "sequentail" in mistake.stderr
    unknown = plan(base + 'architecture = "nope"\n')
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    too_big = plan(base + 'architecture = "llama-3-70b"\n')
    assert too_big.returncode == 1 and "DOES NOT FIT" in too_big.stdout
