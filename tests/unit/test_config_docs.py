"""docs/configuration.md is generated from the config schema, and every setting says what it does."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "config_docs.py"


def config_docs():
    """scripts/config_docs.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("config_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["config_docs"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_the_configuration_page_is_what_the_schema_generates():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]


def test_every_setting_has_a_description():
    assert config_docs().missing_descriptions() == [], (
        "give each setting a Field(description=...) or a comment in shared/config/schema.py, "
        "or a sentence in scripts/config_docs.py's DESCRIPTIONS")


def test_the_scripts_own_tables_name_only_settings_that_exist():
    assert config_docs().stale_entries() == []


def test_a_setting_without_a_comment_or_description_is_reported(monkeypatch):
    docs = config_docs()
    monkeypatch.delitem(docs.DESCRIPTIONS, "Deadlines.route")
    assert docs.missing_descriptions() == ["Deadlines.route"]


def test_a_comment_above_a_field_and_one_on_its_line_are_both_read():
    source = (
        "class Example:\n"
        "    # Why the setting exists,\n"
        "    # over two lines.\n"
        "    first: int = 1  # and a detail\n"
        "\n"
        "    second: str = ''\n"
    )
    comments = config_docs().field_comments(source)
    assert comments == {"Example.first": "Why the setting exists, over two lines. and a detail"}
