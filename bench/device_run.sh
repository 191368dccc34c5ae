#!/usr/bin/env bash
# Run GPU benchmarks on a lent GPU machine: installs the carried wheels, then each named benchmark,
# logging to $OUT. Usage: bash bench/device_run.sh image|reference|swap|decode|e2e|gputests ...
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print(\"torch\", torch.__version__, \"transformers\", transformers.__version__)"
for job in "$@"; do
  case "$job" in
    image) python3 bench/gpu_image_models.py --out "$OUT" 2>&1 | tee "$OUT/image.log" ;;
    llava) python3 bench/gpu_image_models.py --only llava --out "$OUT" 2>&1 | tee "$OUT/llava.log" ;;
    reference) python3 bench/gpu_reference.py --out "$OUT" 2>&1 | tee "$OUT/reference.log" ;;
    swap) python3 bench/swap.py --out "$OUT" 2>&1 | tee "$OUT/swap.log" ;;
    overlap) python3 bench/preload_overlap.py --checkpoint /tmp/lyra-swap/8b --out "$OUT" 2>&1 | tail -3 | tee "$OUT/overlap.log" ;;
    tests) python3 -m pytest -q -m gpu tests/gpu 2>&1 | tee "$OUT/gpu-tests.log" ;;
    gputests) timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests > "$OUT/gpu-tests.log" 2>&1; tail -15 "$OUT/gpu-tests.log" ;;
    e2e) timeout 540 python3 bench/e2e.py --out "$OUT" 2>&1 | grep -v "it/s\]" | tee "$OUT/e2e.log" ;;
    decode) timeout 500 python3 bench/decode.py --out "$OUT" 2>&1 | grep -v "it/s\]" | tee "$OUT/decode.log" ;;
  esac
done
