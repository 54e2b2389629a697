"""The Majority-Kernels parametrization: ``module.W`` computed from its ``e`` stacked copies.

Training mode: ``W = sum_k p[k] * W~[k]`` with the step's per-element Dirichlet ``p`` (Eq. 4.2).
Eval mode: ``W = mean_k W~[k]``, the deployable kernel. The mode follows ``module.train()/eval()``.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from .fused import mix_regenerated
from .sampling import BufferKey, ProbabilitySlot, probability_dtype

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _MixCopies(torch.autograd.Function):
    """``sum_k p[k] * stacked[k]`` with a backward that never materializes more than ``p * grad``.

    ``p`` is saved for backward, so redrawing it in place before backward raises autograd's
    version-counter error instead of silently using the wrong probabilities.
    """

    @staticmethod
    def forward(ctx: Any, stacked: torch.Tensor, p: torch.Tensor, grad_scale: float) -> torch.Tensor:
        ctx.save_for_backward(p, stacked if p.requires_grad else None)
        ctx.grad_scale = grad_scale
        out = torch.mul(p[0], stacked[0])
        for k in range(1, stacked.shape[0]):  # e fused multiply-adds, no [e, ...] temporary
            out.addcmul_(p[k], stacked[k])
        return out.to(stacked.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        p, stacked = ctx.saved_tensors
        grad_stacked = grad_p = None
        # An adversarial probe (p requires grad) only needs dL/dp: its weight gradients would be
        # discarded, so none are made (autograd treats None as zero and leaves .grad alone).
        if ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]:
            # dL/dW~[k] = p[k] * dL/dW, written contiguous like the stack (a channels_last conv hands back a
            # channels_last dL/dW): AccumulateGrad and DDP's buckets then take it without a layout copy
            grad_stacked = torch.empty((p.shape[0], *grad.shape), dtype=grad.dtype, device=grad.device)
            torch.mul(p, grad.unsqueeze(0), out=grad_stacked)
            if ctx.grad_scale != 1.0:  # lr compensation (Lemma 4.3), see MKOptimizer
                grad_stacked.mul_(ctx.grad_scale)
        if ctx.needs_input_grad[1]:
            grad_p = (stacked * grad.unsqueeze(0)).to(p.dtype)  # dL/dp[k] = W~[k] * dL/dW
        return grad_stacked, grad_p, None


def mix_copies(stacked: torch.Tensor, p: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
    """``sum_k p[k] * stacked[k]`` (differentiable in both; the copies' gradient times ``grad_scale``).

    Example:
        >>> mix_copies(torch.ones(3, 2), torch.full((3, 2), 1 / 3))
        tensor([1., 1.])
    """
    return _MixCopies.apply(stacked, p, grad_scale)


def mean_of_copies(stacked: torch.Tensor) -> torch.Tensor:
    """The deployable kernel: the plain mean over copies, accumulated in float32 for fp16/bf16.

    Example:
        >>> mean_of_copies(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        tensor([2., 4.])
    """
    if stacked.dtype in _LOW_PRECISION:
        return stacked.mean(0, dtype=torch.float32).to(stacked.dtype)
    return stacked.mean(0)


def _warn_undriven(sampler: Any) -> None:
    """One warning per expansion trained without an MKOptimizer: nothing would ever redraw ``p``."""
    sampler.driven = None  # warned
    warnings.warn(
        "an expanded model runs a training forward, but no MKOptimizer drives it: p is never redrawn and the "
        "copies' optimizer does not know they are copies. Build mkopt.MKOptimizer(optimizer_cls, model) on the "
        "expanded model (it adopts the copies), or use mkopt.optim.SGD/Adam/AdamW on the plain model",
        RuntimeWarning,
        stacklevel=4,
    )


class MajorityKernel(nn.Module):
    """Parametrization turning a ``[e, *shape]`` stack into the ``[*shape]`` tensor a module reads.

    Registered by :func:`mkopt.expand`; users rarely build one. ``p`` is either a ``[e, *shape]``
    tensor (a view into the sampler's flat buffer, refilled once per optimizer step) or a
    :class:`~mkopt.sampling.ProbabilitySlot` whose sampler regenerates ``p`` inside fused kernels
    (:mod:`mkopt.fused`). The :attr:`p` property returns the probabilities in use either way.
    ``right_inverse`` builds the stack at registration (``init`` copies); a ``tied`` instance
    (second owner of a shared tensor) receives the already expanded stack and passes it through.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> mk = MajorityKernel(e=3, p=torch.full((3, 2, 2), 1 / 3), copies=lambda w: w.expand(3, -1, -1).clone())
        >>> torch.nn.utils.parametrize.register_parametrization(lin, "weight", mk)  # doctest: +ELLIPSIS
        ParametrizedLinear(...)
        >>> tuple(lin.parametrizations.weight.original.shape)
        (3, 2, 2)
    """

    def __init__(self, e: int, p: torch.Tensor | ProbabilitySlot, copies: Any = None, tied: bool = False) -> None:
        super().__init__()
        self.e = e
        self.slot = p if isinstance(p, ProbabilitySlot) else None
        # plain attribute, not a buffer: it must stay a view of the flat buffer
        self._p = p.view if isinstance(p, ProbabilitySlot) else p
        self._copies = copies
        self.tied = tied
        self.grad_scale = 1.0  # set by MKOptimizer(lr_compensation=True)
        self.register_parameter("proxy", None)  # the fused path's N-sized weight (see mkopt.fused_step)
        self.adversarial_norm: torch.Tensor | None = None  # the fused path's s of this step's adversarial p
        self.read_mean = False  # MKOptimizer.eval(): the training forward reads the mean too

    def attach_proxy(self, proxy: nn.Parameter | None) -> None:
        """Make the training forward read ``proxy`` (the fused path), or mix the copies again (``None``).

        The proxy is a registered Parameter (``model.parameters()``, DDP and clipping see it) but
        never part of the ``state_dict``: it is a function of the copies and the step.
        """
        self._parameters["proxy"] = proxy

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        with self._without_proxy():
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        with self._without_proxy():
            super()._load_from_state_dict(state_dict, prefix, *args)

    @contextlib.contextmanager
    def _without_proxy(self):
        proxy = self._parameters.pop("proxy")
        try:
            yield
        finally:
            self._parameters["proxy"] = proxy

    @property
    def p(self) -> torch.Tensor:
        """The probabilities of the current step, ``[e, *shape]`` (a fresh tensor when regenerated)."""
        return self.slot.current() if self._regenerated else self._p

    @property
    def _regenerated(self) -> bool:
        return self.slot is not None and self.slot.sampler.regenerate

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        if not self.training or self.read_mean:
            return mean_of_copies(stacked)
        if self.slot is not None and self.slot.sampler.driven is False:
            _warn_undriven(self.slot.sampler)
        device = self.slot.device if self._regenerated else self._p.device
        if self._regenerated and (device != stacked.device or self.slot.key.dtype != probability_dtype(stacked.dtype)):
            # the model was moved (.to(device/dtype)): p is a function of (seed, step), regenerate it there
            self.slot.sampler.rehome(self.slot.key, BufferKey(stacked.device, probability_dtype(stacked.dtype)))
            device = stacked.device
        if device != stacked.device:
            raise RuntimeError(
                f"MK probabilities live on {device} but the weight is on {stacked.device}: "
                "move the model to its device before building MKOptimizer, or rebuild it after moving"
            )
        if self.proxy is not None:
            from .fused_step import scaled_proxy  # the fused path: W was written by the last step

            return scaled_proxy(self.proxy, self.slot, self.grad_scale, self.adversarial_norm)
        if self._regenerated:
            slot = self.slot
            sampler = slot.sampler
            return mix_regenerated(
                stacked, slot.step_key, slot.offset_tensor, sampler.constants(device), slot.key.dtype,
                self.grad_scale, sampler.compile_kernels(device), sampler.compile_required, host_offset=slot.offset,
            )  # fmt: skip
        return mix_copies(stacked, self._p, self.grad_scale)

    @torch.no_grad()
    def right_inverse(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.tied:
            return tensor  # already the shared [e, *shape] stack
        stacked = self._copies(tensor)
        self._copies = None  # the init closure may hold module copies: drop them
        return stacked

    def extra_repr(self) -> str:
        return f"e={self.e}" + (", tied" if self.tied else "") + (", p regenerated" if self._regenerated else "") + (
            ", fused path" if self.proxy is not None else "")  # fmt: skip
