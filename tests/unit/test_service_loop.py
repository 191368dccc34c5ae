"""The worker loop's threads: resident models load on the thread that later serves the calls."""

from __future__ import annotations

import threading

import pytest

from shared.backends.base import LoadContext
from shared.config import parse_config
from shared.service import ServiceLoop, Worker
from tests.stackproc import fake_config


class Recording(Worker):
    """A router-named worker that records where its startup runs, then asks the loop to stop."""

    service = "router"

    def __init__(self, context: LoadContext, fail: bool = False) -> None:
        super().__init__(context)
        self.fail = fail
        self.loop: ServiceLoop | None = None
        self.started_on: str | None = None

    def startup(self) -> None:
        self.started_on = threading.current_thread().name
        if self.fail:
            raise RuntimeError("the checkpoint is unreadable")
        assert self.loop is not None
        self.loop.stopping.set()  # nothing to serve: the loop drains at once and run() returns

    def handlers(self) -> dict:
        return {}

    def capabilities(self) -> list[str]:
        return []

    def resident(self) -> list[str]:
        return []

    def estimates(self) -> dict[str, dict[str, int]]:
        return {}


def loop_for(tmp_path, fail: bool = False) -> tuple[Recording, ServiceLoop]:
    config = parse_config(fake_config(tmp_path))
    worker = Recording(LoadContext(service="router", physical_gpus=[], config=config), fail)
    worker.loop = ServiceLoop(worker, config)
    return worker, worker.loop


def test_startup_runs_on_the_job_thread_that_serves_calls(tmp_path) -> None:
    worker, loop = loop_for(tmp_path)
    assert loop.run() == 0
    assert worker.started_on == "job"  # CUDA libraries' per-thread handles are made once, at load


def test_a_failed_startup_raises_in_the_main_thread(tmp_path) -> None:
    worker, loop = loop_for(tmp_path, fail=True)
    with pytest.raises(RuntimeError, match="unreadable"):
        loop.run()
    assert worker.started_on == "job"
