"""Where Lyra Runtime keeps files on this machine: the one owner of its directory defaults."""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

SOURCE_TREE = Path(__file__).resolve().parents[2]  # a clone (or an editable install): configs/ sits beside shared/
DATA_DIR = "share/lyra-runtime"  # where a wheel puts configs/ and supervisord.conf (pyproject's data-files)


class ProjectFileMissing(FileNotFoundError):
    """A file that ships with Lyra Runtime (a config, supervisord.conf) is in none of the places it installs to."""


def project_file(relative: str) -> Path:
    """A file shipped with Lyra Runtime: from the source tree of a clone, else from an installed wheel's data."""
    places = [SOURCE_TREE, Path(sysconfig.get_path("data")) / DATA_DIR, Path(sys.prefix) / DATA_DIR]
    for place in places:
        if (place / relative).exists():
            return place / relative
    raise ProjectFileMissing(f"{relative} is not in {' nor '.join(str(p) for p in places)}: reinstall lyra-runtime")


def _xdg_home(variable: str, fallback: str) -> Path:
    """An XDG base directory: $variable when set and not empty, else `fallback` under the home directory."""
    return Path(os.environ.get(variable) or os.path.expanduser(fallback))


def lyra_cache() -> Path:
    """Lyra Runtime's folder in the user's cache directory ($XDG_CACHE_HOME/lyra, else ~/.cache/lyra)."""
    return _xdg_home("XDG_CACHE_HOME", "~/.cache") / "lyra"


def state_dir() -> Path:
    """Lyra Runtime's folder in the user's state directory ($XDG_STATE_HOME/lyra, else ~/.local/state/lyra):
    the pointer to the stack `lyra up` started last."""
    return _xdg_home("XDG_STATE_HOME", "~/.local/state") / "lyra"


def default_keys_dir() -> Path:
    """$XDG_CONFIG_HOME/lyra/keys (~/.config/lyra/keys): where Curve keys live unless runtime.keys_dir says."""
    return _xdg_home("XDG_CONFIG_HOME", "~/.config") / "lyra" / "keys"


def default_run_dir() -> Path:
    """The run directory of a config that sets none: $XDG_RUNTIME_DIR/lyra, else /tmp/lyra-<uid>."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "lyra" if base else Path(f"/tmp/lyra-{os.getuid()}")


def default_config() -> Path:
    """The embedded default's config, what `lyra demo`, `doctor` and `route` use without `-c`."""
    return project_file("configs/default.toml")
