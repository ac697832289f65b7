#!/usr/bin/env bash
# A real SLURM on this machine, to try job scripts locally: one node, `localhost`, all its CPUs;
# with LAUNCHER_SLURM_NODES=K (K > 1), K nodes node1..nodeK, each its own slurmd on this machine
# (Debian's slurmd is built with MULTIPLE_SLURMD: `NodeName=... Port=...` lines), each with all
# the CPUs; their names resolve to 127.0.0.1 through a line of /etc/hosts that `up` adds and
# `down` removes (the launcher's coordinator is the step's first node, by name).
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
SlurmdSpoolDir=$STATE/spool/d/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
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
$(node_lines "$cpus")
CONF
}

# The NodeName and PartitionName lines: `localhost`, or LAUNCHER_SLURM_NODES slurmds on ports
# 17001.. of this machine.
node_lines() {
  local cpus=$1 count="${LAUNCHER_SLURM_NODES:-1}" i
  if [[ $count -le 1 ]]; then
    echo "NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN"
    echo "PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
    return
  fi
  for i in $(seq 1 "$count"); do
    echo "NodeName=node$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$cpus State=UNKNOWN"
  done
  echo "PartitionName=local Nodes=node[1-$count] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
}

node_names() {
  local count="${LAUNCHER_SLURM_NODES:-1}"
  if [[ $count -le 1 ]]; then echo localhost; else seq -f "node%g" 1 "$count"; fi
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
  if [[ "${LAUNCHER_SLURM_NODES:-1}" -gt 1 ]]; then
    echo "127.0.0.1 $(node_names | tr '\n' ' ')$MARK" >> /etc/hosts
  fi
  local node
  for node in $(node_names); do
    mkdir -p "$STATE/spool/d/$node"
    slurmd -f "$CONF" -N "$node" >>"$STATE/slurmd-$node.out" 2>&1
  done
  for _ in $(seq 1 60); do
    if [[ "$(sinfo -h -N -o "%T" 2>/dev/null | grep -cx "idle")" -eq "$(node_names | wc -l)" ]]; then
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
  local name pid_file
  for name in slurmd slurmctld munged; do
    for pid_file in "$STATE/$name".pid "$STATE/$name"-*.pid; do
      if [[ -f "$pid_file" ]]; then
        kill "$(cat "$pid_file")" 2>/dev/null || true
        rm -f "$pid_file"
      fi
    done
  done
  if grep -q "$MARK" /etc/hosts; then  # Rewritten in place: /etc/hosts may be a mount.
    local hosts
    hosts="$(grep -v "$MARK" /etc/hosts)"
    printf '%s\n' "$hosts" > /etc/hosts
  fi
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
