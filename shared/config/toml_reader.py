"""TOML text to Python on every Python Lyra Runtime supports: the standard library's tomllib from 3.11, and on
3.10 the same parser from PyPI (tomli, a dependency there only)."""

from __future__ import annotations

import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError


def parse_toml(text: str) -> dict[str, Any]:
    """The document in `text`; raises TOMLDecodeError, with the line and column, when it is not TOML."""
    return tomllib.loads(text)
