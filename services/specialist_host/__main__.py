"""`python -m services.specialist_host`: the specialist host worker process."""

from services.specialist_host.handlers import SpecialistHost
from shared.process import run_worker

if __name__ == "__main__":
    raise SystemExit(run_worker(SpecialistHost))
