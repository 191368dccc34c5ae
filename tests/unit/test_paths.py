"""Where Lyra Runtime keeps files: one owner (shared.config.paths) of every directory default and its XDG lookup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.config import paths
from shared.config.schema import parse_config
from shared.rundir import stack_record

XDG = ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh home directory and no XDG variables set."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for variable in XDG:
        monkeypatch.delenv(variable, raising=False)
    return tmp_path


def test_without_xdg_variables_every_folder_sits_in_its_usual_place_under_home(home: Path) -> None:
    assert paths.lyra_cache() == home / ".cache" / "lyra"
    assert paths.state_dir() == home / ".local" / "state" / "lyra"
    assert paths.default_keys_dir() == home / ".config" / "lyra" / "keys"
    assert paths.default_run_dir() == Path(f"/tmp/lyra-{os.getuid()}")


def test_xdg_variables_move_every_folder(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in XDG:
        monkeypatch.setenv(variable, str(home / variable.lower()))
    assert paths.lyra_cache() == home / "xdg_cache_home" / "lyra"
    assert paths.state_dir() == home / "xdg_state_home" / "lyra"
    assert paths.default_keys_dir() == home / "xdg_config_home" / "lyra" / "keys"
    assert paths.default_run_dir() == home / "xdg_runtime_dir" / "lyra"


def test_the_config_and_the_stack_record_take_their_defaults_from_paths(home: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(home / "run"))
    config = parse_config({"router": {"backend": "fake"}, "specialists": {"a": {"backend": "fake"}},
                           "voice": {"backend": "fake"}})
    assert config.run_dir() == paths.default_run_dir() == home / "run" / "lyra"
    assert config.keys_dir() == paths.default_keys_dir()
    assert stack_record.pointer_file() == paths.state_dir() / "stack.json"
