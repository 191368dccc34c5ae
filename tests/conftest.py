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

from tests.stackproc import StackPool, StackProcesses


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


@pytest.fixture(scope="package")
def stack_pool() -> Iterator[StackPool]:
    """The running stacks `shared_stack` hands out, stopped when the test package is done."""
    pool = StackPool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def shared_stack(stack_pool: StackPool, request: pytest.FixtureRequest) -> Iterator:
    """Factory: `shared_stack(**overrides)`, a running, idle stack of that config that earlier tests may have used.

    For tests that leave it as they found it: every process running (a worker they kill, they start again),
    nothing queued or running; they read counters as differences and expect no particular model resident.
    Starting a stack costs about 1.5 s of the 2-core VM, and most integration tests need nothing else from it.
    A test that fails has its stack's logs printed and the stack discarded.
    """
    used: list[StackProcesses] = []

    def factory(**overrides) -> StackProcesses:
        stack = stack_pool.get(**overrides)
        used.append(stack)
        return stack

    yield factory
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for stack in used:
            print(f"\n----- service logs for {request.node.name} (a shared stack)\n{stack.logs()}")
            stack_pool.discard(stack)


@pytest.fixture(autouse=True)
def _private_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never touch the user's ~/.local/state/lyra record."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    monkeypatch.delenv("LYRA_ENDPOINT", raising=False)
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)


# The longest modules start first: on two xdist workers the run ends when its last module does, and a
# minute-long module scheduled last leaves the other core idle (each is on one worker: --dist loadscope).
LONGEST_FIRST = ("tests/models/test_demo.py", "tests/models/test_smollm2.py", "tests/models/test_routing_accuracy.py",
                 "tests/unit/test_plan.py", "tests/models/test_voice_tp_stack.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return next((at for at, path in enumerate(LONGEST_FIRST) if item.nodeid.startswith(path)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: every other test keeps its order
