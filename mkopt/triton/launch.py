"""Python launchers of the Triton kernels: shapes, grids and constants; no host-device synchronization.

Every launcher takes tensors and plain Python numbers and only launches kernels: the stream keys
and loss-scale-dependent values arrive as device tensors (0-dim) or Python ints the host already
has, so a launch never reads a value back from the GPU.

CUDA tensors run the compiled kernels; CPU tensors run the same kernels under Triton's interpreter
(:func:`interpreted_kernels`): slow, for tests and for checking a GPU run's arithmetic on CPU.

Example:
    >>> import torch
    >>> from mkopt.triton import launch
    >>> p = launch.probabilities(3, 10, torch.tensor(7), offset=0, dtype=torch.float32)
    >>> tuple(p.shape), bool(torch.allclose(p.sum(0), torch.ones(10)))
    ((3, 10), True)
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
import types
from typing import Any

import torch

from . import kernels as compiled_kernels

_P_DOUBLE = {torch.float64: True, torch.float32: False, torch.bfloat16: False, torch.float16: False}
STORAGE_DTYPES: tuple[torch.dtype, ...] = tuple(_P_DOUBLE)
ROW_ELEMENTS = 4096  # a block holds e rows of p: BLOCK = 4096 / e rounded up to a power of two, in 128 .. 1024

_lock = threading.Lock()
_interpreted: types.ModuleType | None = None


def interpreted_kernels() -> types.ModuleType:
    """A second copy of :mod:`mkopt.triton.kernels` whose ``@triton.jit`` functions run in Triton's interpreter.

    ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, so the copy is executed with the
    variable set (and restored after): its kernels run on CPU tensors whatever the process's setting.
    """
    global _interpreted
    with _lock:
        if _interpreted is None:
            spec = importlib.util.spec_from_file_location("mkopt.triton._interpreted_kernels", compiled_kernels.__file__)
            module = importlib.util.module_from_spec(spec)
            previous = os.environ.get("TRITON_INTERPRET")
            os.environ["TRITON_INTERPRET"] = "1"
            try:
                spec.loader.exec_module(module)
            finally:
                if previous is None:
                    del os.environ["TRITON_INTERPRET"]
                else:
                    os.environ["TRITON_INTERPRET"] = previous
            _interpreted = module
        return _interpreted


def kernels_for(device: torch.device) -> types.ModuleType:
    """The kernels that run on ``device``: compiled for CUDA, interpreted for CPU."""
    if device.type == "cuda":
        return compiled_kernels
    if device.type == "cpu":
        return interpreted_kernels()
    raise ValueError(f"mkopt's Triton kernels run on CUDA (or interpreted on CPU), not on {device}")


def padded_e(e: int) -> int:
    """``e`` rounded up to a power of two (sizes the block: e rows of ``p`` per element live in registers).

    Example:
        >>> [padded_e(e) for e in (1, 2, 3, 5, 16, 17)]
        [1, 2, 4, 8, 16, 32]
    """
    if not 1 <= e <= compiled_kernels.MAX_E:
        raise ValueError(f"e={e} is outside the Triton kernels' range 1..{compiled_kernels.MAX_E}: use the generic path")
    return 1 << (e - 1).bit_length()


def _geometry(e: int, n: int, block: int | None) -> tuple[int, tuple[int]]:
    block = block or max(128, min(1024, ROW_ELEMENTS // padded_e(e)))
    return block, (max(1, math.ceil(n / block)),)


def _kernel(device: torch.device, name: str, grid: tuple[int]) -> Any:
    """``name`` launched over ``grid`` on ``device``: Triton launches on the current CUDA device, so a tensor on
    another GPU (several per process) is launched inside that device's context."""
    kernel = getattr(kernels_for(device), name)[grid]
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return kernel

    def launch_on_device(*args: Any, **kwargs: Any) -> Any:
        with torch.cuda.device(device):
            return kernel(*args, **kwargs)

    return launch_on_device


def _options(device: torch.device) -> dict[str, Any]:
    # no fused multiply-adds: the CPU kernels' -ffp-contract=off, so both write the same bits
    return {"enable_fp_fusion": False, "num_warps": 4} if device.type == "cuda" else {}


def _p_double(dtype: torch.dtype) -> bool:
    if dtype not in _P_DOUBLE:
        raise TypeError(f"mkopt's Triton kernels take {[str(d) for d in STORAGE_DTYPES]}, not {dtype}")
    return _P_DOUBLE[dtype]


def _check(tensor: torch.Tensor, what: str) -> None:
    if not tensor.is_contiguous():
        raise ValueError(f"{what} must be contiguous (got strides {tensor.stride()} for shape {tuple(tensor.shape)})")


def probabilities(e: int, n: int, key: torch.Tensor, offset: int, dtype: torch.dtype, uniform: bool = False,
                  block: int | None = None) -> torch.Tensor:  # fmt: skip
    """Columns ``offset .. offset + n`` of stream ``key`` (0-dim int64 tensor) as ``[e, n]`` (float32/64)."""
    block, grid = _geometry(e, n, block)
    out = torch.empty(e, n, dtype=dtype, device=key.device)
    _kernel(key.device, "probabilities_kernel", grid)(
        out, key, n, offset, E=e, BLOCK=block, DOUBLE=_p_double(dtype), UNIFORM=uniform, **_options(key.device))
    return out


def mix(copies: torch.Tensor, key: torch.Tensor, offset: int, p_dtype: torch.dtype, uniform: bool = False,
        out: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:  # fmt: skip
    """``sum_k p_k * copies[k]`` for a ``[e, *shape]`` stack, accumulated in ``p_dtype``, into ``out`` (or new)."""
    _check(copies, "copies")
    e, n = copies.shape[0], copies[0].numel()
    if out is None:
        out = torch.empty(copies.shape[1:], dtype=copies.dtype, device=copies.device)
    _check(out, "out")
    block, grid = _geometry(e, n, block)
    _kernel(copies.device, "mix_kernel", grid)(
        copies, out, key, n, offset, E=e, BLOCK=block, DOUBLE=_p_double(p_dtype), UNIFORM=uniform,
        **_options(copies.device))  # fmt: skip
    return out


def spread(grad: torch.Tensor, e: int, key: torch.Tensor, offset: int, p_dtype: torch.dtype, scale: float = 1.0,
           block: int | None = None) -> torch.Tensor:  # fmt: skip
    """``[e, *grad.shape]`` with row ``k`` = ``p_k * grad`` (times ``scale``): the copies' gradients."""
    grad = grad.contiguous()
    n = grad.numel()
    out = torch.empty((e, *grad.shape), dtype=grad.dtype, device=grad.device)
    block, grid = _geometry(e, n, block)
    _kernel(grad.device, "spread_kernel", grid)(
        grad, out, key, n, offset, float(scale), E=e, BLOCK=block, DOUBLE=_p_double(p_dtype),
        SCALED=scale != 1.0, **_options(grad.device))  # fmt: skip
    return out


def scale_grad(grad: torch.Tensor, e: int, key: torch.Tensor, offset: int, uniform: bool = False,
               p_dtype: torch.dtype | None = None, block: int | None = None) -> torch.Tensor:  # fmt: skip
    """``sqrt(sum_k p_k^2) * grad`` in a new contiguous tensor (``p`` in ``p_dtype``, default: float64 for float64)."""
    grad = grad.contiguous()
    n = grad.numel()
    out = torch.empty_like(grad)
    block, grid = _geometry(e, n, block)
    double = _p_double(p_dtype or grad.dtype)
    _kernel(grad.device, "scale_grad_kernel", grid)(
        grad, out, key, n, offset, E=e, BLOCK=block, DOUBLE=double, UNIFORM=uniform, **_options(grad.device))
    return out


def ascend_(copies: torch.Tensor, probe: torch.Tensor, w: torch.Tensor, norm: torch.Tensor, weight: torch.Tensor | None,
            ascent: torch.Tensor, ascent_scale: float, key_now: int, offset: int, randomize: bool,
            block: int | None = None) -> None:  # fmt: skip
    """Adversarial step: ``w = sum_k p_k W~_k``, ``norm = s`` of the adversarial ``p`` from ``probe``.

    The ascent step is ``ascent * ascent_scale`` (``ascent``: a 0-dim device tensor, e.g. the inverse
    loss scale times the probe's finite flag). B.2 (``randomize``) saves its per-element weight in ``weight``."""
    for tensor, what in ((copies, "copies"), (probe, "probe"), (w, "w"), (norm, "norm")):
        _check(tensor, what)
    e, n = copies.shape[0], w.numel()
    block, grid = _geometry(e, n, block)
    _kernel(copies.device, "ascend_kernel", grid)(
        copies, probe, w, norm, weight if weight is not None else norm, ascent, n, offset, key_now, float(ascent_scale),
        E=e, BLOCK=block, DOUBLE=_p_double(copies.dtype), RANDOMIZE=randomize, WEIGHT_OUT=weight is not None,
        **_options(copies.device))  # fmt: skip


def adversarial_probabilities(copies: torch.Tensor, probe: torch.Tensor, ascent: torch.Tensor, ascent_scale: float,
                              key_now: int, offset: int, randomize: bool, block: int | None = None) -> torch.Tensor:  # fmt: skip
    """The adversarial ``p`` (``[e, n]``, float32 or float64) that :func:`ascend_` and the update use."""
    _check(copies, "copies")
    e, n = copies.shape[0], probe.numel()
    out = torch.empty(e, n, dtype=torch.float64 if _p_double(copies.dtype) else torch.float32, device=copies.device)
    block, grid = _geometry(e, n, block)
    _kernel(copies.device, "adversarial_probabilities_kernel", grid)(
        copies, probe.contiguous(), out, ascent, n, offset, key_now, float(ascent_scale), E=e, BLOCK=block,
        DOUBLE=_p_double(copies.dtype), RANDOMIZE=randomize, **_options(copies.device))  # fmt: skip
    return out


def adversarial_divergence(copies: torch.Tensor, probe: torch.Tensor, out: torch.Tensor, ascent: torch.Tensor,
                           ascent_scale: float, key_now: int, offset: int, start: int, randomize: bool,
                           block: int | None = None) -> torch.Tensor:  # fmt: skip
    """``out[i]`` = divergence from uniform of the adversarial ``p`` at element ``start + i`` (``out``: ``[run]``)."""
    _check(copies, "copies")
    e, n, run = copies.shape[0], probe.numel(), out.numel()
    block, grid = _geometry(e, run, block)
    _kernel(copies.device, "adversarial_divergence_kernel", grid)(
        copies, probe, out, ascent, n, offset, start, run, key_now, float(ascent_scale), E=e, BLOCK=block,
        DOUBLE=_p_double(copies.dtype), RANDOMIZE=randomize, **_options(copies.device))  # fmt: skip
    return out


def fused_update_(
    copies: torch.Tensor, w: torch.Tensor, grad: torch.Tensor | None, *, key_now: int, key_next: int, offset: int,
    lr: float | torch.Tensor, adam: bool, weight_decay: float = 0.0, decoupled: bool = False, maximize: bool = False,
    uniform: bool = False, uniform_next: bool = False,
    momentum_buffer: torch.Tensor | None = None, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
    first_momentum: bool = False,
    exp_avg: torch.Tensor | None = None, exp_avg_sq: torch.Tensor | None = None, max_exp_avg_sq: torch.Tensor | None = None,
    step: torch.Tensor | None = None, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
    probe: torch.Tensor | None = None, mixing: torch.Tensor | None = None, ascent: torch.Tensor | None = None,
    ascent_scale: float = 0.0, randomize: bool = False, block: int | None = None,
) -> None:  # fmt: skip
    """One fused MK-SGD or MK-Adam(W) update of ``copies`` and their state in place, then ``w = W_t+1``.

    ``grad`` is the proxy's gradient ``s * dL/dW`` (``None``: no update, only ``w`` is rewritten with
    ``p_t+1``). Adam's ``step`` is a 0-dim float32 tensor on the copies' device, already counting this
    step; ``lr`` may be a 0-dim tensor on that device. ``probe`` (with ``ascent``/``ascent_scale``,
    ``mixing``, ``randomize``): the adversarial modes' ``p`` from the probe gradient.
    """
    device = copies.device
    e, n = copies.shape[0], w.numel()
    for tensor, what in ((copies, "copies"), (w, "w")):
        _check(tensor, what)
    block, grid = _geometry(e, n, block)
    has_grad = grad is not None
    if adam and has_grad and (exp_avg is None or exp_avg_sq is None or step is None):
        raise ValueError("an Adam update needs exp_avg, exp_avg_sq and the step tensor")
    has_momentum = momentum_buffer is not None and has_grad and not adam
    lr_tensor = isinstance(lr, torch.Tensor)
    beta1, beta2 = (float(b) for b in betas)
    any_tensor = copies  # placeholder for unused pointers (never dereferenced: their constexpr branch is off)
    _kernel(device, "fused_update_kernel", grid)(
        copies, w, grad if has_grad else any_tensor,
        (exp_avg if adam else momentum_buffer) if (adam or has_momentum) else any_tensor,
        exp_avg_sq if adam and exp_avg_sq is not None else any_tensor,
        max_exp_avg_sq if max_exp_avg_sq is not None else any_tensor,
        probe if probe is not None else any_tensor,
        mixing if mixing is not None else any_tensor,
        ascent if ascent is not None else any_tensor,
        step if step is not None else any_tensor,
        lr if lr_tensor else any_tensor,
        n, offset, key_now, key_next,
        0.0 if lr_tensor else float(lr), float(weight_decay), float(momentum), float(dampening),
        beta1, beta2, float(eps), math.log2(beta1) if beta1 > 0 else -math.inf, math.log2(beta2) if beta2 > 0 else -math.inf,
        float(ascent_scale),
        E=e, BLOCK=block, DOUBLE=_p_double(copies.dtype), ADAM=adam, HAS_GRAD=has_grad, UNIFORM=uniform,
        UNIFORM_NEXT=uniform_next, ADVERSARIAL=probe is not None, RANDOMIZE=randomize, MAXIMIZE=maximize,
        LR_TENSOR=lr_tensor, DECAY=0 if weight_decay == 0 else (2 if decoupled and adam else 1),
        HAS_MOMENTUM=has_momentum, FIRST_MOMENTUM=first_momentum, NESTEROV=nesterov, AMSGRAD=max_exp_avg_sq is not None,
        **_options(device),
    )  # fmt: skip
