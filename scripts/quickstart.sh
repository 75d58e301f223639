#!/usr/bin/env bash
# quickstart.sh - README command (a): install, start the local Slurm cluster, and look at it with hpcserve.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# shellcheck disable=SC1091
source "${PREFIX:-/tmp/hpcserve-mc}/env.sh"
export HPCSERVE_SITE=$PWD/site_configs/minicluster.yaml HPCSERVE_POLICY=$PWD/policies/default.yaml
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

# Serving, as at a site: the service (root here; at a site the hpcserve account under systemd) owns the
# database and answers users on its API socket; the gateway reads keys and routes from the same database.
# alice, a normal Unix user, serves a model and makes an API key through the API: her replicas run as her,
# charged to her Slurm account. The model runs on hpcserve's engine SIMULATOR (a stand-in for vLLM, which
# needs GPUs). Logs and pids are in $demo.
demo=${PREFIX:-/tmp/hpcserve-mc}/quickstart
mkdir -p "$demo"
for pid in "$demo"/*.pid; do [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null; rm -f "$pid"; done
sock=$demo/api.sock
export HPCSERVE_DATABASE_URL="sqlite:///$demo/state/hpcserve.db" HPCSERVE_SOCKET=$sock
rm -rf "$demo/state"
.venv/bin/hpcserve db upgrade >/dev/null
nohup .venv/bin/hpcserve service --metrics-port 0 >"$demo/service.log" 2>&1 &
echo $! > "$demo/service.pid"
nohup .venv/bin/hpcserve gateway --port 8000 --metrics-listen off >"$demo/gateway.log" 2>&1 &
echo $! > "$demo/gateway.pid"
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.2; done
echo; echo "== hpcserve doctor (Slurm, accounting, the config, the service's API, the database)"
.venv/bin/hpcserve doctor
# A user's shell: the site config and the service's socket, never the database.
as() { local who=$1; shift; runuser -u "$who" -- env -u HPCSERVE_DATABASE_URL "$PWD/.venv/bin/hpcserve" "$@"; }
echo; echo "== alice: hpcserve serve demo-llm --engine simulator --min-replicas 1 --max-replicas 3 --wait"
as alice serve demo-llm --engine simulator --gpus-per-replica 1 --min-replicas 1 --max-replicas 3 \
  --scale-down-window 60 --wait --timeout 120
echo; echo "== alice: hpcserve keys create --name demo (shown once; the service keeps a salted hash)"
key=$(as alice keys create --name demo --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["key"])')
echo "${key:0:16}..."
sleep 3  # the gateway re-reads keys every 2 s
echo; echo "== traffic through the gateway (http://127.0.0.1:8000/v1) with alice's key"
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
echo; echo "== alice: hpcserve deployments"; as alice deployments
echo; echo "== sacct: the replica ran as alice, charged to her account"
sacct -X -n -P -u alice -o JobID,JobName,User,Account,State --starttime now-1hour | grep demo-llm | tail -3
echo; echo "== bob: hpcserve scale demo-llm 0 (not his: refused)"
as bob scale demo-llm 0 || echo "(exit $?)"
cat <<MSG

The cluster, the service and the gateway keep running. To use hpcserve yourself (as any user):
  source ${PREFIX:-/tmp/hpcserve-mc}/env.sh; source .venv/bin/activate
  export HPCSERVE_SITE=$HPCSERVE_SITE HPCSERVE_POLICY=$HPCSERVE_POLICY HPCSERVE_SOCKET=$sock
  hpcserve --help
Serving: the gateway is at http://127.0.0.1:8000/v1 (alice's API key: $key); the service's API is on $sock.
As alice (runuser -u alice -- ...): hpcserve deployments; hpcserve scale demo-llm 2; hpcserve logs demo-llm;
hpcserve share demo-llm bob; hpcserve rm demo-llm
Stop them with: kill \$(cat $demo/*.pid); the cluster with: scripts/minicluster.sh stop
MSG
