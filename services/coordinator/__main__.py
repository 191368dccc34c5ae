"""`python -m services.coordinator`: the coordinator process (never imports torch)."""

import logging

from services.coordinator.server import run
from shared.rundir.stack_record import taken
from shared.runtime.process import config_from_args
from shared.wire.names import COORDINATOR

if __name__ == "__main__":
    config = config_from_args(COORDINATOR)
    busy = taken([config.client_endpoint(), config.worker_endpoint()])  # binding an ipc path would steal it
    if busy is not None:
        logging.getLogger("services.coordinator").critical("refusing to start: %s", busy)
        raise SystemExit(2)
    raise SystemExit(run(config))
