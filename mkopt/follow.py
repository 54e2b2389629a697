"""Optimizer state that follows its parameters when the model is moved by ``.to()`` after the optimizer was built.

torch's optimizers place their state where the parameters are only when the state is created or
loaded; a later ``model.to(dtype)`` or ``model.to(device)`` leaves it behind (Adam then fails with
"expected dtype float ... but got double"). MK moves the state of every parameter, the copies'
included, on the first step after such a move; 0-dim entries (``step`` counters) stay where torch
keeps them.
"""

from __future__ import annotations

import torch


def placement(tensor: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """Where a tensor lives: the pair a move changes.

    Example:
        >>> placement(torch.zeros(2, dtype=torch.float64))
        (device(type='cpu'), torch.float64)
    """
    return tensor.device, tensor.dtype


@torch.no_grad()
def follow_parameters(optimizer: torch.optim.Optimizer) -> int:
    """Move every state tensor (``dim >= 1``) of ``optimizer`` to its parameter's device and floating dtype,
    in place of the tensor objects (whoever holds them sees the move). Returns how many moved.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.Adam([w]); w.grad = torch.ones(3); opt.step()
        >>> w.data = w.data.double(); follow_parameters(opt), opt.state[w]["exp_avg"].dtype
        (2, torch.float64)
    """
    moved = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            for value in state.values():
                if not isinstance(value, torch.Tensor) or value.dim() == 0:
                    continue
                dtype = param.dtype if value.is_floating_point() and param.is_floating_point() else value.dtype
                if value.device != param.device or value.dtype != dtype:
                    value.data = value.data.to(device=param.device, dtype=dtype)
                    moved += 1
    return moved
