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


def lyra_cache() -> Path:
    """Lyra Runtime's folder in the user's cache directory ($XDG_CACHE_HOME/lyra, else ~/.cache/lyra)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "lyra"


def default_config() -> Path:
    """The embedded default's config, what `lyra demo`, `doctor` and `route` use without `-c`."""
    return project_file("configs/default.toml")
