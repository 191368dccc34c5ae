"""`backend = "openai"` against live servers on loopback: a test double for the failures (401, 429, 5xx, a cut,
garbled or silent stream, a server that is down) and `transformers serve` (a real OpenAI-compatible server of
another project, serving the embedded SmolLM2) for the happy path through the whole stack."""

from __future__ import annotations

import email.utils
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from shared.client import LyraError, WorkerDeadError
from shared.config.schema import ModelEntry
from shared.engine.cancel import Cancelled
from shared.models import openai_remote, openai_wire
from shared.models.base import BackendError, LoadContext, load_model
from shared.wire.messages import ChatTurn, ErrorCode, GenerationOptions, RouteLabel
from tests.remotedouble import STATUSES, RemoteDouble

KEY_ENV = "LYRA_TEST_REMOTE_KEY"
KEY = "remote-key-0123456789"
HELLO = [ChatTurn(role="user", content="one two three four five")]


@pytest.fixture(scope="module")
def double() -> Iterator[RemoteDouble]:
    server = RemoteDouble(KEY).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def entry(base_url: str, model: str = "echo", **remote: object) -> ModelEntry:
    settings = {"base_url": base_url, "model": model, "api_key_env": KEY_ENV, "backoff_s": 0.01, **remote}
    return ModelEntry(name="voice", backend="openai", remote=settings)


def load(base_url: str, model: str = "echo", **remote: object) -> openai_remote.RemoteModel:
    loaded = load_model(entry(base_url, model, **remote), LoadContext("voice", [], None))  # type: ignore[arg-type]
    assert isinstance(loaded, openai_remote.RemoteModel)
    return loaded


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens once the probe is closed


def test_streams_piece_by_piece_with_the_servers_usage(double: RemoteDouble) -> None:
    model = load(double.base_url)
    try:
        pieces = list(model.generate(HELLO, GenerationOptions(max_new_tokens=9, seed=3), threading.Event()))
        assert pieces == ["one", " two", " three", " four", " five"]
        assert model.last_usage() == (7, 5, "stop")
        sent = double.bodies[-1]
        assert sent["stream"] and sent["max_tokens"] == 9 and sent["seed"] == 3 and sent["model"] == "echo"
        assert model.memory() == [] and "remote" in model.placement()["voice"]
        assert list(model.generate(HELLO, GenerationOptions(max_new_tokens=3), threading.Event())) == [
            "one", " two", " three"]
        assert model.last_usage() == (7, 3, "length")  # the server cut it at max_tokens
    finally:
        model.unload()


def test_openai_variables_meant_for_api_openai_com_never_reach_the_server(double: RemoteDouble,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("OPENAI_API_KEY", "sk-for-api-openai-com"), ("OPENAI_ORG_ID", "org-mine"),
                        ("OPENAI_PROJECT_ID", "proj-mine")):
        monkeypatch.setenv(name, value)
    model = load(double.base_url)
    try:
        list(model.generate(HELLO, GenerationOptions(), threading.Event()))
    finally:
        model.unload()
    sent = double.headers[-1]
    assert sent["authorization"] == f"Bearer {KEY}"  # the key remote.api_key_env names, not OPENAI_API_KEY
    assert "openai-organization" not in sent and "openai-project" not in sent
    server = RemoteDouble(None).start()  # a server without a key: no Authorization header at all
    try:
        model = load_model(ModelEntry(name="voice", backend="openai",
                                      remote={"base_url": server.base_url, "model": "echo"}),
                           LoadContext("voice", [], None))  # type: ignore[arg-type]
        try:
            assert "".join(model.generate(HELLO, GenerationOptions(), threading.Event())).startswith("one")
        finally:
            model.unload()
    finally:
        server.stop()
    assert server.headers and not any("authorization" in sent or "openai-organization" in sent
                                      for sent in server.headers)


def test_a_wrong_key_is_refused_with_401_at_once_naming_the_variable_not_the_key(
        double: RemoteDouble, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "not-the-key")
    asked = len(double.headers)
    with pytest.raises(openai_wire.RemoteKeyRefused, match="401") as err:
        load(double.base_url, retries=3)
    assert KEY_ENV in str(err.value) and "not-the-key" not in str(err.value)
    assert len(double.headers) == asked + 1  # not re-sent: another try would get the same answer
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(BackendError, match=f"{KEY_ENV}, which is unset or empty"):
        load(double.base_url)


def test_429_is_retried_with_back_off_then_busy_when_it_persists(double: RemoteDouble) -> None:
    double.failures, double.seen = 2, {}
    model = load(double.base_url, "ratelimit", retries=3)
    try:
        assert "".join(model.generate(HELLO, GenerationOptions(), threading.Event())) == "one two three four five"
        assert double.seen["ratelimit"] == 3  # two 429s, then served
        double.seen = {}
        model.settings = model.settings.model_copy(update={"retries": 1})
        with pytest.raises(openai_wire.RemoteBusy, match="429") as err:
            list(model.generate(HELLO, GenerationOptions(), threading.Event()))
        assert err.value.code == ErrorCode.busy and double.base_url in str(err.value)
    finally:
        model.unload()


def test_retry_after_sets_the_pause_before_a_resend_up_to_max_backoff_s(double: RemoteDouble) -> None:
    model = load(double.base_url, "ratelimit", retries=1, max_backoff_s=5.0)  # backoff_s is 0.01
    try:
        for in_s in (None, 2.5):  # "1" (seconds), then an HTTP date 2.5 s ahead (1.5 to 2.5 s: whole seconds)
            retry_after = "1" if in_s is None else email.utils.formatdate(time.time() + in_s, usegmt=True)
            double.failures, double.seen, double.retry_after = 1, {}, retry_after
            started = time.monotonic()
            assert "".join(model.generate(HELLO, GenerationOptions(), threading.Event())).startswith("one")
            assert 0.95 <= time.monotonic() - started < 4 and double.seen["ratelimit"] == 2
        model.settings = model.settings.model_copy(update={"max_backoff_s": 0.2})
        double.failures, double.seen, double.retry_after = 1, {}, "120"
        started = time.monotonic()
        assert "".join(model.generate(HELLO, GenerationOptions(), threading.Event())).startswith("one")
        assert 0.15 <= time.monotonic() - started < 2  # capped by remote.max_backoff_s, not 120 s
        model.settings = model.settings.model_copy(update={"max_backoff_s": 60.0})
        double.failures, double.seen, double.retry_after = 1, {}, "30"
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        started = time.monotonic()
        with pytest.raises(Cancelled):  # a cancel during the pause ends it
            list(model.generate(HELLO, GenerationOptions(), cancel))
        assert time.monotonic() - started < 2
    finally:
        double.retry_after = "0"
        model.unload()


def test_5xx_maps_to_worker_error_and_503_is_retried(double: RemoteDouble) -> None:
    double.failures, double.seen = 1, {}
    model = load(double.base_url, "overloaded")
    try:
        assert "".join(model.generate(HELLO, GenerationOptions(), threading.Event())).startswith("one")
        model.settings = model.settings.model_copy(update={"model": "broken"})
        with pytest.raises(openai_wire.RemoteServerError, match=r"500.*device-side assert") as err:
            list(model.generate(HELLO, GenerationOptions(), threading.Event()))
        assert err.value.code == ErrorCode.worker_error
    finally:
        model.unload()


def test_a_stream_cut_midway_is_a_worker_error_naming_the_url(double: RemoteDouble) -> None:
    model = load(double.base_url, "cut")
    got: list[str] = []
    try:
        with pytest.raises(openai_wire.RemoteStreamCut) as err:
            for piece in model.generate(HELLO, GenerationOptions(), threading.Event()):
                got.append(piece)
        assert got == ["one", " two"] and double.base_url in str(err.value)
        assert err.value.code == ErrorCode.worker_error
    finally:
        model.unload()


@pytest.mark.parametrize(("model", "kind", "said"), [
    ("erring", openai_wire.RemoteServerError, "failed mid-stream during the voice reply: CUDA out of memory"),
    ("garbled", openai_wire.RemoteStreamCut, "not JSON"),
    ("unfinished", openai_wire.RemoteStreamCut, "ended before the server finished the voice reply"),
])
def test_a_stream_that_fails_after_its_first_piece_names_how(double: RemoteDouble, model: str, kind: type,
                                                              said: str) -> None:
    loaded = load(double.base_url, model)
    got: list[str] = []
    try:
        with pytest.raises(kind, match=said) as err:
            for piece in loaded.generate(HELLO, GenerationOptions(), threading.Event()):
                got.append(piece)
        assert got[0] == "one" and double.base_url in str(err.value) and err.value.code == ErrorCode.worker_error
    finally:
        loaded.unload()


@pytest.mark.parametrize("status", STATUSES)
def test_each_http_status_has_its_typed_error_with_the_servers_sentence(double: RemoteDouble, status: int) -> None:
    kind, code = {401: (openai_wire.RemoteKeyRefused, ErrorCode.worker_error),
                  403: (openai_wire.RemoteKeyRefused, ErrorCode.worker_error),
                  404: (openai_wire.RemoteModelMissing, ErrorCode.worker_error),
                  429: (openai_wire.RemoteBusy, ErrorCode.busy)}.get(
        status, (openai_wire.RemoteServerError, ErrorCode.worker_error))
    model = load(double.base_url, f"status-{status}", retries=1)
    double.seen = {}
    try:
        with pytest.raises(kind) as err:
            list(model.generate(HELLO, GenerationOptions(), threading.Event()))
    finally:
        model.unload()
    assert err.value.code == code and str(status) in str(err.value)
    assert double.base_url in str(err.value) and "the server's sentence" in str(err.value)
    assert double.seen[f"status-{status}"] == (2 if status == 429 else 1)  # only a 429 (and 502-504) is re-sent


def test_a_silent_server_times_out_and_a_cancel_aborts_at_once(double: RemoteDouble) -> None:
    model = load(double.base_url, "silent", read_timeout_s=0.5)
    double.disconnected = {}
    try:
        started = time.monotonic()
        with pytest.raises(openai_wire.RemoteTimeout, match=r"sent nothing for 0\.5 s"):
            list(model.generate(HELLO, GenerationOptions(), threading.Event()))
        assert time.monotonic() - started < 5
        assert eventually(lambda: double.disconnected.get("silent") == 1)  # the timed-out stream was closed
        model.settings = model.settings.model_copy(update={"read_timeout_s": 60.0})
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        started = time.monotonic()
        with pytest.raises(Cancelled):
            list(model.generate(HELLO, GenerationOptions(), cancel))
        assert time.monotonic() - started < 2  # the HTTP request was aborted, not waited out
        assert eventually(lambda: double.disconnected.get("silent") == 2)  # the server saw the stream closed
    finally:
        model.unload()


def eventually(condition: Callable[[], bool], within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_server_that_is_down_is_unreachable_and_an_unknown_model_is_named(double: RemoteDouble) -> None:
    url = closed_port_url()
    with pytest.raises(openai_wire.RemoteUnreachable, match="unreachable") as err:
        load(url)
    assert url in str(err.value) and err.value.code == ErrorCode.worker_missing
    with pytest.raises(openai_wire.RemoteModelMissing, match="offers: echo"):
        load(double.base_url, "llama-9000")


def test_the_router_scores_labels_by_logprobs_when_offered(double: RemoteDouble) -> None:
    model = load(double.base_url)
    labels = [RouteLabel(name="pragmatist", description="practical"),
              RouteLabel(name="philosopher", description="meaning")]
    try:
        scores = model.classify(HELLO, labels, "{labels}\n{text}", threading.Event())
        assert scores["philosopher"] > 0.9 > scores["pragmatist"] > 0  # "phil" -0.1 vs "pr" -2.5
        assert double.bodies[-1]["logprobs"] is True and double.bodies[-1]["max_tokens"] == 1
    finally:
        model.unload()


# ---------------------------------------------------------------- through the whole stack


def remote_table(base_url: str, model: str) -> dict[str, object]:
    return {"backend": "openai", "remote": {"base_url": base_url, "model": model, "api_key_env": KEY_ENV,
                                            "backoff_s": 0.01}}


def test_a_remote_voice_cut_midway_ends_the_request_with_worker_error_naming_the_url(double, make_stack) -> None:
    stack = make_stack(voice=remote_table(double.base_url, "cut"), services__voice__gpus=[],
                       specialists__philosopher=remote_table(closed_port_url(), "echo"))
    with stack.client() as client:
        with pytest.raises(LyraError) as err:
            client.chat("how do I fix a bike", specialist="pragmatist")
        assert err.value.code == "worker_error" and double.base_url in str(err.value)
        with pytest.raises(WorkerDeadError, match="unreachable"):  # the philosopher's server is down
            client.chat("meaning of life", specialist="philosopher")
        status = client.status()
    voice = next(s for s in status.services if s.service == "voice")
    assert voice.placement["voice"].startswith(f"remote {double.base_url}")
    assert "voice" not in {name for gpu in status.gpus for name in gpu.resident}  # no local VRAM


@pytest.fixture(scope="module")
def transformers_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`transformers serve` on loopback, pinned to the embedded SmolLM2 (base_url, model id)."""
    pytest.importorskip("fastapi")  # transformers' server needs it (the dev extra installs it)
    from shared.models.embedded import materialise

    path = materialise(ModelEntry(name="smollm2", backend="transformers", embedded="smollm2")).path
    port = int(closed_port_url().rsplit(":", 1)[1].split("/")[0])
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("wb")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", path, "--device", "cpu",
                             "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base_url}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"transformers serve did not come up:\n{Path(log.name).read_text()[-3000:]}")
        yield base_url, path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.mark.smollm2
def test_a_forced_specialist_and_the_voice_on_a_real_openai_compatible_server(transformers_serve, make_stack) -> None:
    base_url, model = transformers_serve
    generation = {"max_new_tokens": 6, "temperature": 0.0}
    remote = {"backend": "openai", "remote": {"base_url": base_url, "model": model}, "generation": generation}
    stack = make_stack(voice=remote, services__voice__gpus=[], specialists__pragmatist=dict(remote),
                       deadlines={"route": 60.0, "load": 60.0, "specialist": 60.0, "voice": 60.0})
    with stack.client(timeout_s=120) as client:
        events = list(client.stream("Name a fruit.", specialist="pragmatist"))
    tokens = [e for e in events if e.type == "token_event" and e.stage == "voice"]
    done = events[-1]
    assert done.type == "done_event" and done.specialist == "pragmatist" and done.answer.strip()
    assert len(tokens) > 1 and "".join(t.text for t in tokens) == done.answer  # streamed as the server sent it
    assert done.usage is not None and 0 < done.usage.completion_tokens <= 6  # the server's own count


@pytest.mark.smollm2
def test_a_remote_router_falls_back_to_the_named_label_without_logprobs(transformers_serve) -> None:
    base_url, model_id = transformers_serve
    router = load_model(ModelEntry(name="router", backend="openai", remote={"base_url": base_url, "model": model_id}),
                        LoadContext("router", [], None))  # type: ignore[arg-type]
    labels = [RouteLabel(name="pragmatist", description="practical tasks"),
              RouteLabel(name="philosopher", description="meaning and ethics")]
    try:
        scores = router.classify([ChatTurn(role="user", content="Why be kind?")], labels,
                                 "Specialists:\n{labels}\nMessage: {text}\nAnswer with one specialist's name.",
                                 threading.Event())
        assert set(scores) == {"pragmatist", "philosopher"} and abs(sum(scores.values()) - 1) < 1e-9
        assert router.logprobs_offered is False  # transformers serve ignores `logprobs`: routed by the reply
    finally:
        router.unload()
