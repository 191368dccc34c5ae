"""`lyra up` and the HTTP API: its URL printed, a busy port or an unset key said first, before any model loads;
an earlier stack's logs set aside."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.test_supervisord import left_behind, lyra
from tests.stackproc import fake_config, to_toml

pytestmark = pytest.mark.stack


def write_config(tmp_path: Path, **gateway: object) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    config = tmp_path / "dev.toml"
    config.write_text(to_toml({**fake_config(run_dir), "gateway": {"enabled": True, "port": 0, **gateway}}))
    return config, run_dir


def nothing_started(run_dir: Path) -> bool:
    return not (run_dir / "supervisord.pid").exists() and not list((run_dir / "logs").glob("*.log"))


def test_a_busy_gateway_port_fails_lyra_up_at_once_naming_its_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import socket, time; s = socket.socket(); "
                               "s.bind(('127.0.0.1', 0)); s.listen(); print(s.getsockname()[1], flush=True); "
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(holder.stdout.readline())
        config, run_dir = write_config(tmp_path, port=port)
        up = lyra("up", "-c", str(config), "--timeout", "60", timeout=60)
        assert up.returncode == 2 and up.stdout == "", up.stdout + up.stderr
        assert f"127.0.0.1:{port} is in use by pid {holder.pid} ({sys.executable} -c import socket" in up.stderr, \
            up.stderr
        assert nothing_started(run_dir)
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_an_unset_gateway_key_variable_is_the_first_thing_lyra_up_says(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("LYRA_TEST_UNSET_GATEWAY_KEY", raising=False)
    config, run_dir = write_config(tmp_path, api_key_env="LYRA_TEST_UNSET_GATEWAY_KEY")
    up = lyra("up", "-c", str(config), "--timeout", "60", timeout=60)
    assert up.returncode == 2 and up.stdout == "", up.stdout + up.stderr
    assert up.stderr.startswith(f"lyra: {config}: gateway.api_key_env names $LYRA_TEST_UNSET_GATEWAY_KEY, "
                                "which is unset or empty"), up.stderr
    assert nothing_started(run_dir)


def test_lyra_up_prints_the_api_url_and_sets_an_earlier_stacks_logs_aside(tmp_path: Path) -> None:
    config, run_dir = write_config(tmp_path)
    try:
        for run in range(2):
            if run:
                assert lyra("down").returncode == 0
            up = lyra("up", "-c", str(config), "--timeout", "60")
            assert up.returncode == 0, up.stdout + up.stderr
            url = re.search(r"OpenAI-compatible API: (http://127\.0\.0\.1:\d+/v1)\n", up.stdout).group(1)
            assert httpx.get(url.removesuffix("/v1") + "/health", timeout=5).status_code == 200
            assert f"OpenAI-compatible API: {url}" in lyra("status").stdout
        current, previous = lyra("logs", "router", "-n", "1000"), lyra("logs", "router", "--previous", "-n", "1000")
        assert current.stdout.count("starting router") == 1, current.stdout  # this stack's lines only
        assert previous.stdout.count("starting router") == 1, previous.stdout
    finally:
        lyra("down", "--run-dir", str(run_dir))
    assert left_behind(run_dir) == []
