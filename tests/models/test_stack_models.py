"""Tiny real models behind the real stack: coordinator + worker processes, from the client's side (CPU).

Router: tiny Llama. Specialists: pragmatist (tiny Llama), philosopher (tiny Jamba), artist (tiny FLUX),
perception (tiny LLaVA-NeXT). Voice: tiny Gemma 3. All loaded through the production code path.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from shared.client import BadImageError
from shared.models.tiny import flux as tiny_flux
from shared.models.tiny import llava as tiny_llava
from shared.wire.messages import DoneEvent, ImageEvent, RouteEvent, TokenEvent
from tests.gatewayproc import KEY, GatewayProcess, gateway_overrides
from tests.models import tiny
from tests.stackproc import StackProcesses

pytestmark = pytest.mark.models


def llm(path: Path, tokens: int = 8, **extra: object) -> dict:
    return {"backend": "transformers", "path": str(path), "max_context": 256,
            "generation": {"max_new_tokens": tokens, "temperature": 0.0}, **extra}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcesses]:
    root = tmp_path_factory.mktemp("stack-models")
    specialists = {
        "pragmatist": llm(tiny.build_checkpoint("llama", root / "llama", seed=1), description="practical tasks"),
        "philosopher": llm(tiny.build_checkpoint("jamba", root / "jamba"), description="philosophy"),
        "artist": {"kind": "image_generation", "backend": "diffusers",
                   "path": str(tiny_flux.build_checkpoint(root / "flux")), "description": "drawing pictures",
                   "image": {"width": 32, "height": 32, "steps": 2, "max_side": 128}},
        "perception": {"kind": "vision_language", "backend": "transformers",
                       "path": str(tiny_llava.build_checkpoint(root / "llava")), "description": "looking at images",
                       "generation": {"max_new_tokens": 6, "temperature": 0.0}},
    }
    proc = StackProcesses(
        gpus=[], services={}, specialists=specialists, routing={"image_specialist": "perception"},
        router=llm(tiny.build_checkpoint("llama", root / "router", seed=2)),
        voice=llm(tiny.build_checkpoint("gemma3", root / "gemma3"), tokens=10, system_prompt="You are Lyra."),
        runtime__heartbeat_timeout_s=30.0, runtime__heartbeat_interval_s=0.5, weight_cache={"size_gb": 1.0},
        deadlines={"route": 60.0, "load": 120.0, "specialist": 60.0, "voice": 60.0},
        **gateway_overrides(),
    )
    try:
        proc.start_all(timeout_s=180)
        yield proc
    except BaseException:
        print(proc.logs())
        raise
    finally:
        proc.stop()


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def test_router_specialist_and_voice_stream_through_the_stack(stack: StackProcesses) -> None:
    with stack.client(timeout_s=120) as client:
        events = list(client.stream("How do I boil an egg?"))
    route = next(e for e in events if isinstance(e, RouteEvent))
    assert set(route.scores) == {"pragmatist", "philosopher", "artist", "perception"}
    assert abs(sum(route.scores.values()) - 1) < 1e-5 and not route.forced
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.specialist == route.specialist
    spoken = [e.text for e in events if isinstance(e, TokenEvent) and e.stage == "voice"]
    # The streamer emits whole words, so a tiny model's unspaced output can arrive as one piece.
    assert spoken and "".join(spoken) == done.answer


def test_artist_returns_a_png_of_the_requested_size(stack: StackProcesses) -> None:
    with stack.client(timeout_s=120) as client:
        events = list(client.stream("Draw a lighthouse", specialist="artist", width=48, height=32, seed=3))
    image = next(e for e in events if isinstance(e, ImageEvent)).image
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.image == image
    picture = Image.open(io.BytesIO(image.data))
    assert picture.format == "PNG" and picture.size == (48, 32) == (image.width, image.height)
    assert "I drew" in done.specialist_output


def test_an_image_turn_goes_to_perception_and_gets_an_answer(stack: StackProcesses) -> None:
    with stack.client(timeout_s=120) as client:
        done = client.chat("What is shown in this image?", image=png(40, 30))
    assert done.specialist == "perception" and done.route_kind == "image_rule" and not done.forced
    assert done.specialist_output.strip() and done.answer


@pytest.mark.parametrize("data", [b"not an image at all", png(64, 64)[:100]])
def test_bad_images_are_refused_and_the_stack_keeps_serving(stack: StackProcesses, data: bytes) -> None:
    with stack.client(timeout_s=120) as client:
        with pytest.raises(BadImageError):
            client.chat("What is this?", image=data)
        assert client.chat("How do I boil an egg?", specialist="pragmatist").answer


def test_swaps_between_llm_artist_and_perception_reproduce_outputs(stack: StackProcesses) -> None:
    def turn(client, name: str):
        prompt = {"pragmatist": "How do I boil an egg?", "artist": "a red fox", "perception": "What is this?"}[name]
        done = client.chat(prompt, specialist=name, seed=11, image=png(32, 32) if name == "perception" else None)
        return done.specialist_output, done.image.data if done.image else None, done.timings["load"]

    with stack.client(timeout_s=120) as client:
        first = {name: turn(client, name) for name in ("pragmatist", "artist", "perception")}
        again = {name: turn(client, name) for name in ("pragmatist", "artist", "perception")}
        status = client.status()
    for name in first:
        assert again[name][:2] == first[name][:2], name
        assert again[name][2] > 0  # each turn swapped: the resident one was always another
    host = next(s for s in status.services if s.service == "specialist_host")
    assert host.resident == ["perception"]
    assert {"pragmatist", "artist", "perception"} <= set(host.cached)
    # The second round came from the host weight cache, and status says so swap by swap.
    assert status.counters["swaps_from_host_cache"] >= 3
    assert [s.source for s in status.swaps[-3:]] == ["host_cache"] * 3


def test_a_stop_string_from_the_client_ends_the_specialist_reply(stack: StackProcesses) -> None:
    with stack.client(timeout_s=120) as client:
        full = client.chat("How do I boil an egg?", specialist="pragmatist", max_new_tokens=24).specialist_output
        assert len(full) >= 4
        stop = full[len(full) // 2:len(full) // 2 + 2]
        cut = client.chat("How do I boil an egg?", specialist="pragmatist", max_new_tokens=24, stop=[stop])
    assert cut.specialist_output == full[:full.find(stop)]
    status_engines = [s.placement.get("engine") for s in client_status(stack) if s.resident]
    assert "dynamic (CPU)" in status_engines


def client_status(stack: StackProcesses) -> list:
    with stack.client(timeout_s=30) as client:
        return list(client.status().services)


def test_the_gateway_reports_the_voice_models_real_token_counts(stack: StackProcesses) -> None:
    import openai

    gateway = GatewayProcess(stack)
    try:
        client = openai.OpenAI(base_url=f"{gateway.start()}/v1", api_key=KEY, max_retries=0, timeout=120)
        chunks = list(client.chat.completions.create(
            model="lyra/pragmatist", messages=[{"role": "user", "content": "how do I fix a bike"}], max_tokens=5,
            stream=True, stream_options={"include_usage": True}))
        whole = client.chat.completions.create(model="lyra/pragmatist", max_tokens=5,
                                               messages=[{"role": "user", "content": "how do I fix a bike"}])
    finally:
        gateway.stop()
    usage = chunks[-1].usage
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert usage is not None and usage.completion_tokens == 5 and usage.prompt_tokens > 10
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # greedy decoding: the whole answer is the streamed one, with the same counts
    assert whole.choices[0].message.content == text and whole.usage.completion_tokens == 5
    assert whole.usage.prompt_tokens == usage.prompt_tokens and whole.model == "lyra/pragmatist"
