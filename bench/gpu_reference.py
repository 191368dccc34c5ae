"""The reference placement on a two-GPU machine, with random-weight checkpoints of real architectures.

    python bench/gpu_reference.py --out DIR [--work /tmp/lyra-gpu]

Router (Gemma-3 shape, 8 of 48 layers) only on GPU 0; specialists on GPU 1 (pragmatist: Llama-3-8B shape,
philosopher: Jamba shape with 6 layers and 4 experts); voice (Llama-3-8B shape) split over both GPUs with
device_map="auto". It starts the real stack under supervisord (`lyra up`), chats through each specialist
(A -> B -> A swap), and reports measured memory per process per GPU (torch and nvidia-smi), load time per
model, the resolved placement, and the ledger's estimate vs the measurement with the worst error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.decode import lyra  # noqa: E402 - the one helper that runs the CLI for benchmarks
from shared.config.units import GB  # noqa: E402


def build_checkpoints(work: Path) -> dict[str, Path]:
    """Random-weight checkpoints of real architectures (reduced depth where noted), saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    from shared.planning.architectures import build_config, get_architecture
    from tests.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    shapes = {
        "router-gemma3": ("gemma-3-12b", {"num_hidden_layers": 8}),
        "llama3-8b": ("llama-3-8b", {}),
        "jamba-small": ("jamba-v0.1", {"num_hidden_layers": 6, "num_experts": 4}),
    }
    out = {}
    for name, (arch, overrides) in shapes.items():
        folder = work / name
        out[name] = folder
        if (folder / "config.json").exists():
            continue
        component = get_architecture(arch).components[0]
        config = build_config(component)
        text = getattr(config, "text_config", None) or config
        for key, value in overrides.items():
            setattr(text, key, value)
        if isinstance(vars(text).get("layer_types"), list):  # Gemma: per-layer attention kinds follow the depth
            text.layer_types = text.layer_types[:text.num_hidden_layers]
        started = time.perf_counter()
        with torch.device("cuda:0"):
            model = AutoModelForCausalLM.from_config(text, dtype=torch.bfloat16)
        model.save_pretrained(folder, max_shard_size="5GB")
        tokenizer.save_pretrained(folder)
        params = sum(p.numel() for p in model.parameters())
        del model
        torch.cuda.empty_cache()
        print(f"built {name} ({arch}, {params / 1e9:.2f}B params) in {time.perf_counter() - started:.1f}s", flush=True)
    return out


def write_config(work: Path, ckpt: dict[str, Path]) -> Path:
    def model(path: Path, **extra: str) -> str:
        lines = ['backend = "transformers"', f'path = "{path}"', 'dtype = "bfloat16"', "max_context = 2048",
                 "generation = { max_new_tokens = 16, temperature = 0.0 }"]
        return "\n".join(lines + [f"{k} = {v}" for k, v in extra.items()])

    text = f"""
[runtime]
run_dir = "{work / 'run'}"
heartbeat_timeout_s = 60
[deadlines]
route = 120
load = 600
specialist = 300
voice = 300
[[gpus]]
index = 0
budget_gb = 75
[[gpus]]
index = 1
budget_gb = 75
[services.router]
gpus = [0]
[services.specialist_host]
gpus = [1]
[services.voice]
gpus = [0, 1]
[router]
{model(ckpt['router-gemma3'])}
[specialists.pragmatist]
{model(ckpt['llama3-8b'])}
description = "practical tasks"
[specialists.philosopher]
{model(ckpt['jamba-small'])}
description = "philosophical questions"
[voice]
{model(ckpt['llama3-8b'], device_map='"auto"', max_memory='{ "0" = "6GB", "1" = "40GB" }')}
system_prompt = "You are Lyra."
"""
    path = work / "reference.toml"
    path.write_text(text)
    return path


def nvidia_smi_apps() -> list[str]:
    query = ["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True).stdout.strip().splitlines()


def status() -> dict:
    return json.loads(lyra("status", "--json", "--timeout", "30").stdout)


def chat(specialist: str, text: str) -> dict:
    result = lyra("chat", "--json", "--specialist", specialist, text, timeout=900)
    return json.loads(result.stdout) if result.returncode == 0 else {"error": result.stderr}


def load_times(run_dir: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for log in (run_dir / "logs").glob("*.log"):
        found[log.stem] = [ln.strip() for ln in log.read_text(errors="replace").splitlines()
                           if re.search(r"loaded|placement|device map|may allocate", ln)][-12:]
    return found


def ledger_errors(snapshot: dict) -> list[dict]:
    rows = []
    for gpu in snapshot["gpus"]:
        for service, line in gpu["by_service"].items():
            if "measured" in line and line["estimated"]:
                error = (line["estimated"] - line["measured"]) / line["measured"] * 100
                rows.append({"gpu": gpu["gpu"], "service": service, "estimated_gb": line["estimated"] / GB,
                             "measured_gb": line["measured"] / GB, "error_percent": round(error, 1)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/lyra-gpu")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"nvidia_smi": subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout}
    report["checkpoints"] = {k: str(v) for k, v in build_checkpoints(work).items()}
    config = write_config(work, {k: Path(v) for k, v in report["checkpoints"].items()})
    report["plan"] = lyra("plan", "-c", str(config)).stdout
    started = time.perf_counter()
    up = lyra("up", "-c", str(config), "--timeout", "900")
    report["up_seconds"] = round(time.perf_counter() - started, 1)
    report["up"] = up.stdout[-3000:]
    try:
        report["after_up"] = {"status": status(), "nvidia_smi": nvidia_smi_apps()}
        steps = [("pragmatist", "How do I boil an egg?"), ("philosopher", "Is free will real?"),
                 ("pragmatist", "How do I boil an egg?")]
        report["turns"] = []
        for specialist, text in steps:
            done = chat(specialist, text)
            report["turns"].append({"specialist": specialist, "timings": done.get("timings"),
                                    "output": done.get("specialist_output"), "error": done.get("error"),
                                    "status": status(), "nvidia_smi": nvidia_smi_apps()})
        outputs = [t["output"] for t in report["turns"]]
        report["swap_outputs_equal"] = outputs[0] == outputs[2]
        report["ledger_vs_measured"] = ledger_errors(report["turns"][-1]["status"])
        report["logs"] = load_times(work / "run")
    finally:
        lyra("down")
    (out / "gpu_reference.json").write_text(json.dumps(report, indent=2, default=str))
    print_summary(report)
    return 0


def print_summary(report: dict) -> None:
    print(report["nvidia_smi"])
    print(f"lyra up (load router + voice): {report['up_seconds']} s")
    for turn in report.get("turns", []):
        t = turn["timings"] or {}
        print(f"{turn['specialist']:<12} load {t.get('load', 0):.2f}s  specialist {t.get('specialist', 0):.2f}s  "
              f"voice {t.get('voice', 0):.2f}s  error={turn['error']}")
        for svc in turn["status"]["services"]:
            mem = ", ".join(f"{m['device']}: alloc {m['allocated_bytes'] / GB:.2f} GB reserved "
                            f"{m['reserved_bytes'] / GB:.2f} GB" for m in svc["memory"])
            print(f"    {svc['service']:<16} resident {svc['resident']} placement {svc['placement']}  {mem}")
        print("    nvidia-smi:", "; ".join(turn["nvidia_smi"]))
    print("swap A->B->A outputs equal:", report.get("swap_outputs_equal"))
    rows = report.get("ledger_vs_measured", [])
    for row in rows:
        print(f"GPU {row['gpu']} {row['service']:<16} estimated {row['estimated_gb']:.2f} GB measured "
              f"{row['measured_gb']:.2f} GB error {row['error_percent']:+.1f}%")
    if rows:
        print(f"worst estimate error: {max(abs(r['error_percent']) for r in rows):.1f}%")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
