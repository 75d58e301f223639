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

# Serving: the gateway and the service run in the background (logs and pids in $demo); a model is served
# by replicas of hpcserve's engine SIMULATOR (a stand-in for vLLM, which needs GPUs) as Slurm jobs.
demo=${PREFIX:-/tmp/hpcserve-mc}/quickstart
mkdir -p "$demo"
for pid in "$demo"/*.pid; do [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null; rm -f "$pid"; done
export HPCSERVE_DATABASE_URL="sqlite:///$demo/hpcserve.db"
rm -f "$demo"/hpcserve.db*
key="sk-demo-$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(12))')"
printf 'keys:\n  - id: demo\n    owner: %s\n    sha256: %s\n' "$(id -un)" \
  "$(printf %s "$key" | .venv/bin/hpcserve gateway --hash-key)" > "$demo/keys.yaml"
.venv/bin/hpcserve db upgrade >/dev/null
nohup .venv/bin/hpcserve gateway --port 8000 --keys "$demo/keys.yaml" >"$demo/gateway.log" 2>&1 &
echo $! > "$demo/gateway.pid"
nohup .venv/bin/hpcserve service >"$demo/service.log" 2>&1 &
echo $! > "$demo/service.pid"
echo; echo "== hpcserve serve demo-llm --engine simulator --min-replicas 1 --max-replicas 3 --wait"
.venv/bin/hpcserve serve demo-llm --engine simulator --gpus-per-replica 1 --min-replicas 1 --max-replicas 3 \
  --scale-down-window 60 --wait --timeout 120
echo; echo "== traffic through the gateway (http://127.0.0.1:8000/v1)"
for i in 1 2 3; do
  curl -s http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer $key" \
    -H 'content-type: application/json' \
    -d "{\"model\": \"demo-llm\", \"max_tokens\": 12, \"messages\": [{\"role\": \"user\", \"content\": \"hello $i\"}]}"
  echo
done
echo "-- streamed:"
curl -sN http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer $key" \
  -H 'content-type: application/json' \
  -d '{"model": "demo-llm", "max_tokens": 4, "stream": true, "messages": [{"role": "user", "content": "stream"}]}'
echo; echo "== hpcserve deployments"; .venv/bin/hpcserve deployments
cat <<MSG

The cluster keeps running. To use hpcserve yourself:
  source ${PREFIX:-/tmp/hpcserve-mc}/env.sh; source .venv/bin/activate
  export HPCSERVE_SITE=$HPCSERVE_SITE HPCSERVE_POLICY=$HPCSERVE_POLICY
  hpcserve --help
Serving: the gateway is at http://127.0.0.1:8000/v1 (API key: $key), the service ticks in the
background (logs in $demo). With HPCSERVE_DATABASE_URL=$HPCSERVE_DATABASE_URL:
  hpcserve deployments; hpcserve scale demo-llm 2; hpcserve logs demo-llm; hpcserve rm demo-llm
Stop them with: kill \$(cat $demo/*.pid); the cluster with: scripts/minicluster.sh stop
MSG
