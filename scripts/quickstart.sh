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
echo; echo "== hpcserve ps"; .venv/bin/hpcserve ps
cat <<MSG

The cluster keeps running. To use hpcserve yourself:
  source ${PREFIX:-/tmp/hpcserve-mc}/env.sh; source .venv/bin/activate
  export HPCSERVE_SITE=$HPCSERVE_SITE HPCSERVE_POLICY=$HPCSERVE_POLICY
  hpcserve --help
Stop it with: scripts/minicluster.sh stop
MSG
