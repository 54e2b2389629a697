"""Rank body for tests/test_distributed.py (spawned twice with torch.multiprocessing, gloo on CPU).

Each rank joins through a faked submitit/SLURM environment (the path ``setup_distributed`` takes in
a submitit job), trains the same float64 model under DDP on its half of every global batch in the
Dirichlet and the Adv-MK modes, and saves its parameters; rank 0 also trains the reference: one
process, the full batch, no DDP. Then both ranks rejoin through torchrun's variables.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mkopt
from mkopt.distributed import average_probability_grads, cleanup, setup_distributed, wrap_model

GLOBAL_BATCH = 16
STEPS = 5


def build(mode: str) -> tuple[nn.Module, mkopt.MKOptimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).double()
    opt = mkopt.MKOptimizer(
        torch.optim.SGD, model, e=3, seed=7, probabilities=mode, sampler_compile=False, lr=0.05, momentum=0.9, weight_decay=1e-3
    )
    return model, opt


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def train_step(model: nn.Module, opt: mkopt.MKOptimizer, x: torch.Tensor, y: torch.Tensor, ddp: bool) -> None:
    opt.zero_grad()
    if opt.adversarial:
        with model.no_sync() if ddp else contextlib.nullcontext():  # probe: no weight-gradient all-reduce
            F.cross_entropy(model(x), y).backward()
        if ddp:
            average_probability_grads(opt)
        opt.ascend_probabilities()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def train(mode: str, rank: int | None, world: int) -> list[torch.Tensor]:
    """rank=None: the single-process reference on the full batch."""
    model, opt = build(mode)
    wrapped = model if rank is None else wrap_model(model, setup_distributed())
    for step in range(STEPS):
        x, y = batch(step)
        if rank is not None:
            half = GLOBAL_BATCH // world
            x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        train_step(wrapped, opt, x, y, ddp=rank is not None)
    assert opt.mk_step == STEPS
    return [p.detach().clone() for p in model.parameters()]


def run(rank: int, world: int, ports: tuple[int, int], out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS=str(world), SLURM_JOB_NUM_NODES="1",
        SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
        MASTER_PORT=str(ports[0]),
    )  # fmt: skip
    ctx = setup_distributed()
    result: dict = {"submitit": (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend, ctx.source, str(ctx.device))}
    for mode in ("dirichlet", "adv-mk"):
        result[mode] = train(mode, rank, world)
        if rank == 0:
            result[mode + "-reference"] = train(mode, None, world)
    wrapped = nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
    try:
        mkopt.MKOptimizer(torch.optim.SGD, wrapped, e=3, lr=0.1)
    except TypeError as error:
        result["wrapped-error"] = str(error)
    cleanup()
    assert not dist.is_initialized()
    for name in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        del os.environ[name]
    os.environ["MASTER_PORT"] = str(ports[1])  # RANK, WORLD_SIZE, MASTER_ADDR: exported by submitit's helper
    ctx = setup_distributed()
    dist.barrier()
    result["torchrun"] = (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend, ctx.source, str(ctx.device))
    cleanup()
    torch.save(result, Path(out) / f"rank{rank}.pt")
