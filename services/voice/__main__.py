"""`python -m services.voice`: the voice worker process."""

from services.voice.handlers import VoiceWorker
from shared.process import run_worker

if __name__ == "__main__":
    raise SystemExit(run_worker("voice", VoiceWorker))
