"""Host weight cache: size bound, LRU eviction, one copy per model, exact round trips (CPU)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from services.specialist_host.weight_cache import HostWeightCache, pack  # noqa: E402


def tied_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 50, bias=False))
    model[3].weight = model[0].weight  # tied, as in language models
    model.register_buffer("scale", torch.tensor([2.0]))
    return model


def run(model: nn.Module) -> torch.Tensor:
    return model(torch.arange(8)) * model.scale


def test_pack_round_trip_is_exact_and_keeps_tied_weights_tied() -> None:
    model = tied_model(0)
    before = run(model).detach().clone()
    copy = pack({"m": model}, pin=False)
    assert copy.nbytes >= sum(p.numel() * 4 for p in model.parameters())  # tied weight stored once
    copy.to_host()
    copy.to_device(torch.device("cpu"))
    assert torch.equal(run(model), before)
    assert model[3].weight is model[0].weight
    assert model[0].weight.data_ptr() == model[3].weight.data_ptr()


def test_cache_honours_its_size_and_evicts_least_recently_used() -> None:
    one = pack({"m": tied_model(0)}, pin=False).nbytes
    cache = HostWeightCache(capacity_bytes=int(one * 2.5), pin=False)
    models = {name: tied_model(i) for i, name in enumerate("abc")}
    assert cache.admit("a", {"m": models["a"]})[1] == []
    assert cache.admit("b", {"m": models["b"]})[1] == []
    cache.touch("a")  # b is now the least recently used
    copy, evicted = cache.admit("c", {"m": models["c"]})
    assert copy is not None and evicted == ["b"]
    assert list(cache.sizes()) == ["a", "c"] and cache.used() <= cache.capacity


def test_cache_never_holds_two_copies_of_one_model() -> None:
    cache = HostWeightCache(capacity_bytes=10**8, pin=False)
    model = tied_model(1)
    first, _ = cache.admit("a", {"m": model})
    again, _ = cache.admit("a", {"m": model})
    assert first is again and list(cache.sizes()) == ["a"] and cache.used() == first.nbytes


def test_a_model_larger_than_the_cache_is_not_cached() -> None:
    cache = HostWeightCache(capacity_bytes=100, pin=False)
    copy, evicted = cache.admit("big", {"m": tied_model(2)})
    assert copy is None and evicted == [] and cache.used() == 0
