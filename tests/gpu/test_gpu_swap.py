"""On CUDA: swaps from the pinned host cache give the same outputs as a fresh load, and free the GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.specialist_host.handlers import SpecialistHost
from shared.config.schema import parse_config
from shared.models.base import LoadContext
from shared.wire.messages import LoadRequest, UnloadRequest
from tests.models.test_swap_cache import checkpoints, drive, run, swap_to  # noqa: F401 - fixture reuse

pytestmark = pytest.mark.gpu


def gpu_host(paths: dict[str, Path], cache_gb: float) -> SpecialistHost:
    specialists = {
        "pragmatist": {"backend": "transformers", "path": str(paths["pragmatist"]), "max_context": 256,
                       "dtype": "float32", "generation": {"max_new_tokens": 12, "temperature": 0.0}},
        "artist": {"kind": "image_generation", "backend": "diffusers", "path": str(paths["artist"]),
                   "dtype": "float32", "image": {"width": 32, "height": 32, "steps": 2}},
        "perception": {"kind": "vision_language", "backend": "transformers", "path": str(paths["perception"]),
                       "dtype": "float32", "generation": {"max_new_tokens": 8, "temperature": 0.0}},
    }
    config = parse_config({"router": {}, "voice": {}, "specialists": specialists,
                           "gpus": [{"index": 0, "budget_gb": 70}], "services": {"specialist_host": {"gpus": [0]}},
                           "weight_cache": {"size_gb": cache_gb}})
    return SpecialistHost(LoadContext(service="specialist_host", physical_gpus=[0], config=config))


def test_cuda_cache_swaps_match_fresh_loads_and_free_memory(checkpoints: dict[str, Path]) -> None:  # noqa: F811
    import torch

    fresh_host, fresh, picture = gpu_host(checkpoints, 0), {}, None
    for name in ("pragmatist", "artist", "perception"):
        swap_to(fresh_host, name)
        reply = run(fresh_host, name, picture if name == "perception" else None)
        picture = reply.image.data if reply.image else picture
        fresh[name] = (reply.text, reply.image.data if reply.image else None)
    swap_to(fresh_host, "pragmatist")
    drive(fresh_host.unload, UnloadRequest(model="pragmatist"))
    cached = gpu_host(checkpoints, 1.0)
    for name in ["pragmatist", "artist", "perception"] * 2:
        swap_to(cached, name)
        reply = run(cached, name, picture if name == "perception" else None)
        assert (reply.text, reply.image.data if reply.image else None) == fresh[name], name
        assert cached.cache.touch(name).host.is_pinned()
    torch.cuda.synchronize()
    before, weights = torch.cuda.memory_allocated(), cached.cache.touch("perception").nbytes
    drive(cached.unload, UnloadRequest(model="perception"))
    torch.cuda.synchronize()
    assert before - torch.cuda.memory_allocated() >= weights  # every weight byte left the GPU
    drive(cached.load, LoadRequest(model="artist"))
    assert torch.cuda.memory_allocated() > 0


@pytest.mark.parametrize("quantization", ["bnb-nf4", "bnb-int8"])
def test_bitsandbytes_models_are_cached_in_quantized_form(checkpoints: dict[str, Path], quantization: str) -> None:  # noqa: F811
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("needs bitsandbytes")
    paths = dict(checkpoints)

    def host(cache_gb: float) -> SpecialistHost:
        specialists = {"pragmatist": {"backend": "transformers", "path": str(paths["pragmatist"]), "dtype": "float16",
                                      "quantization": quantization, "max_context": 256,
                                      "generation": {"max_new_tokens": 12, "temperature": 0.0}},
                       "artist": {"kind": "image_generation", "backend": "diffusers", "path": str(paths["artist"]),
                                  "dtype": "float32", "image": {"width": 32, "height": 32, "steps": 2}}}
        config = parse_config({"router": {}, "voice": {}, "specialists": specialists,
                               "gpus": [{"index": 0, "budget_gb": 70}],
                               "services": {"specialist_host": {"gpus": [0]}}, "weight_cache": {"size_gb": cache_gb}})
        return SpecialistHost(LoadContext(service="specialist_host", physical_gpus=[0], config=config))

    fresh = host(0)
    swap_to(fresh, "pragmatist")
    expected = run(fresh, "pragmatist", None).text
    drive(fresh.unload, UnloadRequest(model="pragmatist"))
    cached = host(1.0)
    swap_to(cached, "pragmatist")
    model = cached.loaded["pragmatist"]
    layer_types = {type(m).__name__ for m in model.torch_modules()["model"].modules()}
    assert layer_types & {"Linear4bit", "Linear8bitLt"}  # really quantized
    assert run(cached, "pragmatist", None).text == expected
    if quantization == "bnb-int8":  # not cacheable: reloads from the checkpoint, still correct
        assert not cached.cache.holds("pragmatist")
        swap_to(cached, "artist")
        swap_to(cached, "pragmatist")
        assert run(cached, "pragmatist", None).text == expected
        return
    for _ in range(2):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        swap_to(cached, "artist")  # parks the quantized model: its device copy goes
        drive(cached.unload, UnloadRequest(model="artist"))
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() < before
        swap_to(cached, "pragmatist")  # back from the cache, no re-quantization
        assert cached.loaded["pragmatist"] is model
        assert run(cached, "pragmatist", None).text == expected
