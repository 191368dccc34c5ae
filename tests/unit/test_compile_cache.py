"""Workers keep torch.compile's cache in the user's cache directory, so a reboot does not cost a recompile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.runtime.process import persistent_compile_cache


def test_the_cache_goes_under_the_users_cache_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # recorded, so the value set below is undone after the test
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    persistent_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "lyra" / "torchinductor")


def test_a_cache_directory_the_user_set_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    persistent_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_a_home_that_cannot_hold_the_cache_leaves_torchs_default(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    persistent_compile_cache()
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
