#!/usr/bin/env bash
# A one-node Slurm cluster with accounting, for the Slurm integration tests (tests/test_slurm.py).
#
#   tests/slurm/local-cluster.sh start    # install (if missing), configure, start; no-op when running
#   tests/slurm/local-cluster.sh status   # exit 0 when the node answers and sacct works
#   tests/slurm/local-cluster.sh stop     # stop exactly the daemons `start` started (by recorded PID)
#
# Debian 12 packages (Slurm 22.05), run as root, no systemd: every daemon is started directly
# and writes its PID file under $FRONTIER_SLURM_DIR (default /tmp/frontier-slurm), with state,
# spool, logs, a private munge socket and key, and a private MariaDB (TCP 127.0.0.1:$DB_PORT).
# Settings that work without cgroups: proctrack/linuxproc + task/affinity, cons_tres with
# CR_Core_Memory, DefMemPerCPU (otherwise one job takes the whole node). Two fake GPUs
# (GresTypes=gpu, Gres=gpu:2) backed by character devices, so `--gpus-per-node=2` jobs schedule
# and get CUDA_VISIBLE_DEVICES. The config must live at /etc/slurm/slurm.conf: the jobstep
# plugin strips SLURM_CONF before its inner srun. An /etc/slurm/slurm.conf not written by this
# script is never overwritten (start fails instead).
set -euo pipefail

BASE=${FRONTIER_SLURM_DIR:-/tmp/frontier-slurm}
ETC=/etc/slurm
MARK="# written by frontier tests/slurm/local-cluster.sh"
CLUSTER=frontier
ACCOUNT=frontier
DB_PORT=${FRONTIER_SLURM_DB_PORT:-3399}
DB_PASS=frontier-slurm-test
NGPU=2
MUNGE_SOCK=$BASE/munge/munge.sock
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stop is the reverse

log() { printf '[local-cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

pidfile() { echo "$BASE/run/$1.pid"; }

# PID of a daemon we started, if it is still that process (guards against PID reuse).
alive_pid() {
  local name=$1 f pid comm
  f=$(pidfile "$name")
  [ -s "$f" ] || return 1
  pid=$(tr -dc 0-9 <"$f")
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
  case "$name" in
    mariadbd) [[ "$comm" == mariadbd || "$comm" == mysqld ]] ;;
    *) [[ "$comm" == "$name"* ]] ;;
  esac || return 1
  echo "$pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2 i
  shift 2
  for ((i = 0; i < limit * 5; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "timed out after ${limit}s waiting for $what"
}

cluster_answers() {
  sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)' &&
    sacct -n -X -S now-1minute >/dev/null 2>&1
}

# ------------------------------------------------------------------------------------- install
install_packages() {
  local need=()
  command -v slurmctld >/dev/null || need+=(slurmctld)
  command -v slurmd >/dev/null || need+=(slurmd)
  command -v sbatch >/dev/null || need+=(slurm-client)
  command -v munged >/dev/null || need+=(munge)
  command -v slurmdbd >/dev/null || need+=(slurmdbd)
  { command -v mariadbd || command -v mysqld; } >/dev/null || need+=(mariadb-server)
  [ ${#need[@]} -eq 0 ] && return 0
  log "installing ${need[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  # Keep the packages' maintainer scripts from starting system daemons (no systemd here anyway);
  # only when no policy is in place already, and removed again afterwards.
  local policy=/usr/sbin/policy-rc.d ours=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && ours=1
  fi
  if ! apt-get install -y -qq --no-install-recommends "${need[@]}" >"$BASE/log/apt.log" 2>&1; then
    apt-get update -qq >>"$BASE/log/apt.log" 2>&1
    apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$BASE/log/apt.log" 2>&1 ||
      { [ $ours = 1 ] && rm -f "$policy"; tail -20 "$BASE/log/apt.log" >&2; die "apt-get install failed"; }
  fi
  [ $ours = 1 ] && rm -f "$policy"
  return 0
}

# ------------------------------------------------------------------------------------- configure
fake_gpus() {
  mkdir -p "$BASE/dev"
  local i files=()
  for ((i = 0; i < NGPU; i++)); do
    local dev=$BASE/dev/nvidia$i
    [ -c "$dev" ] || mknod "$dev" c 195 "$i" 2>/dev/null || true
    files+=("$dev")
  done
  if [ -c "${files[0]}" ]; then
    echo "${files[@]}"
  else  # no CAP_MKNOD: any distinct character devices do
    echo /dev/null /dev/zero
  fi
}

configure() {
  if [ -e $ETC/slurm.conf ] && ! grep -qF "$MARK" $ETC/slurm.conf; then
    die "$ETC/slurm.conf exists and was not written by this script; not overwriting it"
  fi
  mkdir -p "$ETC" "$BASE"/{run,log,state,spool,munge,mysql}
  local host mem node gres_files f
  host=$(hostname -s)
  # NodeName=... CPUs=... Boards=... SocketsPerBoard=... CoresPerSocket=... ThreadsPerCore=... RealMemory=...
  node=$(slurmd -C | head -1)
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  node=$(sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 95 / 100))/" <<<"$node")
  read -r -a gres_files <<<"$(fake_gpus)"

  cat >$ETC/slurm.conf <<EOF
$MARK
# A one-node test cluster; state under $BASE. Stop it with local-cluster.sh stop.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
CredType=cred/munge
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
# Finished jobs stay visible to squeue/scontrol for 5 min (status fallback of slurm-generic)
MinJobAge=300
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStoragePass=$MUNGE_SOCK
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
# sacct shows the --comment (the slurm plugin and our generic profile put the rule name there)
AccountingStoreFlags=job_comment
GresTypes=gpu
$node Gres=gpu:$NGPU State=UNKNOWN NodeAddr=127.0.0.1
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  {
    echo "$MARK"
    for f in "${gres_files[@]}"; do echo "NodeName=$host Name=gpu File=$f"; done
  } >$ETC/gres.conf
  # A leftover cgroup.conf from another install would make slurmd try cgroups.
  cat >$ETC/slurmdbd.conf <<EOF
$MARK
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=$BASE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chmod 600 $ETC/slurmdbd.conf
}

# ------------------------------------------------------------------------------------- daemons
start_munge() {
  alive_pid munged >/dev/null && return 0
  local key=$BASE/munge/munge.key
  if [ ! -s "$key" ]; then
    (umask 077 && dd if=/dev/urandom of="$key" bs=1024 count=1 status=none)
  fi
  chmod 700 "$BASE/munge"
  chmod 400 "$key"
  munged --force --key-file="$key" --socket="$MUNGE_SOCK" --pid-file="$(pidfile munged)" \
    --log-file="$BASE/log/munged.log" --seed-file="$BASE/munge/munge.seed"
  wait_for 10 "munged" test -S "$MUNGE_SOCK"
}

sql() { mariadb --no-defaults --protocol=socket --socket="$BASE/mysql/mysqld.sock" -u root "$@"; }

start_mariadb() {
  alive_pid mariadbd >/dev/null && return 0
  local bin datadir=$BASE/mysql/data
  bin=$(command -v mariadbd || command -v mysqld)
  if [ ! -d "$datadir/mysql" ]; then
    mariadb-install-db --no-defaults --user=root --datadir="$datadir" --auth-root-authentication-method=socket \
      --skip-test-db >"$BASE/log/mariadb-install.log" 2>&1 || { tail -20 "$BASE/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
  fi
  # stdin from /dev/null and setsid: it must outlive this script and its caller's terminal
  setsid "$bin" --no-defaults --user=root --datadir="$datadir" --socket="$BASE/mysql/mysqld.sock" \
    --pid-file="$(pidfile mariadbd)" --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
    --log-error="$BASE/log/mariadb.log" --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
    --skip-log-bin </dev/null >/dev/null 2>&1 &
  wait_for 60 "mariadb" sql -e "select 1"
  wait_for 10 "mariadb pid file" test -s "$(pidfile mariadbd)"
  sql <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_slurm() {
  if ! alive_pid slurmdbd >/dev/null; then
    slurmdbd
    wait_for 60 "slurmdbd" sacctmgr -n list cluster
  fi
  sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
  sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description=frontier-tests >/dev/null 2>&1 || true
  sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null 2>&1 || true
  alive_pid slurmctld >/dev/null || slurmctld
  wait_for 30 "slurmctld" scontrol ping
  alive_pid slurmd >/dev/null || slurmd
  wait_for 60 "the node to become idle" cluster_answers
}

running() {
  local d
  for d in "${DAEMONS[@]}"; do alive_pid "$d" >/dev/null || return 1; done
  cluster_answers
}

cmd_start() {
  [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons as root)"
  local t0=$SECONDS
  mkdir -p "$BASE"/{run,log}
  if running; then log "already running (state in $BASE)"; return 0; fi
  install_packages
  configure
  start_munge
  start_mariadb
  start_slurm
  sinfo -N -o '%N %T %c %m %G' >&2
  log "cluster up in $((SECONDS - t0)) s (state in $BASE, config in $ETC)"
}

gone() {  # exited (a zombie waiting for its reaper counts as gone)
  [ ! -d "/proc/$1" ] || [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" = Z ]
}

cmd_stop() {
  local i d pid
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    d=${DAEMONS[$i]}
    pid=$(alive_pid "$d") || continue
    log "stopping $d (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do gone "$pid" && break; sleep 0.1; done
    gone "$pid" || kill -KILL "$pid" 2>/dev/null || true
    rm -f "$(pidfile "$d")"
  done
  log "stopped"
}

cmd_status() {
  local d pid rc=0
  for d in "${DAEMONS[@]}"; do
    if pid=$(alive_pid "$d"); then echo "$d: running (pid $pid)"; else echo "$d: not running"; rc=1; fi
  done
  if [ $rc = 0 ] && cluster_answers; then
    sinfo -N -o '%N %T %c %m %G'
  else
    rc=1
  fi
  return $rc
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
