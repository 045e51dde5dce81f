#!/usr/bin/env bash
# A real Slurm (slurmctld + slurmd + munged) on localhost, for tests and for trying the sbatch scripts.
#
#   slurm/local_cluster.sh up   [--nodes 1|2] [--dir DIR]   install (apt, once), configure, start, wait until idle
#   slurm/local_cluster.sh down [--dir DIR]                 scontrol shutdown, then stop munged by its pid file
#   slurm/local_cluster.sh status [--dir DIR]
#   slurm/local_cluster.sh env  [--dir DIR]                 prints `export SLURM_CONF=...` for the client commands
#
# All state (config, spool, pid files, logs, munge socket) lives under DIR: --dir, else $FT_DIST_SLURM_DIR, else
# /tmp/ft-dist-slurm. Nothing under /etc is changed except the munge key apt creates. Processes are stopped by the
# pid files this script wrote, never by name: other people's processes on the machine are left alone.
# `--nodes 2` emulates two nodes (n1, n2) on this host: two slurmd with their own ports, both at 127.0.0.1; their
# names do not resolve, which is exactly what the sbatch script's head-node address resolution has to cope with.
# Needs root (Debian/Ubuntu, no systemd needed). Slurm 22.05 (Debian 12) checked.
set -euo pipefail

action="${1:-}"
shift || true
nodes=1
dir="${FT_DIST_SLURM_DIR:-/tmp/ft-dist-slurm}"
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    *) echo "local_cluster.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
case "$nodes" in 1|2) ;; *) echo "local_cluster.sh: --nodes must be 1 or 2" >&2; exit 2 ;; esac
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"
ctld_port="${FT_DIST_SLURMCTLD_PORT:-6817}"
host="$(hostname -s)"

log() { echo "local_cluster: $*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  log "installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >"$dir/apt.log" 2>&1 || {
    apt-get update >>"$dir/apt.log" 2>&1
    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >>"$dir/apt.log" 2>&1
  }
}

# True when the pid file names a live process (a stale file from a killed machine does not count).
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  # munged refuses group/world-writable socket dirs and runs as the munge user; keep its files in its own dir.
  mkdir -p "$dir/munge"
  chown munge:munge "$dir/munge"
  chmod 0755 "$dir/munge"
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    (umask 077; dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null)
    chown munge:munge /etc/munge/munge.key
  fi
  if alive "$dir/munge/munged.pid"; then return; fi
  runuser -u munge -- /usr/sbin/munged --socket="$dir/munge/munge.socket" --pid-file="$dir/munge/munged.pid" \
    --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
}

write_config() {
  local node_lines
  if [ "$nodes" = 1 ]; then
    node_lines="NodeName=$host NodeAddr=127.0.0.1 CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  else
    # Two slurmd on one host: distinct NodeName and Port, same address. Each claims the host's 2 CPUs
    # (config_overrides below stops slurmd from draining a node whose declared hardware it cannot verify).
    node_lines="NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=10000 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=10000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  fi
  mkdir -p "$dir/state" "$dir/log"
  cat >"$dir/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
  cat >"$conf" <<EOF
# Written by slurm/local_cluster.sh (nodes=$nodes); see /work/shared/notes/slurm-local.md for why each line is here.
ClusterName=ftdist
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after ~16 s instead of ~2 min.
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/slurmd-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# cgroup v1 freezer: the whole job's process tree is tracked and killed (linuxproc leaves orphans running).
ProctrackType=proctrack/cgroup
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
# Requeue (scontrol requeue, --requeue) must be allowed; the restarted job sees SLURM_RESTART_COUNT.
JobRequeue=1
KillWait=10
InactiveLimit=0
MinJobAge=300
$node_lines
EOF
}

node_names() { if [ "$nodes" = 1 ]; then echo "$host"; else echo "n1 n2"; fi; }

up() {
  if [ "$(id -u)" != 0 ]; then log "needs root"; exit 1; fi
  install_packages
  if alive "$dir/slurmctld.pid"; then
    log "already running (dir $dir); run 'down' first to change --nodes"
    echo "export SLURM_CONF=$conf"
    return
  fi
  write_config
  echo "$nodes" >"$dir/nodes"
  start_munge
  for n in $(node_names); do mkdir -p "$dir/slurmd-$n"; done
  # -c: start clean, no jobs left over from an earlier cluster in the same dir.
  slurmctld -c -f "$conf"
  if [ "$nodes" = 1 ]; then
    slurmd -f "$conf"
  else
    for n in n1 n2; do slurmd -f "$conf" -N "$n"; done
  fi
  local i
  for i in $(seq 1 100); do
    # A slurmctld that could not bind its port exits after daemonizing; sinfo would then ask someone else's.
    if ! alive "$dir/slurmctld.pid"; then
      log "slurmctld exited (port $ctld_port taken? set FT_DIST_SLURMCTLD_PORT); see $dir/log/slurmctld.log"
      tail -n 5 "$dir/log/slurmctld.log" >&2 || true
      exit 1
    fi
    if [ "$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)" -ge "$nodes" ]; then
      log "up: $nodes node(s) idle (dir $dir)"
      echo "export SLURM_CONF=$conf"
      return
    fi
    sleep 0.3
  done
  log "nodes did not become idle; see $dir/log"
  sinfo -N >&2 || true
  exit 1
}

down() {
  [ -f "$dir/nodes" ] && nodes="$(cat "$dir/nodes")"
  if alive "$dir/slurmctld.pid"; then
    scontrol shutdown >/dev/null 2>&1 || true  # stops slurmctld and every slurmd it knows
  fi
  local f i
  for f in "$dir/slurmctld.pid" "$dir"/slurmd-*.pid "$dir/munge/munged.pid"; do
    [ -e "$f" ] || continue
    for i in $(seq 1 50); do alive "$f" || break; sleep 0.2; done
    if alive "$f"; then kill -TERM "$(cat "$f")" 2>/dev/null || true; sleep 1; fi
    if alive "$f"; then kill -KILL "$(cat "$f")" 2>/dev/null || true; fi
    rm -f "$f"
  done
  log "down (dir $dir)"
}

case "$action" in
  up) up ;;
  down) down ;;
  status) if alive "$dir/slurmctld.pid"; then sinfo -N; else echo "not running (dir $dir)"; exit 1; fi ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
