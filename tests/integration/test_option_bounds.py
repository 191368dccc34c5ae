"""Absurd request options are refused at admission with `invalid_request`, before any stage runs; options
within the reach of the models that would serve them still run. Sent as raw msgpack: the Python client would
refuse most of these values itself, a client in another language would not."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator

import httpx
import msgpack
import pytest

from shared.wire import transport
from shared.wire.messages import ErrorCode
from tests.gatewayproc import KEY, GatewayProcess, gateway_overrides
from tests.stackproc import StackProcesses

FAKE = {"triggers": True}
CONFIG = {
    "voice__max_context": 2048,
    "specialists__pragmatist__max_context": 1024,
    "specialists__artist": {"backend": "fake", "kind": "image_generation", "memory_gb": 10.0, "fake": dict(FAKE),
                            "description": "draw paint picture image",
                            "image": {"width": 512, "height": 512, "max_side": 1024, "steps": 4, "max_steps": 8}},
    **gateway_overrides(),
}

REFUSED = {  # options (or envelope fields) -> what the refusal's sentence names
    "max_tokens 10**9": ({"options": {"max_new_tokens": 10**9}}, "max_new_tokens"),
    "max_tokens over the voice's context": ({"specialist": "philosopher", "options": {"max_new_tokens": 4096}},
                                            "the voice (voice) can write: its max_context is 2048"),
    "max_tokens over a context the router may choose": ({"options": {"max_new_tokens": 1500}},
                                                        "pragmatist (which the router may choose)"),
    "max_tokens over a forced specialist's context": ({"specialist": "pragmatist",
                                                       "options": {"max_new_tokens": 1500}}, "max_context is 1024"),
    "temperature 1e9": ({"options": {"temperature": 1e9}}, "temperature"),
    "temperature NaN": ({"options": {"temperature": math.nan}}, "temperature"),
    "temperature inf": ({"options": {"temperature": math.inf}}, "temperature"),
    "top_p 5": ({"options": {"top_p": 5}}, "top_p"),
    "top_p 0": ({"options": {"top_p": 0}}, "top_p"),
    "top_p NaN": ({"options": {"top_p": math.nan}}, "top_p"),
    "negative seed": ({"options": {"seed": -1}}, "seed"),
    "height 0": ({"specialist": "artist", "options": {"height": 0}}, "height"),
    "width 4000 for the artist": ({"specialist": "artist", "options": {"width": 4000}}, "at most 1024 px"),
    "width 4000 for whoever the router picks": ({"options": {"width": 4000}}, "which the router may choose"),
    "steps 500": ({"specialist": "artist", "options": {"steps": 500}}, "at most 8"),
    "nine stop strings": ({"options": {"stop": ["x"] * 9}}, "stop"),
    "sent_at NaN": ({"sent_at": math.nan}, "sent_at"),
}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[StackProcesses, GatewayProcess]]:
    stack = StackProcesses(**CONFIG)
    gateway = GatewayProcess(stack)
    try:
        stack.start_all()
        gateway.start()
        yield stack, gateway
    finally:
        gateway.stop()
        stack.stop()


def ask(stack: StackProcesses, fields: dict, timeout_s: float = 10.0) -> list[dict]:
    """Send one chat request as raw msgpack; its answers up to the first terminal or refusing event."""
    ctx = transport.new_context()
    sock = transport.connect_dealer(ctx, stack.endpoint, 16 * 10**6)
    request = {"type": "chat_request", "id": uuid.uuid4().hex, "v": "1.4", "text": "math code", **fields}
    try:
        transport.send_raw(sock, msgpack.packb(request, use_bin_type=True))
        answers, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if transport.poll([sock], 0.05):
                answer = msgpack.unpackb(transport.recv_frames(sock)[0], raw=False)
                answers.append(answer)
                if answer["type"] in ("done_event", "error_event"):
                    return answers
        raise AssertionError(f"no terminal event within {timeout_s} s: {answers}")
    finally:
        sock.close()
        ctx.term()


def requests_run(stack: StackProcesses) -> int:
    with stack.client() as client:
        return client.status().counters["requests"]


@pytest.mark.parametrize("case", list(REFUSED))
def test_an_absurd_option_is_refused_before_any_stage_runs(served, case: str) -> None:
    stack, _ = served
    fields, named = REFUSED[case]
    before = requests_run(stack)
    started = time.monotonic()
    answers = ask(stack, fields)
    assert [a["type"] for a in answers] == ["error_event"], answers  # never accepted: no stage, no keepalive
    assert answers[0]["code"] == ErrorCode.invalid_request.value and named in answers[0]["message"], answers
    assert time.monotonic() - started < 2.0
    assert requests_run(stack) == before


@pytest.mark.parametrize("fields", [
    {"specialist": "artist", "options": {"width": 1024, "height": 16, "steps": 8}},
    {"specialist": "philosopher", "options": {"max_new_tokens": 2048, "temperature": 5.0, "top_p": 1.0,
                                              "seed": 2**63 - 1}},
    {"specialist": "pragmatist", "options": {"width": 4000}},  # no model it reaches draws: the option is unused
], ids=["artist-at-its-limits", "philosopher-at-the-voice-context", "size-for-a-text-specialist"])
def test_options_within_the_models_limits_still_run(served, fields: dict) -> None:
    stack, _ = served
    answers = ask(stack, fields)
    assert answers[0]["type"] == "accepted_event" and answers[-1]["type"] == "done_event", answers[-1]


def test_the_gateway_answers_them_with_400(served) -> None:
    _, gateway = served
    headers = {"Authorization": f"Bearer {KEY}"}
    chat = httpx.post(f"{gateway.url}/v1/chat/completions", headers=headers, timeout=10, json={
        "model": "lyra", "max_tokens": 4096, "messages": [{"role": "user", "content": "math code"}]})
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "invalid_request", chat.text
    image = httpx.post(f"{gateway.url}/v1/images/generations", headers=headers, timeout=10, json={
        "model": "lyra/artist", "prompt": "a lighthouse", "size": "4000x4000"})
    assert image.status_code == 400 and "at most 1024 px" in image.json()["error"]["message"], image.text
