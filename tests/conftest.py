"""Shared fixtures: a stack of real processes per test, logs dumped when a test fails."""

from __future__ import annotations

import os

# One torch (OpenMP) thread per process, set before anything imports torch; the worker processes the tests
# start inherit it. The tests' models are tiny, so a second thread buys little, and with two threads every
# small op waits at a barrier for both cores: when anything else runs (a tensor rank beside rank 0, a stack's
# workers, another job on the machine) a thread loses its core for a whole time slice at each op. On the
# 2-core VM, test_hf_causal + test_decode took 62-73 s with two threads under such load and 6-7 s with one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
from collections.abc import Iterator

import pytest

from tests.stackproc import StackProcesses


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def make_stack(request: pytest.FixtureRequest) -> Iterator:
    """Factory: `make_stack(**overrides)` starts coordinator + fake workers and returns the handle."""
    stacks: list[StackProcesses] = []

    def factory(start: bool = True, **overrides) -> StackProcesses:
        stack = StackProcesses(**overrides)
        stacks.append(stack)
        if start:
            stack.start_all()
        return stack

    try:
        yield factory
    finally:
        failed = getattr(request.node, "rep_call", None)
        for stack in stacks:
            if failed is not None and failed.failed:
                print(f"\n----- service logs for {request.node.name}\n{stack.logs()}")
            stack.stop()


@pytest.fixture(autouse=True)
def _private_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never touch the user's ~/.local/state/lyra record."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    monkeypatch.delenv("LYRA_ENDPOINT", raising=False)
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
