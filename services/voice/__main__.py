"""`python -m services.voice`: the voice worker process (rank 0 of a tensor-parallel voice)."""

import logging
import os
import sys

from services.voice import ranks
from services.voice.handlers import VoiceWorker
from shared.runtime.entry import run_worker

if __name__ == "__main__":
    ranks.pin_rank0_to_its_gpu(sys.argv[1:])
    code = run_worker(VoiceWorker)
    if ranks.started():  # no interpreter teardown: process groups would wait on followers that die with us
        logging.shutdown()
        os._exit(code)
    raise SystemExit(code)
