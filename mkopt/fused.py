"""Majority-kernel mixing with ``p`` regenerated inside the kernels instead of read from a buffer.

``p`` of a step is a pure function of ``(stream key, element index)`` (:mod:`mkopt.sampling`), so
the forward kernel can hash, build ``p`` and mix the copies in one pass, and the backward kernel
can rebuild the same ``p`` to spread ``dL/dW`` over the copies. Against the buffer path this
drops the per-step draw pass, the two reads of ``p`` and the ``e`` floats of ``p`` per weight;
the values are the ones the buffer would hold. The graph keeps the key of the step it was built
in, so a backward always uses the ``p`` of its own forward.

On CUDA both kernels are Triton kernels (``mkopt::triton_mix`` / ``mkopt::triton_spread``, see
:mod:`mkopt.triton`); elsewhere ``torch.compile`` fuses the torch reference below.
"""

from __future__ import annotations

from typing import Any

import torch

from . import triton as mk_triton
from .compiled import compiler_failed, run_kernel
from .sampling import probability_dtype, probability_rows, splitmix64_constants


def _mix(stacked: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, constants: torch.Tensor, p_dtype: torch.dtype) -> torch.Tensor:
    """``sum_k p[k] * stacked[k]`` for a ``[e, n]`` stack, accumulated in ``p_dtype``, cast back."""
    e, n = stacked.shape
    rows = probability_rows(n, e, key, offset, constants, p_dtype)
    out = rows[0] * stacked[0]
    for k in range(1, e):
        out = out + rows[k] * stacked[k]
    return out.to(stacked.dtype)


def _spread(grad: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, constants: torch.Tensor, e: int, p_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """``dL/dW~[k] = p[k] * dL/dW`` (times ``scale``) for a flat ``[n]`` gradient, as a ``[e, n]`` tensor."""
    rows = probability_rows(grad.shape[0], e, key, offset, constants, p_dtype)
    out = torch.stack([(row * grad).to(grad.dtype) for row in rows])
    return out * scale if scale != 1.0 else out


class _MixRegenerated(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, stacked: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, constants: torch.Tensor,
                p_dtype: torch.dtype, grad_scale: float, compiled: bool, required: bool, host_offset: int | None) -> torch.Tensor:  # fmt: skip
        ctx.saved = (key, offset, constants, p_dtype, grad_scale, compiled, required, host_offset)
        ctx.stack_shape = stacked.shape
        e, shape = stacked.shape[0], stacked.shape[1:]
        if e == 1:
            return stacked[0].clone()
        if on_triton(stacked) and host_offset is not None:
            return mk_triton.ops.mix(stacked, key, host_offset, False, p_dtype)
        out = run_kernel(_mix, stacked.reshape(e, -1), key, offset, constants, p_dtype, compiled=compiled, required=required)
        return out.view(shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        key, offset, constants, p_dtype, grad_scale, compiled, required, host_offset = ctx.saved
        e = ctx.stack_shape[0]
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        if e == 1:
            grad_stacked = grad.unsqueeze(0).contiguous()
            grad_stacked = grad_stacked * grad_scale if grad_scale != 1.0 else grad_stacked.clone()
        elif on_triton(grad) and host_offset is not None:
            grad_stacked = mk_triton.ops.spread(grad.contiguous(), e, key, host_offset, p_dtype, float(grad_scale))
        else:
            flat = run_kernel(
                _spread, grad.reshape(-1), key, offset, constants, e, p_dtype, grad_scale, compiled=compiled, required=required
            )
            grad_stacked = flat.view(ctx.stack_shape)  # contiguous like the stack, as AccumulateGrad and DDP want
        return grad_stacked, None, None, None, None, None, None, None, None


def on_triton(tensor: torch.Tensor) -> bool:
    """Whether the regenerated mix of ``tensor``'s copies runs in Triton: CUDA tensors (or CPU ones inside
    :func:`mkopt.triton.run_on_cpu`), Triton importable."""
    return mk_triton.handles(tensor.device)


def mix_regenerated(stacked: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, constants: torch.Tensor,
                    p_dtype: torch.dtype, grad_scale: float = 1.0, compiled: bool = True, required: bool = False,
                    host_offset: int | None = None) -> torch.Tensor:  # fmt: skip
    """``sum_k p[k] * stacked[k]`` with ``p`` = stream ``key``'s columns from ``offset`` on, never stored.

    Differentiable in ``stacked`` (its gradient is ``p[k] * dL/dW``, times ``grad_scale``).
    ``compiled``/``required``: see :func:`mkopt.compiled.run_kernel`. ``host_offset``: ``offset`` as an int,
    which CUDA tensors need to run the Triton kernels without reading the offset back from the device.

    Example:
        >>> from mkopt.sampling import counter_dirichlet_, splitmix64_constants
        >>> stacked, key, offset = torch.randn(3, 4, 5), torch.tensor(11), torch.tensor(0)
        >>> w = mix_regenerated(stacked, key, offset, splitmix64_constants(), torch.float32, compiled=False)
        >>> p = counter_dirichlet_(torch.empty(3, 20), key=11, compiled=False).view(3, 4, 5)
        >>> torch.allclose(w, (p * stacked).sum(0))
        True
    """
    return _MixRegenerated.apply(stacked, key, offset, constants, p_dtype, grad_scale, compiled, required, host_offset)


def fused_kernels_compile(e: int, like: torch.Tensor, required: bool = False) -> bool:
    """Compile the forward kernel for ``e`` copies of tensors like ``like`` now; whether compiling works here.

    Example:
        >>> fused_kernels_compile(1, torch.zeros(2))  # e = 1 needs no kernel
        True
    """
    if e == 1:
        return not compiler_failed()
    device = like.device
    with torch.no_grad():  # as inside the autograd function's forward: the same compiled variant
        stacked = torch.zeros(e, 2, dtype=like.dtype, device=device)
        zero = torch.zeros((), dtype=torch.int64, device=device)
        run_kernel(_mix, stacked, zero, zero, splitmix64_constants(device), probability_dtype(like.dtype), compiled=True, required=required)
    return not compiler_failed()
