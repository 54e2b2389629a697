"""``MKOptimizer``: expands a model and wraps any ``torch.optim`` optimizer around its copies."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .deploy import collapse
from .expand import Expansion, Init, expand
from .targets import TargetSpec

_STATE_VERSION = 1


class MKOptimizer(torch.optim.Optimizer):
    """Majority-Kernels training (Algorithm 4.1) around any ``torch.optim.Optimizer`` class.

    Building it expands ``model`` in place (see :func:`mkopt.expand`), then builds
    ``optimizer_cls(params, **optimizer_kwargs)`` over the expanded tensors. ``param_groups`` and
    ``state`` are the wrapped optimizer's own objects, so LR schedulers, ``clip_grad_norm_`` and
    ``torch.amp.GradScaler.step(opt)`` work unchanged. :meth:`step` steps, then draws the next
    ``p``: ``p`` of step ``t`` is a function of ``(seed, t)``, so resumed and distributed runs agree.

    Args:
        optimizer_cls: a ``torch.optim.Optimizer`` subclass, e.g. ``torch.optim.SGD`` (not an instance).
        model: the model to train; expanded in place.
        e: expansion factor (copies per kernel), an int >= 1.
        targets: which tensors to expand (see :mod:`mkopt.targets`); default every floating ``ndim >= 2`` parameter.
        init: ``"replicate"`` (default) or ``"independent"`` initialization of the copies.
        seed: seed of the probability stream.
        sampler_compile: compile the probability sampler with ``torch.compile`` (default: on CPU,
            where it is ~4x faster; a few seconds once). Values are the same either way for e <= 3.
        params: optional parameter groups over ``model``'s parameters (e.g. no weight decay on
            biases); the Parameter objects survive expansion, so build them before or after. Default
            ``model.parameters()``.
        **optimizer_kwargs: passed to ``optimizer_cls``.

    Example:
        >>> import torch, mkopt
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
        >>> for _ in range(3):
        ...     opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
        >>> plain = mkopt.deploy(model)     # ordinary nn.Sequential with the mean kernels
        >>> sum(p.numel() for p in plain.parameters()) == 8 * 16 + 16 + 16 * 2 + 2
        True
    """

    def __init__(
        self,
        optimizer_cls: type[torch.optim.Optimizer],
        model: nn.Module,
        e: int = 3,
        *,
        targets: TargetSpec = None,
        init: Init = "replicate",
        seed: int = 0,
        sampler_compile: bool | None = None,
        params: Iterable[Any] | None = None,
        **optimizer_kwargs: Any,
    ) -> None:
        _check_optimizer_cls(optimizer_cls)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.expansion: Expansion = expand(model, e, targets=targets, init=init, seed=seed, sampler_compile=sampler_compile)
        self.optimizer = optimizer_cls(model.parameters() if params is None else params, **optimizer_kwargs)
        # Share, never copy: schedulers, clipping and GradScaler read and write these objects.
        super().__init__(self.optimizer.param_groups, self.optimizer.defaults)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self._collapsed = False
        self._shares_groups = True

    @property
    def e(self) -> int:
        return self.expansion.e

    @property
    def mk_step(self) -> int:
        """Number of completed optimizer steps; ``p`` in use now is the one of this step."""
        step = self.expansion.sampler.step
        assert step is not None
        return step

    @property
    def store(self):
        """The ``TensorDict`` (``batch_size=[e]``) of all expanded kernels: ``store[k]`` is copy ``k``."""
        return self.expansion.store

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Step the wrapped optimizer, then draw the next step's probabilities."""
        if self._collapsed:
            raise RuntimeError("this MKOptimizer's model was collapsed: build a plain optimizer to keep training it")
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        with torch.no_grad():
            self.expansion.sampler.draw(self.mk_step + 1)
        return loss

    def collapse(self) -> nn.Module:
        """Fold the model in place into its plain form (mean kernels) and return it; ends MK training."""
        collapse(self.model)
        self._collapsed = True
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state plus what reproduces the probability stream."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "mkopt": {"version": _STATE_VERSION, "e": self.e, "seed": self.expansion.seed, "step": self.mk_step},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next forward uses exactly the saved run's ``p``."""
        if not isinstance(state_dict, dict) or "mkopt" not in state_dict or "optimizer" not in state_dict:
            raise ValueError(
                "not an MKOptimizer state_dict (expected keys 'optimizer' and 'mkopt'); to start from a plain "
                "optimizer's state, train a few steps instead: its moments refer to the unexpanded tensors"
            )
        mk = state_dict["mkopt"]
        if mk["e"] != self.e:
            raise ValueError(f"state_dict was saved with e={mk['e']} but this MKOptimizer has e={self.e}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        # Optimizer.load_state_dict replaces param_groups and state: share the new objects again.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.expansion.seed = mk["seed"]
        self.expansion.sampler.seed = mk["seed"]
        self.expansion.sampler.draw(mk["step"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_shares_groups", False):
            self.optimizer.add_param_group(param_group)  # lands in the shared list
        else:  # Optimizer.__init__ registering the wrapped optimizer's groups
            super().add_param_group(param_group)

    def __repr__(self) -> str:
        return f"MKOptimizer(e={self.e}, seed={self.expansion.seed}, step={self.mk_step}, optimizer={self.optimizer!r})"


def _check_optimizer_cls(optimizer_cls: Any) -> None:
    if isinstance(optimizer_cls, torch.optim.Optimizer):
        raise TypeError(
            f"pass the optimizer class, not an instance ({type(optimizer_cls).__name__} already holds parameters "
            "and state for the unexpanded tensors): e.g. MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1)"
        )
    if not (inspect.isclass(optimizer_cls) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(
            f"optimizer_cls={optimizer_cls!r} is not a torch.optim.Optimizer subclass: pass e.g. torch.optim.AdamW"
        )
