"""On CUDA, the default engine (`auto`) decodes each text model with the fastest engine the model allows, and
`lyra status` says which and why: the fused step on Lyra's kernels for a Llama model, graphs for a Qwen3 one."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.models import tiny
from tests.stackproc import ROOT, StackProcesses

pytestmark = [pytest.mark.models, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def checkpoint(config_class: str, folder: Path) -> Path:
    """A bfloat16 checkpoint of real proportions (head_dim 64), small enough to load in a second."""
    import transformers

    tokenizer = tiny.build_tokenizer()
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def llm(path: Path, **extra: object) -> dict:
    return {"backend": "transformers", "path": str(path), "dtype": "bfloat16", "max_context": 256,
            "generation": {"max_new_tokens": 8, "temperature": 0.0}, **extra}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcesses]:
    root = tmp_path_factory.mktemp("engine-auto")
    proc = StackProcesses(
        gpus=[{"index": 0, "budget_gb": 60.0}],
        services={"router": {"gpus": [0]}, "specialist_host": {"gpus": [0]}, "voice": {"gpus": [0]}},
        router=llm(tiny.build_checkpoint("llama", root / "router")),
        specialists={"pragmatist": llm(checkpoint("LlamaConfig", root / "llama"), description="practical tasks")},
        voice=llm(checkpoint("Qwen3Config", root / "qwen3"), system_prompt="You are Lyra."),
        runtime__heartbeat_timeout_s=30.0, runtime__heartbeat_interval_s=0.5,
        deadlines={"route": 120.0, "load": 300.0, "specialist": 120.0, "voice": 120.0},
    )
    try:
        proc.start_all(timeout_s=300)
        yield proc
    except BaseException:
        print(proc.logs())
        raise
    finally:
        proc.stop()


def test_status_says_which_engine_auto_picked_for_each_model_and_why(stack: StackProcesses) -> None:
    with stack.client(timeout_s=120) as client:
        assert client.chat("How do I boil an egg?", specialist="pragmatist").answer is not None
        engines = {s.service: s.placement.get("engine", "") for s in client.status().services}
    assert engines["specialist_host"] == "fused graphs (auto: a llama model, on Lyra's kernels)", engines
    assert engines["voice"].startswith("graphs (auto: fused step unsupported: model type 'qwen3'"), engines
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # the packages a GPU machine was given
    shown = subprocess.run([sys.executable, "-m", "shared.cli", "status", "--endpoint", stack.endpoint],
                           capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": path})
    assert "engine=fused graphs (auto: a llama model, on Lyra's kernels)" in shown.stdout, shown.stdout + shown.stderr
