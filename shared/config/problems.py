"""Every problem pydantic found in a config file, in one message; a misspelt key gets the nearest known name."""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping, Sequence
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError


def describe(exc: ValidationError, source: str, root: type[BaseModel]) -> str:
    """`source: where: why` for one problem; a count and one indented line per problem for several."""
    lines = [problem_line(error, root) for error in exc.errors()]
    if len(lines) == 1:
        return f"{source}: {lines[0]}"
    return f"{source}: {len(lines)} problems:\n" + "\n".join(f"  {line}" for line in lines)


def problem_line(error: Any, root: type[BaseModel]) -> str:
    """One problem: the dotted key and what is wrong with it ("did you mean" for an unknown key)."""
    loc = [str(part) for part in error["loc"]]
    where = ".".join(loc) or "(top level)"
    if error["type"] != "extra_forbidden":
        return f"{where}: {error['msg']}"
    guess = difflib.get_close_matches(loc[-1], known_keys(root, loc[:-1]), n=1, cutoff=0.6)
    hint = f"; did you mean {'.'.join([*loc[:-1], guess[0]])}?" if guess else ""
    return f"{where}: unknown setting{hint}"


def known_keys(root: type[BaseModel], path: list[str]) -> list[str]:
    """The keys the table at `path` (below `root`) accepts; [] where the path cannot be followed."""
    node: Any = root
    for part in path:
        node = _inside(node, part)
        if node is None:
            return []
    return list(node.model_fields) if _is_model(node) else []


def _inside(node: Any, part: str) -> Any:
    """The type of `node`'s entry `part`: a model's field, a mapping's value, a sequence's item."""
    if _is_model(node):
        field = node.model_fields.get(part)
        return field.annotation if field is not None else None
    origin, args = get_origin(node), get_args(node)
    if origin in (Union, types.UnionType):  # Optional[X] and the like: the first model among the members
        return next((_inside(arg, part) for arg in args if _is_model(arg) or get_origin(arg)), None)
    if isinstance(origin, type) and issubclass(origin, Mapping) and len(args) == 2:
        return args[1]
    if isinstance(origin, type) and issubclass(origin, Sequence) and args:
        return args[0]
    return None


def _is_model(node: Any) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)
