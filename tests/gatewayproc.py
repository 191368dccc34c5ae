"""Test harness: the gateway as a real subprocess beside a StackProcesses stack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx

from tests.stackproc import ROOT, StackProcesses

KEY_ENV = "LYRA_TEST_GATEWAY_KEY"
KEY = "test-key-0123456789"


def gateway_overrides(**extra: object) -> dict[str, object]:
    """StackProcesses overrides for a gateway on a free loopback port with a key."""
    return {"gateway": {"enabled": True, "port": 0, "api_key_env": KEY_ENV, "keepalive_s": 0.2, **extra}}


class GatewayProcess:
    """`python -m services.gateway` for a stack's config; `url` once it answers /health."""

    def __init__(self, stack: StackProcesses) -> None:
        self.stack = stack
        self.record = stack.run_dir / "gateway.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float = 15.0) -> str:
        self.record.unlink(missing_ok=True)
        log = (self.stack.dir / "gateway.log").open("ab")
        env = {**os.environ, KEY_ENV: KEY, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "services.gateway", "-c", str(self.stack.config_path)],
                                     cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.proc.returncode}\n{self.stack.logs()}")
            try:
                url = json.loads(self.record.read_text())["url"]
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    self.url = url
                    return url
            except (OSError, ValueError, KeyError, httpx.HTTPError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"the gateway did not answer within {timeout_s} s\n{self.stack.logs()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
