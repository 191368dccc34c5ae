"""User text that libraries quote in their log records stays out of the logs unless debug_content is on."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from shared.runtime.process import guard_user_text

PROMPT = "draw my secret lighthouse " * 400
QUOTE = ("The following part of your input was truncated because CLIP can only handle sequences up to 77 "
         f"tokens: {PROMPT}")


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def diffusers_log() -> Iterator[tuple[logging.Logger, Captured]]:
    """A logger set up the way diffusers sets up its own (own handler, no propagation)."""
    factory, root_level = logging.getLogRecordFactory(), logging.getLogger().level
    logger, captured = logging.getLogger("diffusers.pipelines.flux.pipeline_flux"), Captured()
    logger.addHandler(captured)
    logger.propagate = False
    try:
        yield logger, captured
    finally:
        logger.removeHandler(captured)
        logger.propagate = True
        logging.setLogRecordFactory(factory)
        logging.getLogger().setLevel(root_level)


def test_a_quoted_prompt_is_replaced_by_its_size(diffusers_log) -> None:
    logger, captured = diffusers_log
    guard_user_text(debug_content=False)
    logger.warning(QUOTE)
    (record,) = captured.records
    assert "secret" not in record.getMessage() and f"{len(PROMPT)} characters of user text omitted" in \
        record.getMessage()
    assert record.levelno == logging.WARNING and record.getMessage().startswith("The following part")


def test_debug_content_keeps_the_quote_at_debug_only(diffusers_log) -> None:
    logger, captured = diffusers_log
    guard_user_text(debug_content=True)
    logging.getLogger().setLevel(logging.INFO)
    logger.warning(QUOTE)
    logging.getLogger().setLevel(logging.DEBUG)
    logger.warning(QUOTE)
    first, second = captured.records
    assert "secret" not in first.getMessage() and first.levelno == logging.WARNING  # the log level is INFO
    assert "secret" in second.getMessage() and second.levelno == logging.DEBUG


def test_other_records_pass_untouched(diffusers_log) -> None:
    logger, captured = diffusers_log
    guard_user_text(debug_content=False)
    logger.warning("loaded %s in %.1f s", "artist", 1.5)
    assert captured.records[0].getMessage() == "loaded artist in 1.5 s"


def test_lyra_up_makes_logs_an_older_stack_left_readable_owner_only(tmp_path) -> None:
    from shared.cli.stack import make_private

    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True, mode=0o755)
    run_dir.chmod(0o755)
    for path in (run_dir / "logs" / "voice.log", run_dir / "logs" / "voice.log.1", run_dir / "supervisord.log"):
        path.write_text("request ids and timings")
        path.chmod(0o644)
    make_private(run_dir)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [run_dir, run_dir / "logs", *(run_dir / "logs").iterdir(),
                                                        run_dir / "supervisord.log"]}
    assert modes == {"run": 0o700, "logs": 0o700, "voice.log": 0o600, "voice.log.1": 0o600,
                     "supervisord.log": 0o600}
