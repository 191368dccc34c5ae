"""Lyra's Triton kernels under Triton's CPU interpreter, as ordinary tests in the normal pytest process.

Triton chooses the interpreter when a function is decorated. Our kernels are decorated on first use, so
TRITON_INTERPRET=1 set before a test's first launch is enough for them; Triton's own library (tl.max,
tl.sum, ...) is decorated when triton.language is first imported, which in a test process has usually
happened already (torch._dynamo imports it), so for each test those functions are swapped for interpreted
ones. The kernels' gates refuse the CPU without the interpreter at every call and never keep that
refusal, so a CPU model test before these does not turn them off; the variable and Triton's library are
restored after each test, so a test after them runs on torch's operations again. On a machine with a CUDA
device they are skipped: they use CPU tensors, and the GPU tests (tests/gpu) run the compiled kernels.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def interpreted(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """TRITON_INTERPRET=1 and an interpreted triton.language for the test; a skip where a CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("interpreter tests on CPU tensors: with a CUDA device, tests/gpu checks the compiled kernels")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpret_triton_language(monkeypatch)
    yield


def interpret_triton_language(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace every compiled-mode function of triton.language by an interpreted one, until the test ends.

    An interpreted kernel cannot call a compiled-mode function ("Cannot call @triton.jit'd outside of the
    scope of a kernel"). One replacement per function, wherever it is found (tl.max is tl.standard.max and
    tensor.max), because the interpreter recognises some of them by identity.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    owners = [module for name, module in list(sys.modules.items()) if name.startswith("triton.language")]
    replacements: dict[int, InterpretedFunction] = {}
    for owner in [*owners, tl.core.tensor]:
        for name, value in list(vars(owner).items()):
            if isinstance(value, JITFunction):
                replacement = replacements.setdefault(id(value), InterpretedFunction(value.fn))
                monkeypatch.setattr(owner, name, replacement)
