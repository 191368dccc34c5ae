"""The OpenAI-compatible gateway against a live stack of fake workers, driven by the official `openai` package."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.gatewayproc import KEY, GatewayProcess, gateway_overrides
from tests.stackproc import StackProcesses, slow_router

FAKE = {"triggers": True, "token_delay_s": 0.0}


def _png(size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[StackProcesses, GatewayProcess]]:
    """One stack with an artist and a perception specialist, and a gateway with a key."""
    stack = StackProcesses(
        specialists__artist={"backend": "fake", "kind": "image_generation", "routable": False, "memory_gb": 10.0,
                             "fake": dict(FAKE)},
        specialists__perception={"backend": "fake", "kind": "vision_language", "routable": False,
                                 "memory_gb": 10.0, "fake": dict(FAKE)},
        routing={"image_specialist": "perception"},
        **gateway_overrides())
    yield from _serving(stack)


def _serving(stack: StackProcesses) -> Iterator[tuple[StackProcesses, GatewayProcess]]:
    """Start the stack and a gateway in front of it; stop both afterwards."""
    gateway = GatewayProcess(stack)
    try:
        stack.start_all()
        gateway.start()
        yield stack, gateway
    finally:
        gateway.stop()
        stack.stop()


def _client(gateway: GatewayProcess, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=20)


def _metrics(gateway: GatewayProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_streaming_chunks_end_with_done_and_usage(served) -> None:
    _, gateway = served
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "lyra", "stream": True, "stream_options": {"include_usage": True},
                            "messages": [{"role": "user", "content": "how do I do math with code"}]},
                      timeout=20) as raw:
        assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in raw.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    stream = _client(gateway).chat.completions.create(
        model="lyra", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "how do I do math with code"}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("[voice]") and "math with code" in text
    assert all(c.model == "lyra/pragmatist" for c in chunks)
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == ["stop"]
    assert finish[0].lyra["specialist"] == "pragmatist" and "voice" in finish[0].lyra["timings"]
    pieces = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == pieces


def test_whole_completion_with_forced_specialist_and_options(served) -> None:
    _, gateway = served
    reply = _client(gateway).chat.completions.create(
        model="lyra/philosopher", max_completion_tokens=3, temperature=0.5, top_p=0.9, seed=7, stop=["zzz"],
        n=1, user="tester", messages=[{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "how do I do math with code"}])
    assert reply.model == "lyra/philosopher" and reply.lyra["forced"] is True
    assert reply.choices[0].message.content == "[voice] how do"  # three pieces: max tokens reached the voice
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3 and reply.usage.prompt_tokens > 0  # the voice counts its prompt


def test_image_in_goes_to_perception(served) -> None:
    _, gateway = served
    url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    reply = _client(gateway).chat.completions.create(model="lyra", messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is in this picture"}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert reply.model == "lyra/perception"
    assert "what is in this picture" in reply.choices[0].message.content


def test_image_out_from_the_artist(served) -> None:
    _, gateway = served
    result = _client(gateway).images.generate(prompt="a green field", size="16x16", response_format="b64_json")
    picture = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert picture.size == (16, 16) and picture.format == "PNG"
    # The prompt the artist drew from (the fake artist's is its echo of the turn), not the voice's words about it.
    assert "a green field" in result.data[0].revised_prompt and "[voice]" not in result.data[0].revised_prompt
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        _client(gateway).images.generate(prompt="two of them", n=2)


def test_models_list_what_the_config_offers(served) -> None:
    _, gateway = served
    ids = [m.id for m in _client(gateway).models.list()]
    assert ids == ["lyra", "lyra/pragmatist", "lyra/philosopher", "lyra/artist", "lyra/perception"]


def test_refusals_raise_the_clients_typed_errors(served) -> None:
    _, gateway = served
    client = _client(gateway)
    hello = [{"role": "user", "content": "hello"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="lyra", messages=hello, frequency_penalty=0.5)
    assert err.value.status_code == 400 and err.value.body["param"] == "frequency_penalty"
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="lyra", messages=hello, n=2)
    with pytest.raises(openai.BadRequestError, match="data: URL"):
        client.chat.completions.create(model="lyra", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    with pytest.raises(openai.AuthenticationError):
        _client(gateway, key="wrong").chat.completions.create(model="lyra", messages=hello)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=hello)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="image"):  # the coordinator's own refusal of bad bytes
        client.chat.completions.create(model="lyra", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no").decode()}}]}])


def test_concurrent_async_clients_all_complete(served) -> None:
    _, gateway = served

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0, timeout=30)

        async def one(i: int) -> str:
            stream = await client.chat.completions.create(
                model="lyra", stream=True, messages=[{"role": "user", "content": f"meaning of life {i}"}])
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(i) for i in range(12)))
        finally:
            await client.close()

    answers = asyncio.run(main())
    assert [a.split()[4] for a in answers] == [str(i) for i in range(12)]


def growth(before: dict, after: dict):
    """How much a sample (by name and labels) grew between two scrapes."""
    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)
    return grew


def test_metrics_count_what_was_served(served) -> None:
    _, gateway = served
    before = _metrics(gateway)
    client = _client(gateway)
    for _ in range(3):
        client.chat.completions.create(model="lyra/pragmatist", messages=[{"role": "user", "content": "sum"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    after = _metrics(gateway)
    grew = growth(before, after)

    assert grew("lyra_requests_total", endpoint="chat", outcome="ok", specialist="pragmatist") == 3
    assert grew("lyra_requests_total", endpoint="chat", outcome="model_not_found", specialist="") == 1
    assert grew("lyra_e2e_request_latency_seconds_count", endpoint="chat", specialist="pragmatist") == 3
    assert grew("lyra_time_to_first_token_seconds_count", specialist="pragmatist") == 3
    assert grew("lyra_stage_duration_seconds_count", stage="voice", specialist="pragmatist") == 3
    assert grew("lyra_coordinator_completed_total") == 3
    assert after[("lyra_coordinator_up", ())] == 1.0
    assert after[("lyra_num_requests_waiting", ())] == 0.0
    assert after[("lyra_worker_up", (("service", "voice"),))] == 1.0
    assert after[("lyra_vram_budget_bytes", (("gpu", "0"),))] == 47e9
    assert after[("lyra_worker_resident_models", (("model", "pragmatist"), ("service", "specialist_host")))] == 1.0
    assert httpx.get(f"{gateway.url}/metrics", timeout=5).status_code == 401  # the key guards metrics too


def test_gateway_restart_while_the_stack_serves(served) -> None:
    stack, gateway = served
    with stack.client() as lyra:  # a Python client keeps talking to the stack across the restart
        gateway.stop()
        assert lyra.chat("math code", timeout_s=10).answer.startswith("[voice]")
        gateway.start()
    reply = _client(gateway).chat.completions.create(model="lyra", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content.startswith("[voice]")


# ---------------------------------------------------------------- a stack with a tiny queue and a slow router


@pytest.fixture(scope="module")
def tight() -> Iterator[tuple[StackProcesses, GatewayProcess]]:
    stack = StackProcesses(runtime__queue_size=1, **slow_router(0.6),
                           deadlines__voice=0.5, specialists__artist={
                               "backend": "fake", "kind": "image_generation", "routable": False, "memory_gb": 10.0,
                               "fake": {"delay_s": 1.5}},
                           **gateway_overrides())
    yield from _serving(stack)


def _counters(stack: StackProcesses) -> dict[str, int]:
    with stack.client() as lyra:
        return lyra.status().counters


def _wait_idle(stack: StackProcesses, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    with stack.client() as lyra:
        while time.monotonic() < deadline:
            status = lyra.status()
            if status.running is None and status.queue_depth == 0:
                return
            time.sleep(0.05)
    raise TimeoutError("the pipeline did not go idle")


def test_full_queue_answers_429_with_retry_after(tight) -> None:
    _, gateway = tight
    client = _client(gateway)
    hello = [{"role": "user", "content": "math code"}]
    streams = [client.chat.completions.create(model="lyra", messages=hello, stream=True) for _ in range(2)]
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="lyra", messages=hello)
    assert int(err.value.response.headers["retry-after"]) >= 1 and err.value.body["code"] == "busy"
    for stream in streams:
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).startswith("[voice]")


def test_deadline_is_504_and_a_missing_worker_503(tight) -> None:
    stack, gateway = tight
    _wait_idle(stack)
    client = _client(gateway)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="lyra", messages=[{"role": "user", "content": "x [[fake:slow:voice]]"}])
    assert err.value.status_code == 504 and err.value.body["code"] == "deadline"
    _wait_idle(stack)
    with pytest.raises(openai.APIError, match=r"deadline|past"):  # after the first byte: an error event in the stream
        list(client.chat.completions.create(model="lyra", stream=True,
                                            messages=[{"role": "user", "content": "y [[fake:slow:voice]]"}]))


def test_a_disconnected_client_frees_the_pipeline(tight) -> None:
    stack, gateway = tight
    _wait_idle(stack)
    before = _counters(stack)["cancelled"]
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "lyra", "stream": True, "messages": [{"role": "user", "content": "math code"}]}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=10) as r:
        assert r.status_code == 200  # accepted; the router is still thinking: leave now
    with pytest.raises(httpx.ReadTimeout):  # the whole (non-streaming) kind, abandoned by a client timeout
        httpx.post(f"{gateway.url}/v1/chat/completions", json={**body, "stream": False}, headers=headers,
                   timeout=0.3)
    deadline = time.monotonic() + 5
    while _counters(stack)["cancelled"] < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _counters(stack)["cancelled"] == before + 2
    started = time.monotonic()
    assert _client(gateway).chat.completions.create(model="lyra", messages=body["messages"]).choices
    assert time.monotonic() - started < 3  # no abandoned request ran ahead of it


def test_keepalive_comments_while_waiting(tight) -> None:
    stack, gateway = tight
    _wait_idle(stack)
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "lyra", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
                      timeout=10) as raw:
        lines = list(raw.iter_lines())
    assert ": keep-alive" in lines[: lines.index(next(x for x in lines if x.startswith("data:")))]
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"


def test_worker_gone_is_503(tight) -> None:
    stack, gateway = tight
    _wait_idle(stack)
    stack.kill("voice")
    with pytest.raises(openai.InternalServerError) as err:
        _client(gateway).chat.completions.create(model="lyra", messages=[{"role": "user", "content": "math"}])
    assert err.value.status_code == 503


# ---------------------------------------------------------------- under supervisord


@pytest.mark.stack
def test_lyra_up_starts_the_gateway_and_supervisorctl_restarts_it(tmp_path, monkeypatch) -> None:
    import json
    import re

    from tests.integration.test_supervisord import lyra
    from tests.stackproc import fake_config, to_toml

    monkeypatch.setenv("LYRA_TEST_GATEWAY_KEY", KEY)  # `lyra up` hands its environment to the gateway
    config = tmp_path / "dev.toml"
    config.write_text(to_toml({**fake_config(tmp_path / "run"), **gateway_overrides()}))
    try:
        up = lyra("up", "-c", str(config), "--timeout", "60")
        assert up.returncode == 0, up.stdout + up.stderr
        url = re.search(r"gateway up at (http://\S+)/v1", up.stdout).group(1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=20)
        assert client.chat.completions.create(model="lyra", messages=[{"role": "user", "content": "hi"}]).choices
        assert lyra("ctl", "restart", "gateway").returncode == 0
        deadline = time.monotonic() + 20
        while True:
            try:
                url = json.loads((tmp_path / "run" / "gateway.json").read_text())["url"]
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except (OSError, ValueError, KeyError, httpx.HTTPError):
                assert time.monotonic() < deadline, lyra("logs", "gateway").stdout
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=20)
        assert client.models.list().data[0].id == "lyra"
    finally:
        down = lyra("down")
    assert down.returncode == 0


def test_metrics_count_swaps_by_what_left_what_came_and_their_source(served) -> None:
    _, gateway = served
    client = _client(gateway)
    client.chat.completions.create(model="lyra/pragmatist", messages=[{"role": "user", "content": "sum"}])
    before = _metrics(gateway)
    client.chat.completions.create(model="lyra/philosopher", messages=[{"role": "user", "content": "why"}])
    client.chat.completions.create(model="lyra/pragmatist", messages=[{"role": "user", "content": "sum"}])
    after = _metrics(gateway)
    grew = growth(before, after)

    # Fake specialists are not kept in a host weight cache: each swap loads from the "checkpoint".
    assert grew("lyra_swaps_total", unloaded="pragmatist", loaded="philosopher", source="checkpoint") == 1
    assert grew("lyra_swaps_total", unloaded="philosopher", loaded="pragmatist", source="checkpoint") == 1
    assert grew("lyra_model_load_seconds_count", model="philosopher", source="checkpoint") == 1
    assert grew("lyra_coordinator_swaps_from_checkpoint_total") == 2


def test_a_client_leaving_an_image_request_cancels_it(tight) -> None:
    stack, gateway = tight
    _wait_idle(stack)
    before = _counters(stack)["cancelled"]
    with pytest.raises(httpx.ReadTimeout):  # the artist takes 1.5 s; this client gives up after 0.3 s
        httpx.post(f"{gateway.url}/v1/images/generations", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "lyra/artist", "prompt": "a lighthouse"}, timeout=0.3)
    deadline = time.monotonic() + 5
    while _counters(stack)["cancelled"] < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _counters(stack)["cancelled"] == before + 1
