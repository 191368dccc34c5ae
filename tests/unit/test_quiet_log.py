"""Refusal logging under a flood: a line a second per kind, every refusal counted."""

from __future__ import annotations

import logging

from services.coordinator.intake import QuietLog


def test_each_kind_logs_once_a_second_and_flush_tells_the_rest(caplog) -> None:
    now = [0.0]
    quiet = QuietLog(logging.getLogger("test.quiet"), clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.quiet"):
        for _ in range(500):
            quiet.warning("registration as %s refused: no stack secret", "voice", key="voice no")
        quiet.warning("registration as %s refused: wrong stack secret", "voice", key="voice wrong")  # its own kind
        quiet.flush()  # the second is not over: nothing yet
        assert [r.getMessage() for r in caplog.records] == ["registration as voice refused: no stack secret",
                                                           "registration as voice refused: wrong stack secret"]
        now[0] = 1.0
        quiet.flush()
        quiet.flush()  # told once
        now[0] = 2.5
        quiet.warning("registration as %s refused: no stack secret", "voice", key="voice no")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[2] == "499 more refusals like this within 1s were not logged (the last: registration as voice " \
                       "refused: no stack secret)"
    assert lines[3:] == ["registration as voice refused: no stack secret"] and len(lines) == 4
