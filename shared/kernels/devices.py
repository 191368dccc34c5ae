"""Where Lyra's Triton kernels run: a CUDA device, or the CPU under Triton's interpreter (the kernel tests)."""

from __future__ import annotations

import os

import torch


def resolve(device: torch.device) -> torch.device:
    """`device` with its index: "cuda" alone is the current CUDA device (kernel verdicts are kept per device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def runs_here(device: torch.device) -> bool:
    """True on CUDA, and on the CPU under Triton's interpreter (TRITON_INTERPRET=1).

    Read at every call, never cached: a process may switch the interpreter on for its kernel tests and off
    again, and a verdict kept from either time would be wrong at the other (kernels decorated under the
    interpreter stay interpreted; a refusal kept from before would refuse the tests).
    """
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
