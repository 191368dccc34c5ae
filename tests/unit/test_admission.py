"""Admission of a chat request's options against the models that may serve it (no sockets)."""

from __future__ import annotations

import math
from pathlib import Path

import msgpack
import pytest

from services.coordinator.admission import option_problem, reachable
from shared.config.schema import parse_config
from shared.wire import transport
from shared.wire.messages import ChatRequest, ErrorCode, GenerationOptions
from tests.stackproc import fake_config


@pytest.fixture
def config(tmp_path: Path):
    return parse_config(fake_config(tmp_path, voice__max_context=2048, specialists__pragmatist__max_context=1024,
                                    specialists__artist={"backend": "fake", "kind": "image_generation",
                                                         "routable": False, "image": {"max_side": 1024}},
                                    routing={"image_specialist": "artist"}))


def test_the_request_reaches_the_forced_the_image_rules_or_the_routable_specialists(config) -> None:
    assert reachable(config, ChatRequest(text="x", specialist="artist")) == ["artist"]
    assert reachable(config, ChatRequest(text="x", image=b"png")) == ["artist"]
    assert reachable(config, ChatRequest(text="x")) == ["pragmatist", "philosopher"]  # the artist is not routable


@pytest.mark.parametrize("request_,problem", [
    (ChatRequest(text="x", options=GenerationOptions(max_new_tokens=1025)), "pragmatist (which the router"),
    (ChatRequest(text="x", specialist="philosopher", options=GenerationOptions(max_new_tokens=2049)),
     "the voice (voice)"),
    (ChatRequest(text="x", specialist="philosopher", options=GenerationOptions(max_new_tokens=2048)), None),
    (ChatRequest(text="x", specialist="artist", options=GenerationOptions(max_new_tokens=2048)), None),
    (ChatRequest(text="x", image=b"png", options=GenerationOptions(height=1025)), "height is 1025 px"),
    (ChatRequest(text="x", options=GenerationOptions(height=1025)), None),  # nothing it reaches draws
    (ChatRequest(text="x", specialist="artist", options=GenerationOptions(steps=51)), "at most 50"),
    (ChatRequest(text="x", sent_at=math.inf), "sent_at"),
])
def test_options_are_bounded_by_the_models_that_may_serve_them(config, request_: ChatRequest,
                                                               problem: str | None) -> None:
    found = option_problem(config, request_)
    assert (found is None) if problem is None else (found is not None and problem in found), found


@pytest.mark.parametrize("options,code", [
    ({"temperature": 1e9}, ErrorCode.invalid_request),
    ({"seed": -5}, ErrorCode.invalid_request),
    ({"top_p": math.nan}, ErrorCode.invalid_request),
    ({"temperature": "hot"}, ErrorCode.bad_message),  # malformed, not merely out of range
    ({"max_tokens": 5}, ErrorCode.bad_message),  # no such option
])
def test_an_option_out_of_its_range_is_an_invalid_request_on_the_wire(options: dict, code: ErrorCode) -> None:
    frame = msgpack.packb({"type": "chat_request", "v": "1.4", "id": "r", "text": "x", "options": options})
    with pytest.raises(transport.WireError) as raised:
        transport.decode(frame)
    assert raised.value.code == code and raised.value.msg_id == "r"
