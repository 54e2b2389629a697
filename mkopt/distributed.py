"""Data-parallel MK training: process-group setup (torchrun or submitit/SLURM) and MK's DDP semantics.

Semantics under ``DistributedDataParallel`` (DDP):

- **One global** ``p`` **per step, no communication.** ``p`` of step ``t`` is a pure function of
  ``(seed, t)`` (see :mod:`mkopt.sampling`), so every rank that builds ``MKOptimizer`` with the same
  ``seed`` mixes its copies with the same ``p`` at every step, and a resumed run draws the same ``p``.
- **DDP moves the plain model's bytes.** On the fused path (``opt.path == "fused"``) the copies
  take no gradient and DDP all-reduces each kernel's N-sized proxy gradient ``s * g_r``
  (``s = sqrt(sum_k p_k^2)``, the same on every rank), so the average is ``s * mean_r g_r``: the
  update of one process on the global batch (equal up to floating-point summation order), and the
  copies stay bit-identical across ranks. On the generic path copy ``k``'s gradient is
  ``p_k * g_r``; ``wrap_model(model, ctx, optimizer=opt)`` registers a comm hook
  (:mod:`mkopt.comm_hook`) that all-reduces ``sum_k p_k * g_r = g_r`` and re-spreads
  ``p_k * mean_r g_r``; without it DDP moves ``e`` times the plain model's kernel gradients.
- **Build order:** ``model.to(device)`` (and ``channels_last``) → ``MKOptimizer(cls, model, ...)``
  → ``wrap_model(model, ctx)``. DDP sizes its gradient buckets when it is built; expanding a
  model that DDP already wraps breaks them (DDP then reports "parameters that were not used in
  producing loss"), so :class:`mkopt.MKOptimizer` refuses a DDP-wrapped module.
- ``find_unused_parameters`` stays ``False``: every copy (generic path) or proxy (fused path)
  receives a gradient in the Dirichlet and uniform modes; the fused path's copies do not require one. The adversarial modes run their probe pass inside ``ddp.no_sync()`` (its weight
  gradients are discarded and the expanded kernels receive none), then
  :func:`average_probability_grads` so every rank ascends on the global batch's ``dL/dp``, then
  ``opt.ascend_probabilities(scaler)`` and the synchronized descent pass. (The closure form
  ``opt.step(closure)`` would all-reduce the probe pass: use the two-call form under DDP.)
- BatchNorm uses per-rank batch statistics, as in any DDP run (``sync_bn`` in the recipe opts in to
  ``SyncBatchNorm``). Every rank holds the same state, so rank 0 alone writes checkpoints.

Example (a single process: no process group is created):
    >>> import torch, mkopt
    >>> from mkopt.distributed import setup_distributed, wrap_model, cleanup
    >>> ctx = setup_distributed(device="cpu")
    >>> (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed)
    (0, 1, True, False)
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, sampler_compile=False)
    >>> wrap_model(model, ctx) is model      # DDP only when world_size > 1
    True
    >>> cleanup()
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from .optimizer import MKOptimizer

_RANK_VARS = ("RANK", "WORLD_SIZE")  # torchrun's (and TorchDistributedEnvironment.export()'s) identity
_MASTER_VARS = ("MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a (possibly single-process) data-parallel run.

    ``source`` says where the ranks came from: ``"torchrun"`` (``RANK``/``WORLD_SIZE``/``MASTER_*``
    environment variables, also what ``TorchDistributedEnvironment().export()`` sets),
    ``"submitit"`` (a SLURM or local submitit job), ``"existing"`` (a process group that was
    already initialized) or ``"single"``.

    Example:
        >>> DistributedContext().is_main
        True
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (single process)
    source: str = "single"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, shows progress and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use (``world_size > 1``)."""
        return self.world_size > 1


def setup_distributed(
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout: datetime.timedelta | None = None,
) -> DistributedContext:
    """Join the run's process group (when there is more than one process) and pick this rank's device.

    Ranks come from, in order: an already initialized process group; torchrun's environment
    variables; a submitit job (``submitit.helpers.TorchDistributedEnvironment``: SLURM task ids,
    the first node as master); else a single process. ``backend=None`` picks NCCL for CUDA and
    gloo for CPU. ``device=None`` picks CUDA when available: ``cuda:0`` when the process sees one
    GPU (SLURM's ``--gpus-per-task``), ``cuda:<local_rank>`` when it sees one per local task.

    Example:
        >>> setup_distributed(device="cpu").source
        'single'
    """
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return DistributedContext(
            dist.get_rank(), dist.get_world_size(), local_rank, _pick_device(device, local_rank, None),
            dist.get_backend(), "existing",
        )  # fmt: skip
    rank, world_size, local_rank, local_world_size, source = _ranks_from_environment()
    chosen = _pick_device(device, local_rank, local_world_size)
    if world_size == 1:
        return DistributedContext(0, 1, 0, chosen, None, source)
    backend = _pick_backend(backend, chosen)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    if chosen.type == "cuda":
        kwargs["device_id"] = chosen  # eager NCCL init: a wrong GPU mapping fails here, not in the first all-reduce
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
    return DistributedContext(rank, world_size, local_rank, chosen, backend, source)


def cleanup() -> None:
    """Leave the process group, if one was initialized (safe to call in a single process).

    Example:
        >>> cleanup()
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistributedContext, optimizer: MKOptimizer | None = None, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` on this rank's device when distributed, else ``model`` itself.

    Build ``MKOptimizer`` (which expands the model) *before* calling this. Given that
    ``optimizer`` and its generic path, registers :func:`mkopt.comm_hook.mk_allreduce_hook` so
    that DDP moves N values per kernel, not e*N (the fused path moves N anyway).

    Example:
        >>> wrap_model(torch.nn.Linear(2, 2), DistributedContext()).__class__.__name__
        'Linear'
    """
    if not ctx.distributed:
        return model
    devices = {p.device for p in model.parameters()}
    if devices != {ctx.device}:
        raise ValueError(
            f"the model's parameters are on {sorted(map(str, devices))} but this rank's device is {ctx.device}: "
            "move the model with model.to(ctx.device) before building MKOptimizer and wrapping it"
        )
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)
    if optimizer is not None and optimizer.path == "generic":
        from .comm_hook import register_mk_comm_hook

        register_mk_comm_hook(ddp, optimizer)
    return ddp


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``model`` itself): what to save, evaluate and deploy.

    Example:
        >>> lin = torch.nn.Linear(2, 2); unwrap(lin) is lin
        True
    """
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def average_probability_grads(opt: MKOptimizer) -> None:
    """Average the adversarial probe's ``dL/dp`` over ranks (one all-reduce); a no-op in one process.

    Call it between the probe pass (run inside ``ddp.no_sync()``) and ``opt.ascend_probabilities()``:
    then every rank computes the adversarial ``p`` of the global batch, as one process would.

    Example:
        >>> import mkopt
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=2, lr=0.1, probabilities="adv-mk", sampler_compile=False)
        >>> opt.zero_grad(); model(torch.randn(4, 3)).sum().backward()
        >>> average_probability_grads(opt); opt.ascend_probabilities()
    """
    grads = opt._probe_grads()  # dL/dp per view (generic), dL/dW per proxy (fused: N values per kernel)
    if any(g is None for g in grads):
        raise RuntimeError(
            "no gradient reached p: run the probe forward/backward (inside ddp.no_sync()) after opt.zero_grad() "
            "and before average_probability_grads(opt)"
        )
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _ranks_from_environment() -> tuple[int, int, int, int | None, str]:
    """(rank, world_size, local_rank, local_world_size, source) from torchrun's or submitit's variables."""
    present = [name for name in _RANK_VARS if name in os.environ]
    if present:
        missing = [name for name in _RANK_VARS if name not in os.environ]
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            missing += [name for name in _MASTER_VARS if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"{', '.join(present)} set but {', '.join(missing)} missing: launch with torchrun (which sets "
                f"{', '.join(_RANK_VARS + _MASTER_VARS)}), or unset them for a single process"
            )
        local_world = os.environ.get("LOCAL_WORLD_SIZE")
        return (
            int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)),
            int(local_world) if local_world else None, "torchrun",
        )  # fmt: skip
    if os.environ.get("SUBMITIT_EXECUTOR"):
        try:
            from submitit.helpers import TorchDistributedEnvironment
        except ImportError as error:
            raise RuntimeError("SUBMITIT_EXECUTOR is set but submitit is not importable: pip install 'mkopt[slurm]'") from error
        env = TorchDistributedEnvironment()
        if env.world_size > 1:
            # overwrite: a MASTER_PORT set by the user is the one the helper read; the device is chosen below
            env.export(set_cuda_visible_devices=False, overwrite=True)
        return env.rank, env.world_size, env.local_rank, env.local_world_size, "submitit"
    _refuse_plain_multitask_srun()
    return 0, 1, 0, 1, "single"


def _refuse_plain_multitask_srun() -> None:
    """Raise under ``srun -n2 python recipe.py``: without this every task would become rank 0 of its
    own single-process run (same data, same outputs, each overwriting the others' checkpoints).

    ``srun`` sets ``SLURM_STEP_NUM_TASKS`` (the tasks of this step) and ``SLURM_PROCID`` (this task's
    rank). ``SLURM_NTASKS`` alone is not used: a batch script of an ``sbatch -n 8`` allocation sees
    ``SLURM_NTASKS=8`` but runs once (``SLURM_PROCID=0``, no step variables), a legitimate single process.
    """
    step_tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "").strip()
    procid = os.environ.get("SLURM_PROCID", "").strip()
    many = (step_tasks.isdigit() and int(step_tasks) > 1) or (procid.isdigit() and int(procid) > 0)
    if many:
        raise RuntimeError(
            f"this process is task {procid or '?'} of a {step_tasks or 'multi'}-task SLURM step (srun) but no "
            "torchrun or submitit variables are set, so every task would train alone as rank 0. Launch one task "
            "per node running torchrun (srun -n1 torchrun --nproc_per_node=N ...), or submit the recipe with "
            "mkopt.job.RecipeJob through mkopt.launch (submitit sets the ranks); or run one task (srun -n1)"
        )


def _pick_device(device: str | torch.device | None, local_rank: int, local_world_size: int | None) -> torch.device:
    if device is not None:
        chosen = torch.device(device)
        if chosen.type == "cuda" and chosen.index is None:
            chosen = _cuda_for_rank(local_rank, local_world_size)
        return chosen
    if torch.cuda.is_available():
        return _cuda_for_rank(local_rank, local_world_size)
    return torch.device("cpu")


def _cuda_for_rank(local_rank: int, local_world_size: int | None) -> torch.device:
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but torch sees no CUDA device (torch.cuda.is_available() is False)")
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda", 0)
    if local_world_size is not None and visible < local_world_size:
        raise RuntimeError(
            f"{local_world_size} tasks on this node but this task sees {visible} GPUs: request one GPU per task "
            "(SLURM --gpus-per-task=1) or at least one GPU per local task"
        )
    if local_rank >= visible:
        raise RuntimeError(f"local rank {local_rank} but only {visible} GPUs are visible to this task")
    return torch.device("cuda", local_rank)


def _pick_backend(backend: str | None, device: torch.device) -> str:
    if backend is None:
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend='nccl' needs CUDA tensors but this rank's device is {device}: use backend='gloo' on CPU")
    if not dist.is_backend_available(backend):
        raise ValueError(f"torch.distributed backend {backend!r} is not available in this build of torch")
    return backend
