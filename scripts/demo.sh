#!/usr/bin/env bash
# Set up (if needed) and run the scripted demo on the embedded default model (CPU, no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lyra demo "$@"
