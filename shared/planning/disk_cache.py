"""What planning learns from meta-device models, kept on disk, so it does not import every model's code again.

Counting a known architecture's parameters, sizing each of its tensors as the loader quantizes it, and
letting accelerate place its layers all build the model on the meta device, which imports torch and
transformers' model modules: about 7 s for the shipped two-GPU configs, paid by `lyra up`, `lyra plan`
and every worker that caps its GPU memory. The results depend only on the model's spec (an architecture
or a config.json), the installed transformers and accelerate, and Lyra's planning code, so they are kept
in ~/.cache/lyra/plan under a key made of all of them; any change is a miss and a fresh count. A cache
that cannot be read or written is skipped.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

FORMAT = 2  # bump when the stored fields change
# The planning code the key includes (relative to the `shared` package): a change to any is a miss.
_CODE = ("inventory.py", "architectures.py", "disk_cache.py", "layout.py", "device_split.py")
_PACKAGES = ("transformers", "accelerate")


def cached(key: str, compute: Callable[[], Any], encode: Callable[[Any], Any] = lambda value: value,
           decode: Callable[[Any], Any] = lambda value: value, folder: str = "plan") -> Any:
    """compute(), from the disk cache when `key` was computed before; `encode`/`decode` turn it into JSON and back.

    `folder`: the cache's subfolder (~/.cache/lyra/<folder>).
    """
    path = _path(key, folder)
    if path is not None:
        try:
            return decode(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            pass
    found = compute()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            scratch.write_text(json.dumps(encode(found)))
            os.replace(scratch, path)  # whole or not at all, whoever writes it
        except (OSError, TypeError, ValueError):
            pass
    return found


def encode_inventory(inventory: Any) -> dict[str, Any]:
    """A ParameterInventory as JSON-ready fields."""
    return asdict(inventory)


def file_text(path: str) -> str:
    """A file's text for a key ("" when it cannot be read)."""
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _path(key: str, folder: str = "plan") -> Path | None:
    from shared.config.paths import lyra_cache

    salt = _salt()
    if salt is None:
        return None
    digest = hashlib.sha256(salt + key.encode()).hexdigest()[:32]
    return lyra_cache() / folder / f"{digest}.json"


@lru_cache(maxsize=1)
def _salt() -> bytes | None:
    """The part of every key that is this installation: the format, the packages' versions, the code (read once)."""
    try:
        versions = "|".join(importlib.metadata.version(name) for name in _PACKAGES)
        planning = Path(__file__).resolve().parent
        code = b"".join((planning / name).read_bytes() for name in _CODE)
    except (importlib.metadata.PackageNotFoundError, OSError):
        return None
    return hashlib.sha256(f"{FORMAT}|{versions}|".encode() + code).digest()


def decode_inventory(data: dict[str, Any]) -> Any:
    """The ParameterInventory that encode_inventory wrote."""
    from shared.planning.inventory import ModelShape, ParameterInventory

    shape = data.pop("shape")
    if shape is not None:
        shape = ModelShape(**{name: _tuples(value) for name, value in shape.items()})
    components = tuple(tuple(row) for row in data.pop("components"))
    return ParameterInventory(**data, shape=shape, components=components)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(item) for item in value) if isinstance(value, list) else value
