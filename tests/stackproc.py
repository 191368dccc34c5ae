"""Test harness: the real coordinator and workers as subprocesses, from a config written per test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.client import Client, LyraError
from shared.wire.names import SERVICES
from shared.wire.stack_secret import create_secret
from shared.wire.transport import CurveKeys

ROOT = Path(__file__).resolve().parent.parent


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A minimal TOML writer for test configs (tables, arrays of tables, scalars, inline tables)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f'"{k}" = {value(x)}' for k, x in v.items()) + " }"
        raise TypeError(type(v))

    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and not
               (isinstance(v, list) and v and isinstance(v[0], dict))}
    out = [f"[{prefix}]"] if prefix and scalars else []
    out += [f'"{k}" = {value(v)}' if "." in k or "-" in k else f"{k} = {value(v)}" for k, v in scalars.items()]
    for k, v in data.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.append(to_toml(v, name))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                out.append(f"[[{name}]]")
                out += [f"{ik} = {value(iv)}" for ik, iv in item.items()]
    return "\n".join(out) + "\n"


def fake_config(run_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A dev-style config with fake workers, short heartbeats and deadlines, triggers on."""
    fake = {"triggers": True, "token_delay_s": 0.0}
    config: dict[str, Any] = {
        "runtime": {"run_dir": str(run_dir), "queue_size": 64, "heartbeat_interval_s": 0.2,
                    "heartbeat_timeout_s": 1.5, "cancel_grace_s": 2.0, "drain_s": 2.0},
        "deadlines": {"route": 5.0, "load": 5.0, "specialist": 5.0, "voice": 5.0},
        "gpus": [{"index": 0, "budget_gb": 47.0}, {"index": 1, "budget_gb": 47.0}],
        "services": {"router": {"gpus": [0]}, "specialist_host": {"gpus": [1]}, "voice": {"gpus": [0, 1]}},
        "router": {"backend": "fake", "memory_gb": 8.0, "fake": dict(fake)},
        "specialists": {
            "pragmatist": {"backend": "fake", "memory_gb": 20.0, "description": "practical tasks math code how-to",
                           "fake": dict(fake)},
            "philosopher": {"backend": "fake", "memory_gb": 25.0, "description": "meaning ethics consciousness life",
                            "fake": dict(fake)},
        },
        "voice": {"backend": "fake", "memory_gb": 30.0, "system_prompt": "You are Lyra.", "fake": dict(fake)},
    }
    for dotted, val in overrides.items():
        node = config
        *path, last = dotted.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = val
    return config


def slow_router(delay_s: float) -> dict[str, Any]:
    """Overrides for a fake router that takes `delay_s` to classify a turn, with label calibration off.

    The fake's label prior is uniform (content-free turns share no word with any label), so calibrating
    changes no score; but the router computes that prior on its first turn, with three more classify calls
    that each take `delay_s`.
    """
    return {"router__fake": {"delay_s": delay_s, "triggers": True}, "routing__calibrate": False}


class StackProcesses:
    """Starts, kills and restarts the stack's processes; dumps their logs when asked."""

    def __init__(self, **overrides: Any) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lyra-t-"))
        self.run_dir = self.dir / "run"
        self.config_path = self.dir / "config.toml"
        config = fake_config(self.run_dir, **overrides)
        self.config_path.write_text(to_toml(config))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.endpoint = config["runtime"].get("client_endpoint") or f"ipc://{self.run_dir / 'client.sock'}"
        self.worker_endpoint = f"ipc://{self.run_dir / 'workers.sock'}"
        self.secret = create_secret(self.run_dir / "stack.secret")  # as `lyra up` does
        self.curve: CurveKeys | None = None  # the client's keys when the stack runs under Curve

    def start(self, service: str) -> None:
        self.procs[service] = self.spawn(service, self.config_path, f"{service}.log")

    def spawn(self, service: str, config_path: Path, log_name: str) -> subprocess.Popen[bytes]:
        """One service process on `config_path`, logging to `log_name` in the stack's directory."""
        log = (self.dir / log_name).open("ab")
        env = {**os.environ, "LYRA_CONFIG": str(config_path), "PYTHONUNBUFFERED": "1"}
        env.pop("CUDA_VISIBLE_DEVICES", None)
        return subprocess.Popen([sys.executable, "-m", f"services.{service}"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)

    def start_all(self, timeout_s: float = 30.0) -> None:
        for service in SERVICES:
            self.start(service)
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 30.0, services: tuple[str, ...] = SERVICES[1:]) -> None:
        deadline = time.monotonic() + timeout_s
        with self.client(timeout_s=2) as client:
            while time.monotonic() < deadline:
                try:
                    status = client.status(timeout_s=1)
                    if all(s.state in ("up", "busy") and s.pid == self.procs[s.service].pid
                           for s in status.services if s.service in services and s.service in self.procs):
                        return
                except LyraError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"stack not ready within {timeout_s}s\n{self.logs()}")

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """True once every process runs, every worker is up and nothing is queued or running; False at the timeout."""
        if any(proc.poll() is not None for proc in self.procs.values()):
            return False
        deadline = time.monotonic() + timeout_s
        with self.client(timeout_s=2) as client:
            while time.monotonic() < deadline:
                try:
                    status = client.status(timeout_s=1)
                    if status.running is None and status.queue_depth == 0 and all(
                            s.state == "up" and s.pid == self.procs[s.service].pid for s in status.services):
                        return True
                except LyraError:
                    pass
                time.sleep(0.05)
        return False

    def kill(self, service: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[service]
        proc.send_signal(sig)
        proc.wait(timeout=10)

    def client(self, timeout_s: float = 20.0) -> Client:
        return Client(self.endpoint, timeout_s=timeout_s, secret=self.secret, curve=self.curve)

    def logs(self) -> str:
        files = sorted(self.dir.glob("*.log"))
        return "\n".join(f"===== {p.name}\n{p.read_text(errors='replace')[-6000:]}" for p in files)

    def stop(self, grace_s: float = 1.0) -> None:
        """SIGTERM every process, SIGKILL what is still running `grace_s` later, remove the directory.

        An idle stack exits in about 0.3 s. A worker still inside a call drains for up to drain_s (tests that
        leave one there mean to), which teardown has no reason to wait out; the drain has tests of its own.
        """
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


class StackPool:
    """Running stacks kept for tests that leave a stack as they found it, one per config, the last `keep` used.

    A stack is handed out again only when every process still runs and it is idle; otherwise it is replaced.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.stacks: dict[str, StackProcesses] = {}  # config (without its run directory) -> stack, oldest first

    def get(self, **overrides: Any) -> StackProcesses:
        key = to_toml(fake_config(Path("run"), **overrides))
        stack = self.stacks.pop(key, None)
        if stack is not None and not stack.wait_idle():
            stack.stop()
            stack = None
        if stack is None:
            stack = StackProcesses(**overrides)
            try:
                stack.start_all()
            except BaseException:
                stack.stop()
                raise
        self.stacks[key] = stack
        while len(self.stacks) > self.keep:
            self.stacks.pop(next(iter(self.stacks))).stop()
        return stack

    def discard(self, stack: StackProcesses) -> None:
        """Stop `stack` and never hand it out again (a test using it failed: its state is unknown)."""
        for key, kept in list(self.stacks.items()):
            if kept is stack:
                del self.stacks[key]
        stack.stop()

    def close(self) -> None:
        for stack in self.stacks.values():
            stack.stop()
        self.stacks.clear()
