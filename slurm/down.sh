#!/usr/bin/env bash
# Tear down the cluster that slurm/up.sh brought up: cancel its jobs, stop exactly the daemons up.sh
# started (PIDs recorded in $MKOPT_SLURM_DIR/pids, checked against their command names), and remove the
# links it created (/etc/slurm/slurm.conf, /usr/local/bin/sacct). Safe to run twice; a no-op when
# nothing was started.
set -euo pipefail
state=${MKOPT_SLURM_DIR:-/var/spool/mkopt-slurm}
say() { echo "slurm/down.sh: $*"; }
alive() { [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }  # a zombie is dead

if [ ! -s "$state/pids" ]; then
  say "nothing to stop ($state/pids is missing or empty)"
else
  # Jobs still running would leave their slurmstepd/python processes behind: cancel them first.
  if grep -q '^slurmctld ' "$state/pids" && timeout 5 scontrol ping >/dev/null 2>&1; then
    jobs=$(timeout 5 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      timeout 10 scancel $jobs 2>/dev/null || true
      for _ in $(seq 50); do [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  for name in slurmd slurmctld munged; do  # reverse start order
    pid=$(awk -v n="$name" '$1 == n {print $2}' "$state/pids")
    [ -n "$pid" ] || continue
    if ! alive "$pid"; then say "$name ($pid) already stopped"; continue; fi
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    if [ "$comm" != "$name" ]; then say "PID $pid is now '$comm', not $name: leaving it alone"; continue; fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then say "$name ($pid) ignored SIGTERM for 10 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    say "stopped $name ($pid)"
  done
  : >"$state/pids"
fi
if [ -s "$state/links" ]; then
  while read -r link; do [ -L "$link" ] && rm -f "$link"; done <"$state/links"
  : >"$state/links"
fi
