"""The stack secret file: private, fresh per stack, refused when others can read it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shared.wire.stack_secret import SecretError, create_secret, ensure_secret, matches, read_secret


def test_secret_is_0600_fresh_each_time_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "run" / "stack.secret"
    old = os.umask(0)  # even a permissive umask must not widen it
    try:
        first = create_secret(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(first) >= 40
    assert read_secret(path) == first and ensure_secret(path) == first
    second = create_secret(path)
    assert second != first and read_secret(path) == second
    assert matches(second, second) and not matches(second, first) and not matches(second, None)


def test_missing_or_exposed_secret_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "stack.secret"
    with pytest.raises(SecretError, match="lyra up"):
        read_secret(path)
    created = ensure_secret(path)
    assert read_secret(path) == created
    path.chmod(0o644)
    with pytest.raises(SecretError, match="readable by others"):
        ensure_secret(path)
