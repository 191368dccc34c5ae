"""GPU tests: skipped where no CUDA device is visible (CI never has one)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


# The tiny checkpoints the model tests build, for the GPU tests that load them on a card.
from tests.models.conftest import tiny_checkpoints  # noqa: E402, F401
