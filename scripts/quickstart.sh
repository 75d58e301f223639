#!/usr/bin/env bash
# quickstart.sh - README command (a): install, start the local Slurm cluster, and look at it with hpcserve.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# shellcheck disable=SC1091
source "${PREFIX:-/tmp/hpcserve-mc}/env.sh"
export HPCSERVE_SITE=$PWD/site_configs/minicluster.yaml HPCSERVE_POLICY=$PWD/policies/default.yaml
echo; echo "== hpcserve doctor"; .venv/bin/hpcserve doctor
echo; echo "== hpcserve nodes"; .venv/bin/hpcserve nodes
echo; echo "== hpcserve templates"; .venv/bin/hpcserve templates

# A real 2-node torch job (gloo on CPU here): hpcserve picks two nodes under one leaf switch and exports
# that fabric's NCCL settings into the script.
out=${PREFIX:-/tmp/hpcserve-mc}/jobs/quickstart
mkdir -p "$out"
echo; echo "== hpcserve submit train-torchrun -N 2 --set STEPS=3"
# PATH: the job's python3 is the venv's (sbatch exports the caller's environment)
job=$(PATH="$PWD/.venv/bin:$PATH" .venv/bin/hpcserve submit train-torchrun -N 2 --set STEPS=3 \
      --set STEP_SECONDS=0 -t 10 -o "$out/%j.out" --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
echo "submitted job $job; waiting for it"
for _ in $(seq 120); do
  state=$(sacct -n -X -P -j "$job" -o State 2>/dev/null | head -1)
  case "$state" in COMPLETED|FAILED|CANCELLED*|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) break ;; esac
  sleep 1
done
echo "job $job: ${state:-unknown}"
grep -E '^(hpcserve:|rank=[0-9] (host|step=3)|rank [0-9] done)' "$out/$job.out" || cat "$out/$job.out"
echo; echo "== hpcserve ps"; .venv/bin/hpcserve ps
cat <<MSG

The cluster keeps running. To use hpcserve yourself:
  source ${PREFIX:-/tmp/hpcserve-mc}/env.sh; source .venv/bin/activate
  export HPCSERVE_SITE=$HPCSERVE_SITE HPCSERVE_POLICY=$HPCSERVE_POLICY
  hpcserve --help
Stop it with: scripts/minicluster.sh stop
MSG
