"""Waiting for submitit jobs without ever hanging on one SLURM killed: :func:`wait`, :func:`slurm_states`."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["wait", "slurm_states", "JobError"]

# States in which a SLURM job may still produce its result (everything else has ended).
_ALIVE = frozenset(
    "PENDING RUNNING REQUEUED REQUEUE_FED REQUEUE_HOLD RESIZING SUSPENDED COMPLETING CONFIGURING "
    "PREEMPTED STAGE_OUT SIGNALING SPECIAL_EXIT RESV_DEL_HOLD".split()
)




class JobError(RuntimeError):
    """A job raised, or ended (killed, timed out, out of memory) without a result."""


def wait(job: Any, *, timeout_s: float | None = None, poll_s: float = 1.0, state_poll_s: float = 10.0, result_grace_s: float = 30.0) -> Any:
    """The result of one submitit job (a list for a multi-task job), without ever waiting forever.

    Unlike ``job.result()`` it needs no ``sacct``: a job SLURM killed raises :class:`JobError` (state
    and log tail) within about ``state_poll_s + result_grace_s``; ``timeout_s`` bounds the whole wait
    (``TimeoutError``; the job keeps running: ``scancel`` it if needed).

    Example:
        >>> import tempfile, time
        >>> from mkopt.launch.local import SubmititLocalLauncher
        >>> job = SubmititLocalLauncher(job_dir=tempfile.mkdtemp()).submit(time.sleep, 1)
        >>> wait(job, timeout_s=0.5, poll_s=0.1)
        Traceback (most recent call last):
        ...
        TimeoutError: gave up after 0.5 s: still waiting for job(s) ... (RUNNING); they may still run (cancel with `scancel ID`)
        >>> wait(job, timeout_s=60, poll_s=0.1) is None   # time.sleep returns None
        True
    """
    watch = _Watch(poll_s, state_poll_s, result_grace_s)
    watch.add(0, job)
    start = time.monotonic()
    while True:
        for _, result, error in watch.poll():
            if error is not None:
                raise JobError(error)
            return result
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"gave up after {timeout_s:g} s: {watch.describe()}")
        time.sleep(poll_s)


def slurm_states(job_ids: Iterable[str], *, timeout_s: float = 30.0) -> dict[str, str]:
    """State of each SLURM job id (``"12"`` or array task ``"12_3"``) from the controller (``squeue``).

    A job the controller no longer knows (``MinJobAge`` after it ended) is ``"PURGED"``. Raises
    ``RuntimeError`` when squeue fails (controller down) or does not answer within ``timeout_s``.

    Example (no ids: no question to SLURM):
        >>> slurm_states([])
        {}
    """
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    mains = sorted({i.split("_")[0] for i in ids})
    command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", f"--jobs={','.join(mains)}"]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"squeue did not answer within {timeout_s:.0f} s (is slurmctld up? `scontrol ping`)") from None
    known: dict[str, str] = {}
    if run.returncode != 0:
        if "invalid job id" not in run.stderr.lower():
            raise RuntimeError(f"squeue failed: {run.stderr.strip() or run.returncode}")
    else:
        for line in run.stdout.splitlines():
            jid, _, state = line.strip().partition("|")
            if jid:
                known[jid] = state.split()[0] if state else "UNKNOWN"
    return {i: known.get(i, "PURGED") for i in ids}


class _Watch:
    """Jobs being waited for; :meth:`poll` (never blocks) returns those that ended since the last call.

    A job is finished when all its tasks' result files exist, failed as soon as one task's result
    is an exception (the job is then cancelled: its other tasks would wait forever in a collective),
    and lost when the scheduler says it ended and no result appears within ``result_grace_s``
    (shared filesystems show files late). States are read every ``state_poll_s``.
    """

    def __init__(self, poll_s: float, state_poll_s: float, result_grace_s: float) -> None:
        self.poll_s, self.state_poll_s, self.result_grace_s = poll_s, state_poll_s, result_grace_s
        self.jobs: dict[Any, Any] = {}
        self.states: dict[Any, str] = {}
        self.ended_at: dict[Any, float] = {}
        self.last_state_poll = float("-inf")
        self.unreachable_since: float | None = None

    def __len__(self) -> int:
        return len(self.jobs)

    def add(self, key: Any, job: Any) -> None:
        self.jobs[key] = job
        self.last_state_poll = float("-inf")  # learn the new job's state soon

    def describe(self) -> str:
        listed = ", ".join(f"{j.job_id} ({self.states.get(k, '?')})" for k, j in self.jobs.items())
        return f"still waiting for job(s) {listed}; they may still run (cancel with `scancel ID`)"

    def poll(self) -> list[tuple[Any, Any, str | None]]:
        out: list[tuple[Any, Any, str | None]] = []
        for key, job in list(self.jobs.items()):
            tasks = [job.task(i) for i in range(job.num_tasks)]
            done = [t.paths.result_pickle.exists() for t in tasks]
            failed = next((t for t, d in zip(tasks, done) if d and t.exception() is not None), None)
            if failed is not None:
                if not all(done):
                    job.cancel(check=False)
                out.append((key, None, f"job {job.job_id} failed:\n{failed.exception()}"))
            elif all(done):
                results = job.results()
                out.append((key, results if len(tasks) > 1 else results[0], None))
            else:
                continue
            self._forget(key)
        now = time.monotonic()
        if self.jobs and now - self.last_state_poll >= self.state_poll_s:
            self.last_state_poll = now
            try:
                self.states = _states(self.jobs)
                self.unreachable_since = None
            except RuntimeError as error:
                self.unreachable_since = self.unreachable_since or now
                if now - self.unreachable_since > max(300.0, 3 * self.state_poll_s):
                    raise JobError(f"cannot read job states for {now - self.unreachable_since:.0f} s: {error}") from None
            for key, state in self.states.items():
                if state.upper() not in _ALIVE:
                    self.ended_at.setdefault(key, now)
                else:
                    # alive again (requeued after preemption or a node failure): restart the grace
                    # period when it next ends, instead of timing out on the first ending
                    self.ended_at.pop(key, None)
        for key, since in list(self.ended_at.items()):
            if key in self.jobs and now - since > self.result_grace_s:
                out.append((key, None, _no_result(self.jobs[key], self.states.get(key, "?"))))
                self._forget(key)
        return out

    def _forget(self, key: Any) -> None:
        self.jobs.pop(key, None)
        self.states.pop(key, None)
        self.ended_at.pop(key, None)


def _states(jobs: dict[Any, Any]) -> dict[Any, str]:
    """Scheduler state per job (local jobs: from their controller process)."""
    from submitit.local.local import LocalJob

    out: dict[Any, str] = {}
    slurm = {k: j for k, j in jobs.items() if not isinstance(j, LocalJob)}
    for key, job in jobs.items():
        if isinstance(job, LocalJob):
            out[key] = "RUNNING" if not job.done() else str(job.state).upper()
    if slurm:
        states = slurm_states(j.job_id for j in slurm.values())
        out.update({k: states[j.job_id] for k, j in slurm.items()})
    return out


def _no_result(job: Any, state: str) -> str:
    lines = [f"job {job.job_id} ended in state {state} without a result (scancel, time limit, out of memory, node failure?)"]
    log = job.stderr() or ""
    if log.strip():
        lines += ["last lines of its stderr:", *("  " + line for line in log.strip().splitlines()[-15:])]
    lines.append(f"logs: {job.paths.stderr} and {job.paths.stdout}")
    return "\n".join(lines)
