"""A toy recipe for tests/test_slurm.py, shaped like mkopt/recipes/*.py: ``run(config, job=None)`` for ``mkopt.job.RecipeJob``.

MK (e=3, SGD + momentum) on a small MLP; the data of each step is a pure function of ``(step, rank)``.
Ranks come from submitit (``mkopt.distributed.setup_distributed``: DDP over gloo when the job has
several tasks). On the preemption signal, ``mkopt.job.PreemptionGuard`` defers submitit's handler to
the next step boundary, where ``RecipeJob.checkpoint`` saves through the attached saver
(``mkopt.checkpoint``) and the job is requeued; a restart resumes from the newest checkpoint.

Config keys: ``out`` (folder), ``steps``, ``step_sleep_s`` (to leave time for a preemption).
Every start appends a line to ``out/starts.txt``; ``out/progress.txt`` holds the last finished step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mkopt
from mkopt.checkpoint import CheckpointStore, capture_training_state, restore_training_state
from mkopt.distributed import cleanup, setup_distributed, wrap_model
from mkopt.job import PreemptionGuard, RecipeJob


def batch(step: int, rank: int = 0, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g)


def run(config: dict[str, Any], job: RecipeJob | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    out, steps, sleep_s = Path(config["out"]), int(config["steps"]), float(config.get("step_sleep_s", 0.0))
    ctx = setup_distributed(device="cpu")
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, seed=0, lr=0.1, momentum=0.9, sampler_compile=False)
        net = wrap_model(model, ctx)  # after MKOptimizer: DDP sees the expanded copies
        store = CheckpointStore(out / "checkpoints", keep=2)
        progress = {"step": 0}
        loaded = store.load_latest()
        if loaded is not None:
            progress = restore_training_state(loaded[0], model, opt)
        if ctx.is_main:
            with (out / "starts.txt").open("a") as f:
                f.write(f"start at step {progress['step']}\n")

        def save() -> None:  # called by RecipeJob.checkpoint at a step boundary
            if ctx.is_main:
                store.save(capture_training_state(model, opt, progress=progress), progress["step"])

        if job is not None:
            job.attach(save)
        try:
            with PreemptionGuard() as guard:
                while progress["step"] < steps:
                    x, y = batch(progress["step"], ctx.rank)
                    opt.zero_grad()
                    nn.functional.cross_entropy(net(x), y).backward()
                    opt.step()
                    progress["step"] += 1
                    if ctx.is_main:
                        (out / "progress.txt").write_text(str(progress["step"]))
                    time.sleep(sleep_s)
                    guard.check()
        finally:
            if job is not None:
                job.attach(None)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {"rank": ctx.rank, "world_size": ctx.world_size, "source": ctx.source, "backend": ctx.backend, "state": state}
    finally:
        cleanup()
