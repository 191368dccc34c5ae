"""Memory baselines for GPU tests that share one process and one card with the tests before them."""

from __future__ import annotations

import gc


def settle() -> None:
    """Leave the current GPU as an unload leaves it, so that a baseline read now is this test's own.

    An earlier test may leave a model that only the garbage collector frees, cuBLAS workspaces, or blocks
    its last empty_cache() did not see: an unload in this test would free them too (release_memory: gc,
    workspaces, empty_cache) and move any figure measured against a baseline read before.
    """
    import torch

    from shared.models.torch_common import release_memory

    gc.collect()
    torch.cuda.synchronize()
    release_memory()
    torch.cuda.synchronize()
