#!/usr/bin/env bash
# minicluster.sh start|stop|status|partitions - a real Slurm 22.05 cluster on one Debian machine (root, no systemd).
#
# Layout (see README.md, "The local cluster"):
#   head (root namespace): munged, MariaDB (own datadir), slurmdbd, slurmctld
#   node1..node8: each its own network namespace (veth on bridge mcbr0) and UTS namespace, one slurmd each
#   GPUs: 4 fake char devices per node as GRES (File=), so Slurm sets CUDA_VISIBLE_DEVICES for real
#   shards: the infer half's GPUs are also cut into gres/shard (4 per GPU: node Gres=gpu:l40s:4,shard:16), so
#     several jobs share one GPU (--gres=shard:N; hpcserve's gpu_fraction); a GPU in use as shards is not
#     given out whole, and the other way round
#   topology/tree: leaf1=node[1-4] (ib), leaf2=node[5-8] (roce), spine above both
#   partitions: train=node[1-4] (default), infer=node[5-8], all=node[1-8] (low tier, preemptible)
#
# start is idempotent and waits until every node is exactly "idle" (or busy with jobs, if it was up); stop ends only what start started
# (pid files in $PREFIX/run/owned, checked against /proc/PID/comm). Knobs (environment):
#   PREFIX (/tmp/hpcserve-mc)  NNODES (8)  GPUS_PER_NODE (4)  CPUS_PER_NODE (8)  MEM_PER_NODE (16000)
#   RESET=1 (wipe controller state, accounting DB and job folders first)  WAIT_TIMEOUT (120)  PURGE=1 (stop: rm PREFIX)
#   SHARD_NODES (the infer half, "5-8" of 8: first-last node numbers, or "" for none)  SHARDS_PER_GPU (4)
#   TEST_USERS ("alice bob carol"): real Unix users made if missing, each registered in slurmdbd with a Slurm
#   account of its own (acct-USER) as default, so sacct shows who ran what and who paid. Group hpcadmin (carol is
#   in it) and the service account hpcserve (a system user) are made too.
#   LENDING (moves): moves = train and infer on their own halves, as above (hpcserve moves nodes); overlap = both
#   span the middle nodes (train=node[1-6], infer=node[3-8] at PriorityTier 20 over train's 10, train requeued
#   by preempt/partition_prio after GRACE_TIME (120) s); see lending: in site_configs/minicluster.yaml. On a
#   running cluster, `minicluster.sh lending moves|overlap` rewrites the partition lines and runs
#   `scontrol reconfigure` (jobs keep running; PreemptType and PreemptMode are the same in both layouts).
set -euo pipefail

PREFIX=${PREFIX:-/tmp/hpcserve-mc}
NNODES=${NNODES:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
CPUS_PER_NODE=${CPUS_PER_NODE:-8}
MEM_PER_NODE=${MEM_PER_NODE:-16000}
CLUSTER=${CLUSTER:-hpcmini}
ACCOUNT=${ACCOUNT:-hpcserve}
SUBNET=${SUBNET:-10.213.0}
BR=mcbr0
NS_PREFIX=mc-
DB_PORT=${DB_PORT:-3307}
CTLD_PORT=6817 SLURMD_PORT=6818 DBD_PORT=6819
WAIT_TIMEOUT=${WAIT_TIMEOUT:-120}
RESET=${RESET:-0}
PURGE=${PURGE:-0}
TEST_USERS=${TEST_USERS-alice bob carol}
ADMIN_GROUP=${ADMIN_GROUP:-hpcadmin}
SERVICE_USER=${SERVICE_USER:-hpcserve}
LENDING=${LENDING:-moves}
GRACE_TIME=${GRACE_TIME:-120}
SHARDS_PER_GPU=${SHARDS_PER_GPU:-4}
DB_PASS=hpcserve-slurmdb
ETC=$PREFIX/etc RUN=$PREFIX/run LOG=$PREFIX/log OWN=$PREFIX/run/owned DBDIR=$PREFIX/mysql
DBSOCK=$DBDIR/run/mysqld.sock
CTLD_ADDR=$SUBNET.254
export SLURM_CONF=$ETC/slurm.conf
PKGS=(slurmctld slurmd slurm-client slurmdbd libslurm-dev munge mariadb-server iproute2)

T0=$(date +%s.%N)
log() { printf "[%6ss] %s\n" "$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')" "$*"; }
die() { echo "minicluster: ERROR: $*" >&2; exit 1; }

# alive PIDFILE COMM: the recorded pid runs, is not a zombie, and is still the program we started
alive() {
  local p; [ -s "$1" ] || return 1; p=$(cat "$1")
  [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ] && [ "$(cut -d' ' -f3 "/proc/$p/stat" 2>/dev/null)" != Z ]
}
own() { mkdir -p "$OWN"; cp "$2" "$OWN/$1.pid"; }
port_busy() { ss -Hltn "sport = :$1" | grep -q .; }
wait_for() { # wait_for SECONDS CMD...
  local end=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.2; done
}
hl() { [ "$1" = "$2" ] && echo "node$1" || echo "node[$1-$2]"; }   # hostlist of node$1..node$2
half=$(( (NNODES + 1) / 2 ))
SHARD_NODES=${SHARD_NODES-$((half + 1))-$NNODES}
has_shards() { # has_shards I: node I's GPUs are also cut into shards (SHARD_NODES="FIRST-LAST")
  [ -n "$SHARD_NODES" ] && [ "$SHARDS_PER_GPU" -gt 0 ] && [ "$1" -ge "${SHARD_NODES%-*}" ] &&
    [ "$1" -le "${SHARD_NODES#*-}" ]
}

# ------------------------------------------------------------------------------------------------ install
install_packages() {
  local need=0 c
  for c in slurmctld slurmd slurmdbd sbatch munged mariadbd mariadb-install-db ip; do
    command -v "$c" >/dev/null 2>&1 || need=1
  done
  [ -f /usr/include/slurm/slurm.h ] || need=1
  [ $need = 0 ] && return 0
  log "installing ${PKGS[*]}"
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # keep Debian's postinst scripts from starting daemons
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
  [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  log "installed"
}

# ------------------------------------------------------------------------------------------------ state
prepare_dirs() {
  if [ "$RESET" = 1 ]; then
    log "RESET=1: stopping and wiping controller state, accounting DB and job folders"
    do_stop >/dev/null 2>&1 || true
    rm -rf "$PREFIX/state" "$PREFIX/mysql" "$PREFIX/jobs"
  fi
  mkdir -p "$ETC" "$RUN" "$OWN" "$LOG" "$PREFIX/state/ctld" "$PREFIX/state/d" "$PREFIX/jobs" "$PREFIX/dev"
  chmod 1777 "$LOG" "$PREFIX/jobs"
  chown slurm:slurm "$PREFIX/state/ctld"
  # Job ids must not repeat across resets (submitit keys its folders by job id): a fresh state starts
  # at an id taken from the clock, 10,000 ids per minute, kept for the life of the state directory.
  [ -s "$PREFIX/state/first_job_id" ] ||
    echo $(( ($(date +%s) / 60 % 6000) * 10000 + 1000 )) >"$PREFIX/state/first_job_id"
}

start_munge() {
  if alive "$OWN/munged.pid" munged; then return 0; fi
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then log "munge: running (not ours, reused)"; return 0; fi
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge; chmod 0755 /run/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid --force
  wait_for 10 sh -c 'munge -n | unmunge' || die "munged did not come up (see /var/log/munge/munged.log)"
  own munged /run/munge/munged.pid
  log "munge: started pid $(cat /run/munge/munged.pid)"
}

start_mariadb() {
  if alive "$DBDIR/run/mariadbd.pid" mariadbd; then DB_PORT=$(cat "$DBDIR/port"); return 0; fi
  while port_busy "$DB_PORT"; do DB_PORT=$((DB_PORT + 1)); done
  mkdir -p "$DBDIR/data" "$DBDIR/run"; chown -R mysql:mysql "$DBDIR"
  if [ ! -d "$DBDIR/data/mysql" ]; then
    mariadb-install-db --no-defaults --user=mysql --datadir="$DBDIR/data" --skip-test-db \
      --auth-root-authentication-method=normal >"$LOG/mariadb-install.log" 2>&1 ||
      die "mariadb-install-db failed, see $LOG/mariadb-install.log"
  fi
  echo "$DB_PORT" >"$DBDIR/port"
  # innodb_buffer_pool_size >= 1G or slurmdbd complains; allocated lazily
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DBDIR/data" --socket="$DBSOCK" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$DBDIR/run/mariadbd.pid" \
    --log-error="$LOG/mariadbd.log" --innodb-buffer-pool-size=1024M --innodb-lock-wait-timeout=900 \
    --skip-name-resolve </dev/null >/dev/null 2>&1 &
  wait_for 60 mariadb-admin --no-defaults -S "$DBSOCK" -uroot ping || die "mariadbd did not start, see $LOG/mariadbd.log"
  wait_for 10 test -s "$DBDIR/run/mariadbd.pid"
  own mariadbd "$DBDIR/run/mariadbd.pid"
  mariadb --no-defaults -S "$DBSOCK" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    FLUSH PRIVILEGES;"
  log "mariadb: started pid $(cat "$DBDIR/run/mariadbd.pid") on 127.0.0.1:$DB_PORT"
}

# ------------------------------------------------------------------------------------------------ network
setup_network() {
  if ! ip link show "$BR" >/dev/null 2>&1; then ip link add "$BR" type bridge; echo "$BR" >"$OWN/bridge"; fi
  ip addr replace "$CTLD_ADDR/24" dev "$BR"; ip link set "$BR" up
  # safety net: with the bridge gone, packets for the node subnet are refused here, never routed off the machine
  ip route replace unreachable "$SUBNET.0/24" metric 9999 2>/dev/null || true
  local i ns veth
  for i in $(seq 1 "$NNODES"); do
    ns=${NS_PREFIX}node$i veth=mcv$i
    if ! ip netns list | grep -qw "$ns"; then ip netns add "$ns"; echo "$ns" >>"$OWN/netns"; fi
    if ! ip link show "$veth" >/dev/null 2>&1; then
      ip -n "$ns" link del eth0 2>/dev/null || true
      ip link add "$veth" type veth peer name eth0 netns "$ns"
    fi
    ip link set "$veth" master "$BR" up
    ip -n "$ns" addr replace "$SUBNET.$i/24" dev eth0
    ip -n "$ns" link set eth0 up; ip -n "$ns" link set lo up
  done
  sed -i '/^# BEGIN hpcserve-minicluster/,/^# END hpcserve-minicluster/d' /etc/hosts
  {
    echo "# BEGIN hpcserve-minicluster ($PREFIX)"
    for i in $(seq 1 "$NNODES"); do echo "$SUBNET.$i node$i"; done
    echo "# END hpcserve-minicluster"
  } >>/etc/hosts
}

# ------------------------------------------------------------------------------------------------ configs
node_line() { # node_line I
  local i=$1 gt=l40s feat=roce,nvme,l40s gres
  [ "$i" -le $half ] && gt=h100 feat=ib,nvme,h100
  gres=gpu:$gt:$GPUS_PER_NODE
  has_shards "$i" && gres+=",shard:$((GPUS_PER_NODE * SHARDS_PER_GPU))"
  echo "NodeName=node$i NodeHostname=node$i NodeAddr=$SUBNET.$i Sockets=2 CoresPerSocket=$((CPUS_PER_NODE / 2))" \
    "ThreadsPerCore=1 RealMemory=$MEM_PER_NODE Gres=$gres Features=$feat State=UNKNOWN"
}

write_slurm_conf() {
  cat >"$ETC/slurm.conf" <<EOF
# generated by scripts/minicluster.sh - Slurm 22.05
ClusterName=$CLUSTER
SlurmctldHost=$(hostname -s)($CTLD_ADDR)
SlurmUser=slurm
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
# also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=30
CredType=cred/munge
StateSaveLocation=$PREFIX/state/ctld
SlurmdSpoolDir=$PREFIX/state/d/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
PlugStackConfig=$ETC/plugstack.conf
MailProg=/bin/true
MpiDefault=none
# no cgroups on this machine: slurmd must not need them
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
DefMemPerCPU=1024
GresTypes=gpu,shard
TopologyPlugin=topology/tree
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,bf_continue,batch_sched_delay=0
PriorityType=priority/multifactor
EnforcePartLimits=ALL
MaxJobCount=50000
MaxArraySize=100001
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
JobRequeue=1
FirstJobId=$(cat "$PREFIX/state/first_job_id" 2>/dev/null || echo 1000)
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTLD_ADDR
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu,gres/shard
AccountingStorageEnforce=associations
# sacct keeps each job's --comment, where hpcserve's tag lives (hpcserve usage --hpcserve-only, training vs
# inference); a site running hpcserve sets the same
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
EOF
  local i
  for i in $(seq 1 "$NNODES"); do node_line "$i" >>"$ETC/slurm.conf"; done
  partition_lines >>"$ETC/slurm.conf"
}

# partition_lines: LENDING=moves (default) gives train and infer their own halves (hpcserve moves nodes between
# them); LENDING=overlap makes both span the middle nodes (node[3-6] of 8) with infer one PriorityTier above, so
# Slurm's preempt/partition_prio requeues training there after GraceTime=$GRACE_TIME s (site_configs: lending)
partition_lines() {
  local times="DefaultTime=01:00:00 MaxTime=7-00:00:00"
  case $LENDING in
    moves)
      echo "PartitionName=train Nodes=$(hl 1 $half) Default=YES $times PriorityTier=10 State=UP"
      echo "PartitionName=infer Nodes=$(hl $((half + 1)) "$NNODES") $times PriorityTier=10 State=UP" ;;
    overlap)
      local lo=$(( half > 2 ? half - 1 : 1 )) hi=$(( half + 2 < NNODES ? half + 2 : NNODES ))
      echo "PartitionName=train Nodes=$(hl 1 $hi) Default=YES $times PriorityTier=10 PreemptMode=REQUEUE" \
        "GraceTime=$GRACE_TIME State=UP"
      echo "PartitionName=infer Nodes=$(hl $lo "$NNODES") $times PriorityTier=20 State=UP" ;;
    *) die "LENDING=$LENDING: use moves or overlap" ;;
  esac
  echo "PartitionName=all Nodes=$(hl 1 "$NNODES") DefaultTime=01:00:00 MaxTime=1-00:00:00 PriorityTier=1" \
    "PreemptMode=REQUEUE State=UP"
}

# gres.conf: each node's GPUs as fake devices (22.05 drops a file-less gpu GRES); on SHARD_NODES each GPU
# also carries SHARDS_PER_GPU shards, one line per device (Count= is that GPU's shards)
gres_lines() {
  local i g gt
  echo "AutoDetect=off"
  for i in $(seq 1 "$NNODES"); do
    gt=l40s; [ "$i" -le $half ] && gt=h100
    echo "NodeName=node$i Name=gpu Type=$gt File=$PREFIX/dev/nvidia[0-$((GPUS_PER_NODE - 1))]"
    has_shards "$i" || continue
    for g in $(seq 0 $((GPUS_PER_NODE - 1))); do
      echo "NodeName=node$i Name=shard Count=$SHARDS_PER_GPU File=$PREFIX/dev/nvidia$g"
    done
  done
}

# do_render DIR: write slurm.conf and gres.conf as start would, into DIR (nothing else is touched)
do_render() {
  mkdir -p "$1"; ETC=$1 write_slurm_conf; gres_lines >"$1/gres.conf"
  log "rendered $1/slurm.conf and $1/gres.conf"
}

write_configs() {
  local g
  for g in $(seq 0 $((GPUS_PER_NODE - 1))); do
    [ -e "$PREFIX/dev/nvidia$g" ] || mknod "$PREFIX/dev/nvidia$g" c 195 "$g"
  done
  : >"$ETC/plugstack.conf"
  write_slurm_conf
  gres_lines >"$ETC/gres.conf"
  cat >"$ETC/topology.conf" <<EOF
SwitchName=leaf1 Nodes=$(hl 1 $half)
SwitchName=leaf2 Nodes=$(hl $((half + 1)) "$NNODES")
SwitchName=spine Switches=leaf[1-2]
EOF
  cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=slurm
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  # slurmdbd has no -f: it reads slurmdbd.conf next to $SLURM_CONF, which must be 0600 and owned by SlurmUser
  chown slurm:slurm "$ETC/slurmdbd.conf"; chmod 0600 "$ETC/slurmdbd.conf"
  chmod 0644 "$ETC/slurm.conf" "$ETC/gres.conf" "$ETC/topology.conf" "$ETC/plugstack.conf"
  mkdir -p /etc/slurm
  if [ ! -e /etc/slurm/slurm.conf ] || [ "$(readlink /etc/slurm/slurm.conf)" = "$ETC/slurm.conf" ]; then
    ln -sfn "$ETC/slurm.conf" /etc/slurm/slurm.conf; echo /etc/slurm/slurm.conf >"$OWN/etc-link"
  fi
  printf 'export SLURM_CONF=%q\nexport MINICLUSTER_PREFIX=%q\n' "$ETC/slurm.conf" "$PREFIX" >"$PREFIX/env.sh"
}

# ------------------------------------------------------------------------------------------------ daemons
start_slurmdbd() {
  if ! alive "$RUN/slurmdbd.pid" slurmdbd; then
    slurmdbd 2>>"$LOG/slurmdbd.stderr" || die "slurmdbd failed, see $LOG/slurmdbd.log"
    wait_for 60 sacctmgr -n -P show cluster || die "slurmdbd is not answering, see $LOG/slurmdbd.log"
    own slurmdbd "$RUN/slurmdbd.pid"
    log "slurmdbd: started pid $(cat "$RUN/slurmdbd.pid")"
  fi
  sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  sacctmgr -n -P show account format=account | grep -qx "$ACCOUNT" ||
    sacctmgr -i add account "$ACCOUNT" Description=hpcserve Organization=hpcserve >/dev/null
  local u
  for u in root ${SUDO_USER:-} ${EXTRA_USERS:-}; do
    id "$u" >/dev/null 2>&1 || continue
    sacctmgr -n -P show assoc where user="$u" account="$ACCOUNT" format=user | grep -qx "$u" ||
      sacctmgr -i add user "$u" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" >/dev/null
  done
  for u in $TEST_USERS; do
    sacctmgr -n -P show account format=account | grep -qx "acct-$u" ||
      sacctmgr -i add account "acct-$u" Description="$u's grant" Organization=hpcserve >/dev/null
    sacctmgr -n -P show assoc where user="$u" account="acct-$u" format=user | grep -qx "$u" ||
      sacctmgr -i add user "$u" Account="acct-$u" DefaultAccount="acct-$u" >/dev/null
  done
}

# Real Unix users for the multi-user tests: each with a home, in group users; carol also in the admin group.
make_users() {
  getent group "$ADMIN_GROUP" >/dev/null || groupadd "$ADMIN_GROUP"
  id "$SERVICE_USER" >/dev/null 2>&1 ||
    useradd --system --home-dir /var/lib/hpcserve --create-home --shell /usr/sbin/nologin "$SERVICE_USER"
  local u
  for u in $TEST_USERS; do
    id "$u" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$u"
    chmod 0700 "/home/$u"
  done
  case " $TEST_USERS " in *" carol "*) usermod -aG "$ADMIN_GROUP" carol ;; esac
}

start_slurmctld() {
  if alive "$RUN/slurmctld.pid" slurmctld; then scontrol reconfigure >/dev/null || true; return 0; fi
  slurmctld -f "$ETC/slurm.conf" 2>>"$LOG/slurmctld.stderr" || die "slurmctld failed, see $LOG/slurmctld.log"
  wait_for 30 scontrol ping || die "slurmctld is not answering, see $LOG/slurmctld.log"
  own slurmctld "$RUN/slurmctld.pid"
  log "slurmctld: started pid $(cat "$RUN/slurmctld.pid")"
}

start_slurmds() {
  local i n
  for i in $(seq 1 "$NNODES"); do
    n=node$i; mkdir -p "$PREFIX/state/d/$n"
    alive "$RUN/slurmd-$n.pid" slurmd && continue
    rm -f "$RUN/slurmd-$n.pid"
    # nsenter --net, not `ip netns exec`: the latter remounts /sys, hiding /sys/fs/cgroup, and slurmd 22.05
    # then dies with "Unable to initialize cgroup plugin"
    nsenter "--net=/run/netns/${NS_PREFIX}$n" unshare --uts \
      sh -c 'hostname "$1" && exec slurmd -f "$2" -N "$1"' sh "$n" "$ETC/slurm.conf" \
      2>>"$LOG/slurmd-$n.stderr" || die "slurmd $n failed: $(tail -3 "$LOG/slurmd-$n.log" 2>/dev/null)"
  done
  for i in $(seq 1 "$NNODES"); do
    wait_for 20 test -s "$RUN/slurmd-node$i.pid" || die "slurmd node$i did not start, see $LOG/slurmd-node$i.log"
    own "slurmd-node$i" "$RUN/slurmd-node$i.pid"
  done
}

all_idle() { # exactly "idle" (right after a (re)start or RESUME a node shows "idle*", not responding);
  # on a cluster that was already up, a node running jobs ("mix", "alloc") is ready too
  [ "$(sinfo -h -N -p all -o '%N %t' | awk '$2 == "idle" || $2 == "mix" || $2 == "alloc"' | sort -u | wc -l)" \
    -ge "$NNODES" ]
}

do_start() {
  [ "$(id -u)" = 0 ] || die "must run as root (it installs packages, makes namespaces and starts daemons)"
  install_packages
  prepare_dirs
  make_users
  start_munge
  start_mariadb
  setup_network
  write_configs
  start_slurmdbd
  start_slurmctld
  start_slurmds
  if ! wait_for "$WAIT_TIMEOUT" all_idle; then sinfo -N -l; die "nodes not ready after ${WAIT_TIMEOUT}s"; fi
  log "minicluster up: $(sinfo -h -o '%P=%N' | tr '\n' ' ')"
  echo "To use it:   source $PREFIX/env.sh    (sets SLURM_CONF; /etc/slurm/slurm.conf links there too)"
  echo "Then:        sinfo; hpcserve --site site_configs/minicluster.yaml nodes"
}

# ------------------------------------------------------------------------------------------------ stop
comm_of() { case $1 in slurmd-*) echo slurmd ;; *) echo "$1" ;; esac; }

stop_pids() { # stop_pids NAME...: TERM every recorded pid at once, wait up to 20 s, then KILL
  local n p f pids=() names=()
  for n in "$@"; do
    f=$OWN/$n.pid; [ -s "$f" ] || continue
    p=$(cat "$f"); rm -f "$f"
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$(comm_of "$n")" ] || continue
    kill -TERM "$p" 2>/dev/null && { pids+=("$p"); names+=("$n"); }
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  local _ any
  for _ in $(seq 100); do
    any=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && any=1; done
    [ $any = 0 ] && break; sleep 0.2
  done
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null; done
  log "stopped ${names[*]}"
}

do_stop() {
  [ -d "$OWN" ] || { echo "minicluster: nothing recorded in $OWN"; return 0; }
  if alive "$OWN/slurmctld.pid" slurmctld; then   # end jobs while slurmd still runs
    local ids; ids=$(squeue -h -o %A 2>/dev/null | sort -u | xargs)
    [ -n "$ids" ] && { timeout 60 scancel --quiet $ids 2>/dev/null || true; }
    local _; for _ in $(seq 25); do [ -z "$(squeue -h -t R,CG -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  local slurmds=() f
  for f in "$OWN"/slurmd-*.pid; do [ -e "$f" ] && slurmds+=("$(basename "$f" .pid)"); done
  stop_pids "${slurmds[@]}" slurmctld
  stop_pids slurmdbd
  stop_pids mariadbd munged
  if [ -s "$OWN/netns" ]; then
    local ns pids
    while read -r ns; do
      pids=$(ip netns pids "$ns" 2>/dev/null | xargs)
      [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
      ip netns del "$ns" 2>/dev/null || true
    done <"$OWN/netns"
    rm -f "$OWN/netns"
  fi
  if [ -s "$OWN/bridge" ]; then ip link del "$(cat "$OWN/bridge")" 2>/dev/null || true; rm -f "$OWN/bridge"; fi
  if [ -s "$OWN/etc-link" ]; then
    [ "$(readlink /etc/slurm/slurm.conf)" = "$ETC/slurm.conf" ] && rm -f /etc/slurm/slurm.conf
    rm -f "$OWN/etc-link"
  fi
  sed -i '/^# BEGIN hpcserve-minicluster/,/^# END hpcserve-minicluster/d' /etc/hosts
  if [ "$PURGE" = 1 ]; then
    ip route del unreachable "$SUBNET.0/24" metric 9999 2>/dev/null || true
    rm -rf "$PREFIX"; log "purged $PREFIX"
  fi
  log "minicluster stopped"
}

# ------------------------------------------------------------------------------------------------ lending
# do_lending: switch a running cluster's partitions to $LENDING's layout (slurm.conf's PartitionName= lines,
# then scontrol reconfigure), and wait until slurmctld shows train with the new nodes
do_lending() {
  local conf=$ETC/slurm.conf want i
  [ -f "$conf" ] || die "no $conf: start the cluster first"
  want=$(partition_lines | awk '/^PartitionName=train /{sub("Nodes=", "", $2); print $2}')
  { grep -v '^PartitionName=' "$conf"; partition_lines; } >"$conf.new"
  mv "$conf.new" "$conf"
  scontrol reconfigure
  for i in $(seq 1 "$WAIT_TIMEOUT"); do
    [ "$(scontrol -o show partition train | grep -o ' Nodes=[^ ]*')" = " Nodes=$want" ] && break
    sleep 1
  done
  log "partitions: $(sinfo -h -o '%P=%N' | tr '\n' ' ')(LENDING=$LENDING GRACE_TIME=$GRACE_TIME)"
}

# ------------------------------------------------------------------------------------------------ status
do_status() {
  local name comm rc=0
  for name in munged mariadbd slurmdbd slurmctld $(for i in $(seq 1 "$NNODES"); do echo "slurmd-node$i"; done); do
    comm=$(comm_of "$name")
    if alive "$OWN/$name.pid" "$comm"; then printf '%-14s running (pid %s)\n' "$name" "$(cat "$OWN/$name.pid")"
    else printf '%-14s stopped\n' "$name"; rc=1; fi
  done
  if [ $rc = 0 ]; then sinfo -h -o '%P %D %t %N' | sed 's/^/partition /'; fi
  return $rc
}

case ${1:-} in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  partitions) partition_lines ;;  # print the PartitionName= lines start would write (no side effects)
  render) do_render "${2:?usage: $0 render DIR}" ;;  # slurm.conf and gres.conf into DIR (no side effects)
  lending) LENDING=${2:?usage: $0 lending moves|overlap} do_lending ;;
  *) echo "usage: $0 start|stop|status|partitions|render DIR|lending moves|overlap" \
       "  (environment: PREFIX NNODES LENDING GRACE_TIME RESET=1 PURGE=1 ...)" >&2
     exit 2 ;;
esac
