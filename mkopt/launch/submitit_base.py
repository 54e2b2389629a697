"""The submitit launchers' shared machinery: submit, map as arrays, run with a bounded window, explain rejections."""

from __future__ import annotations

import importlib.util
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

from .base import launcher_class
from .profile import ClusterProfile, resolve_job_dir
from .waiting import JobError, _Watch, wait  # noqa: F401  (wait: the docstring example)

__all__ = ["SubmititLauncher", "SubmissionError"]

T = TypeVar("T")


class SubmissionError(RuntimeError):
    """The scheduler refused a submission (its message, what was asked for, and what to change)."""


class SubmititLauncher:
    """What the submitit launchers share; :class:`~mkopt.launch.slurm.SlurmLauncher` (``"slurm"``) and
    :class:`~mkopt.launch.local.SubmititLocalLauncher` (``"local"``) say where jobs run.

    ``SubmititLauncher(kind, ...)`` builds the launcher registered as ``kind``.

    ``run(fn, items)`` submits one job per item (on SLURM as job arrays of at most
    ``profile.max_array_size``, ``profile.array_parallelism`` running at once; locally at most
    ``max_running`` at once) and yields ``(item, result)`` as jobs finish. A job with several tasks
    yields the list of its tasks' results. A failed or killed job does not stop the others: the
    finished ones are yielded, then :class:`JobError` lists every failure. ``submit`` sends a single
    job (e.g. a multi-task DDP job) to be waited on with :func:`wait`.

    Each launcher writes into its own new subfolder of the job folder (``<job_dir>/<time>-<id>/<job id>``),
    so a restarted controller that reuses job ids cannot mix up old and new results. ``fn`` and the
    items are pickled (cloudpickle): use module-level functions and plain data.

    Example (``"local"`` runs here; on a cluster, ``SubmititLauncher("slurm", load_profile(
    "slurm/profiles/my-cluster.yaml"))`` is used the same way):
        >>> import tempfile
        >>> launcher = SubmititLauncher("local", ClusterProfile(time_min=1), job_dir=tempfile.mkdtemp())
        >>> sorted(launcher.run(abs, [-3, 2]))
        [(-3, 3), (2, 2)]
        >>> wait(launcher.submit(divmod, 7, 2), timeout_s=60)
        (3, 1)
    """

    kind: str = ""  # the registered name; set by each subclass
    chunk_size = 1  # items per submission (job arrays on SLURM)
    result_grace_cap_s = float("inf")

    def __new__(cls, *args: Any, **kwargs: Any) -> SubmititLauncher:
        if cls is SubmititLauncher:  # SubmititLauncher("slurm", ...): the launcher registered under that name
            kind = args[0] if args else kwargs.get("kind")
            found = launcher_class(kind) if isinstance(kind, str) else None
            if found is None or not issubclass(found, SubmititLauncher):
                raise ValueError(f"SubmititLauncher kind={kind!r}: use 'local' or 'slurm' (or make_launcher('inline'/'pool'))")
            return super().__new__(found)
        return super().__new__(cls)

    def __init__(
        self,
        *args: Any,
        job_dir: str | os.PathLike | None = None,
        max_running: int | None = None,
        timeout_s: float | None = None,
        poll_s: float = 1.0,
        state_poll_s: float = 10.0,
        result_grace_s: float = 30.0,
        job_name: str = "mkopt",
        **kwargs: Any,
    ) -> None:
        if args and args[0] == self.kind:  # called as SubmititLauncher(kind, profile, ...)
            args = args[1:]
        kwargs.pop("kind", None)
        profile: ClusterProfile | None = args[0] if args else kwargs.pop("profile", None)
        if kwargs:
            raise TypeError(f"unexpected argument(s) {sorted(kwargs)}")
        if importlib.util.find_spec("submitit") is None:  # fail here, before any folder is made
            raise ImportError("the local and slurm launchers need submitit: pip install 'mkopt[slurm]'")
        self.check_machine()
        self.profile = profile or ClusterProfile()
        self.check_profile()
        self.job_dir = resolve_job_dir(job_dir, self.profile)
        self.max_running = self.default_max_running() if max_running is None else max_running
        if self.max_running < 1:
            raise ValueError(f"max_running={self.max_running} must be >= 1")
        self.timeout_s, self.poll_s, self.state_poll_s, self.job_name = timeout_s, poll_s, state_poll_s, job_name
        self.result_grace_s = min(result_grace_s, self.result_grace_cap_s)
        self.folder = self.job_dir / f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"

    # -- what each launcher says -----------------------------------------------------------
    def check_machine(self) -> None:
        """Raise if this machine cannot submit this kind of job."""

    def check_profile(self) -> None:
        """Raise if the profile cannot run here."""

    def default_max_running(self) -> int:
        """Jobs in flight at once when ``max_running`` is not given."""
        return 1 << 30

    def make_executor(self) -> Any:
        """The configured ``submitit`` executor writing into ``self.folder / "%j"``."""
        raise NotImplementedError

    def executor(self) -> Any:
        """A configured ``submitit`` executor writing into this launcher's folder (``.../%j``)."""
        self.folder.mkdir(exist_ok=True)
        return self.make_executor()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Submit one job ``fn(*args, **kwargs)`` (all of the profile's tasks); returns the submitit Job."""
        executor = self.executor()
        with _ExplainRejection(self, 1):
            return executor.submit(fn, *args, **kwargs)

    def map(self, fn: Callable[[T], Any], items: Sequence[T]) -> list[Any]:
        """Submit ``fn(item)`` for every item at once (job arrays on SLURM); returns the Jobs in order."""
        executor = self.executor()
        jobs: list[Any] = []
        chunk = self.chunk_size
        for start in range(0, len(items), chunk):
            part = list(items[start : start + chunk])
            with _ExplainRejection(self, len(part)):
                jobs += executor.map_array(fn, part) if len(part) > 1 else [executor.submit(fn, part[0])]
        return jobs

    def run(self, fn: Callable[[T], Any], items: Iterable[T]) -> Iterator[tuple[T, Any]]:
        items = list(items)
        window = min(len(items), self.max_running) or 1
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
