"""The packages' dependencies point one way, as pyproject.toml's import contracts say (import-linter)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = ("shared", "services", "tests", "bench")


def test_every_import_contract_is_kept():
    command = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    result = subprocess.run([sys.executable, "-c", command, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "KEPT" in result.stdout


def private_names_imported_across_modules() -> list[str]:
    """`from a.b import _name` anywhere in shared/ or services/: a private name crossing a module."""
    found = []
    for path in sorted([*ROOT.glob("shared/**/*.py"), *ROOT.glob("services/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("shared", "services"):
                found += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def our_modules_named_in(tree: ast.Module) -> dict[str, str]:
    """Local name -> module, for each module of ours a file imports (`from shared.kernels import gemv`)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
            for alias in node.names:
                path = ROOT / f"{node.module}.{alias.name}".replace(".", "/")
                if path.with_suffix(".py").exists() or (path / "__init__.py").exists():
                    names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            names.update({a.asname: a.name for a in node.names if a.asname and a.name.split(".")[0] in OURS})
    return names


def private_attributes_used_across_modules() -> list[str]:
    """`module._name` in shared/, services/, bench/ or tests/ where `module` is another module of ours."""
    found = []
    files = [*ROOT.glob("shared/**/*.py"), *ROOT.glob("services/**/*.py"), *ROOT.glob("bench/*.py"),
             *ROOT.glob("tests/**/*.py")]
    for path in sorted(files):
        tree = ast.parse(path.read_text(), str(path))
        modules = our_modules_named_in(tree)
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: {modules[node.value.id]}.{node.attr}"
                  for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in modules and node.attr.startswith("_") and not node.attr.startswith("__")]
    return found


def test_no_private_name_crosses_a_module():
    assert private_names_imported_across_modules() == []
    assert private_attributes_used_across_modules() == []
