"""Byte units, one owner: GB is 10^9 bytes and MB 10^6 bytes everywhere.

Every `*_gb` and `*_mb` setting, budget, estimate and report is decimal, the unit accelerate writes as "47GB"
in max_memory and card vendors print on the box. Binary units appear only where a string names them
(`parse_size("44GiB")`) or where a library allocates in powers of two (cuBLAS workspaces, all-reduce buffers).
"""

from __future__ import annotations

import re

KB = 10**3
MB = 10**6
GB = 10**9
TB = 10**12
KiB = 2**10
MiB = 2**20
GiB = 2**30
TiB = 2**40

_SIZE = re.compile(r"^\s*([\d.]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNIT = {"B": 1, "KB": KB, "MB": MB, "GB": GB, "TB": TB, "KIB": KiB, "MIB": MiB, "GIB": GiB, "TIB": TiB}


def parse_size(value: str | int | float) -> int:
    """Bytes from an accelerate-style size: 47GB (10^9), 47GiB (2^30), 4700MB, or a plain number."""
    if isinstance(value, int | float):
        return int(value)
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"cannot read memory size {value!r} (expected e.g. '47GB' or '44GiB')")
    return int(float(match.group(1)) * _UNIT[(match.group(2) or "B").upper()])


def format_gb(size: float, places: int = 1) -> str:
    """A byte count as a person reads it: `format_gb(12_345_000_000)` -> "12.3 GB"."""
    return f"{size / GB:.{places}f} GB"
