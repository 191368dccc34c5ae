"""Device-map resolution and placement summaries (pure logic, no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shared.planning.placement import (
    PlacementError,
    expand_layer_ranges,
    resolve_device_map,
    resolve_max_memory,
    summarize,
)


def test_layer_ranges_expand_to_one_key_per_layer() -> None:
    expanded = expand_layer_ranges({"model.embed_tokens": 0, "model.layers.0-2": 0, "model.layers.3-4": 1,
                                    "lm_head": "cpu"})
    assert expanded == {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 0,
                        "model.layers.3": 1, "model.layers.4": 1, "lm_head": "cpu"}


def test_a_single_layer_range_and_plain_keys_pass_through() -> None:
    assert expand_layer_ranges({"model.layers.7-7": 1, "model.layers.8": 0}) == {"model.layers.7": 1,
                                                                                  "model.layers.8": 0}


def test_a_reversed_range_is_an_error() -> None:
    with pytest.raises(PlacementError, match="after its end"):
        expand_layer_ranges({"model.layers.9-3": 0})


def test_overlapping_ranges_are_an_error() -> None:
    with pytest.raises(PlacementError, match="twice"):
        expand_layer_ranges({"model.layers.0-4": 0, "model.layers.4-8": 1})


@pytest.mark.parametrize(("config", "gpus", "expected"), [
    ("", 1, {"": 0}),
    ("", 2, {"": 0}),
    ("", 0, "cpu"),
    ("auto", 2, "auto"),
    ("auto", 0, "cpu"),
    ("cpu", 2, "cpu"),
])
def test_string_maps_resolve_per_gpu_count(config: str, gpus: int, expected: object) -> None:
    assert resolve_device_map(config, gpus) == expected


def test_an_explicit_map_is_expanded_and_checked() -> None:
    resolved = resolve_device_map({"model.layers.0-1": 0, "model.layers.2-3": 1, "lm_head": 1}, gpu_count=2)
    assert resolved == {"model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1, "model.layers.3": 1,
                        "lm_head": 1}


@pytest.mark.parametrize(("device_map", "gpus", "message"), [
    ({"model.layers.0-3": 2}, 2, "GPU 2 does not exist"),
    ({"model.layers.0-3": 0}, 0, "no GPU"),
    ({"lm_head": "gpu1"}, 2, "neither a GPU index"),
    ({"lm_head": -1}, 2, "does not exist"),
    ("everywhere", 2, "expected"),
])
def test_impossible_maps_are_refused(device_map: object, gpus: int, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        resolve_device_map(device_map, gpus)  # type: ignore[arg-type]


def test_max_memory_keys_become_relative_indices() -> None:
    assert resolve_max_memory({"0": "47GB", "1": "48GiB", "cpu": "100GB"}, gpu_count=2) == {
        0: "47GB", 1: "48GiB", "cpu": "100GB"}
    assert resolve_max_memory({}, gpu_count=2) is None


@pytest.mark.parametrize(("max_memory", "message"), [({"2": "47GB"}, "GPU 2"), ({"0": "lots"}, "expected a size")])
def test_bad_max_memory_is_refused(max_memory: dict[str, str], message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        resolve_max_memory(max_memory, gpu_count=2)


def test_summary_folds_layers_and_uses_physical_gpu_numbers() -> None:
    # The voice process is pinned to physical GPUs 2 and 5: inside it they are cuda:0 and cuda:1.
    device_map = {"model.embed_tokens": 0, **{f"model.layers.{i}": 0 for i in range(16)},
                  **{f"model.layers.{i}": 1 for i in range(16, 32)}, "model.norm": 1, "lm_head": "cuda:1"}
    assert summarize(device_map, physical_gpus=[2, 5]) == {
        "model.embed_tokens": "gpu:2", "model.layers.0-15": "gpu:2", "model.layers.16-31": "gpu:5",
        "model.norm": "gpu:5", "lm_head": "gpu:5"}


def test_summary_keeps_gaps_and_offload_visible() -> None:
    device_map = {"model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": 0, "model.layers.3": "disk"}
    assert summarize(device_map, physical_gpus=[1]) == {
        "model.layers.0": "gpu:1", "model.layers.1": "cpu", "model.layers.2": "gpu:1", "model.layers.3": "disk"}


@pytest.mark.parametrize(("device_map", "fallback", "expected"), [
    ({"": 0}, "cpu", {"model": "gpu:1"}),
    ({"": "cpu"}, "cpu", {"model": "cpu"}),
    (None, "cpu", {"model": "cpu"}),
    (None, "cuda:0", {"model": "gpu:1"}),
])
def test_whole_model_summaries(device_map: dict | None, fallback: str, expected: dict[str, str]) -> None:
    assert summarize(device_map, physical_gpus=[1], fallback_device=fallback) == expected


def test_module_does_not_import_torch() -> None:
    """`lyra plan` runs in the coordinator's environment, which never imports torch."""
    code = "import sys, shared.planning.placement; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, timeout=60).returncode == 0
