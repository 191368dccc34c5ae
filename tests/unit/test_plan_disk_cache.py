"""Planning keeps what meta-device models taught it on disk, and gives the same plan from the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.config.schema import load_config
from shared.planning import disk_cache
from shared.planning.architectures import get_architecture
from shared.planning.inventory import _count_architecture, inventory_from_architecture
from shared.planning.plan import make_plan, render_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "lyra" / "plan"


def test_a_second_call_reads_the_disk_and_another_key_computes(cache_home: Path) -> None:
    calls = []
    compute = lambda: calls.append(1) or {"model.layers.0": 0}  # noqa: E731
    assert disk_cache.cached("layout|a", compute) == {"model.layers.0": 0}
    assert disk_cache.cached("layout|a", compute) == {"model.layers.0": 0}
    assert len(calls) == 1 and len(list(cache_home.glob("*.json"))) == 1
    disk_cache.cached("layout|b", compute)
    assert len(calls) == 2


def test_a_damaged_entry_is_computed_again(cache_home: Path) -> None:
    disk_cache.cached("k", lambda: [1, 2])
    (entry,) = cache_home.glob("*.json")
    entry.write_text("{not json")
    assert disk_cache.cached("k", lambda: [3]) == [3]
    assert json.loads(entry.read_text()) == [3]


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    calls = []
    for _ in range(2):
        assert disk_cache.cached("k", lambda: calls.append(1) or 7) == 7
    assert len(calls) == 2


def test_an_inventory_survives_the_round_trip(cache_home: Path) -> None:
    counted = _count_architecture(get_architecture("llama-3-8b"))
    assert disk_cache.decode_inventory(json.loads(json.dumps(disk_cache.encode_inventory(counted)))) == counted
    inventory_from_architecture.cache_clear()
    assert inventory_from_architecture("llama-3-8b") == counted  # computed, then written
    inventory_from_architecture.cache_clear()
    assert inventory_from_architecture("llama-3-8b") == counted  # read back
    assert list(cache_home.glob("*.json"))


def test_the_shipped_two_gpu_plan_is_the_same_from_the_cache(cache_home: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.planning import inventory, layout, plan

    def forget() -> None:  # this process's own caches (earlier tests filled them before the cache home moved)
        inventory_from_architecture.cache_clear()
        layout.forget_memoised()
        plan.forget_memoised()

    config = load_config(ROOT / "configs" / "a6000x2.toml")
    forget()
    first = render_table(make_plan(config))
    forget()

    def no_model(*_args: object) -> None:
        raise AssertionError("a meta-device model was built: the disk cache was not used")

    monkeypatch.setattr(layout, "_meta_model", no_model)
    monkeypatch.setattr(inventory, "build_on_meta", no_model)
    assert render_table(make_plan(config)) == first
