"""The fused path: Majority Kernels inside the optimizer, one pass per element and step.

The copies ``W~`` (the parametrizations' ``original`` stacks) take no gradients. The training
forward reads one N-sized *proxy* Parameter per kernel, ``W_t = sum_k p_t,k W~_k``, written by
the previous step. Backward gives the proxy ``s * dL/dW`` with ``s = sqrt(sum_k p_k^2)`` per
element, so its norm is exactly the norm the copies' gradients ``p_k * dL/dW`` would have:
``clip_grad_norm_``, GradScaler's unscale and inf check, gradient accumulation and DDP averaging
see the same numbers as on the generic path, while only N (not e*N) gradient values exist and
DDP moves N. The step then runs one native kernel per kernel tensor that regenerates ``p_t``,
forms ``g_k = p_k / s * grad``, updates copies and optimizer state in place (torch's own state
keys, ``[e, *shape]`` tensors under ``state[proxy]``), draws ``p_t+1`` and writes ``W_t+1``.
Parameters that are not expanded are stepped by the wrapped torch optimizer itself.

This module decides whether the fused path can run (:func:`fused_path_blocker`) and runs it
(:class:`FusedUpdate`); :class:`mkopt.MKOptimizer` picks the path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import native
from . import triton as mk_triton
from .expand import Expansion
from .modes import ProbabilityMode
from .sampling import DirichletSampler, ProbabilitySlot, step_seed

FUSED_OPTIMIZERS: dict[type[torch.optim.Optimizer], str] = {
    torch.optim.SGD: "sgd",
    torch.optim.Adam: "adam",
    torch.optim.AdamW: "adam",
}


def fused_path_blocker(optimizer_cls: type, params: Iterable[torch.Tensor], e: int, optimizer_kwargs: dict[str, Any]) -> str | None:
    """Why the fused path cannot run for this setup, or ``None`` when it can.

    Example:
        >>> fused_path_blocker(torch.optim.RMSprop, [torch.zeros(2, 2)], 3, {}) is not None
        True
    """
    if optimizer_cls not in FUSED_OPTIMIZERS:
        return (
            f"{getattr(optimizer_cls, '__name__', optimizer_cls)} has no fused MK kernel (only exactly torch.optim.SGD, "
            "Adam and AdamW have; a subclass may change the step)"
        )
    if optimizer_kwargs.get("differentiable"):
        return "differentiable=True needs the generic path (the fused kernels are not differentiable)"
    params = list(params)
    on_cpu = any(param.device.type == "cpu" for param in params)
    for param in params:
        if param.device.type == "cuda":  # the Triton kernels (mkopt.triton)
            if not mk_triton.available():
                return f"a kernel lives on {param.device} and the fused GPU kernels need Triton: {mk_triton.unavailable_reason()}"
            if param.dtype not in mk_triton.STORAGE_DTYPES:
                return f"a kernel is {param.dtype}: the fused GPU kernels take {[str(d) for d in mk_triton.STORAGE_DTYPES]}"
            if e > mk_triton.MAX_E:
                return f"e={e} exceeds the fused GPU kernels' maximum e={mk_triton.MAX_E}"
        elif param.device.type != "cpu":
            return f"a kernel lives on {param.device}: the fused kernels run on CPU and CUDA"
        elif param.dtype not in native.SUPPORTED_DTYPES:
            return f"a kernel is {param.dtype}: the fused CPU kernels take {[str(d) for d in native.SUPPORTED_DTYPES]}"
    if on_cpu and not native.available():
        return f"the fused CPU kernels could not be built ({native.unavailable_reason()})"
    if on_cpu and e > native.max_e():
        return f"e={e} exceeds the fused kernels' maximum e={native.max_e()}"
    return None


@torch.library.custom_op("mkopt::scale_grad", mutates_args=())
def scale_grad_op(grad: torch.Tensor, e: int, key: torch.Tensor, offset: int, uniform: bool) -> torch.Tensor:
    """``sqrt(sum_k p_k^2) * grad`` with ``p`` of stream ``key`` (a 0-dim int64 tensor) from column ``offset``.

    A ``torch.library`` op, so ``torch.compile`` traces a model around it (the native call is opaque to
    it) and the step's key is data, not a constant that would recompile the graph every step.
    On CUDA (:mod:`mkopt.triton`) the kernel reads the key on the device: no host synchronization.
    """
    if mk_triton.handles(grad.device):
        return mk_triton.launch.scale_grad(grad, e, key, offset, uniform)
    return native.scale_grad(grad, e, int(key), offset, uniform)


@scale_grad_op.register_fake
def _(grad: torch.Tensor, e: int, key: torch.Tensor, offset: int, uniform: bool) -> torch.Tensor:
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


class _ScaledProxy(torch.autograd.Function):
    """Identity forward; backward returns ``s * dL/dW``, ``s = sqrt(sum_k p_k^2)`` with this graph's ``p``.

    ``p`` is the stream's (regenerated from ``key``), or the adversarial step's (``norm`` holds its
    ``s``, written by the ascent); an adversarial probe (``probe=True``) returns ``dL/dW`` itself.
    """

    @staticmethod
    def forward(ctx: Any, proxy: torch.Tensor, key: torch.Tensor, norm: torch.Tensor | None, e: int, offset: int,
                uniform: bool, scale: float, probe: bool) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(key, norm)
        ctx.p_args = (e, offset, uniform, scale, probe)
        return proxy.view_as(proxy)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        key, norm = ctx.saved_tensors
        e, offset, uniform, scale, probe = ctx.p_args
        if probe:  # the ascent reads dL/dW at the mean
            return grad, None, None, None, None, None, None, None
        if norm is not None:
            out = grad * norm
        elif e == 1:  # p = 1, s = 1
            out = grad.clone()
        else:
            out = scale_grad_op(grad, e, key, offset, uniform)
        if scale != 1.0:  # lr compensation (Lemma 4.3), as the generic path scales the copies' gradients
            out = out * scale
        return out, None, None, None, None, None, None, None


def scaled_proxy(proxy: torch.Tensor, slot: ProbabilitySlot, grad_scale: float = 1.0, norm: torch.Tensor | None = None) -> torch.Tensor:
    """What the training forward reads on the fused path: ``proxy``, with the gradient scaling above.

    ``norm``: the adversarial step's ``s`` (``None`` outside one); the sampler's ``fused_phase``
    says whether this is an adversarial probe.
    """
    sampler = slot.sampler
    phase = sampler.fused_phase
    return _ScaledProxy.apply(
        proxy, sampler.keys[slot.key], norm if phase == "adversarial" else None, sampler.e, slot.offset,
        sampler.uniform, grad_scale, phase == "probe",
    )  # fmt: skip


@dataclass(eq=False)
class FusedKernel:
    """One expanded kernel on the fused path: its copies, its proxy and where its ``p`` lives."""

    name: str
    copies: torch.Tensor  # the [e, *shape] stack (parametrize's ``original``)
    proxy: nn.Parameter  # the N-sized weight the training forward reads
    slot: ProbabilitySlot
    owners: list[nn.Module]  # the MajorityKernel parametrizations that read the proxy
    probe: torch.Tensor | None = None  # adversarial modes: this step's probe gradient dL/dW
    norm: torch.Tensor | None = None  # adversarial modes: s of this step's adversarial p
    mixing: torch.Tensor | None = None  # B.2: the per-element weight u of this step's ascent (no logs twice)


def attach_proxies(expansion: Expansion) -> list[FusedKernel]:
    """Give every expanded kernel a proxy Parameter and stop its copies taking gradients.

    The proxy is registered on the kernel's parametrization (so ``model.parameters()``, DDP and
    ``clip_grad_norm_`` see it) and kept out of the model's ``state_dict`` (it is recomputed
    from the copies). Tied owners share one proxy.
    """
    kernels = []
    for target, slot in zip(expansion.targets, expansion.sampler.slots):
        copies = target.param
        if not copies.is_contiguous():
            raise ValueError(f"the copies of {target.name!r} are not contiguous: the fused kernels need a contiguous [e, *shape] stack")
        proxy = nn.Parameter(torch.empty(copies.shape[1:], dtype=copies.dtype, device=copies.device))
        owners = [owner.module.parametrizations[owner.attr][0] for owner in target.owners]
        for parametrization in owners:
            parametrization.attach_proxy(proxy)
        copies.requires_grad_(False)
        kernels.append(FusedKernel(target.name, copies, proxy, slot, owners))
    expansion.sampler.fused_phase = "stream"
    return kernels


def detach_proxies(expansion: Expansion) -> None:
    """Undo :func:`attach_proxies` (collapse and deploy remove the parametrizations anyway)."""
    for target in expansion.targets:
        for owner in target.owners:
            if hasattr(owner.module, "parametrizations") and owner.attr in owner.module.parametrizations:
                owner.module.parametrizations[owner.attr][0].attach_proxy(None)
        target.param.requires_grad_(True)


class FusedUpdate:
    """Runs the fused MK update of the expanded kernels inside ``optimizer``'s param groups.

    ``optimizer`` is the wrapped torch optimizer built over the proxies (in place of the copies)
    and the plain parameters; :meth:`step` steps the proxies' kernels here and everything else
    through ``optimizer.step()``.
    """

    def __init__(self, sampler: DirichletSampler, kernels: list[FusedKernel], optimizer: torch.optim.Optimizer,
                 mode: ProbabilityMode) -> None:  # fmt: skip
        self.sampler = sampler
        self.kernels = kernels
        self.by_proxy = {id(k.proxy): k for k in kernels}
        self.optimizer = optimizer
        self.kind = FUSED_OPTIMIZERS[type(optimizer)]
        self.uniform = mode.uniform
        self.adversarial = mode.two_pass
        self.randomize = mode.randomize
        self.ascent_step = 0.0  # eps / loss scale of this step's ascent
        self.ascent_tensor: torch.Tensor | None = None  # GPU path: a device factor of ascent_step (see mkopt.triton.step)
        self.weights_are_mean = False  # the proxies hold the plain mean (an armed adversarial probe)

    @property
    def phase(self) -> str:
        """``"stream"`` (Dirichlet or uniform p), ``"probe"`` or ``"adversarial"`` (the adversarial modes)."""
        return self.sampler.fused_phase

    @phase.setter
    def phase(self, value: str) -> None:
        self.sampler.fused_phase = value

    # -- the stream keys -------------------------------------------------------------------
    def current_key(self, slot: ProbabilitySlot) -> int:
        """The stream key of ``slot`` at the sampler's current step (drawn by ``sampler.draw``)."""
        return self.sampler.seeds[slot.key]

    def next_key(self, slot: ProbabilitySlot) -> int:
        """The stream key of ``slot`` at the next step, without touching the sampler's state."""
        sampler = self.sampler
        return step_seed(sampler.seed, sampler.step + 1, sampler.stream_of(slot.key))

    # -- the weight the forward reads --------------------------------------------------------
    @torch.no_grad()
    def write_weights(self, uniform: bool | None = None) -> None:
        """``proxy = sum_k p_k W~_k`` with the current step's ``p`` (after a load, a resume, a manual edit)."""
        uniform = self.uniform if uniform is None else uniform
        for kernel in self.kernels:
            if mk_triton.handles(kernel.copies.device):
                key = self.sampler.keys[kernel.slot.key]
                _write_contiguous(kernel.proxy, lambda out: mk_triton.step.write_weight(kernel, out, key, uniform))
                continue
            _write_contiguous(kernel.proxy, lambda out: native.mix_(
                kernel.copies, out, self.current_key(kernel.slot), kernel.slot.offset, uniform))  # fmt: skip
        self.weights_are_mean = uniform

    # -- adversarial probabilities (appendix B) ---------------------------------------------
    def arm_probe(self) -> None:
        """Start an adversarial step: the proxies hold the mean of the copies, backward yields ``dL/dW``."""
        if not self.weights_are_mean:
            self.write_weights(uniform=True)
        for kernel in self.kernels:
            kernel.probe = None
        self.phase = "probe"

    @property
    def on_device(self) -> bool:
        """Whether the kernels run in Triton (CUDA): the step then keeps every value on the device."""
        return bool(self.kernels) and mk_triton.handles(self.kernels[0].copies.device)

    @torch.no_grad()
    def ascend(self, ascent_step: float, ascent_factor: torch.Tensor | None = None) -> None:
        """B.1 / B.2 from the probe's ``dL/dW`` (the proxies' ``.grad``): write ``W_adv`` and its ``s``.

        The ascent step is ``ascent_step``, times ``ascent_factor`` (a 0-dim device tensor: the inverse
        loss scale and the probe's finite flag, never read by the host) on the GPU path."""
        if ascent_factor is not None and not self.on_device:
            raise ValueError("ascent_factor is the GPU path's device-side step factor: pass the whole step as ascent_step here")
        self.ascent_step = ascent_step
        for kernel in self.kernels:
            probe = kernel.proxy.grad.to(kernel.proxy.dtype).contiguous()
            if kernel.norm is None:
                kernel.norm = torch.empty(kernel.proxy.shape, dtype=kernel.proxy.dtype, device=kernel.proxy.device)
            if self.randomize and kernel.mixing is None:
                kernel.mixing = torch.empty(kernel.proxy.numel(), dtype=kernel.slot.key.dtype, device=kernel.proxy.device)
            if mk_triton.handles(kernel.copies.device):
                self.ascent_tensor = ascent_factor if ascent_factor is not None else mk_triton.step.device_one(kernel.copies.device)
                _write_contiguous(kernel.proxy, lambda out: mk_triton.step.ascend(self, kernel, probe, out, self.ascent_tensor, ascent_step))
                kernel.probe = probe
                kernel.slot.adversarial_p = lambda kernel=kernel: mk_triton.step.adversarial_probabilities(
                    self, kernel, kernel.copies, kernel.probe, kernel.slot.offset)  # fmt: skip
                for owner in kernel.owners:
                    owner.adversarial_norm = kernel.norm
                continue
            args = self._adversarial_args(kernel, kernel.proxy.numel(), kernel.slot.offset)
            _write_contiguous(kernel.proxy, lambda out: native.ascend_(args, kernel.copies, probe, out, kernel.norm, kernel.mixing))
            kernel.probe = probe
            kernel.slot.adversarial_p = lambda kernel=kernel, args=args: native.adversarial_probabilities(args, kernel.copies, kernel.probe)
            for owner in kernel.owners:
                owner.adversarial_norm = kernel.norm
        self.weights_are_mean = False
        self.phase = "adversarial"

    def _adversarial_args(self, kernel: FusedKernel, n: int, offset: int) -> native.StepArgs:
        return native.StepArgs(
            n=n, offset=offset, key_now=self.current_key(kernel.slot), e=kernel.copies.shape[0],
            adversarial=1, randomize=int(self.randomize), ascent_step=self.ascent_step,
        )  # fmt: skip

    @torch.no_grad()
    def estimated_entropy(self, columns: int = 8192, chunks: int = 2) -> float:
        """Mean normalized entropy of this step's adversarial ``p`` on at most ``columns`` elements per kernel
        (``chunks`` evenly spaced runs), weighted by kernel size: a diagnostic, not worth a full pass
        (8 runs per kernel cost ~2.4 ms per step on the paper's MLP, mostly Python; 2 cost ~0.6 ms)."""
        from .adversarial import normalized_entropy

        if self.on_device:  # partial results stay on the device: one read
            return mk_triton.step.estimated_entropy(self, columns, chunks)
        total = weight = 0.0
        for kernel in self.kernels:
            n = kernel.proxy.numel()
            run = max(1, min(n, columns // chunks))
            starts = sorted({(n - run) * i // max(chunks - 1, 1) for i in range(chunks)}) if n > run else [0]
            values = []
            for start in starts:
                copies = kernel.copies.reshape(kernel.copies.shape[0], -1)[:, start : start + run].contiguous()
                probe = kernel.probe.reshape(-1)[start : start + run].contiguous()
                args = self._adversarial_args(kernel, copies.shape[1], kernel.slot.offset + start)
                values.append(float(normalized_entropy(native.adversarial_probabilities(args, copies, probe))))
            total += sum(values) / len(values) * n
            weight += n
        return total / weight

    # -- the step --------------------------------------------------------------------------
    def step(self, closure: Any = None) -> Any:
        """Step every parameter at the sampler's current step ``t``; the proxies then hold ``W_t+1``."""
        loss = None
        if closure is not None:  # as torch's optimizers do: the closure first, then the update
            with torch.enable_grad():
                loss = closure()
        if self.adversarial and self.phase != "adversarial":
            raise RuntimeError("an adversarial step needs its ascent first: opt.ascend_probabilities() before opt.step()")
        with self._proxy_grads_hidden() as grads:
            self.optimizer.step()
        with torch.no_grad():
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    kernel = self.by_proxy.get(id(param))
                    if kernel is not None:
                        self._step_kernel(kernel, group, grads.get(id(param)))
        if self.adversarial:
            self.weights_are_mean = True
            self.phase = "probe"
        return loss

    @contextmanager
    def _proxy_grads_hidden(self) -> Iterator[dict[int, torch.Tensor]]:
        """The torch optimizer skips parameters without ``.grad``: hide the proxies' for its step."""
        grads = {}
        for kernel in self.kernels:
            if kernel.proxy.grad is not None:
                grads[id(kernel.proxy)] = kernel.proxy.grad
                kernel.proxy.grad = None
        try:
            yield grads
        finally:
            for kernel in self.kernels:
                if id(kernel.proxy) in grads:
                    kernel.proxy.grad = grads[id(kernel.proxy)]

    def _step_kernel(self, kernel: FusedKernel, group: dict[str, Any], grad: torch.Tensor | None) -> None:
        if mk_triton.handles(kernel.copies.device):
            mk_triton.step.step_kernel(self, kernel, group, grad)
            return
        if grad is not None and grad.is_sparse:
            raise RuntimeError(f"{kernel.name!r} has a sparse gradient: MK kernels need dense gradients")
        proxy, copies, slot = kernel.proxy, kernel.copies, kernel.slot
        e = copies.shape[0]
        args = native.StepArgs(
            n=proxy.numel(), offset=slot.offset, key_now=self.current_key(slot), key_next=self.next_key(slot), e=e,
            uniform=int(self.uniform),
            has_grad=int(grad is not None), maximize=int(group.get("maximize", False)), lr=float(group["lr"]),
            weight_decay=float(group.get("weight_decay", 0.0)), grad_scale=1.0,  # lr compensation: in backward
            adversarial=int(self.adversarial), randomize=int(self.randomize), ascent_step=self.ascent_step,
            uniform_next=int(self.adversarial),  # the next adversarial step starts from its probe at the mean
        )  # fmt: skip
        probe = kernel.probe if self.adversarial else None
        mixing = kernel.mixing if self.adversarial and self.randomize else None
        grad_flat = None if grad is None else grad.to(proxy.dtype).contiguous()
        if self.kind == "sgd":
            momentum = float(group.get("momentum", 0.0))
            buffer = None
            state = self.optimizer.state[proxy] if momentum != 0 else {}  # torch keeps no entry without momentum
            _check_state(kernel, state)
            if momentum != 0 and grad is not None:
                buffer = state.get("momentum_buffer")
                args.first_momentum = int(buffer is None)
                if buffer is None:
                    buffer = state["momentum_buffer"] = torch.empty_like(copies)
                args.momentum, args.dampening, args.nesterov = momentum, float(group["dampening"]), int(group["nesterov"])
            elif momentum != 0:
                buffer = state.get("momentum_buffer")  # untouched without a gradient; only W is rewritten
            _write_contiguous(proxy, lambda out: native.sgd_(args, copies, out, grad_flat, buffer, probe, mixing))
            self._after_kernel_step(kernel)
            return
        state = self.optimizer.state[proxy]
        _check_state(kernel, state)
        amsgrad = bool(group["amsgrad"])
        if "exp_avg" not in state:  # the params form keeps its copies in this dict too
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(copies, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(copies, memory_format=torch.contiguous_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(copies, memory_format=torch.contiguous_format)
        if grad is not None:
            state["step"] += 1
        t = float(state["step"])
        beta1, beta2 = (float(b) for b in group["betas"])
        args.beta1, args.beta2, args.eps = beta1, beta2, float(group["eps"])
        if t > 0:
            args.step_size = float(group["lr"]) / (1 - beta1**t)
            args.bias2_sqrt = math.sqrt(1 - beta2**t)
        args.amsgrad = int(amsgrad)
        args.decoupled = int(group.get("decoupled_weight_decay", type(self.optimizer) is torch.optim.AdamW))
        max_sq = state.get("max_exp_avg_sq") if amsgrad else None
        if amsgrad and max_sq is None:
            max_sq = state["max_exp_avg_sq"] = torch.zeros_like(copies, memory_format=torch.contiguous_format)
        _write_contiguous(proxy, lambda out: native.adam_(args, copies, out, grad_flat, state["exp_avg"], state["exp_avg_sq"], max_sq, probe, mixing))
        self._after_kernel_step(kernel)

    def _after_kernel_step(self, kernel: FusedKernel) -> None:
        if self.adversarial:  # the proxy now holds the mean: the next step's probe is armed
            kernel.probe = None
            kernel.slot.adversarial_p = None


def _check_state(kernel: FusedKernel, state: dict[str, Any]) -> None:
    """Refuse optimizer state that is not ``[e, *shape]`` (e.g. stepped by a plain optimizer): the kernel would overrun it."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and (
            value.shape != kernel.copies.shape or not value.is_contiguous() or value.dtype != kernel.copies.dtype
        ):
            raise RuntimeError(
                f"optimizer state {name!r} of {kernel.name!r} has shape {tuple(value.shape)} and dtype {value.dtype}, but the "
                f"fused path keeps [e, *shape] = {tuple(kernel.copies.shape)} {kernel.copies.dtype} contiguous tensors: was "
                "it loaded from a plain optimizer's state_dict, or stepped outside MKOptimizer.step()?"
            )


def _write_contiguous(target: torch.Tensor, write: Any) -> None:
    """Run ``write(out)`` into ``target`` directly, or through a contiguous scratch (channels_last proxies)."""
    if target.is_contiguous():
        write(target.data)
        return
    scratch = torch.empty(target.shape, dtype=target.dtype, device=target.device)
    write(scratch)
    target.data.copy_(scratch)
