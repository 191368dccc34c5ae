"""`python -m services.voice.rank`: a follower rank of the tensor-parallel voice (started by rank 0 only)."""

from __future__ import annotations

import argparse
import logging
import os

from shared.config.schema import ConfigError, load_config
from shared.runtime.process import guard_user_text, setup_logging
from shared.wire.names import VOICE

log = logging.getLogger("services.voice.rank")


def main(argv: list[str] | None = None) -> int:
    """Join rank 0's group, load this rank's share of the voice, then replay what rank 0 commands."""
    parser = argparse.ArgumentParser(prog="python -m services.voice.rank")
    parser.add_argument("--config", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--store", required=True, help="host:port of rank 0's rendezvous store")
    args = parser.parse_args(argv)
    setup_logging(f"voice.rank{args.rank}")
    from services.voice import ranks

    ranks.die_with_parent()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.critical("%s", exc)
        return 2
    guard_user_text(config.runtime.debug_content)
    from torch.distributed import TCPStore

    from shared.distributed.rank_runner import follow, join
    from shared.distributed.tensor_parallel import load_voice_rank
    from shared.runtime.gpu_share import cap_this_process
    from shared.runtime.process import persistent_compile_cache, physical_gpus

    persistent_compile_cache()

    gpus = physical_gpus(config, VOICE)  # this rank's own GPU (it sees the voice's others too)
    cap_this_process(config, VOICE, gpus)
    host, port = args.store.rsplit(":", 1)
    store = TCPStore(host, int(port), args.world, is_master=False, timeout=ranks.STORE_TIMEOUT)
    group = join(args.rank, args.world, ranks.rank_device(gpus), store)
    model = load_voice_rank(config.voice, gpus[0] if gpus else None, group)
    ranks.publish_memory(args.store, args.rank, model.memory, config.runtime.heartbeat_interval_s)
    log.info("rank %d of %d ready (pid %d, %s)", args.rank, args.world, os.getpid(), model.placement())
    assert model.engine is not None and model.engine.runner is not None
    follow(model.engine.runner, group)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
