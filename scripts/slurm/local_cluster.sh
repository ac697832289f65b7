#!/usr/bin/env bash
# A real SLURM on this machine, to try job scripts locally: one node, `localhost`, all its CPUs.
#
#   scripts/slurm/local_cluster.sh up       # install (Debian packages) if needed, start, wait for idle
#   scripts/slurm/local_cluster.sh status   # sinfo
#   scripts/slurm/local_cluster.sh down     # stop the daemons
#
# Needs root (packages, /etc/slurm/slurm.conf). There is no systemd here: munged, slurmctld and
# slurmd run in the background, their PIDs and logs in $LAUNCHER_SLURM_STATE (default
# /tmp/launcher-slurm). An existing /etc/slurm/slurm.conf that this script did not write is left
# alone and `up` refuses. `down` stops everything `up` started, munged included.
set -euo pipefail

STATE="${LAUNCHER_SLURM_STATE:-/tmp/launcher-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# written by launcher scripts/slurm/local_cluster.sh"

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  echo "installing slurmctld slurmd slurm-client munge (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  if [[ -f "$CONF" ]] && ! grep -q "$MARK" "$CONF"; then
    echo "error: $CONF exists and is not ours; not touching a real cluster's configuration" >&2
    exit 1
  fi
  local cpus
  cpus=$(nproc)
  mkdir -p "$STATE/spool/ctld" "$STATE/spool/d" /etc/slurm
  cat > "$CONF" <<CONF
$MARK
ClusterName=launcher-local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again once its old credential expires (default 120 s); 10 s here.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# The main scheduler every 2 s (default 60): a requeued job starts once its credential expired.
SchedulerParameters=bf_interval=2,sched_interval=2
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

up() {
  install_packages
  write_conf
  down quiet
  mkdir -p /run/munge "$STATE"
  chown -R munge:munge /run/munge 2>/dev/null || true
  [[ -f /etc/munge/munge.key ]] || mungekey --create
  munged --force --pid-file="$STATE/munged.pid" 2>>"$STATE/munged.log"
  # -c: start with no jobs: a job left queued by an interrupted earlier run would hold the node.
  slurmctld -c -i -f "$CONF" >>"$STATE/slurmctld.out" 2>&1
  slurmd -f "$CONF" -N localhost >>"$STATE/slurmd.out" 2>&1
  for _ in $(seq 1 60); do
    if sinfo -h -o "%T" 2>/dev/null | grep -qx "idle"; then
      echo "SLURM is up: $(sinfo -h -o '%P %D %T %C' | head -1) (state in $STATE)"
      return
    fi
    sleep 1
  done
  echo "error: SLURM did not come up within 60 s; see $STATE/*.log" >&2
  sinfo >&2 || true
  exit 1
}

down() {
  local name
  for name in slurmd slurmctld munged; do
    if [[ -f "$STATE/$name.pid" ]]; then
      kill "$(cat "$STATE/$name.pid")" 2>/dev/null || true
      rm -f "$STATE/$name.pid"
    fi
  done
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  pkill -f "munged --force --pid-file=$STATE/munged.pid" 2>/dev/null || true
  [[ "${1:-}" == quiet ]] || echo "SLURM daemons stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) sinfo; squeue ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
