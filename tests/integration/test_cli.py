"""The `lyra` command's small promises, as a user meets them: a closed pipe, `ctl status`'s exit, `--version`,
one rule for -c, every config problem at once, and what `doctor` says on a machine without GPUs."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_supervisord import left_behind, lyra
from tests.stackproc import ROOT, fake_config, to_toml


def into_a_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """`lyra ARGS | head -0`: the reader is gone before lyra writes a byte."""
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, code, "", proc.stderr.read())


@pytest.mark.stack
def test_ctl_status_judges_by_the_config_and_status_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = tmp_path / "dev.toml"
    config.write_text(to_toml(fake_config(run_dir)))  # [gateway] is off in this config
    try:
        assert lyra("up", "-c", str(config), "--timeout", "60").returncode == 0
        healthy = lyra("ctl", "status")
        assert healthy.returncode == 0, healthy.stdout
        assert "gateway" in healthy.stdout and "(not run by this config)" in healthy.stdout
        piped = into_a_closed_pipe("status")
        assert piped.returncode == 141 and piped.stderr == "", piped.stderr  # no BrokenPipeError traceback
        assert lyra("ctl", "stop", "router").returncode == 0
        assert lyra("ctl", "status").returncode == 3  # a program the config runs is down
    finally:
        lyra("down", "--run-dir", str(run_dir))
    assert left_behind(run_dir) == []


def test_a_table_into_a_closed_pipe_ends_quietly() -> None:
    piped = into_a_closed_pipe("plan", "-c", str(ROOT / "configs" / "dev.toml"))
    assert piped.returncode == 141 and piped.stderr == "", piped.stderr  # 128 + SIGPIPE, as a shell reports it


def test_version_prints_the_package_version() -> None:
    shown = lyra("--version", timeout=30)
    assert shown.returncode == 0 and shown.stdout.strip() == f"lyra {importlib.metadata.version('lyra-runtime')}"


@pytest.mark.parametrize("command", ["up", "plan", "doctor", "route", "demo"])
def test_every_command_taking_a_config_defaults_to_the_embedded_one_and_says_so(command: str) -> None:
    shown = lyra(command, "--help", timeout=30)
    assert shown.returncode == 0
    assert "default: the embedded default, configs/default.toml" in " ".join(shown.stdout.split())


def test_plan_without_a_config_uses_the_embedded_default_and_says_so() -> None:
    planned = lyra("plan", timeout=60)
    assert planned.returncode == 0, planned.stderr
    assert "using the embedded default" in planned.stderr and "default.toml" in planned.stdout


def test_a_config_with_several_mistakes_names_each_with_the_key_it_probably_meant(tmp_path: Path) -> None:
    config = fake_config(tmp_path / "run")
    config["runtime"]["queue_sise"] = 4
    config["runtime"]["heartbeat_interval_s"] = -1
    config["gatway"] = {"enabled": True}
    config["specialists"]["pragmatist"]["generation"] = {"max_new_tokns": 3}
    (tmp_path / "bad.toml").write_text(to_toml(config))
    planned = lyra("plan", "-c", str(tmp_path / "bad.toml"), timeout=60)
    assert planned.returncode == 2
    said = planned.stderr
    assert f"{tmp_path / 'bad.toml'}: 4 problems:" in said, said
    assert "runtime.queue_sise: unknown setting; did you mean runtime.queue_size?" in said
    assert "runtime.heartbeat_interval_s: Input should be greater than 0" in said
    assert "gatway: unknown setting; did you mean gateway?" in said
    assert ("specialists.pragmatist.generation.max_new_tokns: unknown setting; did you mean "
            "specialists.pragmatist.generation.max_new_tokens?") in said


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="doctor checks models through torch")
def test_doctor_on_a_machine_without_gpus_names_the_gpus_the_config_assigns() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    checked = lyra("doctor", "-c", str(ROOT / "configs" / "a6000x2.toml"), timeout=120)
    assert checked.returncode == 1
    # the artist's bitsandbytes form needs the GPU the config gives the specialist host
    assert "the config assigns this service GPU 1 but this machine has none" in checked.stdout, checked.stdout
    assert "this service has none" not in checked.stdout and "does not exist in this process" not in checked.stdout
