"""The Triton kernels as ``torch.library`` ops (``mkopt::triton_*``), so ``torch.compile`` traces a model around them.

Each op has a fake implementation (shapes and dtypes only): a compiled graph keeps the op as one
opaque node, and the step's stream key stays a tensor input (data, not a constant), so a new key
every step never recompiles the graph. The in-place update and ascent ops declare what they mutate.

Example (interpreted on CPU tensors):
    >>> import torch
    >>> from mkopt.triton import ops
    >>> copies = torch.ones(3, 4, 5)
    >>> w = ops.mix(copies, torch.tensor(11), 0, False, torch.float32)
    >>> bool(torch.allclose(w, torch.ones(4, 5)))
    True
"""

from __future__ import annotations

import torch

from . import launch


@torch.library.custom_op("mkopt::triton_probabilities", mutates_args=())
def probabilities(e: int, n: int, key: torch.Tensor, offset: int, dtype: torch.dtype, uniform: bool) -> torch.Tensor:
    """Columns ``offset .. offset + n`` of stream ``key`` as ``[e, n]`` (see :func:`mkopt.triton.launch.probabilities`)."""
    return launch.probabilities(e, n, key, offset, dtype, uniform)


@probabilities.register_fake
def _(e: int, n: int, key: torch.Tensor, offset: int, dtype: torch.dtype, uniform: bool) -> torch.Tensor:
    return torch.empty(e, n, dtype=dtype, device=key.device)


@torch.library.custom_op("mkopt::triton_mix", mutates_args=())
def mix(copies: torch.Tensor, key: torch.Tensor, offset: int, uniform: bool, p_dtype: torch.dtype) -> torch.Tensor:
    """``sum_k p_k * copies[k]`` with ``p`` regenerated (the generic path's forward on the GPU)."""
    return launch.mix(copies.contiguous(), key, offset, p_dtype, uniform)


@mix.register_fake
def _(copies: torch.Tensor, key: torch.Tensor, offset: int, uniform: bool, p_dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(copies.shape[1:], dtype=copies.dtype, device=copies.device)


@torch.library.custom_op("mkopt::triton_spread", mutates_args=())
def spread(grad: torch.Tensor, e: int, key: torch.Tensor, offset: int, p_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """``[e, *grad.shape]`` with row ``k`` = ``p_k * grad * scale`` (the generic path's backward on the GPU)."""
    return launch.spread(grad, e, key, offset, p_dtype, scale)


@spread.register_fake
def _(grad: torch.Tensor, e: int, key: torch.Tensor, offset: int, p_dtype: torch.dtype, scale: float) -> torch.Tensor:
    return torch.empty((e, *grad.shape), dtype=grad.dtype, device=grad.device)


@torch.library.custom_op("mkopt::triton_ascend", mutates_args=("w", "norm", "weight"))
def ascend(copies: torch.Tensor, probe: torch.Tensor, w: torch.Tensor, norm: torch.Tensor, weight: torch.Tensor | None,
           ascent: torch.Tensor, ascent_scale: float, key_now: int, offset: int, randomize: bool) -> None:  # fmt: skip
    """The adversarial weight and its gradient scale, in place (see :func:`mkopt.triton.launch.ascend_`)."""
    launch.ascend_(copies, probe, w, norm, weight, ascent, ascent_scale, key_now, offset, randomize)


@ascend.register_fake
def _(copies, probe, w, norm, weight, ascent, ascent_scale, key_now, offset, randomize) -> None:  # noqa: ANN001
    return None


@torch.library.custom_op(
    "mkopt::triton_fused_update", mutates_args=("copies", "w", "momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "mixing")
)
def fused_update(
    copies: torch.Tensor, w: torch.Tensor, grad: torch.Tensor | None, key_now: int, key_next: int, offset: int, lr: float,
    lr_tensor: torch.Tensor | None, adam: bool, weight_decay: float, decoupled: bool, maximize: bool, uniform: bool,
    uniform_next: bool, momentum_buffer: torch.Tensor | None, momentum: float, dampening: float, nesterov: bool,
    first_momentum: bool, exp_avg: torch.Tensor | None, exp_avg_sq: torch.Tensor | None, max_exp_avg_sq: torch.Tensor | None,
    step: torch.Tensor | None, beta1: float, beta2: float, eps: float, probe: torch.Tensor | None, mixing: torch.Tensor | None,
    ascent: torch.Tensor | None, ascent_scale: float, randomize: bool,
) -> None:  # fmt: skip
    """One fused MK update in place (see :func:`mkopt.triton.launch.fused_update_`; ``lr_tensor`` overrides ``lr``)."""
    launch.fused_update_(
        copies, w, grad, key_now=key_now, key_next=key_next, offset=offset, lr=lr if lr_tensor is None else lr_tensor,
        adam=adam, weight_decay=weight_decay, decoupled=decoupled, maximize=maximize, uniform=uniform,
        uniform_next=uniform_next, momentum_buffer=momentum_buffer, momentum=momentum, dampening=dampening,
        nesterov=nesterov, first_momentum=first_momentum, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
        max_exp_avg_sq=max_exp_avg_sq, step=step, betas=(beta1, beta2), eps=eps, probe=probe, mixing=mixing,
        ascent=ascent, ascent_scale=ascent_scale, randomize=randomize,
    )  # fmt: skip


@fused_update.register_fake
def _(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
    return None
