"""Programmatic dependent launch is only asked for on CUDA, and never when LYRA_PDL=0."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from shared.kernels import overlap  # noqa: E402


def test_never_off_cuda() -> None:
    assert not overlap.enabled(torch.device("cpu"))
    assert overlap.options(torch.device("cpu")) == {}


def test_turned_off_by_the_environment_before_any_cuda_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(overlap.ENV, "0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: pytest.fail("CUDA was asked"))
    assert not overlap.enabled(torch.device("cuda", 0))
    assert overlap.options(torch.device("cuda", 0)) == {}
