"""`lyra doctor`: check this machine against a config, one pass/fail line per check with the fix."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from shared.config.schema import LyraConfig, ModelEntry
from shared.config.secrets import MissingApiKey, api_key_from_env
from shared.config.units import GB, format_gb
from shared.wire.names import ROUTER, SPECIALIST_HOST, VOICE, WORKER_SERVICES


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    status: str  # "pass", "warn", "fail", "info"
    name: str
    detail: str
    fix: str = ""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _run(args: list[str]) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_checks(config: LyraConfig) -> tuple[list[Check], bool]:
    """GPU count, names, memory, topology; whether CUDA is usable."""
    if not _installed("torch"):
        return [Check("warn", "torch", "not installed: only fake backends can run", "bash scripts/setup.sh")], False
    import torch

    checks = [Check("info", "torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")]
    if not torch.cuda.is_available():
        needed = any(config.gpus_of(s) for s in WORKER_SERVICES) and any(
            e.backend != "fake" for e in [config.router, config.voice, *config.specialists.values()])
        checks.append(Check("fail" if needed else "info", "GPUs", "no CUDA GPU visible",
                            "install a CUDA build of torch and the NVIDIA driver" if needed else ""))
        return checks, False
    count = torch.cuda.device_count()
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        checks.append(Check("info", f"GPU {i}", f"{props.name}, {format_gb(props.total_memory)}"))
    for gpu in config.gpus:
        if gpu.index >= count:
            checks.append(Check("fail", f"config GPU {gpu.index}", f"only {count} GPU(s) visible",
                                "fix [[gpus]] or CUDA_VISIBLE_DEVICES"))
        elif gpu.budget_gb * GB > torch.cuda.get_device_properties(gpu.index).total_memory:
            checks.append(Check("fail", f"config GPU {gpu.index}", f"budget {gpu.budget_gb} GB exceeds the card",
                                "lower budget_gb below the card's memory"))
    topo = _run(["nvidia-smi", "topo", "-m"])
    nvlink = _run(["nvidia-smi", "nvlink", "-s"])
    checks.append(Check("info", "topology", topo or "nvidia-smi topo -m unavailable"))
    links = "NVLink active" if nvlink and "GB/s" in nvlink else "no active NVLink reported"
    checks.append(Check("info", "NVLink", links))
    return checks, True


def attention_checks(has_cuda: bool) -> list[Check]:
    """Which attention implementations and quantization backends can run here."""
    flash = _installed("flash_attn")
    checks = [Check("pass", "attention sdpa", "available (PyTorch scaled_dot_product_attention)"),
              Check("pass" if flash and has_cuda else "info", "attention flash_attention_2",
                    "available" if flash and has_cuda else "unavailable (needs CUDA and flash-attn)",
                    "" if flash else "pip install flash-attn --no-build-isolation (CUDA machines)")]
    bnb = _installed("bitsandbytes")
    checks.append(Check("pass" if bnb and has_cuda else "info", "quantization bnb-int8/bnb-nf4",
                        "bitsandbytes ready" if bnb and has_cuda else "unavailable (needs CUDA and bitsandbytes)",
                        "" if bnb else "pip install bitsandbytes"))
    return checks


def model_checks(config: LyraConfig, has_cuda: bool) -> list[Check]:
    """Per-model problems found without loading (missing packages, impossible options)."""
    checks = []
    services = [(ROUTER, config.router), *((SPECIALIST_HOST, e) for e in config.specialists.values()),
                (VOICE, config.voice)]
    for service, entry in services:
        problems: list[str] = []
        if entry.backend in ("transformers",) and _installed("torch"):
            from shared.models.hf_causal import check_entry

            problems = check_entry(entry, has_cuda, config.gpus_of(service))
        if entry.backend == "diffusers" and not _installed("diffusers"):
            problems = ["diffusers is not installed: pip install diffusers"]
        elif entry.backend == "diffusers" and entry.quantization != "none" and not has_cuda:
            from shared.models.hf_checks import no_gpu_reason

            problems = [f"quantization = {entry.quantization!r} runs through bitsandbytes on a CUDA GPU and "
                        f"{no_gpu_reason(config.gpus_of(service))}; run it on a CUDA machine or set "
                        "quantization = \"none\""]
        elif entry.backend == "diffusers" and entry.quantization != "none" and not _installed("bitsandbytes"):
            problems = [f"quantization = {entry.quantization!r} needs bitsandbytes: pip install bitsandbytes"]
        if entry.backend == "openai":
            problems = _remote_key_problems(entry)
        ready = f"remote at {entry.remote.base_url} (its worker checks GET /v1/models at load)" \
            if entry.backend == "openai" else f"{entry.backend} backend ready"
        status = "fail" if problems else "pass"
        checks.append(Check(status, f"model {entry.name}", "; ".join(problems) or ready))
    return checks


def _remote_key_problems(entry: ModelEntry) -> list[str]:
    """Whether the key a remote model's worker sends is in this environment, which `lyra up` passes on to it."""
    try:
        api_key_from_env(entry.remote.api_key_env, "remote.api_key_env")
    except MissingApiKey as exc:
        return [f"{exc} here"]
    return []


def engine_checks(config: LyraConfig, has_cuda: bool) -> list[Check]:
    """Text models the fused step could decode faster: what `auto` picks for them, or the line that gives it to one
    left on `graphs`; the step's own load-time check (`fused_step.problems`) run on the model its config.json
    describes, built on the meta device."""
    if not has_cuda:  # on the CPU every engine decodes with transformers' dynamic cache
        return []
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from shared.engine.fused_step import problems
    from shared.planning.device_split import meta_model_from_checkpoint

    checks = []
    for section, entry in [*((f"specialists.{n}", e) for n, e in config.specialists.items()), ("voice", config.voice)]:
        described = Path(entry.path).expanduser() / "config.json" if entry.path else None
        if entry.backend != "transformers" or entry.kind != "causal_lm" or entry.engine not in ("auto", "graphs") or \
                entry.quantization != "none" or described is None:
            continue
        try:
            if "quantization_config" in json.loads(described.read_text()):  # weights stored quantized
                continue
            model = meta_model_from_checkpoint(AutoModelForCausalLM, str(described.parent), torch.bfloat16,
                                               local_files_only=True)
        except Exception:  # no local config.json, or one transformers cannot build: `model` checks say so
            continue
        if problems(model):
            continue
        triton = "" if _installed("triton") else " once Triton is installed (pip install triton)"
        if entry.engine == "auto":
            checks.append(Check("pass" if not triton else "info", f"engine {entry.name}",
                                f"auto: a {model.config.model_type} model, which the fused engine decodes on Lyra's "
                                f"kernels{triton or ' (lyra status shows it once loaded)'}",
                                "pip install triton" if triton else ""))
            continue
        checks.append(Check("info", f"engine {entry.name}",
                            f"graphs; a {model.config.model_type} model, which the fused engine "
                            f"decodes on Lyra's kernels{triton}: 0.55-0.60 s against 0.90-1.03 s for 128 tokens "
                            "at 8B on an H200, first load about 15 s longer (docs/decode-engine.md)",
                            f'engine = "auto" (the default) or "fused" in [{section}]'))
    return checks


def placement_checks(config: LyraConfig) -> list[Check]:
    """The device map each service would get, and the plan's verdict."""
    from shared.planning.plan import assess

    plan = assess(config)
    checks = []
    for p in plan.placements:
        where = ", ".join(f"GPU {g}: {format_gb(b)}" for g, b in p.split.per_gpu.items()) or "CPU"
        checks.append(Check("info", f"placement {p.name}", f"{format_gb(p.estimate.total)} -> {where}"))
    checks.append(Check("pass" if plan.ok else "fail", "VRAM plan", "fits" if plan.ok else "does not fit",
                        "" if plan.ok else f"see `lyra plan -c {config.source}` for the arithmetic and options"))
    return checks


def runtime_checks(config: LyraConfig) -> list[Check]:
    """supervisord present, run directory usable."""
    checks = []
    from shared.cli.stack import venv_bin

    for tool in ("supervisord", "supervisorctl"):
        found = Path(venv_bin(tool)).exists() or shutil.which(tool)
        checks.append(Check("pass" if found else "fail", tool, "found" if found else "missing",
                            "" if found else "pip install supervisor"))
    run_dir = config.run_dir()
    parent = run_dir if run_dir.exists() else run_dir.parent
    ok = os.access(parent, os.W_OK)
    checks.append(Check("pass" if ok else "fail", "run directory", str(run_dir),
                        "" if ok else "set runtime.run_dir to a writable directory"))
    return checks


def diagnose(config: LyraConfig) -> list[Check]:
    """Every check, in the order they are printed."""
    gpus, has_cuda = gpu_checks(config)
    from shared.distributed.p2p import voice_parallel_check  # imports torch only when the voice has GPUs

    return [*runtime_checks(config), *gpus, *attention_checks(has_cuda), *model_checks(config, has_cuda),
            *engine_checks(config, has_cuda), Check(*voice_parallel_check(config, has_cuda)),
            *placement_checks(config)]


def render(checks: list[Check]) -> str:
    """One line per check; multi-line details indented."""
    lines = []
    for c in checks:
        detail = c.detail.replace("\n", "\n        ")
        lines.append(f"[{c.status.upper():4}] {c.name}: {detail}" + (f"\n        fix: {c.fix}" if c.fix else ""))
    return "\n".join(lines)
