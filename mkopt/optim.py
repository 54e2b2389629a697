"""Majority Kernels as torch-style optimizers over ordinary parameters: the *params form*.

``mkopt.optim.SGD(model.parameters(), lr=0.1, e=3)`` is built like ``torch.optim.SGD``, from
parameters, so every framework that builds the optimizer itself can use it (Hugging Face's
``Trainer(optimizer_cls_and_kwargs=...)``, Lightning's ``configure_optimizers``, config-driven
``_component_`` factories). The model is not rewritten: each target parameter ``W`` keeps its
class, name and size and holds the weight the training forward reads, ``W_t = sum_k p_t,k W~_k``;
its ``e`` copies ``W~`` live in the optimizer state (``state[W]["copies"]``, ``[e, *W.shape]``,
from the first step on; :meth:`MKParamOptimizer.named_copies` reads them any time) beside torch's
own state keys. Backward gives ``W.grad = s * dL/dW`` with ``s = sqrt(sum_k
p_k^2)`` (a gradient hook), so clipping, GradScaler, accumulation and DDP see the norms the
copies' gradients have, exactly as on :class:`mkopt.MKOptimizer`'s fused path. ``step()`` updates
the copies and their state and writes ``W_t+1``. :meth:`MKParamOptimizer.eval` swaps every
target to the mean of its copies (what is evaluated and deployed), :meth:`~MKParamOptimizer.train`
swaps back, bit for bit.

SGD, Adam and AdamW run the fused native kernels (one pass per element and step, CPU); any other
optimizer class goes through :func:`wrap` and runs the generic path (the wrapped optimizer steps the
``[e, *shape]`` copies with gradients ``p_k * dL/dW``). Both forms draw the same ``p``: for the same
targets in the same order, ``mkopt.optim.SGD(model.parameters(), ...)`` trains exactly like
``MKOptimizer(torch.optim.SGD, model, ...)``.

Example:
    >>> import torch, mkopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> opt = mkopt.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, e=3)
    >>> x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    >>> for _ in range(3):
    ...     opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    >>> tuple(opt.state[model[0].weight]["copies"].shape)
    (3, 16, 8)
    >>> opt.eval()                 # the model now holds the mean of the copies: evaluate, save, ship
    >>> torch.equal(model[0].weight, opt.state[model[0].weight]["copies"].mean(0))
    True
    >>> opt.train()                # back to this step's training weights
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from .diagnostics import copy_spread
from .follow import follow_parameters, placement
from .expand import _check_e
from .fused_step import FusedKernel, FusedUpdate, fused_path_blocker, scale_grad_op
from .modes import probability_mode
from .optimizer import PATHS, _STATE_VERSION, _check_optimizer_cls, resolve_path, split_mk_state, with_mk_state
from .parametrization import mean_of_copies
from .sampling import DirichletSampler, ProbabilitySlot

TargetChoice = Callable[[torch.Tensor], bool] | Iterable[torch.Tensor] | None


def is_default_target(param: torch.Tensor) -> bool:
    """The paper's kernels among plain parameters: trainable floating tensors with ``ndim >= 2``.

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> is_default_target(lin.weight), is_default_target(lin.bias)
        (True, False)
    """
    return param.requires_grad and param.is_floating_point() and param.dim() >= 2


class MKParamOptimizer(torch.optim.Optimizer):
    """Majority-Kernels training over ordinary parameters; subclasses made by :func:`wrap` name the optimizer.

    Args (beyond the wrapped optimizer's own, e.g. ``lr``, ``momentum``, ``betas``):
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        e: copies per kernel (an int >= 1; the paper uses 3).
        seed: seed of the probability stream (``p`` of step ``t`` is a function of ``(seed, t)``).
        probabilities: ``"dirichlet"`` (default, Eq. 4.2) or ``"uniform"`` (``p = 1/e``, Lemma 4.3).
            The adversarial modes take a probe pass through the model's parametrizations: use
            :class:`mkopt.MKOptimizer` for them.
        init: ``"replicate"`` (default): every copy starts as the parameter's current value.
        targets: which parameters get copies: ``None`` (default: trainable floating tensors with
            ``ndim >= 2``, see :func:`is_default_target`), a predicate ``param -> bool``, or an
            iterable of the parameters themselves. The others are stepped plainly.
        lr_compensation: scale the copies' gradients by ``e`` (SGD family only; see
            :class:`mkopt.MKOptimizer`).
        path: ``"auto"`` (default), ``"fused"`` or ``"generic"``, as for :class:`mkopt.MKOptimizer`.
        sampler_compile: compile the generic path's probability sampler (``None``: on CPU).

    Example:
        >>> import torch, mkopt
        >>> lin = torch.nn.Linear(4, 2)
        >>> opt = mkopt.optim.AdamW(lin.parameters(), lr=1e-3, e=4)
        >>> opt.path, opt.e, opt.trained_parameters() == 4 * 8 + 2
        ('fused', 4, True)
    """

    optimizer_cls: ClassVar[type[torch.optim.Optimizer]]

    def __init__(
        self,
        params: Iterable[Any],
        *args: Any,
        e: int = 3,
        seed: int = 0,
        probabilities: str = "dirichlet",
        init: str = "replicate",
        targets: TargetChoice = None,
        lr_compensation: bool = False,
        path: str = "auto",
        sampler_compile: bool | None = None,
        **optimizer_kwargs: Any,
    ) -> None:
        optimizer_cls = type(self).__dict__.get("optimizer_cls") or getattr(type(self), "optimizer_cls", None)
        if optimizer_cls is None:
            raise TypeError("MKParamOptimizer is a base class: use mkopt.optim.SGD / Adam / AdamW or mkopt.optim.wrap(cls)")
        _check_optimizer_cls(optimizer_cls)
        e = _check_e(e)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed={seed!r} must be an int")
        if path not in PATHS:
            raise ValueError(f"path={path!r} is unknown: use one of {PATHS}")
        self.mode = probability_mode(probabilities)
        if self.mode.two_pass:
            raise ValueError(
                f"probabilities={probabilities!r} needs a probe pass at the mean of the copies, which the params form "
                "cannot insert into your model: use mkopt.MKOptimizer(optimizer_cls, model, probabilities=...) for "
                "the adversarial modes"
            )
        if init != "replicate":
            raise ValueError(
                f"init={init!r}: the params form only knows the parameters, not the layers' initializers, so it "
                "replicates (init='replicate'); for independently drawn copies use mkopt.MKOptimizer(..., init='independent')"
            )
        if lr_compensation and not issubclass(optimizer_cls, torch.optim.SGD):
            raise ValueError(
                f"lr_compensation=True changes the step only of optimizers linear in the gradient (torch.optim.SGD and "
                f"subclasses); {optimizer_cls.__name__} is scale-invariant: raise its lr instead"
            )
        groups = _as_groups(params)
        chosen = _choose_targets(groups, targets)
        if not chosen:
            raise ValueError(
                "no parameter qualifies as an MK target (default: trainable floating tensors with ndim >= 2), so this "
                "would be plain training: pass targets= (a predicate or the tensors), or, under FSDP, wrap with "
                "use_orig_params=True (flattened 1-D parameters hide the kernels)"
            )
        for param in chosen:
            param_ref, owner = _OWNERS.get(id(param), (lambda: None, lambda: None))
            if param_ref() is param and owner() is not None:
                raise ValueError(
                    f"a parameter of shape {tuple(param.shape)} already belongs to a live mkopt optimizer: two would scale "
                    "its gradient twice and both rewrite it. Delete the old optimizer first (del opt), or build one over "
                    "all the parameters"
                )
        self.probabilities = probabilities
        self.lr_compensation = bool(lr_compensation)
        self.grad_scale = float(e) if lr_compensation else 1.0
        self.path = resolve_path(path, optimizer_cls, chosen, e, optimizer_kwargs)
        self.sampler = DirichletSampler(e, seed, compiled=sampler_compile, regenerate=True)
        self.sampler.uniform = self.mode.uniform
        self._slots: dict[int, ProbabilitySlot] = {}
        self._targets: list[torch.Tensor] = chosen
        for param in chosen:
            self._slots[id(param)] = self.sampler.allocate(param.device, param.dtype, param.shape)
        self.sampler.draw(0)
        self._evaluating = False
        with torch.no_grad():
            copies = {id(p): p.detach().unsqueeze(0).repeat(e, *([1] * p.dim())).contiguous() for p in chosen}
        self._fused: FusedUpdate | None = None
        self._inner: torch.optim.Optimizer | None = None
        if self.path == "fused":  # the torch optimizer steps the plain parameters; the kernels step the targets
            self.optimizer = optimizer_cls(groups, *args, **optimizer_kwargs)
        else:  # the torch optimizer steps the copies; the user-facing groups hold the parameters
            inner_groups = [{**g, "params": [copies.get(id(p), p) for p in g["params"]]} for g in groups]
            self._inner = optimizer_cls(inner_groups, *args, **optimizer_kwargs)
            self.optimizer = _ParameterGroups(
                [{**{k: v for k, v in inner.items() if k != "params"}, "params": g["params"]} for g, inner in zip(groups, self._inner.param_groups)],
                self._inner.defaults,
            )  # fmt: skip
        # Share, never copy: schedulers, clipping and GradScaler read and write these objects.
        super().__init__(self.optimizer.param_groups, self.optimizer.defaults)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self._shares_groups = True
        # The copies enter ``state`` at the first step (or a load): until then the state is empty, as a fresh
        # torch optimizer's is, which is what torch.distributed.checkpoint's loading relies on.
        self._copies: dict[int, torch.Tensor] = copies
        if self.path == "fused":
            kernels = [FusedKernel(self._name(p), copies[id(p)], p, self._slots[id(p)], []) for p in chosen]
            self._fused = FusedUpdate(self.sampler, kernels, self.optimizer, self.mode)
        this = weakref.ref(self)
        self._hooks = [p.register_hook(_GradientScale(this, id(p))) for p in chosen]
        for param in chosen:
            _OWNERS[id(param)] = (weakref.ref(param), this)
        weakref.finalize(self, _release, list(self._hooks))
        self._write_weights()

    # -- properties -------------------------------------------------------------------------
    @property
    def e(self) -> int:
        return self.sampler.e

    @property
    def seed(self) -> int:
        return self.sampler.seed

    @property
    def mk_step(self) -> int:
        """Number of completed optimizer steps; ``p`` in use now is the one of this step."""
        step = self.sampler.step
        assert step is not None
        return step

    @property
    def last_p_entropy(self) -> None:  # the adversarial modes' diagnostic; none here
        return None

    def targets(self) -> list[torch.Tensor]:
        """The parameters that have copies, in stream order."""
        return list(self._targets)

    def named_copies(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, [e, *shape] copies)`` of every target (names: ``group.index``)."""
        return [(self._name(p), self._copies[id(p)]) for p in self._targets]

    @torch.no_grad()
    def mean_weights(self, names: dict[int, str]) -> dict[str, torch.Tensor]:
        """``{name: mean of the copies}`` for every target named in ``names`` (``id(param) -> name``): what a
        checkpoint of the deployable model holds, whatever the parameters hold now."""
        return {names[id(p)]: mean_of_copies(self._copies[id(p)]).to(p.dtype).clone() for p in self._targets if id(p) in names}

    def trained_parameters(self) -> int:
        """How many values are trained: ``e`` copies of every target plus every other parameter.

        Example:
            >>> import torch, mkopt
            >>> mkopt.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.1, e=3).trained_parameters() == 3 * 8 + 2
            True
        """
        targets = {id(p) for p in self._targets}
        return sum(p.numel() * (self.e if id(p) in targets else 1) for g in self.param_groups for p in g["params"])

    def _index(self, param: torch.Tensor) -> int:
        """``param``'s key in :meth:`state_dict` (its position over all groups)."""
        return next(i for i, p in enumerate(p for g in self.param_groups for p in g["params"]) if p is param)

    def _name(self, param: torch.Tensor) -> str:
        for g, group in enumerate(self.param_groups):
            for i, other in enumerate(group["params"]):
                if other is param:
                    return f"{g}.{i}"
        return f"tensor{tuple(param.shape)}"

    # -- the weights the model reads --------------------------------------------------------
    @torch.no_grad()
    def _write_weights(self, mean: bool = False) -> None:
        """Every target := ``sum_k p_k W~_k`` with this step's ``p``, or the plain mean of its copies."""
        self._follow_moves()
        if mean:  # exactly what mkopt.deploy ships for the model form
            for param in self._targets:
                param.copy_(mean_of_copies(self._copies[id(param)]))
        elif self._fused is not None:  # the kernels' own mix: the bits the last step wrote
            self._fused.write_weights()
        else:
            for param in self._targets:
                copies = self._copies[id(param)]
                if self.mode.uniform:
                    param.copy_(mean_of_copies(copies))
                else:
                    param.copy_((self._slots[id(param)].current().to(copies.dtype) * copies).sum(0))
        self._record_versions()

    def _record_versions(self) -> None:
        """Remember each target's version counter: a later change means someone else wrote the weight."""
        self._versions = {id(p): (p._version, placement(p)) for p in self._targets}

    @torch.no_grad()
    def _adopt_external_writes(self) -> None:
        """Weights written outside the optimizer (``model.load_state_dict`` after building it, DDP's broadcast of
        rank 0's weights): before the first step the copies re-replicate them; later the copies win and a write
        that changed values is said once. Writes of the values the copies already give (a checkpoint loaded with
        its optimizer state) pass silently."""
        written = [p for p in self._targets if self._versions.get(id(p), (None, None)) != (p._version, placement(p))
                   and self._versions.get(id(p), (None, None))[1] == placement(p)]  # fmt: skip
        if not written:
            return
        fresh = self.mk_step == 0 and not any("copies" in self.state.get(p, {}) for p in self._targets)
        outside = {id(p): p.detach().clone() for p in written}
        self._write_weights()  # what the copies say the weights are now
        changed = [p for p in written if not torch.equal(outside[id(p)], p)]
        if not changed:
            return
        if fresh:
            for param in changed:
                self._copies[id(param)].copy_(outside[id(param)].unsqueeze(0).expand_as(self._copies[id(param)]))
            self._write_weights()
            return
        if not getattr(self, "_warned_external", False):
            self._warned_external = True
            warnings.warn(
                f"{len(changed)} MK target(s) were written outside the optimizer after training started; the copies "
                "hold the training state, so the weights were rewritten from them. Load weights with opt.load_state_dict "
                "(it carries the copies), or before building the optimizer",
                RuntimeWarning,
                stacklevel=3,
            )

    def eval(self) -> None:
        """Make every target hold the plain mean of its copies: evaluate, save or deploy the model as is.

        Idempotent; :meth:`train` restores this step's training weights bit for bit. Hugging Face's
        ``Trainer`` calls it around evaluation (the schedule-free optimizers' convention).
        """
        if not self._evaluating:
            self._adopt_external_writes()
            self._write_weights(mean=True)
            self._evaluating = True

    def train(self) -> None:
        """Undo :meth:`eval`: the targets hold ``sum_k p_t,k W~_k`` again (idempotent)."""
        if self._evaluating:
            self._write_weights()
            self._evaluating = False

    # -- the step ---------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run ``closure`` (if given), update the copies and every other parameter, write ``W_t+1``."""
        if self._evaluating:
            raise RuntimeError("the optimizer is in eval mode (targets hold the mean): call opt.train() before training")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._follow_moves()
        self._adopt_external_writes()
        self._publish_copies()
        self._sync_hyperparameters()
        if self._fused is not None:
            self._fused.step()
        else:
            self._generic_step()
        self.sampler.draw(self.mk_step + 1)
        if self._fused is None:
            self._write_weights()
        else:
            self._record_versions()  # the kernels wrote W through its storage
        return loss

    @torch.no_grad()
    def _generic_step(self) -> None:
        assert self._inner is not None
        scratch = []
        for param in self._targets:
            if param.grad is None:
                continue
            copies = self._copies[id(param)]
            p = self._slots[id(param)].current().to(copies.dtype)
            grad = param.grad.to(copies.dtype)
            if not self.mode.uniform and self.e > 1:  # undo s: the copies' gradients are p_k * dL/dW
                grad = grad / p.square().sum(0).sqrt()
            elif self.e > 1:
                grad = grad * math.sqrt(self.e)
            copies.grad = p * grad
            scratch.append(copies)
        self._inner.step()
        for copies in scratch:
            copies.grad = None  # e*N values: not kept between steps

    def _sync_hyperparameters(self) -> None:
        """The generic path's inner optimizer follows schedulers' and users' edits of ``param_groups``."""
        if self._inner is None:
            return
        for outer, inner in zip(self.param_groups, self._inner.param_groups):
            for key, value in outer.items():
                if key != "params":
                    inner[key] = value

    def _follow_moves(self) -> None:
        """Copies and their state follow a target moved by ``model.to(...)`` after the optimizer was built
        (and a framework that replaced the state's tensors, e.g. moving them to a device)."""
        moved = bool(self._targets) and placement(self._copies[id(self._targets[0])]) != placement(self._targets[0])
        for param in self._targets:
            live = self._copies[id(param)]
            state = self.state.get(param, {})
            if "copies" in state and state["copies"] is not live:
                live.data = state["copies"].data  # keep the tensor object: kernels and the inner optimizer hold it
                state["copies"] = live
            if live.device == param.device and live.dtype == param.dtype:
                continue
            blocker = None if self._fused is None else fused_path_blocker(self.optimizer_cls, [param], self.e, {})
            if blocker is not None:
                raise RuntimeError(
                    f"target {self._name(param)} moved to {param.device} ({param.dtype}), where the fused path cannot run: "
                    f"{blocker}. Build the optimizer after moving the model, with path='generic' if needed"
                )
            tensors = {id(v): v for v in [live, *state.values()] if isinstance(v, torch.Tensor) and v.dim() > 0}
            for value in tensors.values():  # in place of the objects: every holder sees the move
                value.data = value.data.to(device=param.device, dtype=param.dtype)
            slot = self._slots[id(param)]
            if slot.key.device != param.device or slot.key.dtype != _probability_dtype(param.dtype):
                self._rehome_sampler()
        if moved:  # every other state tensor: the plain parameters' (and on the generic path the copies')
            follow_parameters(self.optimizer if self._inner is None else self._inner)

    def _publish_copies(self) -> None:
        """Put every target's copies into ``state`` (from the first step on)."""
        for param in self._targets:
            self.state[param]["copies"] = self._copies[id(param)]

    def _rehome_sampler(self) -> None:
        """A fresh sampler on the targets' devices, at the same step: ``p`` is a function of ``(seed, step)``."""
        step = self.mk_step
        sampler = DirichletSampler(self.e, self.seed, compiled=self.sampler.compiled, regenerate=True)
        sampler.uniform = self.sampler.uniform
        self._slots = {id(p): sampler.allocate(p.device, p.dtype, p.shape) for p in self._targets}
        sampler.draw(step)
        self.sampler = sampler
        if self._fused is not None:
            self._fused.sampler = sampler
            for kernel in self._fused.kernels:
                kernel.slot = self._slots[id(kernel.proxy)]

    # -- diagnostics and state ----------------------------------------------------------------
    def diagnostics(self, collapse_threshold: float = 1e-4) -> dict[str, float]:
        """Copy spread per target and overall, and whether the copies collapsed (see :class:`mkopt.MKOptimizer`)."""
        return copy_spread(self, collapse_threshold)

    def state_dict(self) -> dict[str, Any]:
        """torch's layout (``state``, ``param_groups``) plus MK's own state under ``"mkopt"``.

        ``state[i]["copies"]`` holds target ``i``'s copies; MK's state is also written into every
        saved param group, the part that ``torch.distributed.checkpoint`` keeps.
        """
        saved = self.optimizer.state_dict()
        if self._inner is not None:  # the inner optimizer's per-copy state, under the target's index
            inner = self._inner.state_dict()["state"]
            for index, entry in inner.items():
                saved["state"].setdefault(index, {}).update(entry)
        return with_mk_state(saved, self._mk_state())

    def _mk_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION, "e": self.e, "seed": self.seed, "step": self.mk_step,
            "probabilities": self.probabilities, "lr_compensation": self.lr_compensation, "path": self.path,
        }  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (from either path); the next step continues bit for bit."""
        mk, state_dict = split_mk_state(state_dict)
        if mk["e"] != self.e:
            raise ValueError(f"state_dict was saved with e={mk['e']} but this optimizer has e={self.e}")
        if bool(mk.get("lr_compensation", False)) != self.lr_compensation:
            raise ValueError(f"state_dict was saved with lr_compensation={mk.get('lr_compensation')}, this optimizer has {self.lr_compensation}")
        if mk.get("probabilities", "dirichlet") != self.probabilities:
            raise ValueError(f"state_dict was saved with probabilities={mk['probabilities']!r}, this optimizer uses {self.probabilities!r}")
        targets = {id(p) for p in self._targets}
        order = [p for g in self.param_groups for p in g["params"]]
        saved_keys = [k for g in state_dict["param_groups"] for k in g["params"]]  # ints, or DCP's parameter names
        copies_of = {i: entry["copies"] for i, entry in state_dict["state"].items() if "copies" in entry}
        missing = [self._name(p) for k, p in zip(saved_keys, order) if id(p) in targets and k not in copies_of]
        if missing and not state_dict["state"]:  # saved before its first step: the copies replicate the weights
            with torch.no_grad():
                for param in self._targets:
                    self._copies[id(param)].copy_(param.detach().unsqueeze(0).expand_as(self._copies[id(param)]))
            copies_of, missing = {}, []
        if missing:
            raise ValueError(f"state_dict has no copies for targets {missing}: it was saved with other targets or parameters")
        live = self._copies
        outer_state = {i: entry for i, entry in state_dict["state"].items() if i in copies_of or self._inner is None}
        if self._inner is not None:  # the copies to this optimizer, their optimizer state to the inner one
            outer_state = {i: {"copies": copies_of[i]} for i in copies_of}
            inner_state = {i: {k: v for k, v in entry.items() if k != "copies"} for i, entry in state_dict["state"].items()}
            self._inner.load_state_dict({"state": {i: v for i, v in inner_state.items() if v}, "param_groups": state_dict["param_groups"]})
        self.optimizer.load_state_dict({**state_dict, "state": outer_state})
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        with torch.no_grad():  # keep the copies' tensor objects: the kernels and the inner optimizer hold them
            for param in self._targets:
                if "copies" in self.state.get(param, {}):
                    live[id(param)].copy_(self.state[param]["copies"])
                    self.state[param]["copies"] = live[id(param)]
        self.sampler.seed = mk["seed"]
        self.sampler.draw(mk["step"])
        self._evaluating = False
        if self._fused is not None:
            self._fused.optimizer = self.optimizer
        self._write_weights()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_shares_groups", False):
            raise RuntimeError("add_param_group after construction is not supported by mkopt.optim: list every group up front")
        super().add_param_group(param_group)

    def __repr__(self) -> str:
        return f"mkopt.optim.{type(self).__name__}(e={self.e}, path={self.path!r}, step={self.mk_step}, optimizer={self.optimizer!r})"


# id(param) -> (the param, its MK optimizer), both weak (tensors compare elementwise: no WeakKeyDictionary)
_OWNERS: dict[int, tuple[Any, Any]] = {}


def _release(hooks: list[Any]) -> None:
    """The optimizer is gone: its parameters are ordinary parameters again."""
    for hook in hooks:
        hook.remove()


class _ParameterGroups(torch.optim.Optimizer):
    """The generic path's user-facing groups and state (copies); the inner torch optimizer does the stepping."""

    def __init__(self, groups: list[dict[str, Any]], defaults: dict[str, Any]) -> None:
        super().__init__(groups, defaults)

    def step(self, closure: Any = None) -> None:  # pragma: no cover - never called: MKParamOptimizer steps the inner one
        raise RuntimeError("internal: the generic path's parameter groups are not stepped directly")


class _GradientScale:
    """Gradient hook of a target: ``s * grad`` with ``s = sqrt(sum_k p_k^2)`` of the current step's ``p``."""

    def __init__(self, optimizer: "weakref.ref[MKParamOptimizer]", param_id: int) -> None:
        self.optimizer = optimizer
        self.param_id = param_id

    def __call__(self, grad: torch.Tensor) -> torch.Tensor | None:
        opt = self.optimizer()
        if opt is None:  # the optimizer is gone: an ordinary parameter again
            return None
        slot = opt._slots[self.param_id]
        sampler = opt.sampler
        if sampler.e == 1:
            out = grad
        elif sampler.uniform:
            out = grad * (1.0 / math.sqrt(sampler.e))
        else:
            out = scale_grad_op(grad.contiguous(), sampler.e, sampler.keys[slot.key], slot.offset, False)
        return out * opt.grad_scale if opt.grad_scale != 1.0 else out


def _probability_dtype(dtype: torch.dtype) -> torch.dtype:
    from .sampling import probability_dtype

    return probability_dtype(dtype)


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or of parameter groups (dicts), got a single tensor: wrap it in a list")
    items = list(params)
    if not items:
        raise ValueError("the optimizer got an empty parameter list")
    if isinstance(items[0], dict):
        return [{**g, "params": [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])} for g in items]
    return [{"params": items}]


def _choose_targets(groups: list[dict[str, Any]], targets: TargetChoice) -> list[torch.Tensor]:
    params = [p for g in groups for p in g["params"]]
    if targets is None:
        chosen = [p for p in params if is_default_target(p)]
    elif callable(targets):
        chosen = [p for p in params if targets(p)]
    else:
        wanted = {id(t) for t in targets}
        known = {id(p) for p in params}
        if not wanted <= known:
            raise ValueError("targets names tensors that are not among the optimizer's params: pass them in params too")
        chosen = [p for p in params if id(p) in wanted]
    for p in chosen:
        if not p.is_floating_point():
            raise ValueError(f"target of shape {tuple(p.shape)} is {p.dtype}: only floating tensors get copies")
    unique, seen = [], set()
    for p in chosen:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


_WRAPPED: dict[type[torch.optim.Optimizer], type[MKParamOptimizer]] = {}


def wrap(optimizer_cls: type[torch.optim.Optimizer]) -> type[MKParamOptimizer]:
    """The params-form MK optimizer class for any ``torch.optim`` class (the generic path unless fused kernels exist).

    Example:
        >>> import torch, mkopt
        >>> RMSprop = mkopt.optim.wrap(torch.optim.RMSprop)
        >>> opt = RMSprop(torch.nn.Linear(4, 2).parameters(), lr=1e-3, e=2)
        >>> opt.path, type(opt).__name__
        ('generic', 'RMSprop')
    """
    _check_optimizer_cls(optimizer_cls)
    closure = inspect.signature(optimizer_cls.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"{optimizer_cls.__name__}.step needs a closure (it re-evaluates the loss, e.g. LBFGS): MK changes the weights "
            "between evaluations, which such an optimizer cannot see; use a first-order optimizer"
        )
    if optimizer_cls not in _WRAPPED:
        name = optimizer_cls.__name__
        _WRAPPED[optimizer_cls] = type(name, (MKParamOptimizer,), {
            "optimizer_cls": optimizer_cls, "__module__": __name__, "__qualname__": name,
            "__doc__": f"Majority Kernels around ``{optimizer_cls.__module__}.{name}``: ``{name}(params, <its arguments>, *, "
                       "e=3, seed=0, probabilities='dirichlet', targets=None, ...)``; see :class:`MKParamOptimizer`.",
        })  # fmt: skip
    return _WRAPPED[optimizer_cls]


SGD = wrap(torch.optim.SGD)
Adam = wrap(torch.optim.Adam)
AdamW = wrap(torch.optim.AdamW)

__all__ = ["SGD", "Adam", "AdamW", "wrap", "MKParamOptimizer", "is_default_target"]
