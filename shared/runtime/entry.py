"""A model worker process's entry: load the config, build the worker, serve until SIGTERM."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from shared.models.base import LoadContext
from shared.runtime.process import config_from_args, persistent_compile_cache, physical_gpus

if TYPE_CHECKING:
    from shared.runtime.worker_loop import Worker

log = logging.getLogger(__name__)


def run_worker(worker_class: type[Worker], argv: list[str] | None = None) -> int:
    """Load the config, build this process's `worker_class` (its `service` names the process), serve until SIGTERM."""
    from shared.runtime.worker_loop import ServiceLoop

    service = worker_class.service
    config = config_from_args(service, argv)
    persistent_compile_cache()  # before any compile; tensor ranks started by the voice inherit it
    context = LoadContext(service=service, physical_gpus=physical_gpus(config, service), config=config)
    log.info("starting %s (pid %d, GPUs %s, config %s)", service, os.getpid(),
             context.physical_gpus or "none", config.source)
    from shared.runtime.gpu_share import cap_this_process

    cap_this_process(config, service, context.physical_gpus)
    if config.runtime.cpu_threads:  # before the model loads: its first ops size torch's thread pool
        import torch

        torch.set_num_threads(config.runtime.cpu_threads)
        log.info("%s: torch uses %d CPU thread(s) (runtime.cpu_threads)", service, config.runtime.cpu_threads)
    return ServiceLoop(worker_class(context), config).run()
