"""The tensor-parallel voice under supervisord (CPU, two gloo ranks, tiny Llama), as an operator sees it.

`lyra up` with `parallel = "tensor"`, `ranks = 2`: the coordinator sees one `voice`, `lyra status` lists
both ranks, the answer is the one a single process gives, `supervisorctl restart voice` replaces both
ranks, and a rank SIGKILLed in the middle of a request ends it with `worker_dead` and the stack serves on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.voice.handlers import compose_voice_prompt
from shared.client import Client, LyraError
from shared.models import hf_causal
from shared.wire.messages import (
    ChatTurn,
    DoneEvent,
    GenerationOptions,
    StageStartedEvent,
    SynthesizeRequest,
    TokenEvent,
)
from tests.integration.test_supervisord import LYRA, ROOT, supervisorctl
from tests.models import tiny
from tests.stackproc import fake_config, to_toml

pytestmark = [pytest.mark.models, pytest.mark.stack]

QUESTION = "How do I fix a flat tyre?"
PERSONA = "You are Lyra."


ENDPOINT: dict[str, str] = {}  # this stack's client endpoint and run directory (the stack `lyra` commands mean)


def lyra(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"LYRA_RUN_DIR": ENDPOINT["run_dir"]} if ENDPOINT else {})}
    return subprocess.run([*LYRA, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def status() -> dict:
    """The coordinator's status (through the Python client: a `lyra` process per poll is slow on 2 cores)."""
    with Client(ENDPOINT["url"], timeout_s=10) as client:
        return client.status(timeout_s=5).model_dump()


def voice_of(shown: dict) -> dict:
    return next(s for s in shown["services"] if s["service"] == "voice")


def rank_pids(shown: dict) -> list[int]:
    placement = voice_of(shown)["placement"]
    return [int(placement[f"rank{rank}"].split(" pid ")[1]) for rank in range(2)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():  # type: ignore[operator]
                return
        except (AssertionError, LyraError, KeyError, ValueError, StopIteration):
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{lyra('logs', 'voice', '-n', '60').stdout}")


def chat(endpoint: str, secret_file: Path) -> tuple[str, str]:
    """(specialist's text, voice's answer) of one forced turn."""
    with Client(endpoint, timeout_s=90, secret=secret_file.read_text().strip()) as client:
        events = list(client.stream(QUESTION, specialist="pragmatist"))
    done = events[-1]
    assert isinstance(done, DoneEvent)
    notes = "".join(e.text for e in events if isinstance(e, TokenEvent) and e.stage == "specialist")
    return notes, done.answer


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("voice-tp")
    checkpoint = tiny.build_checkpoint("llama", root / "llama", seed=5)
    config = fake_config(root / "run", gpus=[], services={}, runtime__stage_retries=0,
                         runtime__heartbeat_interval_s=0.5, runtime__heartbeat_timeout_s=20.0,
                         deadlines={"route": 30.0, "load": 30.0, "specialist": 30.0, "voice": 60.0})
    voice = {"backend": "transformers", "path": str(checkpoint), "max_context": 256, "system_prompt": PERSONA,
             "parallel": "tensor", "ranks": 2, "generation": {"max_new_tokens": 12, "temperature": 0.0}}
    config["voice"] = voice
    path = root / "config.toml"
    path.write_text(to_toml(config))
    ENDPOINT["url"] = f"ipc://{root / 'run' / 'client.sock'}"
    ENDPOINT["run_dir"] = str(root / "run")
    try:
        up = lyra("up", "-c", str(path), "--timeout", "150", timeout=180)
        assert up.returncode == 0, up.stdout + up.stderr + lyra("logs", "voice", "-n", "80").stdout
        yield {"checkpoint": checkpoint, "endpoint": ENDPOINT["url"],
               "secret": root / "run" / "stack.secret"}
    finally:
        lyra("down")


def single_process_answer(checkpoint: Path, notes: str) -> str:
    model = hf_causal.load(tiny.entry("voice", checkpoint, max_context=256), tiny.cpu_context())
    request = SynthesizeRequest(messages=[ChatTurn(role="user", content=QUESTION)], specialist="pragmatist",
                                specialist_output=notes)
    options = GenerationOptions(max_new_tokens=12)
    return "".join(model.generate(compose_voice_prompt(PERSONA, request), options, threading.Event()))


def test_one_voice_worker_with_both_ranks_answers_as_one_process(stack: dict) -> None:
    shown = lyra("status", "--json")
    assert shown.returncode == 0, shown.stderr
    shown = json.loads(shown.stdout)
    assert [s["service"] for s in shown["services"]].count("voice") == 1
    placement = voice_of(shown)["placement"]
    assert placement["parallel"] == "tensor x2" and placement["engine"].startswith("dynamic, tensor x2")
    assert placement["all_reduce"] == "gloo"  # the CPU ranks sum over the process group
    assert all(alive(pid) for pid in rank_pids(shown))
    notes, answer = chat(stack["endpoint"], stack["secret"])
    expected = single_process_answer(stack["checkpoint"], notes)
    assert expected and answer == expected


def test_restart_voice_replaces_every_rank(stack: dict) -> None:
    before = rank_pids(status())
    restarted = supervisorctl(Path(ENDPOINT["run_dir"]), "restart", "voice")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    wait_for(lambda: voice_of(status())["state"] == "up" and rank_pids(status())[0] != before[0], 120,
             "the voice to come back")
    after = rank_pids(status())
    assert not any(alive(pid) for pid in before)
    assert set(after).isdisjoint(before) and all(alive(pid) for pid in after)
    assert chat(stack["endpoint"], stack["secret"])[1]


def test_a_rank_killed_mid_request_gives_worker_dead_and_the_stack_serves_on(stack: dict) -> None:
    leader, follower = rank_pids(status())
    os.kill(follower, signal.SIGSTOP)  # rank 0's first collective of the request waits on it
    outcome: dict = {}
    with Client(stack["endpoint"], timeout_s=90, secret=stack["secret"].read_text().strip()) as client:
        try:
            for event in client.stream(QUESTION, specialist="pragmatist"):
                if isinstance(event, StageStartedEvent) and event.stage == "voice":
                    time.sleep(0.5)  # the voice is inside its prefill, waiting on the stopped rank
                    os.kill(follower, signal.SIGKILL)
        except LyraError as exc:
            outcome["error"] = exc
    assert getattr(outcome.get("error"), "code", None) == "worker_dead", outcome
    wait_for(lambda: not alive(leader), 30, "rank 0 to exit")
    wait_for(lambda: voice_of(status())["state"] == "up" and rank_pids(status())[0] != leader, 120,
             "supervisord to restart the voice")
    assert chat(stack["endpoint"], stack["secret"])[1]
