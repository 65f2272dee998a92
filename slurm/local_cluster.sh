#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for tests and local trials of our launch scripts.
#
#   slurm/local_cluster.sh up       # install (Debian packages) if needed, start, print SLURM_CONF
#   slurm/local_cluster.sh status   # exit 0 when both nodes are up
#   slurm/local_cluster.sh down     # cancel jobs, stop every daemon, remove the state directory
#
# Two slurmd "nodes" (n1, n2) listen on 127.0.0.1 ports 6921/6922; accounting (slurmdbd +
# MariaDB) is on so that `sacct` works (NeMo-Run reads job states with it). Runs as root, no
# systemd, no cgroups. `up` and `down` are idempotent and `down` leaves no daemon behind.
# Environment: AVR_SLURM_DIR (state/config dir, default /tmp/avr-slurm), AVR_SLURM_ACCOUNT.
set -euo pipefail
D=${AVR_SLURM_DIR:-/tmp/avr-slurm}
ACCOUNT=${AVR_SLURM_ACCOUNT:-avr}
NODES=(n1 n2)
PORTS=(6921 6922)
export SLURM_CONF=$D/etc/slurm.conf
PKGS="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"

log() { echo "local_cluster: $*" >&2; }
wait_for() {  # wait_for DESCRIPTION COMMAND...: retry up to 30 s
  local what=$1 i; shift
  for i in $(seq 1 120); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  log "timed out waiting for $what"; return 1
}

install_packages() {
  # shellcheck disable=SC2086
  dpkg -s $PKGS >/dev/null 2>&1 && return 0
  log "installing $PKGS"
  apt-get update -qq >/dev/null
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
}

write_config() {
  local cpus mem i
  cpus=$(nproc)
  mem=$(( $(free -m | awk '/^Mem:/{print $2}') * 4 / 10 ))  # per node: 40% of RAM
  mkdir -p "$D"/{etc,state,log,db}
  for i in "${NODES[@]}"; do mkdir -p "$D/spool/$i"; done
  cat > "$SLURM_CONF" <<CONF
ClusterName=avrlocal
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6917
AuthType=auth/munge
AuthInfo=cred_expire=10
MailProg=/bin/true
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
# pgid tracking kills a job's orphaned children (linuxproc let one escape).
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6919
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# Fast scheduling so requeued jobs restart within seconds.
SchedulerParameters=bf_interval=1,sched_interval=2
KillWait=5
MinJobAge=600
InactiveLimit=0
NodeName=n1 NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=${PORTS[0]} CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=${PORTS[1]} CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
  cat > "$D/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6919
SlurmUser=root
LogFile=$D/log/slurmdbd.log
PidFile=$D/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3316
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
CONF
  chmod 600 "$D/etc/slurmdbd.conf"
}

start_munge() {
  [[ -s /etc/munge/munge.key ]] || {
    mungekey -c -k /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  install -d -o munge -g munge -m 0755 /run/munge
  if ! { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }; then
    runuser -u munge -- /usr/sbin/munged
    touch "$D/munged.ours"  # started here, so `down` stops it
  fi
  wait_for munge bash -c "munge -n | unmunge"
}

start_db() {
  local sock=$D/db/mysql.sock
  if ! mariadb -S "$sock" -e "select 1" >/dev/null 2>&1; then
    [[ -d $D/db/data/mysql ]] || mariadb-install-db --user=root --datadir="$D/db/data" \
      --auth-root-authentication-method=socket >"$D/log/mariadb-install.log" 2>&1
    setsid /usr/sbin/mariadbd --user=root --datadir="$D/db/data" --socket="$sock" --port=3316 \
      --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$D/db/mariadbd.pid" \
      --log-error="$D/log/mariadb.log" --innodb-buffer-pool-size=32M </dev/null >/dev/null 2>&1 &
    wait_for mariadb mariadb -S "$sock" -e "select 1"
  fi
  mariadb -S "$sock" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'%' IDENTIFIED BY 'slurmpw';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'%'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  pgrep -f "slurmdbd.*" -F "$D/slurmdbd.pid" >/dev/null 2>&1 || SLURM_CONF=$SLURM_CONF /usr/sbin/slurmdbd
  wait_for slurmdbd sacctmgr -n show cluster
}

ctld_running() { [[ -s $D/slurmctld.pid ]] && kill -0 "$(cat "$D/slurmctld.pid")" 2>/dev/null; }
nodes_idle() {  # (sinfo retries for a minute when slurmctld is down: check the pid first)
  ctld_running && [[ $(timeout 10 sinfo -h -N -o "%N %T" 2>/dev/null | grep -cE "^n[12] (idle|mixed|allocated)") -eq 2 ]]
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

up() {
  if nodes_idle; then log "already up"; echo "export SLURM_CONF=$SLURM_CONF"; return 0; fi
  local port
  if ! ctld_running; then  # our ports held by someone else: most likely a cluster in another dir
    for port in 6917 6919 3316 "${PORTS[@]}"; do
      if port_busy "$port"; then
        log "port $port is in use: is a cluster from another AVR_SLURM_DIR running? Stop it" \
            "with AVR_SLURM_DIR=<its dir> $0 down"
        return 1
      fi
    done
  fi
  install_packages
  write_config
  start_munge
  start_db
  ctld_running || /usr/sbin/slurmctld -f "$SLURM_CONF"
  wait_for slurmctld scontrol ping
  local n
  for n in "${NODES[@]}"; do
    if ! { [[ -s $D/slurmd-$n.pid ]] && kill -0 "$(cat "$D/slurmd-$n.pid")" 2>/dev/null; }; then
      /usr/sbin/slurmd -f "$SLURM_CONF" -N "$n"
    fi
  done
  wait_for "both nodes idle" nodes_idle
  sacctmgr -i add cluster avrlocal >/dev/null 2>&1 || true
  sacctmgr -i add account "$ACCOUNT" >/dev/null 2>&1 || true
  sacctmgr -i add user root account="$ACCOUNT" >/dev/null 2>&1 || true
  log "up: nodes n1 n2, account $ACCOUNT, config $SLURM_CONF"
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pidfile() {  # SIGTERM, wait up to 10 s, then SIGKILL
  local f=$1 p i
  [[ -s $f ]] || return 0
  p=$(cat "$f"); kill "$p" 2>/dev/null || return 0
  for i in $(seq 1 50); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.2; done
  kill -9 "$p" 2>/dev/null || true
}

kill_our_stepds() {  # step daemons left behind by a job; only this cluster's (by SLURM_CONF)
  local p
  for p in $(pgrep -x slurmstepd 2>/dev/null); do
    tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF" \
      && kill -9 "$p" 2>/dev/null
  done
  return 0
}

down() {
  local f i
  if ctld_running; then
    scancel --full --signal=KILL --user=root 2>/dev/null || true
    # let slurmstepd report completion before slurmctld goes, or it retries forever
    for i in $(seq 1 75); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.2; done
  fi
  for f in "$D"/slurmd-*.pid "$D/slurmctld.pid" "$D/slurmdbd.pid" "$D/db/mariadbd.pid"; do
    stop_pidfile "$f"
  done
  [[ -f $D/munged.ours ]] && stop_pidfile /run/munge/munged.pid
  kill_our_stepds
  rm -rf "$D"
  log "down"
}

status() {
  nodes_idle && { sinfo -N; return 0; }
  log "not up"; return 1
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
