#!/usr/bin/env bash
# A single-node SLURM on this machine, for the tests of the `slurm` cluster profile (docs/design.md §6).
#
#   bash .ci/slurm.sh start    install (Debian packages, only if missing), configure, start, check
#   bash .ci/slurm.sh stop     cancel every job, stop the daemons this script started
#   bash .ci/slurm.sh status   sinfo and squeue
#
# Root only (as CI and the development machines run). No systemd: munged, slurmctld and slurmd run
# as plain daemons with pid files under $LAYERTIME_SLURM_STATE (default /var/lib/layertime-slurm).
# `start` is idempotent: a healthy SLURM that this script started is left as it is; stale state
# (pid files of dead daemons, old job state) is wiped before a fresh start. It writes
# /etc/slurm/slurm.conf and refuses to replace one that it did not write.
#
# The node: this host's CPUs and memory (`slurmd -C`), a fake GPU gres (gres.conf `File=/dev/null`,
# no device isolation with TaskPlugin=task/none), partition `debug` (default). Jobs that finish are
# appended to $LAYERTIME_SLURM_STATE/jobcomp.log (there is no slurmdbd, so no sacct).
set -euo pipefail

STATE=${LAYERTIME_SLURM_STATE:-/var/lib/layertime-slurm}
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
MARK="# written by layertime .ci/slurm.sh"
GPUS=${LAYERTIME_SLURM_GPUS:-2}   # fake GPUs on the node: two one-GPU worker jobs can run at once

log() { echo "slurm.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# A daemon is alive if its pid file names a running process (a zombie is not: here nobody may reap it).
alive() {
  [[ -s $1 ]] || return 1
  local state
  state=$(ps -o stat= -p "$(cat "$1")" 2>/dev/null) || return 1
  [[ -n $state && $state != Z* ]]
}

install_packages() {
  local missing=()
  for cmd in munged slurmctld slurmd sbatch; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
  ((${#missing[@]})) || return 0
  log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d keeps the packages' init scripts from starting anything: we start the daemons.
  local policy=/usr/sbin/policy-rc.d added=0
  if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added=1; fi
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
  ((added)) && rm -f "$policy"
  return 0
}

write_config() {
  local host hw mem
  host=$(hostname -s)
  # This host as slurmd sees it: CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=..
  hw=$(slurmd -C | sed -n 's/^NodeName=[^ ]* \(.*\) RealMemory=\([0-9]*\).*/\1/p')
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mem=$((mem * 9 / 10))   # leave the OS some room
  if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not replacing a real cluster's configuration"
  fi
  mkdir -p /etc/slurm
  cat >"$CONF.new" <<EOF
$MARK: a single-node SLURM for tests
ClusterName=layertime-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
GresTypes=gpu
ReturnToService=2
KillWait=2
MinJobAge=10
InactiveLimit=0
SlurmdTimeout=30
SchedulerType=sched/backfill
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 $hw RealMemory=$mem Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  {
    echo "$MARK"
    # slurmd wants one distinct file per GPU: /dev/null, then empty files (nothing opens them)
    echo "NodeName=$host Name=gpu File=/dev/null"
    for ((i = 1; i < GPUS; i++)); do echo "NodeName=$host Name=gpu File=$STATE/fake-gpu$i"; done
  } >"$GRES_CONF.new"
  local changed=0
  cmp -s "$CONF.new" "$CONF" || changed=1
  cmp -s "$GRES_CONF.new" "$GRES_CONF" || changed=1
  mv "$CONF.new" "$CONF"
  mv "$GRES_CONF.new" "$GRES_CONF"
  return $((1 - changed))   # 0: the configuration changed
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  cp /run/munge/munged.pid "$STATE/munged.pid"   # ours: `stop` may end it
  for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged does not answer"
}

healthy() {
  alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && scontrol ping 2>/dev/null | grep -q UP \
    && [[ $(sinfo -h -N -o %T 2>/dev/null | head -1) =~ ^(idle|mixed|allocated|completing)$ ]]
}

stop_daemons() {
  if alive "$STATE/slurmctld.pid"; then
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 50); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.2; done
    fi
  fi
  local name pid
  for name in slurmd slurmctld munged; do
    alive "$STATE/$name.pid" || { rm -f "$STATE/$name.pid"; continue; }
    pid=$(cat "$STATE/$name.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$STATE/$name.pid"
  done
}

smoke_test() {
  local out id
  out=$(timeout 60 srun -N1 -n1 -t 1 --gres=gpu:1 hostname 2>&1) || die "srun failed: $out"
  rm -f "$STATE/smoke.out"
  # Not `sbatch --wait`: it polls every 10 s.
  id=$(sbatch --parsable -o "$STATE/smoke.out" -t 1 --gres=gpu:1 -D "$STATE" --wrap 'echo ok' 2>&1) \
    || die "sbatch failed: $id"
  for _ in $(seq 300); do
    [[ $(cat "$STATE/smoke.out" 2>/dev/null) == ok ]] && return 0
    sleep 0.2
  done
  die "batch job $id did not run in 60 s: $(scontrol show job "$id" 2>&1 | grep -E 'JobState|Reason')"
}

start() {
  [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts daemons)"
  install_packages
  mkdir -p "$STATE"
  local changed=1
  write_config || changed=0
  if ((!changed)) && healthy; then
    log "already running: $(sinfo -h -o '%P %D %T %G')"
    return 0
  fi
  stop_daemons
  rm -rf "$STATE/ctld" "$STATE/d" "$STATE"/*.log
  mkdir -p "$STATE/ctld" "$STATE/d"
  for ((i = 1; i < GPUS; i++)); do : >"$STATE/fake-gpu$i"; done
  start_munge
  local t0=$SECONDS
  slurmctld -c -i   # cold start: no jobs or node state carried over
  slurmd -c
  for name in slurmctld slurmd; do
    for _ in $(seq 50); do alive "$STATE/$name.pid" && break; sleep 0.1; done
    alive "$STATE/$name.pid" || die "$name did not start: $(tail -n 5 "$STATE/$name.log" 2>&1)"
  done
  for _ in $(seq 120); do
    healthy && break
    sleep 0.5
    scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
  done
  healthy || die "node not idle after 60 s: $(sinfo -N 2>&1); logs in $STATE"
  smoke_test
  log "up in $((SECONDS - t0)) s: $(sinfo -h -o 'partition %P, %D node, %T, cpus %c, mem %m MB, gres %G')"
}

case ${1:-} in
  start) start ;;
  stop) stop_daemons; log "stopped" ;;
  status) sinfo; squeue ;;
  *) die "usage: $0 start|stop|status" ;;
esac
