"""A DDP communication hook for the generic path: all-reduce ``dL/dW`` (N values), not the copies' e*N.

On the generic path copy ``k``'s gradient is ``p_k * dL/dW`` with the step's ``p``, the same on
every rank. Summing a kernel's ``e`` rows gives ``dL/dW`` (``sum_k p_k = 1``, up to rounding), so
the hook all-reduces that one row per kernel and re-spreads the average as ``p_k * mean(dL/dW)``:
the same update as DDP's default hook up to rounding, with the plain model's traffic. The fused
path needs no hook: its gradients are N-sized already.

Example (one process, no process group: nothing to register):
    >>> import torch, mkopt
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = mkopt.MKOptimizer(torch.optim.RMSprop, model, e=3, lr=1e-3)
    >>> opt.path
    'generic'
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations as objects.
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from .sampling import ProbabilitySlot

if TYPE_CHECKING:
    from .optimizer import MKOptimizer


@dataclass
class MKHookState:
    """What the hook needs: which bucket parameters are copies, and where their ``p`` lives."""

    slots: dict[int, ProbabilitySlot]  # id(copies parameter) -> its probability slot
    process_group: Any = None


def mk_allreduce_hook(state: MKHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average one DDP bucket over ranks, sending one row per MK kernel instead of ``e``."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    params, grads = bucket.parameters(), bucket.gradients()
    pieces = [grad.sum(0).reshape(-1) if id(param) in state.slots else grad.reshape(-1) for param, grad in zip(params, grads)]
    flat = torch.cat(pieces).div_(world)
    future = dist.all_reduce(flat, group=group, async_op=True).get_future()

    def spread(done: torch.futures.Future) -> torch.Tensor:
        reduced = done.value()[0]
        offset = 0
        for param, grad in zip(params, grads):  # views into the bucket's buffer
            slot = state.slots.get(id(param))
            size = grad.numel() if slot is None else grad[0].numel()
            mean = reduced[offset : offset + size]
            offset += size
            if slot is None:
                grad.copy_(mean.view_as(grad))
            else:
                grad.copy_(slot.current() * mean.view(grad.shape[1:]).unsqueeze(0))
        return bucket.buffer()

    return future.then(spread)


def register_mk_comm_hook(ddp: nn.parallel.DistributedDataParallel, optimizer: "MKOptimizer", process_group: Any = None) -> None:
    """Make ``ddp`` all-reduce N values per MK kernel on the generic path (the fused path needs nothing).

    Call it right after wrapping, before the first backward (:func:`mkopt.distributed.wrap_model`
    does when given the optimizer).
    """
    if not isinstance(ddp, nn.parallel.DistributedDataParallel):
        raise TypeError(f"register_mk_comm_hook takes a DistributedDataParallel module, got {type(ddp).__name__}")
    if optimizer.path != "generic":
        raise ValueError(f"the {optimizer.path} path all-reduces N values already: no comm hook is needed")
    slots = {id(target.param): slot for target, slot in zip(optimizer.expansion.targets, optimizer.expansion.sampler.slots)}
    ddp.register_comm_hook(MKHookState(slots, process_group), mk_allreduce_hook)
