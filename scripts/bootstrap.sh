#!/usr/bin/env bash
# bootstrap.sh - what both README commands need on a fresh Debian machine (root):
#   a virtualenv in .venv with hpcserve and its test tools, and the local Slurm cluster, started.
# Idempotent; about 30-60 s the first time, a few seconds after that. PYTHON=... picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
# The distribution's Python first: Debian builds it with PGO and LTO, and the CLI ran 15-20% faster on it
# than on a default source build (pyenv). Any CPython >= 3.11 works.
pick_python() {
  local c
  for c in ${PYTHON:-} /usr/bin/python3 python3; do
    "$c" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null && { echo "$c"; return; }
  done
  echo "bootstrap: no Python >= 3.11 found (set PYTHON=...)" >&2; exit 1
}
if [ ! -x .venv/bin/python ]; then
  py=$(pick_python)
  if ! "$py" -m venv .venv 2>/dev/null; then   # Debian splits venv support out of the interpreter
    rm -rf .venv
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    "$py" -m venv .venv
  fi
  .venv/bin/python -m pip install -q --upgrade pip
fi
# strict editable mode: a link tree under build/ on a plain path entry. The default mode installs an import
# hook that every Python start in the venv pays for (~15-30 ms here); an edit shows at once, a new module
# after the next run of this script.
# torch 2.13.0 first: it is the CPU build on this machine's disk; the `train` extra's range then adds nothing
# (a bare `torch` requirement would fetch a CUDA build of several GB).
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev,postgres,train,plot,nvml]' --config-settings editable_mode=strict
# systemd-analyze checks the site install's unit files and visudo its sudoers rule (tests/test_site_install.py);
# no systemd needs to run
if ! command -v systemd-analyze >/dev/null || ! command -v visudo >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd sudo >/dev/null
fi
# prometheus/promtool check the monitoring config and its queries (tests/test_monitoring*.py); chromium renders
# `hpcserve report` headless (tests/test_report*.py)
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || ! command -v chromium >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus chromium fonts-dejavu-core >/dev/null
  systemctl disable --now prometheus >/dev/null 2>&1 || true  # the tests start their own, on loopback
fi
bash scripts/minicluster.sh start
# The multi-user tests and the quickstart run this checkout's hpcserve as real users (alice, bob, carol): every
# folder above it must be enterable, and the checkout readable, by them (a clone under /root is not).
d=$PWD
while [ "$d" != / ]; do
  [ "$(stat -c %A "$d" | cut -c10)" = x ] || { chmod o+x "$d"; echo "bootstrap: chmod o+x $d (for the test users)"; }
  d=$(dirname "$d")
done
runuser -u nobody -- test -x .venv/bin/python -a -r hpcserve/__init__.py ||
  echo "bootstrap: warning: other users cannot run $PWD/.venv/bin/python (the multi-user tests will fail)" >&2
