"""Operations as a user meets them through `lyra`: stale state, crash loops, two stacks, bad input on the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.cli.stack import programs
from shared.client import Client, StackNotFoundError, find_stack
from shared.wire.messages import StageStartedEvent
from tests.integration.test_supervisord import left_behind, lyra
from tests.stackproc import ROOT, fake_config, to_toml


def write_config(path: Path, run_dir: Path, **overrides) -> Path:
    path.write_text(to_toml(fake_config(run_dir, **overrides)))
    return path


def leftover_socket(path: Path) -> None:
    """A socket file nobody listens on, as a killed coordinator leaves it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()


def stale_stack(run_dir: Path) -> dict:
    """A run directory as a stack killed with SIGKILL leaves it: record, pid file and sockets, no processes."""
    run_dir.mkdir(parents=True, mode=0o700)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    record = {"config": "dev.toml", "client_endpoint": f"ipc://{run_dir / 'client.sock'}",
              "worker_endpoint": f"ipc://{run_dir / 'workers.sock'}", "run_dir": str(run_dir),
              "supervisord_pid": dead.pid}
    (run_dir / "stack.json").write_text(json.dumps(record))
    (run_dir / "supervisord.pid").write_text(str(dead.pid))
    for name in ("client.sock", "workers.sock", "supervisor.sock"):
        leftover_socket(run_dir / name)
    state = Path(os.environ["XDG_STATE_HOME"]) / "lyra"
    state.mkdir(parents=True, exist_ok=True)
    (state / "stack.json").write_text(json.dumps({"run_dir": str(run_dir)}))
    return record


def test_stale_stack_is_reported_at_once_and_cleaned_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    stale_stack(run_dir)
    chat = lyra("chat", "hello", "--timeout", "900", timeout=30)  # it used to wait out the 900 s
    assert chat.returncode == 1
    assert "not_running" in chat.stderr and "is gone" in chat.stderr and "lyra up" in chat.stderr, chat.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == []  # record, pid file and sockets removed
    assert not (Path(os.environ["XDG_STATE_HOME"]) / "lyra" / "stack.json").exists()
    again = lyra("status", timeout=30)
    assert again.returncode == 1 and "no running Lyra stack" in again.stderr


def test_client_on_an_unserved_endpoint_fails_within_seconds_not_its_timeout(tmp_path: Path) -> None:
    leftover_socket(tmp_path / "client.sock")
    with Client(f"ipc://{tmp_path / 'client.sock'}", timeout_s=900) as client:
        began = time.monotonic()
        with pytest.raises(StackNotFoundError) as err:
            client.chat("hello")
    assert err.value.code == "not_running" and "nothing serves" in err.value.message
    assert time.monotonic() - began < 60  # a bound against hanging, not a speed target (about 1 s)


@pytest.mark.stack
def test_up_with_a_crashing_worker_fails_fast_stops_everything_and_shows_its_log(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "crash.toml", run_dir,
                          voice__fake={"misbehave": "crash", "misbehave_on": "load"})
    up = lyra("up", "-c", str(config), "--timeout", "600", timeout=120)
    assert up.returncode == 2, up.stdout + up.stderr
    assert "voice keeps crashing" in up.stderr and "the stack was stopped" in up.stderr, up.stderr
    assert f"lines of {run_dir / 'logs' / 'voice.log'}:" in up.stderr
    assert "starting voice" in up.stderr  # the service's own log lines, not just a pointer to them
    assert left_behind(run_dir) == []
    assert not (run_dir / "stack.json").exists()


def lyra_async(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "shared.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def finished(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err


@pytest.mark.stack
def test_two_stacks_side_by_side_and_a_shared_run_directory_refused(tmp_path: Path) -> None:
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    config_a = write_config(tmp_path / "a.toml", run_a)
    config_b = write_config(tmp_path / "b.toml", run_b)
    same_dir = write_config(tmp_path / "a2.toml", run_a)
    same_endpoint = write_config(tmp_path / "c.toml", tmp_path / "c",
                                 runtime__client_endpoint=f"ipc://{run_a / 'client.sock'}")
    try:
        for config in (config_a, config_b):  # one after the other: b is the stack started last
            assert finished(lyra_async("up", "-c", str(config), "--timeout", "60"))[0] == 0
        pid_a = int((run_a / "supervisord.pid").read_text())
        pids = {}
        for run_dir, text in ((run_a, "how do I do math with code"), (run_b, "meaning of life")):
            with Client(find_stack(run_dir)["client_endpoint"], timeout_s=30) as client:
                assert client.chat(text).answer
                pids[run_dir] = {s.service: s.pid for s in client.status().services}
        assert not set(pids[run_a].values()) & set(pids[run_b].values())  # two stacks, not one seen twice
        refused = [lyra_async("up", "-c", str(config), "--timeout", "60") for config in (same_dir, same_endpoint)]
        (code_dir, said_dir), (code_endpoint, said_endpoint) = (finished(proc) for proc in refused)
        assert code_dir == 2
        assert f"run directory {run_a} is in use by a live Lyra stack (supervisord pid {pid_a}" in said_dir
        assert code_endpoint == 2
        coordinator_a = next(p["pid"] for p in programs(run_a) if p["name"] == "coordinator")
        assert f"client.sock is in use by pid {coordinator_a}" in said_endpoint, said_endpoint
        assert lyra("down", "--run-dir", str(run_a)).returncode == 0  # the first down leaves b alone
        assert not (run_a / "stack.json").exists() and (run_b / "stack.json").exists()
        with Client(timeout_s=30) as client:  # no endpoint given: the stack started last, b, still serves
            assert client.chat("meaning of life").specialist == "philosopher"
    finally:
        downs = [lyra_async("down", "--run-dir", str(run_dir)) for run_dir in (run_a, run_b)]
        [finished(down) for down in downs]
    assert left_behind(run_a) == [] and left_behind(run_b) == []


def test_missing_image_is_one_line_and_no_traceback(tmp_path: Path) -> None:
    chat = lyra("chat", "what is this?", "--image", str(tmp_path / "missing.png"), timeout=30)
    assert chat.returncode == 2
    assert chat.stderr.strip() == f"lyra: cannot read image {tmp_path / 'missing.png'}: No such file or directory"


def test_chat_reads_a_long_prompt_from_stdin_and_from_a_file(shared_stack, tmp_path: Path) -> None:
    stack = shared_stack()
    prompt = "how do I do math with code " + "word " * 27_000  # 135 KB: more than one argv string may hold
    piped = subprocess.run([sys.executable, "-m", "shared.cli", "chat", "-", "--json", "--endpoint", stack.endpoint],
                           input=prompt, capture_output=True, text=True, timeout=60, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["specialist"] == "pragmatist"
    (tmp_path / "prompt.txt").write_text(prompt)
    filed = lyra("chat", "--file", str(tmp_path / "prompt.txt"), "--json", "--endpoint", stack.endpoint)
    assert filed.returncode == 0, filed.stderr
    assert json.loads(filed.stdout)["answer"] == json.loads(piped.stdout)["answer"]


def test_a_prompt_cut_to_max_context_is_reported_in_done_and_by_the_cli(make_stack, tmp_path: Path) -> None:
    stack = make_stack(voice__max_context=64)
    (tmp_path / "long.txt").write_text("how do I do math with code " + "step " * 200)
    chat = lyra("chat", "--file", str(tmp_path / "long.txt"), "--endpoint", stack.endpoint, "--max-new-tokens", "8")
    assert chat.returncode == 0, chat.stderr
    assert "truncated: the voice (voice) read only the last 56 of" in chat.stdout, chat.stdout
    with Client(stack.endpoint, timeout_s=30) as client:
        cut = client.chat("how do I do math with code " + "step " * 200, max_new_tokens=8).truncated
        assert [(t.stage, t.kept_tokens, t.max_context) for t in cut] == [("voice", 56, 64)]
        assert cut[0].prompt_tokens > 200
        assert client.chat("how do I do math with code", max_new_tokens=8).truncated is None  # short: nothing cut


def test_counters_say_what_they_count(make_stack) -> None:
    stack = make_stack()
    prompts = ["math code one", "math code two", "meaning of life", "math code three", "math code four"]
    with stack.client() as client:
        done = [client.chat(p) for p in prompts]
        counters = client.status().counters
    assert [d.specialist for d in done] == ["pragmatist"] * 2 + ["philosopher"] + ["pragmatist"] * 2
    no_swap = sum(d.timings["load"] == 0.0 for d in done)
    assert counters["already_resident"] == no_swap == len(prompts) - counters["swaps"]
    assert counters["swaps_from_checkpoint"] == counters["swaps"] >= 3  # fakes have no host weight cache
    assert counters["swaps_from_host_cache"] == 0 and "cache_hits" not in counters


def test_swap_counters_add_up_after_a_cancelled_load(make_stack) -> None:
    """The host finishes a load its request cancelled (loads ignore cancels); the next load finds it resident."""
    stack = make_stack(specialists__philosopher__fake={"load_s": 1.0, "triggers": True})
    with stack.client() as client:
        for event in client.stream("meaning of life", specialist="philosopher"):
            if isinstance(event, StageStartedEvent) and event.stage == "load":
                break  # leaving the stream cancels the request mid-load
        assert client.chat("meaning of life", specialist="philosopher").specialist == "philosopher"
        counters = client.status().counters
    assert counters["swaps"] == counters["swaps_from_checkpoint"] + counters["swaps_from_host_cache"], counters
