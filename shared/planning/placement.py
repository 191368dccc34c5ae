"""Where a model's layers go: config device maps -> `from_pretrained` arguments -> a readable summary.

Pure logic, no torch: `lyra plan` and the unit tests use it without a GPU. Inside a worker process the GPUs
it is pinned to (CUDA_VISIBLE_DEVICES) are numbered 0..n-1; configs speak in those relative numbers and
summaries speak in physical numbers, so an operator can match them with `nvidia-smi`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# accelerate's automatic strategies; "auto" is the one configs normally use
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
OFFLOAD_TARGETS = ("cpu", "disk")

_RANGE = re.compile(r"^(?P<prefix>.*\.)(?P<start>\d+)-(?P<end>\d+)$")
_INDEXED = re.compile(r"^(?P<prefix>.*\.)(?P<index>\d+)$")


class PlacementError(ValueError):
    """A device map or memory limit cannot work for this process; the message says which key and why."""


def expand_layer_ranges(device_map: Mapping[str, int | str]) -> dict[str, int | str]:
    """Expand keys like "model.layers.0-39" into one key per layer, keeping every other key as is."""
    expanded: dict[str, int | str] = {}
    for key, device in device_map.items():
        match = _RANGE.match(key)
        if match is None:
            _add(expanded, key, device)
            continue
        start, end = int(match["start"]), int(match["end"])
        if start > end:
            raise PlacementError(f"device_map key {key!r}: range start {start} is after its end {end}")
        for index in range(start, end + 1):
            _add(expanded, f"{match['prefix']}{index}", device)
    return expanded


def _add(expanded: dict[str, int | str], key: str, device: int | str) -> None:
    if key in expanded:
        raise PlacementError(f"device_map places {key!r} twice")
    expanded[key] = device


def check_device(device: int | str, gpu_count: int, where: str) -> None:
    """Raise PlacementError unless `device` is a relative GPU index this process has, "cpu" or "disk"."""
    if isinstance(device, bool) or not isinstance(device, int | str):
        raise PlacementError(f"{where}: {device!r} is neither a GPU index nor one of {OFFLOAD_TARGETS}")
    if isinstance(device, str):
        if device not in OFFLOAD_TARGETS:
            raise PlacementError(f"{where}: {device!r} is neither a GPU index nor one of {OFFLOAD_TARGETS}")
        return
    if not 0 <= device < gpu_count:
        have = f"GPUs 0..{gpu_count - 1}" if gpu_count else "no GPU"
        raise PlacementError(
            f"{where}: GPU {device} does not exist in this process ({have}); indices are relative to the "
            "service's [services.<name>] gpus list"
        )


def resolve_device_map(device_map: str | Mapping[str, int | str], gpu_count: int) -> str | dict[str, int | str]:
    """The `device_map` argument for `from_pretrained`, given the config value and the process's GPU count.

    "" puts the whole model on relative GPU 0 (or the CPU when the process has no GPU); an accelerate
    strategy passes through; a dict is expanded (layer ranges) and checked against the GPUs present.
    """
    if isinstance(device_map, str):
        if device_map == "":
            return {"": 0} if gpu_count else "cpu"
        if device_map == "cpu":
            return "cpu"
        if device_map not in STRATEGIES:
            raise PlacementError(f"device_map {device_map!r}: expected \"\", \"cpu\", one of {STRATEGIES} or a table")
        return device_map if gpu_count else "cpu"
    expanded = expand_layer_ranges(device_map)
    for key, device in expanded.items():
        check_device(device, gpu_count, f"device_map key {key!r}")
    return expanded


def resolve_max_memory(max_memory: Mapping[str, str], gpu_count: int) -> dict[int | str, str] | None:
    """The `max_memory` argument: config keys "0", "1", "cpu" -> {0: ..., 1: ..., "cpu": ...}; None if empty."""
    if not max_memory:
        return None
    resolved: dict[int | str, str] = {}
    for key, limit in max_memory.items():
        device: int | str = int(key) if key.isdigit() else key
        check_device(device, gpu_count, f"max_memory key {key!r}")
        if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]i?B\s*", limit, flags=re.IGNORECASE):
            raise PlacementError(f"max_memory[{key!r}] = {limit!r}: expected a size such as \"47GB\" or \"46GiB\"")
        resolved[device] = limit
    return resolved


def device_label(device: Any, physical_gpus: list[int]) -> str:
    """A device as an operator reads it: "gpu:<physical index>", "cpu" or "disk"."""
    text = str(device)
    if text.startswith("cuda"):
        text = text.partition(":")[2] or "0"
    if not text.isdigit():
        return text
    relative = int(text)
    if relative < len(physical_gpus):
        return f"gpu:{physical_gpus[relative]}"
    return f"gpu:?{relative}"  # a device this process should not have: shown rather than hidden


def summarize(hf_device_map: Mapping[str, Any] | None, physical_gpus: list[int],
              fallback_device: Any = "cpu") -> dict[str, str]:
    """Summarize a loaded model's placement, folding consecutive layers on one device into ranges.

    `hf_device_map` is what accelerate recorded (model.hf_device_map), or None when the model was put on
    one device without it; then `fallback_device` says where. A whole-model map reads {"model": "gpu:1"}.
    """
    if not hf_device_map:
        return {"model": device_label(fallback_device, physical_gpus)}
    summary: dict[str, str] = {}
    run: tuple[str, int, int, str] | None = None  # prefix, first index, last index, device
    for key, device in hf_device_map.items():
        label = device_label(device, physical_gpus)
        match = _INDEXED.match(key)
        if match and run and run[0] == match["prefix"] and run[2] + 1 == int(match["index"]) and run[3] == label:
            run = (run[0], run[1], int(match["index"]), label)
            continue
        _close(summary, run)
        run = (match["prefix"], int(match["index"]), int(match["index"]), label) if match else None
        if match is None:
            summary[key or "model"] = label
    _close(summary, run)
    return summary


def _close(summary: dict[str, str], run: tuple[str, int, int, str] | None) -> None:
    if run is None:
        return
    prefix, first, last, label = run
    summary[f"{prefix}{first}" if first == last else f"{prefix}{first}-{last}"] = label
