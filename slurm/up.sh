#!/usr/bin/env bash
# Bring up a real single-node SLURM cluster on this machine (Debian 12, root, no systemd needed).
#
#   slurm/up.sh     # ~12 s from nothing (apt + config + daemons + node idle), <2 s when installed; a no-op when up
#   slurm/down.sh   # stops exactly the daemons this script started
#
# What it does: installs slurmctld, slurmd, slurm-client and munge with apt when missing; writes a
# slurm.conf for this node into $MKOPT_SLURM_DIR (default /var/spool/mkopt-slurm) and links it as
# /etc/slurm/slurm.conf (refusing to replace a configuration it did not write); starts munged (as user
# munge), slurmctld (clean state) and slurmd; waits until the node is idle; installs the `sacct`
# stand-in slurm/bin/sacct as /usr/local/bin/sacct (this cluster has no accounting database, and
# submitit reads job states from sacct); records the PIDs and links it created in $MKOPT_SLURM_DIR.
# One partition, `local`, holds the node (no GPUs, no GRES). Profile: slurm/profiles/local-test.yaml.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state=${MKOPT_SLURM_DIR:-/var/spool/mkopt-slurm}
conf=/etc/slurm/slurm.conf
marker="# written by mkopt slurm/up.sh"
die() { echo "slurm/up.sh: $*" >&2; exit 1; }
say() { echo "slurm/up.sh: $*"; }
alive() { [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
pid_of() { [ -s "$1" ] && tr -d ' \n' <"$1" || true; }
t0=$(date +%s.%N)

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons); the SLURM tests skip without a cluster"

# Already up (started by us)? Then nothing to do; half up? Then stop the leftovers first.
if [ -s "$state/pids" ]; then
  all_alive=1
  while read -r _ pid; do alive "$pid" || all_alive=0; done <"$state/pids"
  if [ "$all_alive" = 1 ] && timeout 10 scontrol ping >/dev/null 2>&1; then
    say "already up (PIDs in $state/pids)"; exit 0
  fi
  say "a previous bring-up is half alive: stopping it first"
  "$here/down.sh"
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || die "slurmctld/slurmd/sbatch/munged are missing and apt-get is not available: install SLURM and munge yourself"
  say "installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  pkgs=(slurmctld slurmd slurm-client munge)
  # apt's postinst cannot start services here (no init system): harmless, we start the daemons below.
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; } \
    || die "apt-get install ${pkgs[*]} failed"
fi

mkdir -p "$state/state" "$state/spool"
: >"$state/pids"
: >"$state/links"
record() { echo "$1 $2" >>"$state/pids"; }
fail() {  # stop what we started, show the logs, exit
  echo "slurm/up.sh: $*" >&2
  for log in "$state/slurmctld.log" "$state/slurmd.log"; do [ -f "$log" ] && { echo "--- tail $log" >&2; tail -15 "$log" >&2; }; done
  "$here/down.sh" >&2 || true
  exit 1
}

# munge: the key comes with the package; munged refuses to run as root with a key owned by munge.
if [ ! -s /etc/munge/munge.key ]; then
  say "creating /etc/munge/munge.key"
  install -d -o munge -g munge -m 700 /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
if timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
  say "munged already running (not started by this script, will not be stopped by down.sh)"
else
  install -d -o munge -g munge -m 755 /run/munge
  rm -f /run/munge/munged.pid
  setpriv --reuid=munge --regid=munge --init-groups munged --pid-file=/run/munge/munged.pid \
    || fail "munged did not start (log: /var/log/munge/munged.log)"
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  record munged "$(pid_of /run/munge/munged.pid)"
  for _ in $(seq 50); do timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 || fail "munged started but 'munge -n | unmunge' fails"
fi

# slurm.conf for this node; clients (sbatch, srun inside jobs, scontrol) read /etc/slurm/slurm.conf.
node=$(hostname -s)
# SLURM itself needs no DNS here (NodeAddr=127.0.0.1), but DDP jobs use the node name as master address.
getent hosts "$node" >/dev/null || say "warning: hostname '$node' does not resolve: multi-task (DDP) jobs cannot reach their master; add '127.0.0.1 $node' to /etc/hosts"
# `|| fail`: under `set -e` a bare `read` at end of input (slurmd -C printed no NodeName line) would end
# the script silently; fail (not die) also stops a munged this script started.
read -r cpus mem < <(slurmd -C | awk '/^NodeName/ {for (i = 1; i <= NF; i++) {split($i, kv, "="); v[kv[1]] = kv[2]} print v["CPUs"], v["RealMemory"]}') \
  || fail "'slurmd -C' printed no NodeName line (its output: $(slurmd -C 2>&1 | head -3 | tr '\n' ' '))"
[ -n "$cpus" ] && [ -n "$mem" ] || fail "could not read CPUs/RealMemory from 'slurmd -C'"
mem=$((mem * 9 / 10))  # below what slurmd -C reports, or the node is drained for "low RealMemory"
cat >"$state/slurm.conf" <<EOF
$marker; a single-node cluster for tests (see the header of slurm/up.sh)
ClusterName=mkopt
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# short credential lifetime + frequent scheduling: a requeued job restarts after ~12 s, not ~3 min
# (SLURM holds a requeued job until its old credential expired; default 120 s + sched_interval 60 s)
AuthInfo=cred_expire=10
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
# no cgroups here
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# reject impossible requests at submit time instead of leaving them PENDING forever
EnforcePartLimits=ALL
ReturnToService=2
# no accounting database: slurm/bin/sacct answers submitit from 'squeue' instead
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
KillWait=5
InactiveLimit=0
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmdSpoolDir=$state/spool
StateSaveLocation=$state/state
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
mkdir -p /etc/slurm
if [ -L "$conf" ] && [ "$(readlink "$conf")" = "$state/slurm.conf" ]; then
  :
elif [ -e "$conf" ] || [ -L "$conf" ]; then
  if head -1 "$conf" 2>/dev/null | grep -q "^$marker"; then rm -f "$conf"; else
    fail "$conf exists and was not written by this script (a real cluster's configuration?): move it away first"
  fi
fi
if [ ! -L "$conf" ]; then ln -s "$state/slurm.conf" "$conf"; echo "$conf" >>"$state/links"; fi

rm -f "$state/slurmctld.pid" "$state/slurmd.pid"
slurmctld -c -f "$state/slurm.conf" || fail "slurmctld did not start"
for _ in $(seq 50); do [ -s "$state/slurmctld.pid" ] && break; sleep 0.1; done
record slurmctld "$(pid_of "$state/slurmctld.pid")"
slurmd -f "$state/slurm.conf" || fail "slurmd did not start"
for _ in $(seq 50); do [ -s "$state/slurmd.pid" ] && break; sleep 0.1; done
record slurmd "$(pid_of "$state/slurmd.pid")"
while read -r name pid; do alive "$pid" || fail "$name did not stay up"; done <"$state/pids"

# submitit polls sacct for job states; without accounting the real sacct only errors out.
standin=/usr/local/bin/sacct
if [ -L "$standin" ] && [ "$(readlink "$standin")" = "$here/bin/sacct" ]; then
  :
elif [ -e "$standin" ]; then
  say "warning: $standin exists and is not slurm/bin/sacct: submitit will use it"
else
  ln -s "$here/bin/sacct" "$standin"; echo "$standin" >>"$state/links"
fi

# wait until the node is idle (registered, not drained)
ok=0
for _ in $(seq 300); do
  [ "$(sinfo -h -n "$node" -o %T 2>/dev/null)" = idle ] && { ok=1; break; }
  sleep 0.2
done
[ "$ok" = 1 ] || fail "node $node is not idle after 60 s: $(sinfo -h -N -o '%N %T %E' 2>&1)"
say "up in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s: node $node ($cpus CPUs, ${mem} MB), partition local; PIDs in $state/pids"
