"""``local``: submitit's local executor (one controller process per job, logs in the job folder;
``Checkpointable`` requeue and multi-task jobs work as on SLURM)."""

from __future__ import annotations

import os
from typing import Any

from .base import register_launcher
from .submitit_base import SubmititLauncher


@register_launcher("local")
class SubmititLocalLauncher(SubmititLauncher):
    """Jobs as local processes; at most ``max_running`` at once (default: what this machine's CPUs fit).

    Example:
        >>> import tempfile
        >>> from mkopt.launch import ClusterProfile
        >>> sorted(SubmititLocalLauncher(ClusterProfile(time_min=1), job_dir=tempfile.mkdtemp()).run(abs, [-3, 2]))
        [(-3, 3), (2, 2)]
    """

    result_grace_cap_s = 5.0  # a local job's result file appears at once: no shared-filesystem delay

    def check_profile(self) -> None:
        self.profile.local_parameters()  # validates (one node)

    def default_max_running(self) -> int:
        # A local job runs tasks_per_node processes of cpus_per_task CPUs each on this machine.
        per_job = self.profile.cpus_per_task * self.profile.tasks_per_node
        return max(1, (os.cpu_count() or 1) // per_job)

    def make_executor(self) -> Any:
        import submitit

        executor = submitit.LocalExecutor(folder=self.folder / "%j", max_num_timeout=self.profile.max_num_timeout)
        executor.update_parameters(**self.profile.local_parameters())
        return executor
