"""Run ``fn(item)`` for many items: in this process, on local processes, or as SLURM job arrays.

Every launcher implements :class:`mkopt.launch.base.Launcher`: ``run(fn, items)`` yields
``(item, result)`` as runs finish. The kinds (:data:`LAUNCHERS`):

- ``inline``: sequentially in this process (simplest to debug);
- ``pool``: a local process pool (``concurrent.futures``);
- ``local``: submitit's local executor (one controller process per job, logs in the job folder,
  ``Checkpointable`` requeue and multi-task jobs work as on SLURM);
- ``slurm``: submitit on SLURM; a sweep goes out as job arrays (``executor.map_array``).

Cluster settings come from a :class:`ClusterProfile` (a YAML file under ``slurm/profiles/``, see
:func:`load_profile`) plus keyword/CLI overrides. The job folder (submitit's pickles and logs) comes
from the ``job_dir`` argument, else ``$MKOPT_JOB_DIR``, else the profile; it must be an absolute,
existing, writable folder that every node mounts at the same path (:func:`resolve_job_dir`).

Waiting never hangs on a job SLURM killed: results are read as soon as their file exists, and job
states come from the controller (``squeue``), not from ``sacct`` (which needs an accounting
database); a job that ended without a result raises :class:`JobError` with its log. Submissions
SLURM rejects (GPUs on a node without GRES, more CPUs or memory than a node has, an unknown
partition) raise :class:`SubmissionError` with SLURM's message and what to change.

Example:
    >>> from mkopt import launch
    >>> launcher = launch.make_launcher("inline")
    >>> sorted(launcher.run(abs, [-2, 1]))
    [(-2, 2), (1, 1)]
    >>> launch.ClusterProfile(partition="gpu", tasks_per_node=4, gpus_per_task=1).slurm_parameters()["gpus_per_node"]
    4
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from .base import InlineLauncher, Launcher, LocalPoolLauncher
from ..config import parse_overrides  # the one key=value parser (re-exported: --cluster values)

__all__ = [
    "LAUNCHERS",
    "JOB_DIR_ENV",
    "ClusterProfile",
    "load_profile",
    "parse_overrides",
    "resolve_job_dir",
    "make_launcher",
    "SubmititLauncher",
    "wait",
    "slurm_states",
    "SubmissionError",
    "JobError",
    "add_launcher_arguments",
    "launcher_from_args",
]

T = TypeVar("T")
LAUNCHERS = ("inline", "pool", "local", "slurm")
JOB_DIR_ENV = "MKOPT_JOB_DIR"
# States in which a SLURM job may still produce its result (everything else has ended).
_ALIVE = frozenset(
    "PENDING RUNNING REQUEUED REQUEUE_FED REQUEUE_HOLD RESIZING SUSPENDED COMPLETING CONFIGURING "
    "PREEMPTED STAGE_OUT SIGNALING SPECIAL_EXIT RESV_DEL_HOLD".split()
)


class SubmissionError(RuntimeError):
    """The scheduler refused a submission (its message, what was asked for, and what to change)."""


class JobError(RuntimeError):
    """A job raised, or ended (killed, timed out, out of memory) without a result."""


# ---------------------------------------------------------------------------------------------
# profiles


@dataclasses.dataclass(frozen=True)
class ClusterProfile:
    """Cluster settings for submitit jobs; every field can come from YAML or an override.

    Resources are per task (one task = one process, e.g. one DDP rank): SLURM gets
    ``--gpus-per-node = gpus_per_task * tasks_per_node`` (every task sees the node's GPUs and
    :class:`submitit.helpers.TorchDistributedEnvironment` picks one by local rank) and
    ``--mem = mem_gb_per_task * tasks_per_node``. ``sbatch`` holds any other sbatch option
    (``{"constraint": "a100"}``); ``setup`` holds shell lines run before the job (``module load …``).

    Example:
        >>> p = ClusterProfile(partition="gpu", tasks_per_node=2, cpus_per_task=8, gpus_per_task=1, mem_gb_per_task=32)
        >>> {k: p.slurm_parameters()[k] for k in ("ntasks_per_node", "gpus_per_node", "mem", "time")}
        {'ntasks_per_node': 2, 'gpus_per_node': 2, 'mem': '65536M', 'time': 60}
        >>> p.replace(gpus_per_task=0).slurm_parameters().get("gpus_per_node") is None
        True
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    gpus_per_task: int = 0
    mem_gb_per_task: float | None = None
    time_min: int = 60
    job_dir: str | None = None
    array_parallelism: int = 256
    max_array_size: int = 1000
    signal_delay_s: int = 90
    max_num_timeout: int = 3
    setup: tuple[str, ...] = ()
    sbatch: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        positive = ("nodes", "tasks_per_node", "cpus_per_task", "time_min", "array_parallelism", "max_array_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("gpus_per_task", "signal_delay_s", "max_num_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.mem_gb_per_task is not None and self.mem_gb_per_task <= 0:
            raise ValueError(f"mem_gb_per_task={self.mem_gb_per_task} must be > 0 (or null for the partition's default)")
        object.__setattr__(self, "setup", tuple(self.setup))
        object.__setattr__(self, "sbatch", dict(self.sbatch))

    @classmethod
    def keys(cls) -> list[str]:
        """The valid field names (YAML keys and override names)."""
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **overrides: Any) -> ClusterProfile:
        """A copy with ``overrides`` applied (unknown names are an error, not ignored)."""
        unknown = sorted(set(overrides) - set(self.keys()))
        if unknown:
            raise ValueError(f"unknown cluster setting(s) {unknown}; valid: {', '.join(self.keys())}")
        return dataclasses.replace(self, **overrides)

    @property
    def tasks(self) -> int:
        """Tasks (processes) per job: ``nodes * tasks_per_node``."""
        return self.nodes * self.tasks_per_node

    def slurm_parameters(self, job_name: str = "mkopt") -> dict[str, Any]:
        """Keyword arguments for ``submitit.SlurmExecutor.update_parameters``."""
        params: dict[str, Any] = {
            "job_name": job_name,
            "nodes": self.nodes,
            "ntasks_per_node": self.tasks_per_node,
            "cpus_per_task": self.cpus_per_task,
            "time": self.time_min,
            "signal_delay_s": self.signal_delay_s,
            "array_parallelism": self.array_parallelism,
        }
        for name in ("partition", "account", "qos"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        if self.gpus_per_task:
            params["gpus_per_node"] = self.gpus_per_task * self.tasks_per_node
        if self.mem_gb_per_task is not None:
            params["mem"] = f"{round(self.mem_gb_per_task * self.tasks_per_node * 1024)}M"
        if self.setup:
            params["setup"] = list(self.setup)
        if self.sbatch:
            params["additional_parameters"] = dict(self.sbatch)
        return params

    def local_parameters(self) -> dict[str, Any]:
        """Keyword arguments for ``submitit.LocalExecutor.update_parameters`` (one node)."""
        if self.nodes != 1:
            raise ValueError(f"nodes={self.nodes}: the local executor runs on this machine only (use nodes: 1)")
        params: dict[str, Any] = {
            "timeout_min": self.time_min,
            "tasks_per_node": self.tasks_per_node,
            "signal_delay_s": self.signal_delay_s,
        }
        if self.gpus_per_task:
            params["gpus_per_node"] = self.gpus_per_task * self.tasks_per_node
        if self.setup:
            params["setup"] = list(self.setup)
        return params

    def summary(self) -> str:
        """One line: what a job asks for."""
        parts = [f"{k}={getattr(self, k)}" for k in ("partition", "account", "qos") if getattr(self, k) is not None]
        parts += [f"nodes={self.nodes}", f"tasks_per_node={self.tasks_per_node}", f"cpus_per_task={self.cpus_per_task}"]
        parts += [f"gpus_per_task={self.gpus_per_task}", f"mem_gb_per_task={self.mem_gb_per_task}", f"time_min={self.time_min}"]
        parts += [f"{k}={v}" for k, v in self.sbatch.items()]
        return ", ".join(parts)


def _check_type(name: str, value: Any, annotation: str) -> None:
    ok = {
        "str | None": value is None or isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float | None": value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)),
        "tuple[str, ...]": isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
        "Mapping[str, Any]": isinstance(value, Mapping) and all(isinstance(k, str) for k in value),
    }[annotation]
    if not ok:
        want = {"str | None": "a string or null", "int": "an integer", "float | None": "a number or null",
                "tuple[str, ...]": "a list of strings", "Mapping[str, Any]": "a mapping of option: value"}[annotation]  # fmt: skip
        raise TypeError(f"cluster setting {name}={value!r} must be {want}")


def load_profile(path: str | os.PathLike | None = None, **overrides: Any) -> ClusterProfile:
    """Read a YAML profile (keys: :meth:`ClusterProfile.keys`), then apply ``overrides``.

    ``path=None`` starts from the defaults. Unknown keys are an error naming the file.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "p.yaml"
        >>> _ = f.write_text("partition: gpu\\ngpus_per_task: 1\\ntime_min: 120\\n")
        >>> load_profile(f, time_min=30).time_min, load_profile(f).partition
        (30, 'gpu')
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"cluster profile {path} does not exist (profiles live in slurm/profiles/, e.g. slurm/profiles/local-test.yaml)"
            )
        try:
            import yaml
        except ImportError as error:  # pragma: no cover - pyyaml comes with the slurm/recipes extras
            raise ImportError("reading a cluster profile needs PyYAML: pip install pyyaml") from error
        loaded = yaml.safe_load(path.read_text())
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"cluster profile {path} must be a YAML mapping of setting: value, got {type(loaded).__name__}")
        unknown = sorted(set(loaded) - set(ClusterProfile.keys()))
        if unknown:
            raise ValueError(f"cluster profile {path}: unknown key(s) {unknown}; valid: {', '.join(ClusterProfile.keys())}")
        values = loaded
    try:
        return ClusterProfile(**values).replace(**overrides)
    except (TypeError, ValueError) as error:
        where = f"cluster profile {path}" if path is not None else "cluster settings"
        raise type(error)(f"{where}: {error}") from None


# ---------------------------------------------------------------------------------------------
# the job folder


def resolve_job_dir(job_dir: str | os.PathLike | None = None, profile: ClusterProfile | None = None) -> Path:
    """The job folder: ``job_dir``, else ``$MKOPT_JOB_DIR``, else ``profile.job_dir``; checked.

    ``~`` and ``$VARS`` are expanded. It must be absolute (a relative path means something else on
    a compute node), exist (it is not created: a typo or a node-local disk should fail here, not
    as a silent job failure) and be writable. Each error names the folder and the fix.

    Example:
        >>> resolve_job_dir("runs/jobs")
        Traceback (most recent call last):
        ...
        ValueError: job folder 'runs/jobs' (from the job_dir argument) is relative: give an absolute path on a filesystem every node mounts at the same place, e.g. /shared/$USER/mkopt-jobs
    """
    if job_dir is not None:
        raw, source = str(job_dir), "the job_dir argument"
    elif os.environ.get(JOB_DIR_ENV):
        raw, source = os.environ[JOB_DIR_ENV], f"${JOB_DIR_ENV}"
    elif profile is not None and profile.job_dir:
        raw, source = profile.job_dir, "the profile's job_dir"
    else:
        raise ValueError(
            f"no job folder: pass --job-dir / job_dir=, set job_dir: in the cluster profile, or export {JOB_DIR_ENV}=/shared/path "
            "(an absolute, existing folder that every node mounts at the same place; submitit writes pickles and logs there)"
        )
    path = Path(os.path.expandvars(os.path.expanduser(raw)))
    if not path.is_absolute():
        raise ValueError(
            f"job folder {raw!r} (from {source}) is relative: give an absolute path on a filesystem every node mounts "
            "at the same place, e.g. /shared/$USER/mkopt-jobs"
        )
    if not path.exists():
        raise FileNotFoundError(
            f"job folder {path} (from {source}) does not exist: create it with `mkdir -p {path}` on a filesystem "
            f"every node mounts, or point {source} elsewhere"
        )
    if not path.is_dir():
        raise NotADirectoryError(f"job folder {path} (from {source}) is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".mkopt-write-test-"):
            pass
    except OSError as error:
        raise PermissionError(
            f"job folder {path} (from {source}) is not writable ({error.strerror}): fix its permissions or choose another folder"
        ) from None
    return path


# ---------------------------------------------------------------------------------------------
# launchers


def make_launcher(
    kind: str,
    *,
    profile: ClusterProfile | str | os.PathLike | None = None,
    job_dir: str | os.PathLike | None = None,
    workers: int = 2,
    timeout_s: float | None = None,
    **overrides: Any,
) -> Launcher:
    """A launcher of ``kind`` (one of :data:`LAUNCHERS`).

    ``profile``: a :class:`ClusterProfile` or the path of a YAML profile (``local``/``slurm`` only);
    ``overrides``: profile settings that win over the file; ``workers``: processes for ``pool`` and
    the most jobs ``local`` runs at once; ``timeout_s``: give up waiting after this long.

    Example:
        >>> list(make_launcher("inline").run(len, ["ab"]))
        [('ab', 2)]
        >>> make_launcher("cloud")
        Traceback (most recent call last):
        ...
        ValueError: launcher 'cloud' is unknown: use one of inline, pool, local, slurm
    """
    if kind not in LAUNCHERS:
        raise ValueError(f"launcher {kind!r} is unknown: use one of {', '.join(LAUNCHERS)}")
    if kind in ("inline", "pool") and (profile is not None or overrides):
        raise ValueError(f"launcher {kind!r} takes no cluster profile or settings (they are for local and slurm)")
    if kind == "inline":
        return InlineLauncher()
    if kind == "pool":
        return LocalPoolLauncher(workers)
    if not isinstance(profile, ClusterProfile):
        profile = load_profile(profile)
    profile = profile.replace(**overrides)
    return SubmititLauncher(kind, profile, job_dir=job_dir, max_running=workers if kind == "local" else None, timeout_s=timeout_s)


class SubmititLauncher:
    """Runs jobs with submitit on SLURM (``kind="slurm"``) or on local processes (``"local"``).

    ``run(fn, items)`` submits one job per item (on SLURM as job arrays of at most
    ``profile.max_array_size``, ``profile.array_parallelism`` running at once; locally at most
    ``max_running`` at once) and yields ``(item, result)`` as jobs finish. A job with several tasks
    yields the list of its tasks' results. A failed or killed job does not stop the others: the
    finished ones are yielded, then :class:`JobError` lists every failure. ``submit`` sends a single
    job (e.g. a multi-task DDP job) to be waited on with :func:`wait`.

    Each launcher writes into its own new subfolder of the job folder (``<job_dir>/<time>-<id>/<job id>``),
    so a restarted controller that reuses job ids cannot mix up old and new results. ``fn`` and the
    items are pickled (cloudpickle): use module-level functions and plain data.

    Example (``kind="local"`` runs here; on a cluster, ``SubmititLauncher("slurm", load_profile(
    "slurm/profiles/my-cluster.yaml"))`` is used the same way):
        >>> import tempfile
        >>> launcher = SubmititLauncher("local", ClusterProfile(time_min=1), job_dir=tempfile.mkdtemp())
        >>> sorted(launcher.run(abs, [-3, 2]))
        [(-3, 3), (2, 2)]
        >>> wait(launcher.submit(divmod, 7, 2), timeout_s=60)
        (3, 1)
    """

    def __init__(
        self,
        kind: str,
        profile: ClusterProfile | None = None,
        *,
        job_dir: str | os.PathLike | None = None,
        max_running: int | None = None,
        timeout_s: float | None = None,
        poll_s: float = 1.0,
        state_poll_s: float = 10.0,
        result_grace_s: float = 30.0,
        job_name: str = "mkopt",
    ) -> None:
        if kind not in ("local", "slurm"):
            raise ValueError(f"SubmititLauncher kind={kind!r}: use 'local' or 'slurm' (or make_launcher('inline'/'pool'))")
        if importlib.util.find_spec("submitit") is None:  # fail here, before any folder is made
            raise ImportError("the local and slurm launchers need submitit: pip install 'mkopt[slurm]'")
        if kind == "slurm":
            missing = [c for c in ("sbatch", "srun", "squeue") if shutil.which(c) is None]
            if missing:
                raise RuntimeError(
                    f"launcher 'slurm': {', '.join(missing)} not found on PATH, so this machine cannot submit to SLURM. "
                    "Run from a login node of the cluster, use --launcher local, or bring up a test cluster with slurm/up.sh"
                )
        self.kind = kind
        self.profile = profile or ClusterProfile()
        if kind == "local":
            self.profile.local_parameters()  # validates (one node)
        self.job_dir = resolve_job_dir(job_dir, self.profile)
        cpus = os.cpu_count() or 1
        # A local job runs tasks_per_node processes of cpus_per_task CPUs each on this machine.
        per_job = self.profile.cpus_per_task * self.profile.tasks_per_node
        self.max_running = max_running if max_running is not None else max(1, cpus // per_job)
        if self.max_running < 1:
            raise ValueError(f"max_running={self.max_running} must be >= 1")
        self.timeout_s, self.poll_s, self.state_poll_s, self.job_name = timeout_s, poll_s, state_poll_s, job_name
        self.result_grace_s = result_grace_s if kind == "slurm" else min(result_grace_s, 5.0)
        self.folder = self.job_dir / f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"

    def executor(self) -> Any:
        """A configured ``submitit`` executor writing into this launcher's folder (``.../%j``)."""
        import submitit

        self.folder.mkdir(exist_ok=True)
        if self.kind == "slurm":
            executor = submitit.SlurmExecutor(folder=self.folder / "%j", max_num_timeout=self.profile.max_num_timeout)
            executor.update_parameters(**self.profile.slurm_parameters(self.job_name))
        else:
            executor = submitit.LocalExecutor(folder=self.folder / "%j", max_num_timeout=self.profile.max_num_timeout)
            executor.update_parameters(**self.profile.local_parameters())
        return executor

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Submit one job ``fn(*args, **kwargs)`` (all of the profile's tasks); returns the submitit Job."""
        executor = self.executor()
        with _ExplainRejection(self, 1):
            return executor.submit(fn, *args, **kwargs)

    def map(self, fn: Callable[[T], Any], items: Sequence[T]) -> list[Any]:
        """Submit ``fn(item)`` for every item at once (job arrays on SLURM); returns the Jobs in order."""
        executor = self.executor()
        jobs: list[Any] = []
        chunk = self.profile.max_array_size if self.kind == "slurm" else 1
        for start in range(0, len(items), chunk):
            part = list(items[start : start + chunk])
            with _ExplainRejection(self, len(part)):
                jobs += executor.map_array(fn, part) if len(part) > 1 else [executor.submit(fn, part[0])]
        return jobs

    def run(self, fn: Callable[[T], Any], items: Iterable[T]) -> Iterator[tuple[T, Any]]:
        items = list(items)
        window = len(items) if self.kind == "slurm" else self.max_running
        queue = list(range(len(items)))
        watch = _Watch(self.poll_s, self.state_poll_s, self.result_grace_s)
        failures: list[str] = []
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while queue or watch:
            take, queue = queue[: window - len(watch)], queue[window - len(watch) :]
            if take:
                for index, job in zip(take, self.map(fn, [items[i] for i in take])):
                    watch.add(index, job)
            finished = watch.poll()
            for index, result, error in finished:
                if error is not None:
                    failures.append(f"{_describe(items[index])}: {error}")
                else:
                    yield items[index], result
            if not finished and watch:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"gave up after {self.timeout_s:g} s: {watch.describe()}")
                time.sleep(self.poll_s)
        if failures:
            shown, rest = failures[:5], failures[5:]
            more = f"\n\n... and {len(rest)} more: " + "; ".join(f.split(": job", 1)[0] for f in rest) if rest else ""
            raise JobError(f"{len(failures)} of {len(items)} job(s) failed:\n\n" + "\n\n".join(shown) + more)

class _ExplainRejection:
    """Turns submitit's bare ``FailedJobError(sbatch's stderr)`` into a :class:`SubmissionError`."""

    def __init__(self, launcher: SubmititLauncher, count: int) -> None:
        self.launcher, self.count = launcher, count

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> bool:
        from submitit.core.utils import FailedJobError

        if error is None or not isinstance(error, FailedJobError):
            return False
        message = str(error).strip() or "(no message)"
        what = "job array" if self.count > 1 else "job"
        raise SubmissionError(
            f"SLURM rejected the {what} (sbatch said):\n  {message.replace(chr(10), chr(10) + '  ')}\n"
            f"requested: {self.launcher.profile.summary()}\n"
            f"what to do: {_hint(message, self.launcher.profile)}"
        ) from error


def _hint(message: str, profile: ClusterProfile) -> str:
    text = message.lower()
    partition = profile.partition or "the default partition"
    if "gres" in text or "gpu" in text:
        return (
            f"{partition} has no GPUs of that kind: for a CPU run set gpus_per_task: 0 (--cluster gpus_per_task=0); "
            "otherwise pick a GPU partition (`sinfo -o '%P %G'` lists partitions and their GRES)"
        )
    if "partition" in text:
        return "list the partitions with `sinfo -s` and set partition: in the profile (or --cluster partition=NAME)"
    if "memory" in text:
        return f"less memory than a node of {partition} has: lower mem_gb_per_task or tasks_per_node (`sinfo -N -o '%N %P %c %m'` shows CPUs and MB per node)"
    if "processors" in text or "node configuration" in text or "cpu" in text:
        return (
            f"more CPUs, GPUs or memory per node than a node of {partition} has: lower cpus_per_task, tasks_per_node, "
            "gpus_per_task or mem_gb_per_task (`sinfo -N -o '%N %P %c %m %G'` shows what each node has)"
        )
    if "node count" in text:
        return f"more nodes than {partition} has: lower nodes (`sinfo -s` shows the node counts)"
    if "account" in text or "qos" in text or "association" in text:
        return "set account:/qos: to ones you belong to (`sacctmgr show assoc user=$USER format=account,qos`)"
    if "time limit" in text:
        return f"time_min={profile.time_min} exceeds {partition}'s limit (`sinfo -o '%P %l'`): lower time_min"
    return "check the profile against `sinfo` and `scontrol show partition`"


def _describe(item: Any, width: int = 160) -> str:
    text = repr(item)
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------------------------------
# waiting without hanging


def wait(job: Any, *, timeout_s: float | None = None, poll_s: float = 1.0, state_poll_s: float = 10.0, result_grace_s: float = 30.0) -> Any:
    """The result of one submitit job (a list for a multi-task job), without ever waiting forever.

    Unlike ``job.result()`` it needs no ``sacct``: a job SLURM killed raises :class:`JobError` (state
    and log tail) within about ``state_poll_s + result_grace_s``; ``timeout_s`` bounds the whole wait
    (``TimeoutError``; the job keeps running: ``scancel`` it if needed).

    Example:
        >>> import tempfile, time
        >>> job = SubmititLauncher("local", job_dir=tempfile.mkdtemp()).submit(time.sleep, 1)
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


# ---------------------------------------------------------------------------------------------
# command line


def add_launcher_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """Add ``--launcher``, ``--profile``, ``--job-dir`` and ``--cluster KEY=VALUE`` to ``parser``.

    Example:
        >>> p = argparse.ArgumentParser(); add_launcher_arguments(p)
        >>> a = p.parse_args(["--launcher", "slurm", "--cluster", "partition=gpu", "time_min=30"])
        >>> a.launcher, parse_overrides(a.cluster)
        ('slurm', {'partition': 'gpu', 'time_min': 30})
    """
    group = parser.add_argument_group("launcher")
    group.add_argument("--launcher", choices=LAUNCHERS, default=default, help="where runs execute: inline | pool | local (submitit) | slurm (submitit job arrays)")
    group.add_argument("--profile", type=Path, default=None, help="cluster profile YAML for local/slurm (e.g. slurm/profiles/local-test.yaml)")
    group.add_argument("--job-dir", default=None, help=f"absolute, shared folder for submitit pickles and logs (default: ${JOB_DIR_ENV}, then the profile's job_dir)")
    group.add_argument("--cluster", nargs="+", default=[], metavar="KEY=VALUE", help=f"override profile settings: {', '.join(ClusterProfile.keys())}")


def launcher_from_args(args: argparse.Namespace, workers: int = 2) -> Launcher:
    """The launcher that :func:`add_launcher_arguments`' options describe (default: pool if workers > 1).

    Example:
        >>> p = argparse.ArgumentParser(); add_launcher_arguments(p)
        >>> type(launcher_from_args(p.parse_args([]), workers=1)).__name__
        'InlineLauncher'
    """
    kind = args.launcher or ("pool" if workers > 1 else "inline")
    try:
        overrides = parse_overrides(args.cluster)
    except ValueError as error:
        raise ValueError(f"--cluster: {error}; keys: {', '.join(ClusterProfile.keys())}") from None
    if kind in ("inline", "pool") and (args.profile is not None or overrides or args.job_dir is not None):
        raise ValueError(f"--profile/--job-dir/--cluster apply to --launcher local or slurm, not {kind}")
    if kind in ("inline", "pool"):
        return make_launcher(kind, workers=workers)
    return make_launcher(kind, profile=args.profile, job_dir=args.job_dir, workers=workers, **overrides)
