"""On CUDA: Lyra's int8 and int4 decode in a CUDA graph under the default engine, and swap through the host cache.

The checkpoint is the wide tiny Llama (128 columns: int4 rounds whole groups of 128), loaded through the
specialist host's own handlers, so the load, the engine and the cache are the production ones.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from services.specialist_host.handlers import SpecialistHost
from shared.config.schema import parse_config
from shared.engine.quantized_linear import QuantizedLinear
from shared.models.base import LoadContext
from shared.wire.messages import ChatTurn, GenerationOptions, LoadRequest, RunSpecialistRequest, UnloadRequest
from tests.models import tiny

pytestmark = [pytest.mark.gpu, pytest.mark.models]


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_wide_llama(tmp_path_factory.mktemp("wide-llama"))


def host(path: Path, form: str, cache_gb: float, engine: str = "auto") -> SpecialistHost:
    specialists = {
        "pragmatist": {"backend": "transformers", "path": str(path), "dtype": "bfloat16", "quantization": form,
                       "engine": engine, "max_context": 256, "generation": {"max_new_tokens": 12, "temperature": 0.0}},
        "philosopher": {"backend": "transformers", "path": str(path), "dtype": "bfloat16", "max_context": 256,
                        "generation": {"max_new_tokens": 12, "temperature": 0.0}},
    }
    config = parse_config({"router": {}, "voice": {}, "specialists": specialists,
                           "gpus": [{"index": 0, "budget_gb": 70}], "services": {"specialist_host": {"gpus": [0]}},
                           "weight_cache": {"size_gb": cache_gb}})
    return SpecialistHost(LoadContext(service="specialist_host", physical_gpus=[0], config=config))


def answer(h: SpecialistHost, name: str) -> str:
    for resident in h.resident():
        list(h.unload(UnloadRequest(model=resident), threading.Event()))
    list(h.load(LoadRequest(model=name), threading.Event()))
    request = RunSpecialistRequest(model=name, messages=[ChatTurn(role="user", content="How do I boil an egg?")],
                                   options=GenerationOptions(seed=5))
    return list(h.run(request, threading.Event()))[-1].text


@pytest.mark.parametrize("form", ["int8", "int4"])
def test_the_default_engine_captures_lyra_forms_in_a_graph_and_says_why_not_fused(wide_llama: Path,
                                                                                  form: str) -> None:
    graphs = host(wide_llama, form, 0)
    text = answer(graphs, "pragmatist")
    engine = graphs.loaded["pragmatist"].engine_kind()
    assert engine.startswith("graphs") and f"quantized projections (Lyra {form})" in engine, engine
    model = graphs.loaded["pragmatist"].torch_modules()["model"]
    assert all(m.packed.is_cuda for m in model.modules() if isinstance(m, QuantizedLinear))
    assert answer(host(wide_llama, form, 0, engine="eager"), "pragmatist") == text  # the same kernels, uncaptured


@pytest.mark.parametrize("form", ["int8", "int4"])
def test_lyra_forms_swap_through_the_host_cache_packed_and_free_the_gpu(wide_llama: Path, form: str) -> None:
    import torch

    expected = answer(host(wide_llama, form, 0), "pragmatist")
    cached = host(wide_llama, form, 1.0)
    assert answer(cached, "pragmatist") == expected
    model = cached.loaded["pragmatist"]
    for _ in range(2):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        answer(cached, "philosopher")  # parks the quantized model: its device copy goes
        list(cached.unload(UnloadRequest(model="philosopher"), threading.Event()))
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() < before
        assert answer(cached, "pragmatist") == expected  # back from the cache: the same modules, re-captured
        assert cached.loaded["pragmatist"] is model
