#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for the SLURM tests and for trying the
# sbatch launchers without a cluster.  Usage (as root):
#
#   launch/slurm_local.sh start    # install (apt-get, Debian/Ubuntu) if missing, configure, start
#   launch/slurm_local.sh status   # print the nodes; exit 1 when the controller does not answer
#   launch/slurm_local.sh stop     # stop the daemons; PURGE=1 also wipes state and logs
#
# Why a script of our own: CI and users' clones have no shared cluster, and the
# tests must prove the launchers against a real slurmctld/slurmd, not a mock.
#
# Layout (slurm-wlm 22.05, munge auth):
#   partition "debug" (default): this host, all its CPUs;
#   partition "multi": FAKE_NODES (default 2) extra slurmd daemons n1..nN on the same host
#     (distinct ports), so `--nodes=2` jobs get distinct SLURM_NODEID / SLURMD_NODENAME.
#     `127.0.0.1 nX` is added to /etc/hosts so the node names resolve (MASTER_ADDR).
# Tasks are bound to their allocated cores (task/affinity), as on a production cluster, so that
# the CPUs srun gives each task (--cpus-per-task, --cpu-bind) are visible to the tests; every fake
# node maps its cores onto the same host CPUs.
# State and logs live under SLURM_BASE (default /tmp/slurm-local); the config is
# /etc/slurm/slurm.conf.  A slurm.conf that keeps its state elsewhere (a real cluster's) is
# never overwritten.
#
# Pitfalls seen with this setup: `hostname` prints the real host inside every fake
# node (use SLURMD_NODENAME); `#SBATCH --signal=B:USR1@N` fires within about
# +-30 s of N (the controller checks every 30 s); a requeued job restarts 12-14 s later.
set -euo pipefail

BASE=${SLURM_BASE:-/tmp/slurm-local}
FAKE_NODES=${FAKE_NODES:-2}
CONF=/etc/slurm/slurm.conf

die() { echo "slurm_local.sh: $*" >&2; exit 1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v sbatch >/dev/null && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null \
    || die "slurm is not installed and apt-get is missing: install slurmctld, slurmd, slurm-client and munge by hand"
  # Block the packages' services from auto-starting during install (we start our own daemons).
  local tmp_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; tmp_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
  [ "$tmp_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

start_munge() {
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge /etc/munge/munge.key
  chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge; chown munge:munge /run/munge; chmod 755 /run/munge
  # A munged that answers is reused: one left by an interrupted run may lack its pid file (a full disk).
  munge -n >/dev/null 2>&1 && return 0
  alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "munged did not answer within 5 s"
}

# Print the slurm.conf for this host: 1 real node in "debug", FAKE_NODES in "multi".
render_config() {
  local host=$1 topo mem i
  topo=$(slurmd -C | head -1 | grep -o 'Boards=.*ThreadsPerCore=[0-9]*')
  mem=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 9 / 10 ))
  cat <<EOF
# Written by vitscale launch/slurm_local.sh (a single-host test cluster).
ClusterName=ci
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
NodeName=$host $topo RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  if [ "$FAKE_NODES" -gt 0 ]; then
    for i in $(seq 1 "$FAKE_NODES"); do
      echo "NodeName=n$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((17000 + i))" \
        "$topo RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=multi Nodes=n[1-$FAKE_NODES] MaxTime=INFINITE State=UP"
  fi
}

stop_daemons() {
  local p pid
  for p in "$BASE"/run/slurmd-*.pid "$BASE"/run/slurmctld.pid "$@"; do
    [ -f "$p" ] || continue
    pid=$(cat "$p")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$p"
  done
}

wait_idle() {
  for _ in $(seq 120); do
    if [ -n "$(sinfo -h 2>/dev/null)" ] && [ "$(sinfo -h -N -o '%t' 2>/dev/null | grep -cv '^idle$')" = 0 ]; then
      return 0
    fi
    sleep 0.5
  done
  sinfo -N >&2 || true
  die "nodes did not become idle within 60 s; see $BASE/log/"
}

cmd_start() {
  [ "$(id -u)" = 0 ] || die "start needs root (it installs packages, writes $CONF and runs the daemons)"
  install_packages
  start_munge
  local host nodes new i n
  host=$(hostname -s)
  nodes=$host; for i in $(seq 1 "$FAKE_NODES"); do nodes="$nodes n$i"; done
  mkdir -p "$BASE"/state/ctld "$BASE"/log "$BASE"/run
  for n in $nodes; do mkdir -p "$BASE/state/d/$n"; done
  for i in $(seq 1 "$FAKE_NODES"); do
    getent hosts "n$i" >/dev/null || echo "127.0.0.1 n$i" >>/etc/hosts
  done
  new=$(mktemp)
  render_config "$host" >"$new"
  if ! cmp -s "$new" "$CONF"; then
    # Ours (or the same recipe's): it keeps its daemons' state under $BASE.
    if [ -e "$CONF" ] && ! grep -qxF "SlurmctldPidFile=$BASE/run/slurmctld.pid" "$CONF"; then
      rm -f "$new"
      die "$CONF belongs to another cluster (its state is not under $BASE); move it away to use the local one"
    fi
    stop_daemons   # config changed: restart the daemons with the new one
    mkdir -p "$(dirname "$CONF")"; cp "$new" "$CONF"
  fi
  rm -f "$new"
  alive "$BASE/run/slurmctld.pid" || slurmctld
  for n in $nodes; do
    alive "$BASE/run/slurmd-$n.pid" || { if [ "$n" = "$host" ]; then slurmd; else slurmd -N "$n"; fi; }
  done
  wait_idle
  sinfo -N
}

cmd_status() {
  sinfo -N 2>/dev/null || die "no SLURM controller answers (start it: launch/slurm_local.sh start)"
}

cmd_stop() {
  stop_daemons /run/munge/munged.pid
  if [ "${PURGE:-0}" = 1 ]; then rm -rf "$BASE"/state "$BASE"/log "$BASE"/run; fi
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) die "usage: $0 start|stop|status  (env: SLURM_BASE=$BASE FAKE_NODES=$FAKE_NODES PURGE=0|1)" ;;
esac
