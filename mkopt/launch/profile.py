"""Cluster settings (:class:`ClusterProfile`, read from YAML by :func:`load_profile`) and the job folder."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

from ..config import _read_yaml, load_config
from ..errors import ConfigError

__all__ = ["ClusterProfile", "load_profile", "resolve_job_dir", "JOB_DIR_ENV", "ALIASES"]

JOB_DIR_ENV = "MKOPT_JOB_DIR"
# submitit's parameter names -> ours; the per-node ones are divided by tasks_per_node.
ALIASES = {"timeout_min": "time_min", "gpus_per_node": "gpus_per_task", "mem_gb": "mem_gb_per_task"}


@dataclasses.dataclass(frozen=True)
class ClusterProfile:
    """Cluster settings for submitit jobs; every field can come from YAML or an override.

    Resources are per task (one task = one process, e.g. one DDP rank): SLURM gets
    ``--gpus-per-node = gpus_per_task * tasks_per_node`` (every task sees the node's GPUs and
    :class:`submitit.helpers.TorchDistributedEnvironment` picks one by local rank) and
    ``--mem = mem_gb_per_task * tasks_per_node``. ``sbatch`` holds any other sbatch option
    (``{"constraint": "a100"}``); ``setup`` holds shell lines run before the job (``module load …``).
    submitit's own names are accepted as aliases in profiles and overrides (:data:`ALIASES`):
    ``timeout_min`` (= ``time_min``), ``gpus_per_node`` (= ``gpus_per_task * tasks_per_node``),
    ``mem_gb`` (memory per node = ``mem_gb_per_task * tasks_per_node``).

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
    setup: list[str] = dataclasses.field(default_factory=list)
    sbatch: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_types(self)  # built in Python (not from YAML) too: a wrong type is named here, not deep in submitit
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
        """A copy with ``overrides`` applied (type-checked; submitit's names accepted; unknown names are an error)."""
        values = {**dataclasses.asdict(self), "setup": list(self.setup)}
        overrides = _resolve_aliases(overrides, {**values, **overrides})
        unknown = sorted(set(overrides) - set(self.keys()))
        if unknown:
            raise ConfigError(f"unknown cluster setting(s) {unknown}; valid: {', '.join(self.keys())} (or {', '.join(ALIASES)})")
        return load_config(ClusterProfile, None, values={**values, **overrides}, source="cluster settings")

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


def _check_types(profile: ClusterProfile) -> None:
    """Each field's value against its annotation, by the same OmegaConf validation the YAML loader uses."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.structured(profile)
    except OmegaConfBaseException as error:
        key = str(getattr(error, "full_key", "") or "").split("[")[0]
        value = getattr(profile, key, "?") if key else "?"
        annotation = ClusterProfile.__annotations__.get(key, "?")
        raise ConfigError(f"cluster setting {key}={value!r} must be {annotation}: {str(error).splitlines()[0]}") from None


def _resolve_aliases(values: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """submitit's names -> ours: ``timeout_min`` as is; ``gpus_per_node``/``mem_gb`` per node -> per task."""
    out = dict(values)
    for alias, key in ALIASES.items():
        if alias not in out:
            continue
        if key in out:
            raise ConfigError(f"{alias!r} and {key!r} set the same thing: give one of them")
        value = out.pop(alias)
        if alias != "timeout_min" and value is not None:
            tasks = context.get("tasks_per_node", 1)
            if not isinstance(tasks, int) or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{alias}={value!r} must be a number (per node; tasks_per_node={tasks!r})")
            if alias == "gpus_per_node" and value % tasks:
                raise ConfigError(f"gpus_per_node={value} is not a multiple of tasks_per_node={tasks}: give gpus_per_task instead")
            value = value // tasks if alias == "gpus_per_node" else value / tasks
        out[key] = value
    return out


def load_profile(path: str | os.PathLike | None = None, **overrides: Any) -> ClusterProfile:
    """Read a YAML profile (keys: :meth:`ClusterProfile.keys`, or submitit's names), then apply ``overrides``.

    ``path=None`` starts from the defaults. Unknown keys and values of the wrong type are a
    :class:`mkopt.errors.ConfigError` naming the file, the key and the expected type.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "p.yaml"
        >>> _ = f.write_text("partition: gpu\\ngpus_per_node: 4\\ntasks_per_node: 4\\ntimeout_min: 120\\n")
        >>> p = load_profile(f, time_min=30); p.time_min, p.partition, p.gpus_per_task
        (30, 'gpu', 1)
    """
    profile = ClusterProfile()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"cluster profile {path} does not exist (profiles live in slurm/profiles/, e.g. slurm/profiles/local-test.yaml)"
            )
        loaded = _read_yaml(path)
        try:
            resolved = _resolve_aliases(loaded, loaded)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
        profile = load_config(ClusterProfile, None, values=resolved, source=str(path))
    return profile.replace(**overrides)


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


