"""Which specialist the host holds, against live processes: one record, the host's last report, shown the same
way in its service line, in the VRAM ledger and in the swap decisions."""

from __future__ import annotations

import time

import pytest

from shared.client import DeadlineError


def test_a_load_that_finished_after_its_deadline_shows_in_the_ledger_and_is_used(make_stack) -> None:
    """The coordinator gave up on a load; the host finished it anyway and its heartbeats say so."""
    stack = make_stack(deadlines__load=0.8, specialists__philosopher__fake={"load_s": 1.6, "triggers": True})
    with stack.client() as client:
        with pytest.raises(DeadlineError):
            client.chat("meaning of life")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = client.status(timeout_s=2)
            host = next(s for s in status.services if s.service == "specialist_host")
            if host.resident == ["philosopher"]:
                break
            time.sleep(0.05)
        assert host.resident == ["philosopher"], host
        assert "specialist_host:philosopher" in status.gpus[1].resident, status.gpus[1]  # the ledger agrees
        assert status.gpus[1].by_service["specialist_host"]["estimated"] == 25 * 10**9
        done = client.chat("meaning of life")
        assert done.specialist == "philosopher" and done.timings["load"] == 0.0  # no second load
        assert "specialist_host:philosopher" in done.vram[1].resident
        assert client.status().counters["already_resident"] >= 1
