#!/usr/bin/env bash
# test.sh - README command (b): install, start the local Slurm cluster if needed, lint, type-check, run pytest.
# Extra arguments go to pytest. pytest's exit 5 (no tests ran) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# shellcheck disable=SC1091
source "${PREFIX:-/tmp/hpcserve-mc}/env.sh"
.venv/bin/ruff check hpcserve tests scripts/bench
.venv/bin/ruff format --check hpcserve tests scripts/bench
.venv/bin/mypy
.venv/bin/lint-imports --no-cache
if grep -rn --include='*.py' 'shell=True' hpcserve scripts tests | grep -v 'never shell=True'; then
  echo "test.sh: shell=True found" >&2; exit 1
fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "test.sh: pytest ran no tests: that is a failure" >&2; exit 1; fi
exit $rc
