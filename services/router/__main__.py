"""`python -m services.router`: the router worker process."""

from services.router.handlers import RouterWorker
from shared.runtime.entry import run_worker

if __name__ == "__main__":
    raise SystemExit(run_worker(RouterWorker))
