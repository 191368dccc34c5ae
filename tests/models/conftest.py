"""Fixtures for the model tests: tiny real checkpoints saved to disk and loaded through `hf_causal.load`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.models import hf_causal
from tests.models import tiny


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny checkpoint per architecture, by name ("llama", "gemma3", "jamba")."""
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {arch: tiny.build_checkpoint(arch, root / arch) for arch in tiny.ARCHITECTURES}


@pytest.fixture(scope="session", params=tiny.ARCHITECTURES)
def architecture(request: pytest.FixtureRequest) -> str:
    """Each tiny architecture in turn."""
    return str(request.param)


@pytest.fixture(scope="session")
def tiny_model(architecture: str, tiny_checkpoints: dict[str, Path]) -> Iterator[hf_causal.HfCausalModel]:
    """The tiny checkpoint of `architecture`, loaded on the CPU once per session."""
    loaded = hf_causal.load(tiny.entry(architecture, tiny_checkpoints[architecture]), tiny.cpu_context())
    assert isinstance(loaded, hf_causal.HfCausalModel)
    yield loaded
    loaded.unload()
