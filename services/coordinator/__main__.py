"""`python -m services.coordinator`: the coordinator process (never imports torch)."""

from services.coordinator.server import run
from shared.process import config_from_args

if __name__ == "__main__":
    raise SystemExit(run(config_from_args("coordinator")))
