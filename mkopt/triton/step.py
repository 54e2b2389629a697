"""The fused path's GPU side: one kernel's update, weight rewrite and adversarial ascent through Triton.

:class:`mkopt.fused_step.FusedUpdate` hands a kernel here when its tensors live where
:func:`mkopt.triton.handles` says Triton runs. The host never reads a device value in these
functions: the stream keys are Python ints the sampler already has, Adam's step count is a device
tensor (as torch's ``capturable`` Adam keeps it) that the kernel reads, an lr given as a tensor is
read by the kernel, and the adversarial ascent step is a device scalar.

Example (the kernels interpreted on CPU):
    >>> import torch, mkopt
    >>> from mkopt import triton as mk_triton
    >>> model = torch.nn.Linear(4, 3, bias=False)
    >>> with mk_triton.run_on_cpu():
    ...     opt = mkopt.MKOptimizer(torch.optim.Adam, model, e=3, lr=1e-2, path="fused")
    ...     model(torch.randn(2, 4)).sum().backward(); opt.step()
    >>> opt.state[model.parametrizations.weight[0].proxy]["step"]
    tensor(1.)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import launch

if TYPE_CHECKING:
    from ..fused_step import FusedKernel, FusedUpdate

_ones: dict[torch.device, torch.Tensor] = {}


def device_one(device: torch.device) -> torch.Tensor:
    """A cached 0-dim float32 ``1`` on ``device`` (the ascent's device factor when the host already knows the step)."""
    if device not in _ones:
        _ones[device] = torch.ones((), dtype=torch.float32, device=device)
    return _ones[device]


def ascent_factor(grads: list[torch.Tensor], scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """The adversarial ascent's device factor: ``1 / loss scale`` if every probe gradient is finite, else 0.

    One reduction (the sum is finite iff every entry is; an overflowing sum only skips the ascent, the
    safe side), kept on the device, as is the scaler's scale: the host reads neither.
    """
    device = grads[0].device
    total = torch.stack([g.sum().to(device) for g in grads]).sum()
    factor = torch.isfinite(total).to(torch.float32)
    if scaler is not None and scaler.is_enabled():
        scale = scaler._get_scale_async()  # the scale tensor itself (get_scale() would read it to the host)
        if scale is not None:
            factor = factor / scale.to(device=device, dtype=torch.float32)
    return factor


def write_weight(kernel: FusedKernel, out: torch.Tensor, key: torch.Tensor, uniform: bool) -> None:
    """``out = sum_k p_k W~_k`` with ``p`` of the stream ``key`` (a 0-dim device tensor)."""
    launch.mix(kernel.copies, key, kernel.slot.offset, kernel.slot.key.dtype, uniform=uniform, out=out)


def ascend(update: FusedUpdate, kernel: FusedKernel, probe: torch.Tensor, out: torch.Tensor, ascent: torch.Tensor,
           ascent_scale: float) -> None:  # fmt: skip
    """The adversarial weight ``W_adv`` into ``out`` and its gradient scale into ``kernel.norm`` (B.2: also ``u``)."""
    launch.ascend_(
        kernel.copies, probe, out, kernel.norm, kernel.mixing if update.randomize else None, ascent, ascent_scale,
        update.current_key(kernel.slot), kernel.slot.offset, update.randomize,
    )  # fmt: skip


def adversarial_probabilities(update: FusedUpdate, kernel: FusedKernel, copies: torch.Tensor, probe: torch.Tensor,
                              offset: int) -> torch.Tensor:  # fmt: skip
    """This step's adversarial ``p`` of ``copies`` (``[e, n]``, a slice's columns from ``offset``)."""
    return launch.adversarial_probabilities(
        copies, probe, update.ascent_tensor, update.ascent_step, update.current_key(kernel.slot), offset, update.randomize)


@dataclass
class _EntropyPlan:
    """Where each sampled run of each kernel writes its divergences, and each sample's weight in the mean."""

    runs: list[tuple[Any, int, int, int]]  # (FusedKernel, first element, length, position in samples)
    samples: torch.Tensor  # float64, every run's divergences side by side
    weights: torch.Tensor  # float64, n_k / (N * runs_k * length) per sample: the mean is one dot product
    columns: tuple[int, int] = (0, 0)  # the (columns, chunks) it was made for


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def estimated_entropy(update: FusedUpdate, columns: int, chunks: int) -> float:
    """:meth:`FusedUpdate.estimated_entropy` (the same samples and weights) in one kernel per run and one read.

    ``1 - sum_i w_i d_i`` over the sampled elements' divergences ``d_i`` (one launch per run, no ``p``
    materialized), weighted as the CPU path averages: runs within a kernel, kernels by size."""
    plan = _plans.get(update)
    if plan is None or plan.columns != (columns, chunks):
        plan = _plans[update] = _plan(update, columns, chunks)
    for kernel, start, run, at in plan.runs:
        launch.adversarial_divergence(
            kernel.copies, kernel.probe, plan.samples[at : at + run], update.ascent_tensor, update.ascent_step,
            update.current_key(kernel.slot), kernel.slot.offset, start, update.randomize,
        )  # fmt: skip
    return float(1 - torch.dot(plan.weights, plan.samples))  # the step's one device-to-host read (a diagnostic)


def _plan(update: FusedUpdate, columns: int, chunks: int) -> _EntropyPlan:
    runs, weights = [], []
    total = sum(kernel.proxy.numel() for kernel in update.kernels)
    at = 0
    for kernel in update.kernels:
        n = kernel.proxy.numel()
        run = max(1, min(n, columns // chunks))
        starts = sorted({(n - run) * i // max(chunks - 1, 1) for i in range(chunks)}) if n > run else [0]
        for start in starts:
            runs.append((kernel, start, run, at))
            weights.append(torch.full((run,), n / (total * len(starts) * run), dtype=torch.float64))
            at += run
    device = update.kernels[0].copies.device
    return _EntropyPlan(runs, torch.empty(at, dtype=torch.float64, device=device), torch.cat(weights).to(device), (columns, chunks))


def step_kernel(update: FusedUpdate, kernel: FusedKernel, group: dict[str, Any], grad: torch.Tensor | None) -> None:
    """:meth:`FusedUpdate._step_kernel` on the GPU: state in torch's keys, one Triton launch, no host reads."""
    from ..fused_step import _check_state, _write_contiguous

    if grad is not None and grad.is_sparse:
        raise RuntimeError(f"{kernel.name!r} has a sparse gradient: MK kernels need dense gradients")
    proxy, copies, slot = kernel.proxy, kernel.copies, kernel.slot
    device = copies.device
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.device != device:
        lr = float(lr)  # a CPU tensor: read on the host, no device transfer
    common: dict[str, Any] = dict(
        key_now=update.current_key(slot), key_next=update.next_key(slot), offset=slot.offset, lr=lr,
        weight_decay=float(group.get("weight_decay", 0.0)), maximize=bool(group.get("maximize", False)),
        uniform=update.uniform, uniform_next=update.adversarial,  # the next adversarial step starts from its probe at the mean
    )  # fmt: skip
    if update.adversarial:
        common.update(probe=kernel.probe, mixing=kernel.mixing if update.randomize else None, ascent=update.ascent_tensor,
                      ascent_scale=update.ascent_step, randomize=update.randomize)  # fmt: skip
    grad_flat = None if grad is None else grad.to(proxy.dtype).contiguous()
    if update.kind == "sgd":
        momentum = float(group.get("momentum", 0.0))
        state = update.optimizer.state[proxy] if momentum != 0 else {}  # torch keeps no entry without momentum
        _check_state(kernel, state)
        buffer = state.get("momentum_buffer") if momentum != 0 else None
        first = False
        if momentum != 0 and grad is not None and buffer is None:
            buffer = state["momentum_buffer"] = torch.empty_like(copies)
            first = True
        _write_contiguous(proxy, lambda out: launch.fused_update_(
            copies, out, grad_flat, adam=False, momentum_buffer=buffer, momentum=momentum,
            dampening=float(group.get("dampening", 0.0)), nesterov=bool(group.get("nesterov", False)), first_momentum=first,
            **common))  # fmt: skip
    else:
        state = update.optimizer.state[proxy]
        amsgrad = bool(group["amsgrad"])
        if "exp_avg" not in state:  # the params form keeps its copies in this dict too
            # the step count lives on the device (as torch's capturable Adam): the kernel reads it, the host never does
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
            state["exp_avg"] = torch.zeros_like(copies, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(copies, memory_format=torch.contiguous_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(copies, memory_format=torch.contiguous_format)
        _check_state(kernel, state)
        if state["step"].device != device:  # loaded from a checkpoint (torch keeps it on the CPU): once
            state["step"] = state["step"].to(device=device, dtype=torch.float32, non_blocking=True)
        if grad is not None:
            state["step"].add_(1)
        _write_contiguous(proxy, lambda out: launch.fused_update_(
            copies, out, grad_flat, adam=True, exp_avg=state["exp_avg"], exp_avg_sq=state["exp_avg_sq"],
            max_exp_avg_sq=state.get("max_exp_avg_sq") if amsgrad else None, step=state["step"],
            betas=tuple(group["betas"]), eps=float(group["eps"]),
            decoupled=bool(group.get("decoupled_weight_decay", type(update.optimizer) is torch.optim.AdamW)), **common))  # fmt: skip
    update._after_kernel_step(kernel)
