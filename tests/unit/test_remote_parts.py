"""Beyond one machine, without sockets: remote-model config and plan, Curve key files, the remote backend's
pure parts (label scores, back-off). Its wire behaviour (statuses, streams, retries) is tested against a real
server in tests/integration/test_remote_backend.py."""

from __future__ import annotations

import email.utils
import os
import stat
import time
from pathlib import Path

import pytest

from shared.config.schema import ConfigError, RemoteSettings, parse_config
from shared.models import openai_remote as remote
from shared.models import openai_wire as wire
from shared.planning.plan import make_plan, render_table
from shared.wire import keys
from tests.stackproc import fake_config

VOICE = {"backend": "openai", "remote": {"base_url": "http://10.0.0.7:8000/v1/", "model": "llama-70b"}}


def test_a_remote_model_needs_a_server_and_a_model_and_takes_no_gpu(tmp_path: Path) -> None:
    config = parse_config(fake_config(tmp_path, voice=VOICE, services__voice__gpus=[]))
    assert config.voice.remote.base_url == "http://10.0.0.7:8000/v1"  # the trailing slash goes
    with pytest.raises(ConfigError, match=r"sets no remote\.base_url or remote\.model"):
        parse_config(fake_config(tmp_path, voice={"backend": "openai", "remote": {"model": "x"}}))
    with pytest.raises(ConfigError, match=r"services\.voice\.gpus: every model of voice runs remotely"):
        parse_config(fake_config(tmp_path, voice=VOICE))
    with pytest.raises(ConfigError, match="must start with http"):
        parse_config(fake_config(tmp_path, voice={**VOICE, "remote": {"base_url": "10.0.0.7", "model": "m"}}))


def test_a_remote_router_is_not_calibrated_unless_asked(tmp_path: Path) -> None:
    router = {"backend": "openai", "remote": {"base_url": "http://h:1/v1", "model": "m"}}
    assert not parse_config(fake_config(tmp_path, router=router, services__router__gpus=[])).routing.calibrate
    asked = parse_config(fake_config(tmp_path, router=router, services__router__gpus=[], routing={"calibrate": True}))
    assert asked.routing.calibrate


def test_workers_over_a_network_get_a_longer_heartbeat_timeout_unless_set(tmp_path: Path) -> None:
    remote_workers = {"runtime__worker_endpoint": "tcp://10.0.0.2:5601", "runtime__allow_remote": True,
                      "runtime__curve": True}
    raw = fake_config(tmp_path, **remote_workers)
    del raw["runtime"]["heartbeat_timeout_s"]
    assert parse_config(raw).runtime.heartbeat_timeout_s == 10.0
    assert parse_config(fake_config(tmp_path, **remote_workers)).runtime.heartbeat_timeout_s == 1.5  # chosen
    with pytest.raises(ConfigError, match="both endpoints are ipc"):
        parse_config(fake_config(tmp_path, runtime__curve=True))


def test_the_plan_counts_a_remote_model_as_zero_local_bytes_and_says_where_it_runs(tmp_path: Path) -> None:
    plan = make_plan(parse_config(fake_config(tmp_path, voice=VOICE, services__voice__gpus=[])))
    voice = next(p for p in plan.placements if p.role == "voice")
    assert voice.estimate.total == 0 and not any(voice.split.per_gpu.values())
    assert all(gpu.voice == 0 for gpu in plan.gpus)
    assert "runs at http://10.0.0.7:8000/v1 as llama-70b: no local VRAM" in render_table(plan)


def test_lyra_keys_writes_private_files_that_load_and_refuses_shared_ones(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    written = keys.make_keys(directory, clients=("client", "gateway"))
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in written)
    assert stat.S_IMODE((directory / "authorized").stat().st_mode) == 0o700
    voice = keys.identity(directory, "voice")
    assert voice.server_public == keys.load_public(directory / "coordinator.key")
    assert voice.secret.decode() not in repr(voice)  # a key never shows up in a repr or a log line
    assert keys.authorized(directory, "workers") == {keys.load_public(directory / f"{name}.key"): name
                                                     for name in ("router", "specialist_host", "voice")}
    assert set(keys.authorized(directory, "clients").values()) == {"client", "gateway"}
    with pytest.raises(keys.KeyFileError, match="already exists"):
        keys.make_keys(directory)
    os.chmod(directory / "voice.key_secret", 0o644)
    with pytest.raises(keys.KeyFileError, match="readable by others"):
        keys.identity(directory, "voice")
    with pytest.raises(keys.KeyFileError, match="no key file"):
        keys.identity(directory, "nobody")


def test_label_scores_from_logprobs_and_from_a_named_label() -> None:
    top = [(" Phil", -0.2), ("pr", -1.9), ("p", -3.0)]
    scores = remote.label_probabilities_from_logprobs(top, ["pragmatist", "philosopher", "artist"])
    assert scores["philosopher"] > scores["pragmatist"] > scores["artist"] and abs(sum(scores.values()) - 1) < 1e-9
    assert remote.label_probabilities_from_text("I'd say: Philosopher, not pragmatist",
                                                ["pragmatist", "philosopher"]) == {"pragmatist": 0.0,
                                                                                   "philosopher": 1.0}
    assert remote.label_probabilities_from_text("no idea", ["a1", "b1"]) == {"a1": 0.5, "b1": 0.5}


def test_back_off_doubles_is_capped_and_honours_retry_after_in_seconds_or_as_a_date() -> None:
    settings = RemoteSettings(base_url="http://h/v1", model="m", backoff_s=0.5, max_backoff_s=3.0)
    assert [wire.backoff_s(settings, n, None) for n in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert wire.backoff_s(settings, 0, "2") == 2.0 and wire.backoff_s(settings, 0, "120") == 3.0
    assert wire.backoff_s(settings, 0, "0") == 0.0  # the server's word wins over backoff_s
    soon = email.utils.formatdate(time.time() + 2.5, usegmt=True)
    assert 1.0 < wire.backoff_s(settings, 0, soon) <= 2.5
    assert wire.backoff_s(settings, 1, "Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date gone by: at once
    assert wire.backoff_s(settings, 1, "soon") == 1.0  # unreadable: doubling as without one


def test_a_client_finds_its_curve_keys_only_where_curve_is_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.client.discovery import curve_keys as _curve_keys
    from tests.stackproc import to_toml

    directory = tmp_path / "keys"
    keys.make_keys(directory)
    endpoint = "tcp://127.0.0.1:5600"
    monkeypatch.setenv("LYRA_KEYS_DIR", str(directory))
    assert _curve_keys(endpoint) == keys.identity(directory, "client") and _curve_keys("ipc:///x.sock") is None
    monkeypatch.delenv("LYRA_KEYS_DIR")
    for curve, expected in ((True, keys.identity(directory, "client")), (False, None)):
        config = tmp_path / f"curve-{curve}.toml"
        config.write_text(to_toml(fake_config(tmp_path, runtime__client_endpoint=endpoint, runtime__curve=curve,
                                              runtime__keys_dir=str(directory))))
        monkeypatch.setenv("LYRA_CONFIG", str(config))
        assert _curve_keys(endpoint) == expected  # a stack without Curve never gets a Curve handshake


def test_doctor_says_where_a_remote_model_runs_and_misses_its_key(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.cli.doctor import model_checks

    voice = {**VOICE, "remote": {**VOICE["remote"], "api_key_env": "LYRA_TEST_NO_SUCH_KEY"}}
    monkeypatch.delenv("LYRA_TEST_NO_SUCH_KEY", raising=False)
    config = parse_config(fake_config(tmp_path, voice=voice, services__voice__gpus=[]))
    check = next(c for c in model_checks(config, has_cuda=False) if c.name == "model voice")
    assert check.status == "fail" and "LYRA_TEST_NO_SUCH_KEY" in check.detail
    monkeypatch.setenv("LYRA_TEST_NO_SUCH_KEY", "k")
    check = next(c for c in model_checks(config, has_cuda=False) if c.name == "model voice")
    assert check.status == "pass" and "remote at http://10.0.0.7:8000/v1" in check.detail


def test_lyra_up_leaves_a_service_another_host_runs_to_that_host(tmp_path: Path) -> None:
    from shared.cli.stack import stack_env

    config = parse_config(fake_config(tmp_path, services__specialist_host={"gpus": [1], "external": True}))
    env = stack_env(config)
    assert (env["LYRA_AUTOSTART_ROUTER"], env["LYRA_AUTOSTART_SPECIALIST_HOST"], env["LYRA_AUTOSTART_VOICE"]) == (
        "true", "false", "true")


def test_doctor_says_what_auto_picks_and_points_models_left_on_graphs_to_the_fused_engine(tmp_path: Path) -> None:
    import json

    from shared.cli.doctor import engine_checks

    folders = {}
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256}
    for name, described in (("llama", {"model_type": "llama"}), ("qwen", {"model_type": "qwen2"}),
                            ("gemma", {"model_type": "gemma3_text", "head_dim": 16}),
                            ("gelu", {"model_type": "llama", "hidden_act": "gelu"}),
                            ("fp8", {"model_type": "llama", "quantization_config": {"quant_method": "fp8"}})):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "config.json").write_text(json.dumps({**small, **described}))

    def model(folder: str, **extra: str) -> dict:
        return {"backend": "transformers", "path": str(folders[folder]), "description": folder, **extra}

    config = parse_config(fake_config(
        tmp_path, specialists__pragmatist=model("llama"), specialists__philosopher=model("gemma"),
        specialists__coder=model("qwen", engine="fused"),
        voice={**model("qwen", engine="graphs"), "system_prompt": "x"}))
    checks = {check.name: check for check in engine_checks(config, has_cuda=True)}
    assert set(checks) == {"engine pragmatist", "engine voice"}  # gemma: not a fused family; coder: fused already
    assert checks["engine pragmatist"].detail.startswith("auto: a llama model")  # the default picks fused itself
    assert "a qwen2 model" in checks["engine voice"].detail and checks["engine voice"].fix.endswith("[voice]")
    assert engine_checks(config, has_cuda=False) == []  # on the CPU every engine decodes the same way
    for refused in (model("llama", quantization="int4"), model("fp8"), model("gelu"),
                    {**model("llama"), "path": "org/not-in-the-local-cache"}):
        config = parse_config(fake_config(tmp_path, specialists__pragmatist=refused))
        assert engine_checks(config, has_cuda=True) == []  # what the fused step would refuse, or cannot read
