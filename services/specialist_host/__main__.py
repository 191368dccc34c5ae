"""`python -m services.specialist_host`: the specialist host worker process."""

from services.specialist_host.handlers import SpecialistHost
from shared.runtime.entry import run_worker

if __name__ == "__main__":
    raise SystemExit(run_worker(SpecialistHost))
