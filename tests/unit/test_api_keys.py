"""API keys come from the environment variable a setting names, read in one place for the gateway and the doctor."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.gateway.state import GatewayConfigError, api_key
from shared.cli.doctor import model_checks
from shared.config.schema import GatewaySettings, parse_config
from shared.config.secrets import MissingApiKey, api_key_from_env
from tests.stackproc import fake_config

REMOTE_VOICE = {"backend": "openai", "system_prompt": "x",
                "remote": {"base_url": "http://10.0.0.7:8000/v1", "model": "m", "api_key_env": "LYRA_TEST_KEY"}}


def test_a_key_is_read_from_the_variable_the_setting_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LYRA_TEST_KEY", "k-123")
    assert api_key_from_env("LYRA_TEST_KEY", "remote.api_key_env") == "k-123"
    assert api_key_from_env("", "remote.api_key_env") is None  # no variable named: no key, not an error


@pytest.mark.parametrize("value", [None, ""])
def test_an_unset_or_empty_variable_is_refused_naming_the_setting_and_the_variable(
        value: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if value is None:
        monkeypatch.delenv("LYRA_TEST_KEY", raising=False)
    else:
        monkeypatch.setenv("LYRA_TEST_KEY", value)
    with pytest.raises(MissingApiKey, match=r"gateway\.api_key_env names \$LYRA_TEST_KEY, which is unset or empty"):
        api_key_from_env("LYRA_TEST_KEY", "gateway.api_key_env")


def test_the_gateway_and_the_doctor_word_a_missing_key_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LYRA_TEST_KEY", raising=False)
    with pytest.raises(GatewayConfigError) as refused:
        api_key(GatewaySettings(api_key_env="LYRA_TEST_KEY"), "x.toml")
    config = parse_config(fake_config(tmp_path, voice=REMOTE_VOICE, services__voice__gpus=[]))
    check = next(c for c in model_checks(config, has_cuda=False) if c.name == "model voice")
    assert "names $LYRA_TEST_KEY, which is unset or empty" in str(refused.value)
    assert check.status == "fail" and "remote.api_key_env names $LYRA_TEST_KEY, which is unset or empty" in check.detail
