#!/usr/bin/env bash
# bootstrap.sh - what both README commands need on a fresh Debian machine (root):
#   a virtualenv in .venv with hpcserve and its test tools, and the local Slurm cluster, started.
# Idempotent; about 30-60 s the first time, a few seconds after that.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -e '.[dev,postgres]'
.venv/bin/python -m compileall -q hpcserve   # as an install would; the CLI's start time counts
bash scripts/minicluster.sh start
