"""What every Lyra process does first: its arguments, its logging, its config, its GPUs (no torch here)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from shared.config.schema import ConfigError, LyraConfig, load_config
from shared.runtime.parent_watch import end_with_parent

log = logging.getLogger(__name__)


def setup_logging(service: str) -> None:
    """One line per record, greppable by service and request id; files this process makes are private."""
    os.umask(0o077)  # sockets, logs and caches it creates: owner only (supervisord sets the same umask)
    level = os.environ.get("LYRA_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )


# Libraries that quote the user's text in their own log records: diffusers warns "The following part of your
# input was truncated because CLIP can only handle sequences up to 77 tokens: <the rest of the prompt>" at
# WARNING, so the specialist host (the artist) wrote nearly whole prompts to its log.
QUOTES_USER_TEXT = ("part of your input was truncated",)
OWN_LOGGERS = ("shared", "services", "__main__")  # ours log ids, sizes and timings; never quoted text


def guard_user_text(debug_content: bool) -> None:
    """Strip user text that libraries quote in log records; with `debug_content` keep it, at DEBUG only."""
    make_record = logging.getLogRecordFactory()

    def guarded(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if record.name.startswith(OWN_LOGGERS) or record.levelno <= logging.DEBUG:
            return record
        message = record.getMessage()
        if not any(marker in message for marker in QUOTES_USER_TEXT):
            return record
        if debug_content and logging.getLogger().isEnabledFor(logging.DEBUG):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return record
        head, _, quoted = message.partition(": ")
        record.msg, record.args = f"{head}: [{len(quoted)} characters of user text omitted]", None
        return record

    logging.setLogRecordFactory(guarded)


EXIT_GRACE_S = 5.0  # beyond runtime.drain_s: how long a service whose supervisor died may take to stop


def config_from_args(service: str, argv: list[str] | None = None) -> LyraConfig:
    """Parse `--config` (default: $LYRA_CONFIG) and load it, exiting with one clear line on error.

    The process ends with its supervisor from here on (see `parent_watch`).
    """
    parser = argparse.ArgumentParser(prog=f"python -m services.{service}")
    parser.add_argument("--config", "-c", default=os.environ.get("LYRA_CONFIG", ""), help="TOML config file")
    args = parser.parse_args(argv)
    setup_logging(service)
    if not args.config:
        parser.error("no config: pass --config or set LYRA_CONFIG")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.critical("%s", exc)
        raise SystemExit(2) from None
    end_with_parent(service, config.runtime.drain_s + EXIT_GRACE_S)
    guard_user_text(config.runtime.debug_content)
    return config


RANK_GPU_ENV = "LYRA_RANK_GPU"  # set for a tensor rank of the voice: its own GPU (services/voice/ranks.py)


def physical_gpus(config: LyraConfig, service: str) -> list[int]:
    """The GPUs this process is pinned to; CUDA_VISIBLE_DEVICES (set by supervisord) wins over the config.

    A tensor rank of the voice sees all of the voice's GPUs, its own first, and is pinned to that one.
    """
    own = os.environ.get(RANK_GPU_ENV, "")
    if own.isdigit():
        return [int(own)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return config.gpus_of(service)
    return [int(x) for x in visible.split(",") if x.strip().isdigit()]


def persistent_compile_cache() -> None:
    """Keep torch.compile's cache (inductor's kernels and autotuning) across reboots, not in /tmp.

    A fused or compiled decode step compiles for 70 s to 3 min the first time and about 16 s with the
    cache (8B tensor ranks on H200s). TORCHINDUCTOR_CACHE_DIR, when set, still decides; an uncreatable
    or read-only folder leaves torch's default. It grows with each model and torch version: delete the
    folder to reclaim the space (the next start compiles again).
    """
    from shared.config.paths import lyra_cache

    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    folder = lyra_cache() / "torchinductor"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only home (some containers): torch's default under /tmp still works
        log.warning("torch.compile's cache stays in its default place: cannot create %s (%s)", folder, exc)
        return
    if os.access(folder, os.W_OK):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    else:
        log.warning("torch.compile's cache stays in its default place: %s is not writable", folder)
