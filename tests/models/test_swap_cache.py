"""Swaps through the specialist host's own handlers: fresh load vs swap from the host weight cache (CPU).

For an LLM, a FLUX pipeline and a LLaVA-NeXT model, the output after A -> B -> A swaps from the cache equals
the output after a fresh load (greedy decoding, fixed seed), and parking really drops the device copy.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from services.specialist_host.handlers import SpecialistHost
from shared.config.schema import parse_config
from shared.config.units import GB
from shared.models.base import LoadContext
from shared.models.tiny import flux as tiny_flux
from shared.models.tiny import llava as tiny_llava
from shared.wire.messages import (
    ChatTurn,
    GenerationOptions,
    LoadRequest,
    RunSpecialistRequest,
    SpecialistReply,
    UnloadRequest,
)
from tests.models import tiny

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("swap-cache")
    return {"pragmatist": tiny.build_checkpoint("llama", root / "llama", seed=3),
            "artist": tiny_flux.build_checkpoint(root / "flux"),
            "perception": tiny_llava.build_checkpoint(root / "llava")}


def host(checkpoints: dict[str, Path], cache_gb: float) -> SpecialistHost:
    specialists = {
        "pragmatist": {"backend": "transformers", "path": str(checkpoints["pragmatist"]), "max_context": 256,
                       "generation": {"max_new_tokens": 12, "temperature": 0.0}},
        "artist": {"kind": "image_generation", "backend": "diffusers", "path": str(checkpoints["artist"]),
                   "image": {"width": 32, "height": 32, "steps": 2}},
        "perception": {"kind": "vision_language", "backend": "transformers", "path": str(checkpoints["perception"]),
                       "generation": {"max_new_tokens": 8, "temperature": 0.0}},
    }
    config = parse_config({"router": {}, "voice": {}, "specialists": specialists,
                           "weight_cache": {"size_gb": cache_gb}})
    return SpecialistHost(LoadContext(service="specialist_host", physical_gpus=[], config=config))


def drive(handler, msg):
    items = list(handler(msg, threading.Event()))
    return items[-1]


def run(h: SpecialistHost, name: str, image: bytes | None) -> SpecialistReply:
    prompt = {"pragmatist": "How do I boil an egg?", "artist": "a red lighthouse",
              "perception": "What is shown in this image?"}[name]
    reply = drive(h.run, RunSpecialistRequest(model=name, messages=[ChatTurn(role="user", content=prompt)],
                                              image=image, options=GenerationOptions(seed=5)))
    assert isinstance(reply, SpecialistReply)
    return reply


def swap_to(h: SpecialistHost, name: str) -> None:
    for resident in h.resident():
        drive(h.unload, UnloadRequest(model=resident))
    drive(h.load, LoadRequest(model=name))


def test_outputs_after_cache_swaps_equal_a_fresh_load(checkpoints: dict[str, Path]) -> None:
    picture = tiny_flux_png = None
    fresh_host = host(checkpoints, cache_gb=0)
    fresh = {}
    for name in ("pragmatist", "artist", "perception"):
        swap_to(fresh_host, name)
        reply = run(fresh_host, name, tiny_flux_png if name == "perception" else None)
        if name == "artist":
            tiny_flux_png = picture = reply.image.data
        fresh[name] = (reply.text, reply.image.data if reply.image else None)
    cached = host(checkpoints, cache_gb=1.0)
    order = ["pragmatist", "artist", "perception", "pragmatist", "artist", "perception", "pragmatist"]
    for step, name in enumerate(order):
        swap_to(cached, name)
        reply = run(cached, name, picture if name == "perception" else None)
        assert (reply.text, reply.image.data if reply.image else None) == fresh[name], (step, name)
    assert set(cached.cached()) == {"pragmatist", "artist", "perception"}
    assert set(cached.parked) == {"artist", "perception"} and cached.resident() == ["pragmatist"]


def test_parking_drops_the_device_copy_and_a_small_cache_evicts(checkpoints: dict[str, Path]) -> None:
    h = host(checkpoints, cache_gb=1.0)
    swap_to(h, "pragmatist")
    model = h.loaded["pragmatist"]
    copy = h.cache.touch("pragmatist")
    assert copy is not None and copy.device_buffer is None  # first load: weights as from_pretrained made them
    drive(h.unload, UnloadRequest(model="pragmatist"))
    weight = next(model.torch_modules()["model"].parameters())
    assert copy.host.data_ptr() <= weight.data_ptr() < copy.host.data_ptr() + copy.nbytes  # points at the cache
    drive(h.load, LoadRequest(model="pragmatist"))
    weight = next(model.torch_modules()["model"].parameters())
    assert copy.device_buffer is not None
    assert copy.device_buffer.data_ptr() <= weight.data_ptr() < copy.device_buffer.data_ptr() + copy.nbytes
    # a cache that holds only one model: loading another evicts the parked one, whose model is dropped
    small = host(checkpoints, cache_gb=copy.nbytes * 1.5 / GB)
    swap_to(small, "pragmatist")
    swap_to(small, "perception")
    assert "pragmatist" not in small.parked and list(small.cached()) == ["perception"]
