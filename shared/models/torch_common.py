"""What the torch backends (hf_causal, hf_vision, diffusers_image) share: dtypes, the CUDA check, freeing memory."""

from __future__ import annotations

import gc

import torch

from shared.config.schema import ModelEntry
from shared.models.base import BackendError, LoadContext

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(entry: ModelEntry, on_gpu: bool) -> torch.dtype:
    """The entry's dtype; "auto" is bfloat16 on a GPU and float32 on the CPU."""
    if entry.dtype != "auto":
        return DTYPES[entry.dtype]
    return torch.bfloat16 if on_gpu else torch.float32


def pinned_gpus(entry: ModelEntry, context: LoadContext) -> list[int]:
    """The physical GPUs this process may use ([] = CPU); an error when it is pinned to GPUs CUDA cannot see."""
    if context.physical_gpus and not torch.cuda.is_available():
        raise BackendError(f"model {entry.name!r}: the {context.service} service is pinned to GPUs "
                           f"{context.physical_gpus} but CUDA is not available here (CPU-only torch or no driver)")
    return list(context.physical_gpus)


def release_memory() -> None:
    """After dropping a model: collect it and hand torch's cached GPU blocks (and cuBLAS workspaces) back."""
    gc.collect()
    if torch.cuda.is_available():
        # cuBLAS keeps a workspace per thread and stream (32 MiB on Hopper) inside torch's allocator;
        # generation threads leave theirs behind. No public API frees them, hence the guarded lookup.
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()
