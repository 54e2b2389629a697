"""``slurm``: submitit on SLURM; a sweep goes out as job arrays (``executor.map_array``)."""

from __future__ import annotations

import shutil
from typing import Any

from .base import register_launcher
from .submitit_base import SubmititLauncher


@register_launcher("slurm")
class SlurmLauncher(SubmititLauncher):
    """Jobs on SLURM: arrays of at most ``profile.max_array_size``, ``profile.array_parallelism`` running at once.

    Needs ``sbatch``, ``srun`` and ``squeue`` on PATH (a login node, or ``slurm/up.sh``'s test cluster).

    Example (no SLURM here: the error says where to run instead):
        >>> import shutil
        >>> shutil.which("sbatch") is not None or "cannot submit" in str(_error(SlurmLauncher))
        True
    """

    chunk_size = property(lambda self: self.profile.max_array_size)  # type: ignore[assignment]

    def check_machine(self) -> None:
        missing = [c for c in ("sbatch", "srun", "squeue") if shutil.which(c) is None]
        if missing:
            raise RuntimeError(
                f"launcher 'slurm': {', '.join(missing)} not found on PATH, so this machine cannot submit to SLURM. "
                "Run from a login node of the cluster, use --launcher local, or bring up a test cluster with slurm/up.sh"
            )

    def make_executor(self) -> Any:
        import submitit

        executor = submitit.SlurmExecutor(folder=self.folder / "%j", max_num_timeout=self.profile.max_num_timeout)
        executor.update_parameters(**self.profile.slurm_parameters(self.job_name))
        return executor


def _error(cls: type) -> Exception | None:
    try:
        cls(job_dir="/")
    except Exception as error:  # noqa: BLE001 - the doctest shows the message
        return error
    return None
