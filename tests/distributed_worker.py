"""Rank body for tests/test_distributed.py (spawned twice with torch.multiprocessing, gloo on CPU).

Each rank joins through a faked submitit/SLURM environment (the path ``setup_distributed`` takes in
a submitit job), trains the same float64 model under DDP on its half of every global batch — MK on
the fused path, MK on the generic path with mkopt's comm hook, Adv-MK (generic, hook), and the plain
model — counts the bytes handed to ``all_reduce``, and saves its parameters; rank 0 also trains the
reference: one process, the full batch, no DDP. Then both ranks rejoin through torchrun's variables.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import mkopt
from mkopt.distributed import average_probability_grads, cleanup, setup_distributed, wrap_model

GLOBAL_BATCH = 16
STEPS = 5


VARIANTS = {
    "fused": ("dirichlet", "fused"), "generic": ("dirichlet", "generic"), "adv-mk": ("adv-mk", "generic"),
    "adv-mk-fused": ("adv-mk", "fused"), "plain": None,
}  # fmt: skip
SENT: list[int] = []  # bytes handed to all_reduce by the DDP hooks in this process


def counting_all_reduce(original):
    def all_reduce(tensor, *args, **kwargs):
        SENT.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    return all_reduce


def build(variant: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).double()
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    if VARIANTS[variant] is None:
        return model, torch.optim.SGD(model.parameters(), **kwargs)
    mode, path = VARIANTS[variant]
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, seed=7, probabilities=mode, sampler_compile=False, path=path, **kwargs)
    assert opt.path == path
    return model, opt


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, ddp: bool) -> None:
    opt.zero_grad()
    if getattr(opt, "adversarial", False):
        with model.no_sync() if ddp else contextlib.nullcontext():  # probe: no weight-gradient all-reduce
            F.cross_entropy(model(x), y).backward()
        if ddp:
            average_probability_grads(opt)
        opt.ascend_probabilities()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def train(variant: str, rank: int | None, world: int) -> tuple[list[torch.Tensor], int]:
    """rank=None: the single-process reference on the full batch. Also returns the bytes all-reduced per step."""
    model, opt = build(variant)
    if rank is None:
        wrapped = model
    elif isinstance(opt, mkopt.MKOptimizer):
        wrapped = wrap_model(model, setup_distributed(), optimizer=opt)  # the generic path gets mkopt's hook
        if opt.path == "fused":  # DDP's own reduction (the default hook), made visible to the byte count
            wrapped.register_comm_hook(None, default_hooks.allreduce_hook)
    else:
        wrapped = wrap_model(model, setup_distributed())
        wrapped.register_comm_hook(None, default_hooks.allreduce_hook)
    SENT.clear()
    for step in range(STEPS):
        x, y = batch(step)
        if rank is not None:
            half = GLOBAL_BATCH // world
            x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        train_step(wrapped, opt, x, y, ddp=rank is not None)
    assert getattr(opt, "mk_step", STEPS) == STEPS
    return [t.clone() for t in model.state_dict().values()], sum(SENT) // STEPS  # copies, not the fused path's proxies


def run(rank: int, world: int, ports: tuple[int, int], out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS=str(world), SLURM_JOB_NUM_NODES="1",
        SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
        MASTER_PORT=str(ports[0]),
    )  # fmt: skip
    ctx = setup_distributed()
    result: dict = {"submitit": (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend, ctx.source, str(ctx.device))}
    dist.all_reduce = counting_all_reduce(dist.all_reduce)
    for variant in VARIANTS:
        result[variant], result[variant + "-bytes"] = train(variant, rank, world)
        if rank == 0:
            result[variant + "-reference"] = train(variant, None, world)[0]
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
