"""configs/ and supervisord.conf are found from a clone and from an installed wheel alike."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from shared.config import paths

ROOT = Path(__file__).resolve().parents[2]


def test_a_clone_finds_its_own_files():
    assert paths.project_file("supervisord.conf") == ROOT / "supervisord.conf"
    assert paths.default_config() == ROOT / "configs" / "default.toml"


def test_an_installed_package_finds_the_files_in_its_data_directory(tmp_path, monkeypatch):
    data = tmp_path / paths.DATA_DIR
    (data / "configs").mkdir(parents=True)
    (data / "configs" / "default.toml").write_text("# installed\n")
    monkeypatch.setattr(paths, "SOURCE_TREE", tmp_path / "site-packages")  # no configs/ beside the package
    monkeypatch.setattr(paths.sys, "prefix", str(tmp_path))
    assert paths.default_config() == data / "configs" / "default.toml"
    with pytest.raises(paths.ProjectFileMissing, match=r"supervisord\.conf is not in"):
        paths.project_file("supervisord.conf")


def test_the_wheel_carries_every_config_and_supervisord_conf(tmp_path):
    source = tmp_path / "source"  # a copy: building leaves build/ and *.egg-info beside the sources
    for name in ("shared", "services", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "supervisord.conf"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    data = [n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n]
    shipped = [ROOT / "supervisord.conf", *ROOT.glob("configs/*.toml"), *ROOT.glob("configs/routing/*")]
    expected = {f"{paths.DATA_DIR}/{p.relative_to(ROOT)}" for p in shipped}
    assert expected <= set(data)
    assert any(n.startswith("shared/wire/") for n in names)
    assert any(n.startswith("services/coordinator/") for n in names)


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.toml")))
def test_every_shipped_config_serves_the_http_api_on_loopback_without_a_key(config: str) -> None:
    from shared.config.schema import load_config

    gateway = load_config(ROOT / "configs" / config).gateway
    assert (gateway.enabled, gateway.host, gateway.api_key_env) == (True, "127.0.0.1", "")
