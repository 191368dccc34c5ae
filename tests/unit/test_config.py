"""Config: the shipped files load; a bad file gets one message naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config.schema import ConfigError, load_config, parse_config
from tests.stackproc import ROOT, fake_config


def test_dev_config_loads() -> None:
    config = load_config(ROOT / "configs" / "dev.toml")
    assert set(config.specialists) == {"pragmatist", "philosopher"}
    assert config.gpus_of("voice") == [0, 1]
    assert config.client_endpoint().startswith("ipc://")


@pytest.mark.parametrize("change,field", [
    ({"runtime__queue_size": 0}, "runtime.queue_size"),
    ({"runtime__heartbeat_timeout_s": 0.1}, "runtime"),
    ({"specialists__pragmatist__backend": "quantum"}, "specialists.pragmatist.backend"),
    ({"specialists__pragmatist__colour": "red"}, "specialists.pragmatist.colour"),
    ({"services__voice": {"gpus": [7]}}, "GPU 7"),
    ({"router__backend": "transformers"}, "router"),
])
def test_bad_config_names_the_field_and_file(tmp_path: Path, change: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(fake_config(tmp_path, **change), source="my.toml")
    assert str(err.value).startswith("my.toml: ") and field in str(err.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[runtime\nqueue_size = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_tcp_endpoints_must_be_loopback_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not loopback"):
        parse_config(fake_config(tmp_path, runtime__client_endpoint="tcp://0.0.0.0:5555"))
    ok = parse_config(fake_config(tmp_path, runtime__client_endpoint="tcp://127.0.0.1:5555"))
    assert ok.client_endpoint() == "tcp://127.0.0.1:5555"
    with pytest.raises(ConfigError, match="needs CurveZMQ"):  # beyond loopback only with Curve keys
        parse_config(fake_config(tmp_path, runtime__client_endpoint="tcp://0.0.0.0:5555", runtime__allow_remote=True))
    exposed = parse_config(fake_config(tmp_path, runtime__client_endpoint="tcp://0.0.0.0:5555",
                                       runtime__allow_remote=True, runtime__curve=True))
    assert exposed.runtime.allow_remote and exposed.curve_on(exposed.client_endpoint())
    assert not exposed.client_needs_secret()  # the keys say who may connect


def test_auth_none_is_refused_on_tcp_endpoints_loopback_included(tmp_path) -> None:
    from shared.config.schema import ConfigError, parse_config
    from tests.stackproc import fake_config

    raw = fake_config(tmp_path, runtime__auth="none", runtime__worker_endpoint="tcp://127.0.0.1:5999")
    with pytest.raises(ConfigError, match="open to every local user") as err:
        parse_config(raw)
    assert "runtime.auth" in str(err.value) and "stack secret" in str(err.value)
    assert parse_config(fake_config(tmp_path, runtime__auth="none")).runtime.auth == "none"  # ipc: allowed
    assert parse_config(fake_config(tmp_path)).runtime.stage_retries == 1


def test_the_old_4bit_spelling_is_refused_with_one_line_naming_both_forms(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(fake_config(tmp_path, specialists__pragmatist__quantization="4bit"), source="my.toml")
    assert str(err.value) == ('my.toml: specialists.pragmatist.quantization: Value error, quantization = "4bit" is now '
                              'spelled "bnb-nf4" (bitsandbytes NF4, as before) or "int4" (Lyra\'s kernels, group 128)')
    for form in ("none", "int8", "int4", "bnb-int8", "bnb-nf4"):
        config = parse_config(fake_config(tmp_path, specialists__pragmatist__quantization=form))
        assert config.specialists["pragmatist"].quantization == form
