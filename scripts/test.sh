#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest.
# LYRA_TEST_WORKERS: pytest-xdist processes (default 2; 0 runs every test in this one process). Each
# module's tests stay on one worker (--dist loadscope), so a module's shared stack is started once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers=${LYRA_TEST_WORKERS:-2}
parallel=()
[ "$workers" != 0 ] && parallel=(-n "$workers" --dist loadscope)
set +e
.venv/bin/python -m pytest "${parallel[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
