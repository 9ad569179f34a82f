#!/usr/bin/env bash
# A one-node SLURM cluster on localhost (munged + slurmctld + slurmd), for the test suite and for
# trying the sbatch templates without a real cluster. Needs root; works without systemd.
#
#   slurm/local_cluster.sh start [--install]   start what is not running; prints "started: ..." last
#   slurm/local_cluster.sh stop [DAEMON ...]   stop those daemons (default: all three), by pid file
#   slurm/local_cluster.sh env                 prints the export line that points SLURM tools here
#   slurm/local_cluster.sh install             installs the Debian packages (slurmctld slurmd slurm-client munge)
#
# Everything lives under $FICO_SLURM_DIR (default /tmp/fico-slurm): its own slurm.conf (selected
# with SLURM_CONF, so /etc/slurm is never touched), its own munge key and socket, state, logs and
# pid files, and its own ports. A system SLURM or munge on the same machine is left alone.
# Daemons are only ever stopped through the pid files written here, never by name.
set -eEuo pipefail  # -E: the ERR trap of `start` also fires inside the functions it calls

BASE=${FICO_SLURM_DIR:-/tmp/fico-slurm}
CONF=$BASE/slurm.conf
MUNGE_SOCKET=$BASE/munge/munge.socket
CTLD_PORT=${FICO_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${FICO_SLURM_SLURMD_PORT:-16818}
WAIT_S=${FICO_SLURM_WAIT_S:-60}
export SLURM_CONF=$CONF
log() { echo "[local_cluster] $*" >&2; }

# alive NAME: our pid file names a live process that is still that daemon (a stale pid file whose
# pid now belongs to something else must never get that process killed)
alive() {
  local pf=$BASE/run/$1.pid pid
  [ -s "$pf" ] && pid=$(cat "$pf") && kill -0 "$pid" 2>/dev/null \
    && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

wait_for() {  # tries command...: poll every 0.1 s
  local n=$1; shift
  for _ in $(seq "$n"); do "$@" && return 0; sleep 0.1; done
  return 1
}

install_packages() {
  local pkgs="slurmctld slurmd slurm-client munge"
  log "installing $pkgs"
  export DEBIAN_FRONTEND=noninteractive
  # the package index of a fresh machine may be empty or stale: update only when install fails
  apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $pkgs >/dev/null; }
}

munge_ok() { munge -S "$MUNGE_SOCKET" -n 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

start_munged() {
  mkdir -p "$BASE/munge" && chmod 700 "$BASE/munge"
  if [ ! -s "$BASE/munge/munge.key" ]; then
    dd if=/dev/urandom of="$BASE/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$BASE/munge/munge.key"
  fi
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"   # left by an unclean stop, munged would refuse to start
  # --force: munged refuses to run as root, and to use a socket outside /run/munge, without it
  munged --force --socket="$MUNGE_SOCKET" --key-file="$BASE/munge/munge.key" \
    --pid-file="$BASE/run/munged.pid" --log-file="$BASE/log/munged.log" --seed-file="$BASE/munge/seed"
  wait_for 50 munge_ok || fail "munged did not start: $(tail -3 "$BASE/log/munged.log")"
}

write_conf() {
  local host hw cpus
  host=$(hostname -s)
  hw=$(slurmd -C | head -1)   # NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 ... RealMemory=24105
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  cat >"$CONF" <<EOF
# written by slurm/local_cluster.sh: a one-node cluster on localhost
ClusterName=fico-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may not start again until its old credential expires (default 120 s). 5 s is
# the smallest value slurmctld accepts (a smaller one is ignored: back to 120 s); a requeue then
# takes ~6 s instead of ~2 min.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# look at the queue every 2 s rather than every 60 s, so that a test's job starts at once
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# a node that came back (slurmd restarted) is usable again without an admin
ReturnToService=2
# SIGTERM -> SIGKILL after 5 s (default 30): requeue and scancel do not wait long
KillWait=5
# finished jobs stay visible to scontrol for 10 minutes (tests read their state and exit code)
MinJobAge=600
InactiveLimit=0
MailProg=/bin/true
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$(( $(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw") * 9 / 10 )) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -N -n "$(hostname -s)" -o %t 2>/dev/null | head -1; }

wait_node_ready() {
  local deadline=$(( $(date +%s) + WAIT_S )) st
  while :; do
    st=$(node_state || true)
    case "$st" in
      idle|mix|alloc) return 0 ;;
      down*|drain*|fail*) scontrol update NodeName="$(hostname -s)" State=RESUME 2>/dev/null || true ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] || { log "node not ready after ${WAIT_S}s (state '$st')"; return 1; }
    sleep 0.2
  done
}

missing_programs() {
  local b; for b in munged munge slurmctld slurmd sbatch srun scontrol sinfo; do command -v $b >/dev/null || echo "$b"; done
}

install() {  # only what is missing
  [ -z "$(missing_programs)" ] && return 0
  [ "$(id -u)" = 0 ] || { log "cannot install: needs root"; return 3; }
  install_packages || { log "installing the SLURM packages failed"; return 4; }
}

STARTED=()
fail() {  # a start that fails half-way stops what it had started: nobody else knows about it
  log "$*"
  trap - ERR
  [ ${#STARTED[@]} -eq 0 ] || stop "${STARTED[@]}"
  exit 1
}

start() {
  [ "$(id -u)" = 0 ] || { log "cannot start: needs root (slurmd launches jobs as their users)"; exit 3; }
  local missing; missing=$(missing_programs | tr '\n' ' ')
  if [ -n "$missing" ]; then
    [ "${1:-}" = --install ] || { log "cannot start: not installed: $missing(run with --install)"; exit 4; }
    install || { log "cannot start: installing the SLURM packages failed"; exit 4; }
  fi
  mkdir -p "$BASE"/{run,log,state}
  trap 'fail "start failed (line $LINENO)"' ERR
  if ! alive munged; then STARTED+=(munged); start_munged; fi
  if ! alive slurmctld; then
    # a fresh controller gets a fresh queue: no jobs left from an earlier session come back
    write_conf
    rm -rf "$BASE/state/ctld" "$BASE/state/d"; mkdir -p "$BASE/state/ctld" "$BASE/state/d"
    STARTED+=(slurmctld)
    slurmctld   # daemonizes; writes SlurmctldPidFile
    wait_for 100 bash -c 'scontrol ping 2>/dev/null | grep -q UP' \
      || fail "slurmctld did not start: $(tail -5 "$BASE/log/slurmctld.log")"
  fi
  if ! alive slurmd; then
    STARTED+=(slurmd)
    slurmd
    wait_for 50 alive slurmd || fail "slurmd did not start: $(tail -5 "$BASE/log/slurmd.log")"
  fi
  wait_node_ready || fail "the node did not become ready"
  trap - ERR
  log "cluster ready: $(sinfo -h -o '%P %D %c CPUs %t')"
  echo "started: ${STARTED[*]}"
}

stop_daemon() {  # NAME: SIGTERM by pid file, SIGKILL if it is still there after 10 s
  local name=$1 pid
  if ! alive "$name"; then rm -f "$BASE/run/$name.pid"; return 0; fi
  pid=$(cat "$BASE/run/$name.pid")
  kill -TERM "$pid"
  wait_for 100 bash -c "! kill -0 $pid 2>/dev/null" || kill -KILL "$pid" 2>/dev/null || true
  rm -f "$BASE/run/$name.pid"
  log "stopped $name (pid $pid)"
}

stop() {
  local names=("$@")
  [ ${#names[@]} -gt 0 ] || names=(slurmd slurmctld munged)
  # Jobs are cancelled while the daemons still run, or their job steps would outlive slurmd.
  if [[ " ${names[*]} " == *" slurmctld "* ]] && alive slurmctld; then
    local jobs; jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// }" ]; then
      scancel $jobs 2>/dev/null || true
      wait_for 150 bash -c '[ -z "$(squeue -h -o %A 2>/dev/null)" ]' || log "jobs still listed: $(squeue -h -o %A | tr '\n' ' ')"
    fi
  fi
  local n
  for n in slurmd slurmctld; do [[ " ${names[*]} " == *" $n "* ]] && stop_daemon "$n" & done
  wait
  [[ " ${names[*]} " == *" munged "* ]] && stop_daemon munged
  return 0
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  install) install ;;
  *) echo "usage: $0 start [--install] | stop [slurmd slurmctld munged] | env | install" >&2; exit 2 ;;
esac
