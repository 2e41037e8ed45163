#!/bin/bash
# A one-node SLURM cluster on this machine, for testing `gn sweep --emit slurm` with a real scheduler.
#
#   scripts/slurm_local.sh install   # apt-get install slurmctld slurmd slurm-client munge (root)
#   eval "$(scripts/slurm_local.sh up)"     # start munged, slurmctld, slurmd; prints `export SLURM_CONF=...`
#   scripts/slurm_local.sh status
#   scripts/slurm_local.sh down      # stop the daemons (the state directory is kept until `clean`)
#   scripts/slurm_local.sh clean
#
# The configuration needs neither systemd nor cgroups: processes are tracked by their parent
# (proctrack/linuxproc), tasks are not confined (task/none), the daemons run in the foreground
# in the background of this shell, as root (SlurmUser=root, SlurmdUser=root). Everything lives
# under $GN_SLURM_DIR (default /tmp/gn-slurm): slurm.conf, logs, spool and state. Ports
# $GN_SLURM_PORT (default 16817) and the next one.
set -euo pipefail
DIR=${GN_SLURM_DIR:-/tmp/gn-slurm}
PORT=${GN_SLURM_PORT:-16817}
HOST=$(hostname -s)
CONF=$DIR/slurm.conf
cmd=${1:-status}

need() { command -v "$1" >/dev/null 2>&1 || { echo "slurm_local: '$1' not found; run: $0 install" >&2; exit 3; }; }

write_conf() {
  mkdir -p "$DIR"/{spool,state,log,munge}
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat > "$CONF" <<CONF
ClusterName=gnlocal
SlurmctldHost=$HOST
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=defer
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
JobRequeue=1
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

start_munge() {
  if pgrep -x munged >/dev/null; then return; fi
  mkdir -p /etc/munge /var/run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
  if id munge >/dev/null 2>&1; then
    chown -R munge:munge /etc/munge /var/run/munge /var/log/munge /var/lib/munge
    su -s /bin/sh munge -c "munged" 2>>"$DIR/log/munged.err" || munged --force
  else
    munged --force
  fi
}

case "$cmd" in
  install)
    [ "$(id -u)" = 0 ] || { echo "slurm_local install: run as root" >&2; exit 3; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >&2 ;;
  up)
    [ "$(id -u)" = 0 ] || { echo "slurm_local up: run as root (the daemons run as root here)" >&2; exit 3; }
    need slurmctld; need slurmd; need munged; need sinfo
    write_conf
    start_munge
    export SLURM_CONF=$CONF
    if ! pgrep -f "slurmctld -D -i -f $CONF" >/dev/null; then
      setsid slurmctld -D -i -f "$CONF" >>"$DIR/log/slurmctld.out" 2>&1 < /dev/null &
    fi
    if ! pgrep -f "slurmd -D -f $CONF" >/dev/null; then
      setsid slurmd -D -f "$CONF" >>"$DIR/log/slurmd.out" 2>&1 < /dev/null &
    fi
    for _ in $(seq 60); do
      if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "export SLURM_CONF=$CONF"; exit 0
      fi
      sleep 1
    done
    echo "slurm_local up: the node did not become idle in 60 s; see $DIR/log/" >&2
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    exit 4 ;;
  status)
    export SLURM_CONF=$CONF
    sinfo 2>&1 || true; squeue 2>&1 || true ;;
  down)
    pkill -f "slurmd -D -f $CONF" 2>/dev/null || true
    pkill -f "slurmctld -D -i -f $CONF" 2>/dev/null || true
    sleep 1 ;;
  clean)
    "$0" down; rm -rf "$DIR" ;;
  *) echo "usage: $0 install|up|status|down|clean" >&2; exit 2 ;;
esac
