"""Run ``fn(item)`` for many items: in this process, on local processes, or as SLURM job arrays.

Every launcher implements :class:`mkopt.launch.base.Launcher`: ``run(fn, items)`` yields
``(item, result)`` as runs finish. Each kind is one module of this package, found by name
(:func:`make_launcher`, :func:`mkopt.launch.base.launcher_class`); the kinds (:data:`LAUNCHERS`):

- ``inline`` (:mod:`.inline`): sequentially in this process (simplest to debug);
- ``pool`` (:mod:`.pool`): a local process pool (``concurrent.futures``);
- ``local`` (:mod:`.local`): submitit's local executor (one controller process per job, logs in
  the job folder, ``Checkpointable`` requeue and multi-task jobs work as on SLURM);
- ``slurm`` (:mod:`.slurm`): submitit on SLURM; a sweep goes out as job arrays (``executor.map_array``).

Cluster settings come from a :class:`ClusterProfile` (a YAML file under ``slurm/profiles/``, see
:func:`load_profile`; submitit's names ``timeout_min``, ``gpus_per_node``, ``mem_gb`` are accepted)
plus keyword/CLI overrides. The job folder (submitit's pickles and logs) comes
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
import os  # noqa: F401  (tests patch launch.os.cpu_count)
from pathlib import Path
from typing import Any

from ..config import parse_overrides  # the one key=value parser (re-exported: --cluster values)
from ..errors import ConfigError
from .base import LAUNCHERS, Launcher, launcher_class, register_launcher
from .inline import InlineLauncher
from .local import SubmititLocalLauncher
from .pool import LocalPoolLauncher
from .profile import ALIASES, JOB_DIR_ENV, ClusterProfile, load_profile, resolve_job_dir
from .slurm import SlurmLauncher
from .submitit_base import SubmissionError, SubmititLauncher
from .waiting import JobError, _Watch, slurm_states, wait  # noqa: F401  (_Watch: tests)

__all__ = [
    "LAUNCHERS",
    "JOB_DIR_ENV",
    "ALIASES",
    "Launcher",
    "ClusterProfile",
    "load_profile",
    "parse_overrides",
    "resolve_job_dir",
    "make_launcher",
    "register_launcher",
    "InlineLauncher",
    "LocalPoolLauncher",
    "SubmititLauncher",
    "SubmititLocalLauncher",
    "SlurmLauncher",
    "wait",
    "slurm_states",
    "SubmissionError",
    "JobError",
    "add_launcher_arguments",
    "launcher_from_args",
]


def make_launcher(
    kind: str,
    *,
    profile: ClusterProfile | str | os.PathLike | None = None,
    job_dir: str | os.PathLike | None = None,
    workers: int = 2,
    timeout_s: float | None = None,
    **overrides: Any,
) -> Launcher:
    """The launcher registered as ``kind`` (mkopt ships :data:`LAUNCHERS`).

    ``profile``: a :class:`ClusterProfile` or the path of a YAML profile (submitit launchers only);
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
    cls = launcher_class(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"launcher {kind!r} is unknown: use one of {', '.join(LAUNCHERS)}")
    if not issubclass(cls, SubmititLauncher):
        if profile is not None or overrides:
            raise ValueError(f"launcher {kind!r} takes no cluster profile or settings (they are for local and slurm)")
        return cls(workers) if cls is LocalPoolLauncher else cls()
    if not isinstance(profile, ClusterProfile):
        profile = load_profile(profile)
    profile = profile.replace(**overrides)
    max_running = workers if issubclass(cls, SubmititLocalLauncher) else None  # SLURM queues the rest itself
    return cls(profile, job_dir=job_dir, max_running=max_running, timeout_s=timeout_s)


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
        raise ConfigError(f"--cluster: {error}; keys: {', '.join(ClusterProfile.keys())}") from None
    if kind in ("inline", "pool") and (args.profile is not None or overrides or args.job_dir is not None):
        raise ValueError(f"--profile/--job-dir/--cluster apply to --launcher local or slurm, not {kind}")
    if kind in ("inline", "pool"):
        return make_launcher(kind, workers=workers)
    return make_launcher(kind, profile=args.profile, job_dir=args.job_dir, workers=workers, **overrides)
