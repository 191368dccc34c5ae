"""The whole dev stack over tcp on 127.0.0.1 with CurveZMQ: listed keys are admitted, others refused and logged."""

from __future__ import annotations

import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.client import Client, UnauthorizedError
from shared.wire import keys, transport
from tests.gatewayproc import KEY, GatewayProcess, gateway_overrides
from tests.stackproc import StackProcesses


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(path: Path, text: str, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = path.read_text(errors="replace") if path.exists() else ""
        if text in log:
            return log
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path.name} within {timeout_s} s:\n{log[-3000:]}")


@pytest.fixture(scope="module")
def _module_curve_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcesses]:
    """The dev stack over tcp under Curve, with a gateway configured (started only by the test that needs it).

    Shared by this module's tests: each leaves it serving, which is what they check.
    """
    key_dir = tmp_path_factory.mktemp("curve") / "keys"
    keys.make_keys(key_dir)
    stack = StackProcesses(runtime__curve=True, runtime__keys_dir=str(key_dir),
                           runtime__client_endpoint=f"tcp://127.0.0.1:{_free_port()}",
                           runtime__worker_endpoint=f"tcp://127.0.0.1:{_free_port()}", **gateway_overrides())
    stack.key_dir = key_dir  # type: ignore[attr-defined]
    stack.curve = keys.identity(key_dir, "client")
    try:
        stack.start_all()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def curve_stack(_module_curve_stack: StackProcesses, request: pytest.FixtureRequest) -> Iterator[StackProcesses]:
    """The module's Curve stack; its logs are printed when the test fails."""
    yield _module_curve_stack
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(f"\n----- service logs for {request.node.name}\n{_module_curve_stack.logs()}")


def _client(stack, name: str | None = "client", timeout_s: float = 10.0) -> Client:
    curve = keys.identity(stack.key_dir, name) if name else None
    return Client(stack.endpoint, timeout_s=timeout_s, curve=curve)


def test_the_dev_stack_serves_over_tcp_with_curve_and_key_files_are_private(curve_stack) -> None:
    for path in curve_stack.key_dir.rglob("*"):
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    with _client(curve_stack) as client:
        result = client.chat("how do I fix a bike, step by step")
        assert result.answer.startswith("[voice]") and result.specialist == "pragmatist"
        deadline = time.monotonic() + 10  # the voice reports itself idle just after the answer's last event
        states = {}
        while time.monotonic() < deadline and states != {"router": "up", "specialist_host": "up", "voice": "up"}:
            states = {s.service: s.state for s in client.status().services}
            time.sleep(0.1)
        assert states == {"router": "up", "specialist_host": "up", "voice": "up"}
    for log in curve_stack.dir.glob("*.log"):  # no key, public or secret, ever reaches a log
        text = log.read_text()
        for pair in curve_stack.key_dir.glob("*.key_secret"):
            public, secret = keys.load_pair(pair)
            assert public.decode() not in text and secret.decode() not in text, log.name


def test_a_client_with_no_key_or_an_unlisted_key_is_refused_and_logged(curve_stack, tmp_path: Path) -> None:
    with _client(curve_stack, name=None) as stranger, pytest.raises(UnauthorizedError, match="refused"):
        stranger.status(timeout_s=5)
    coordinator_log = curve_stack.dir / "coordinator.log"
    _wait_for(coordinator_log, "refused a client connection")
    other = tmp_path / "other"
    keys.make_keys(other)  # a well-formed pair the coordinator does not list
    impostor = keys.identity(other, "client")
    impostor = transport.CurveKeys(impostor.public, impostor.secret, keys.load_public(curve_stack.key_dir /
                                                                                      "coordinator.key"))
    with Client(curve_stack.endpoint, timeout_s=5, curve=impostor) as client, \
            pytest.raises(UnauthorizedError, match="not in the coordinator's authorized keys"):
        client.status()
    _wait_for(coordinator_log, "is not in authorized/clients/")
    with _client(curve_stack) as client:  # the stack kept serving
        assert client.chat("meaning of life").answer.startswith("[voice]")


def _refused_voice(stack, name: str, config_text: str, worker_says: str, coordinator_says: str) -> None:
    """Start a second voice process on `config_text`; both it and the coordinator must log its refusal."""
    config = stack.dir / f"{name}.toml"
    config.write_text(config_text)
    intruder = stack.spawn("voice", config, f"{name}-voice.log")
    try:
        _wait_for(stack.dir / f"{name}-voice.log", worker_says)
        _wait_for(stack.dir / "coordinator.log", coordinator_says)
    finally:
        intruder.kill()
        intruder.wait(timeout=10)


def test_a_worker_with_a_wrong_key_is_refused_on_both_sides(curve_stack, tmp_path: Path) -> None:
    # A real worker process whose key pair the coordinator does not list (keys_dir points at other keys).
    other = tmp_path / "other"
    keys.make_keys(other)
    (other / "coordinator.key").write_text((curve_stack.key_dir / "coordinator.key").read_text())
    text = curve_stack.config_path.read_text()
    _refused_voice(curve_stack, "wrong", text.replace(str(curve_stack.key_dir), str(other)),
                   "refused this worker's connection", "is not in authorized/workers/")
    # A worker with no key at all (its config lacks `curve = true`) is refused too, and both sides say so.
    _refused_voice(curve_stack, "keyless", text.replace("curve = true", "curve = false"),
                   "one side has no Curve key", "the handshake failed: one side has no Curve key")
    with _client(curve_stack) as client:
        assert client.chat("how to cook rice").answer.startswith("[voice]")




def test_the_gateway_reaches_a_curve_coordinator_with_the_configs_client_key(curve_stack) -> None:
    gateway = GatewayProcess(curve_stack)
    try:
        url = gateway.start()
        reply = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                           json={"model": "lyra", "messages": [{"role": "user", "content": "how to fix a bike"}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"].startswith("[voice]")
    finally:
        gateway.stop()
