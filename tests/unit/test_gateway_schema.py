"""The gateway's request validation and startup checks: pure functions, no sockets."""

from __future__ import annotations

import pytest

from services.gateway.errors import GatewayError, from_lyra
from services.gateway.openai_schema import (
    ChatCompletionRequest,
    generation_options,
    image_size,
    parse,
    resolve_model,
    to_turns,
)
from services.gateway.state import GatewayConfigError, api_key
from shared.client import BusyError, DeadlineError, WorkerDeadError
from shared.config.schema import GatewaySettings

HELLO = [{"role": "user", "content": "hi"}]


def test_unsupported_fields_are_named_and_neutral_ones_pass() -> None:
    with pytest.raises(GatewayError) as err:
        parse(ChatCompletionRequest, {"model": "lyra", "messages": HELLO, "tools": [{"type": "function"}]})
    assert err.value.status == 400 and err.value.param == "tools"
    req = parse(ChatCompletionRequest, {"model": "lyra", "messages": HELLO, "presence_penalty": 0,
                                        "logprobs": False, "response_format": None})
    assert req.model == "lyra"


def test_options_map_onto_generation_options() -> None:
    req = parse(ChatCompletionRequest, {"model": "lyra", "messages": HELLO, "max_tokens": 5, "stop": "END",
                                        "temperature": 0.2, "seed": 3})
    assert generation_options(req) == {"max_new_tokens": 5, "stop": ["END"], "temperature": 0.2, "seed": 3}
    for bad in ({"n": 3}, {"max_tokens": 4, "max_completion_tokens": 5}, {"stop": ["a"] * 5}):
        with pytest.raises(GatewayError):
            generation_options(parse(ChatCompletionRequest, {"model": "lyra", "messages": HELLO, **bad}))
    with pytest.raises(GatewayError) as err:
        parse(ChatCompletionRequest, {"model": "lyra", "messages": HELLO, "temperature": 3})
    assert err.value.param == "temperature"


def test_content_parts_and_one_image() -> None:
    url = "data:image/png;base64,aGk="
    req = parse(ChatCompletionRequest, {"model": "lyra", "messages": [
        {"role": "developer", "content": "terse"},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": url}}]}]})
    turns, image = to_turns(req.messages)
    assert turns == [{"role": "system", "content": "terse"}, {"role": "user", "content": "look"}] and image == b"hi"
    two = parse(ChatCompletionRequest, {"model": "lyra", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "image_url", "image_url": {"url": url}}]}]})
    with pytest.raises(GatewayError, match="one image"):
        to_turns(two.messages)


def test_models_sizes_and_statuses() -> None:
    assert resolve_model("lyra", ["a"]) is None and resolve_model("lyra/a", ["a"]) == "a"
    with pytest.raises(GatewayError) as err:
        resolve_model("lyra/b", ["a"])
    assert err.value.status == 404
    assert image_size("64x32") == {"width": 64, "height": 32} and image_size("auto") == {}
    with pytest.raises(GatewayError):
        image_size("huge")
    assert from_lyra(BusyError("busy", code="busy"), 2.5).headers() == {"Retry-After": "3"}
    assert from_lyra(DeadlineError("late", code="deadline")).status == 504
    assert from_lyra(WorkerDeadError("gone", code="worker_dead")).status == 503


def test_a_public_bind_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(GatewayConfigError, match="not loopback"):
        api_key(GatewaySettings(host="0.0.0.0"), "x.toml")
    monkeypatch.delenv("LYRA_K", raising=False)
    with pytest.raises(GatewayConfigError, match="LYRA_K"):
        api_key(GatewaySettings(host="0.0.0.0", api_key_env="LYRA_K"), "x.toml")
    monkeypatch.setenv("LYRA_K", "secret")
    assert api_key(GatewaySettings(host="0.0.0.0", api_key_env="LYRA_K"), "x.toml") == "secret"
    assert api_key(GatewaySettings(), "x.toml") is None
