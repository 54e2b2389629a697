"""``MKOptimizer``: expands a model and wraps any ``torch.optim`` optimizer around its copies."""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from . import adversarial, native
from . import triton as mk_triton
from .deploy import collapse
from .diagnostics import copy_spread
from .follow import follow_parameters, placement
from .expand import Expansion, Init, expand, expansion_of, is_expanded
from .modes import probability_mode
from .parametrization import MajorityKernel
from .fused_step import FusedUpdate, attach_proxies, detach_proxies, fused_path_blocker
from .targets import TargetSpec, select_targets

PATHS: tuple[str, ...] = ("auto", "fused", "generic")

_STATE_VERSION = 3  # 3: Dirichlet draws for 4 <= e <= 16 by uniform spacings (e <= 3 unchanged)
STATE_KEY = "mkopt"  # MK's own state in an optimizer state_dict (top level, and in every saved param group)


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
        e: expansion factor (copies per kernel), an int >= 1; default 3, or the ``e`` of a model already
            :func:`mkopt.expand`-ed (whose copies are then trained as they are).
        targets: which tensors to expand (see :mod:`mkopt.targets`); default every floating ``ndim >= 2`` parameter.
        init: ``"replicate"`` (default) or ``"independent"`` initialization of the copies.
        seed: seed of the probability stream (default 0, or the expanded model's).
        probabilities: ``"dirichlet"`` (default, Eq. 4.2), ``"uniform"`` (``p = 1/e``, Lemma 4.3's
            case, for ablations), ``"adversarial"`` (Algorithm B.1) or ``"adv-mk"`` (B.2). The last
            two take two passes per step: ``step(closure)``, or the two-call form (see
            :meth:`ascend_probabilities`).
        adversarial_eps: ascent step on ``p`` for the adversarial modes (>= 0).
        lr_compensation: scale the copies' gradients by ``e`` so that, at the same nominal lr, the
            deployed mean moves exactly like the baseline's weights (Lemma 4.3). Only for optimizers
            whose step is linear in the gradient (the SGD family); adaptive ones are scale-invariant.
        sampler_compile: compile the probability sampler with ``torch.compile`` (default: on CPU,
            where it is ~4x faster; a few seconds once). Values are the same either way for e <= 16.
        params: optional parameter groups over ``model``'s parameters (e.g. no weight decay on
            biases); the Parameter objects survive expansion, so build them before or after. Default
            ``model.parameters()``.
        path: ``"auto"`` (default), ``"fused"`` or ``"generic"``. The fused path (exactly
            ``torch.optim.SGD``, ``Adam``, ``AdamW``; CPU with C++ kernels in float32, float64 or
            bfloat16, or CUDA with Triton kernels, float16 too) keeps MK inside the optimizer: the model
            reads one N-sized weight per kernel, its gradient is N-sized, and one native pass per step updates the copies and
            their optimizer state and writes the next weight (:mod:`mkopt.fused_step`). The generic
            path works with any optimizer: the copies take gradients ``p_k * dL/dW`` and the wrapped
            optimizer steps them. ``"auto"`` takes the fused path where it can run; asking for
            ``"fused"`` where it cannot raises and says why. :attr:`path` says which one runs; both
            compute the same training (the same ``p``, the same updates up to rounding) and a
            checkpoint of one loads into the other.
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
        e: int | None = None,
        *,
        targets: TargetSpec = None,
        init: Init = "replicate",
        seed: int | None = None,
        probabilities: str = "dirichlet",
        adversarial_eps: float = adversarial.DEFAULT_ADVERSARIAL_EPS,
        lr_compensation: bool = False,
        sampler_compile: bool | None = None,
        params: Iterable[Any] | None = None,
        path: str = "auto",
        **optimizer_kwargs: Any,
    ) -> None:
        _check_optimizer_cls(optimizer_cls)
        if path not in PATHS:
            raise ValueError(f"path={path!r} is unknown: use one of {PATHS}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            raise TypeError(
                f"model is wrapped in {type(model).__name__}, whose gradient buckets were sized for the unexpanded "
                "tensors: build MKOptimizer on the bare model first, then wrap it (mkopt.distributed.wrap_model)"
            )
        self.mode = probability_mode(probabilities)
        _check_eps(adversarial_eps)
        if lr_compensation and not issubclass(optimizer_cls, torch.optim.SGD):
            raise ValueError(
                f"lr_compensation=True rescales gradients, which changes the step only of optimizers linear in the "
                f"gradient (torch.optim.SGD and subclasses); {optimizer_cls.__name__} is scale-invariant. Measured "
                "effective factors for adaptive optimizers are in results/lr_compensation.md: raise their lr instead"
            )
        if not self.mode.replicate_ok and init == "replicate":
            raise ValueError(
                "probabilities='adversarial' with init='replicate' never separates the copies: equal copies get equal "
                "dL/dp, so p stays uniform and MK degenerates to plain training at lr/e. Use init='independent', or "
                "probabilities='adv-mk' (Algorithm B.2 re-injects randomness exactly there)"
            )
        self.model = model
        self.probabilities = probabilities
        self.adversarial_eps = float(adversarial_eps)
        self.lr_compensation = bool(lr_compensation)
        existing = _existing_expansion(model, e, seed, targets)
        if existing is not None:
            e = existing.e
        self.path = _choose_path(path, optimizer_cls, model, targets, 3 if e is None else e, optimizer_kwargs)
        fused = self.path == "fused"
        if existing is not None:  # expand() ran first: train its copies
            self.expansion = _adopt(existing, fused, self.mode.regenerable)
        else:
            self.expansion = expand(
                model, 3 if e is None else e, targets=targets, init=init, seed=0 if seed is None else seed,
                sampler_compile=sampler_compile,
                keep_p_buffer=not self.mode.regenerable,  # uniform and adversarial p are not a stream
                regenerate_p=True if fused else None,  # the native kernels regenerate p themselves
            )  # fmt: skip
        self.expansion.sampler.driven = True
        self.expansion.sampler.driver = weakref.ref(self)  # a deep copy of the model is a new expansion: adoptable
        if lr_compensation:
            for module in model.modules():
                if hasattr(module, "grad_scale") and hasattr(module, "tied"):
                    module.grad_scale = float(self.expansion.e)
        groups = model.parameters() if params is None else params
        self._fused: FusedUpdate | None = None
        if fused:
            self.expansion.sampler.uniform = self.mode.uniform
            kernels = attach_proxies(self.expansion)
            groups = _with_proxies(groups, {id(k.copies): k.proxy for k in kernels}, {id(k.proxy) for k in kernels})
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            self._fused = FusedUpdate(self.expansion.sampler, kernels, self.optimizer, self.mode)
            # the proxies are a function of the copies: loading the model's state_dict rewrites them
            this = weakref.ref(self)
            model.register_load_state_dict_post_hook(lambda module, keys: _rewrite_weights(this))
        else:
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        # Share, never copy: schedulers, clipping and GradScaler read and write these objects.
        super().__init__(self.optimizer.param_groups, self.optimizer.defaults)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self._collapsed = False
        self._shares_groups = True
        self._phase = "plain"  # adversarial modes: "probe" (p = 1/e, recording dL/dp) or "descent"
        self._in_closure_step = False
        self._evaluating = False
        self.last_p_entropy: float | None = None
        self._placement = placement(self.expansion.targets[0].param) if self.expansion.targets else None
        self._prepare(0)

    # -- properties -------------------------------------------------------------------------
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

    @property
    def adversarial(self) -> bool:
        return self.mode.two_pass

    def named_copies(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, [e, *shape] copies)`` of every expanded kernel (tied kernels once, by their first name)."""
        return [(target.name, target.param) for target in self.expansion.targets]

    def trained_parameters(self) -> int:
        """How many values are trained: ``e`` copies of every kernel plus every other parameter.

        The fused path's proxies are not counted: they are a function of the copies.

        Example:
            >>> import torch, mkopt
            >>> opt = mkopt.MKOptimizer(torch.optim.SGD, torch.nn.Linear(4, 2), e=3, lr=0.1)
            >>> opt.trained_parameters() == 3 * 8 + 2
            True
        """
        proxies = set() if self._fused is None else {id(k.proxy) for k in self._fused.kernels}
        return sum(p.numel() for p in self.model.parameters() if id(p) not in proxies)

    # -- the step ---------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Step the wrapped optimizer, then prepare the next step's probabilities.

        Adversarial modes: either pass a ``closure`` that computes the loss and calls
        ``backward()`` (it runs twice: at ``p = 1/e`` and at the adversarial ``p``), or use the
        two-call form: probe backward, :meth:`ascend_probabilities`, backward, ``step()``.
        """
        if self._collapsed:
            raise RuntimeError("this MKOptimizer's model was collapsed: build a plain optimizer to keep training it")
        if self._evaluating:
            raise RuntimeError("the optimizer is in eval mode (the model reads the mean): call opt.train() before training")
        if self.adversarial and closure is not None:
            return self._two_pass_step(closure)
        if self.adversarial and self._phase != "descent":
            raise RuntimeError(
                f"probabilities={self.probabilities!r} takes two passes per step: call opt.step(closure), or run the "
                "probe forward/backward, then opt.ascend_probabilities(), then the forward/backward to descend, then opt.step()"
            )
        return self._descend(closure)

    def _descend(self, closure: Callable[[], Any] | None = None) -> Any:
        """The update itself, then the next step's probabilities (fused: the kernels wrote the next W)."""
        self._follow_moves()
        if self._fused is not None:
            loss = self._fused.step(closure)
            self._prepare(self.mk_step + 1, weights_written=True)
            return loss
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self._prepare(self.mk_step + 1)
        return loss

    def _follow_moves(self) -> None:
        """After ``model.to(...)``, move the optimizer state to the parameters (p follows by itself)."""
        first = self.expansion.targets[0].param if self.expansion.targets else None
        if first is None or placement(first) == self._placement:
            return
        follow_parameters(self.optimizer)
        if self._fused is not None:
            for kernel in self._fused.kernels:  # the adversarial modes' scratch: rebuilt where the copies are
                kernel.norm = kernel.mixing = None
        self._placement = placement(first)

    def _two_pass_step(self, closure: Callable[[], Any]) -> Any:
        self._in_closure_step = True
        try:
            self._arm_probe()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = closure()
            self.ascend_probabilities()
            with torch.enable_grad():
                closure()
        finally:
            self._in_closure_step = False
        self._descend()
        return loss

    def ascend_probabilities(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Second call of an adversarial step: move ``p`` up the loss (B.1; B.2 also mixes in randomness).

        Reads ``dL/dp`` from the probe pass (run after :meth:`zero_grad`, at ``p = 1/e``), writes the
        adversarial ``p`` and zeroes every gradient, ready for the descent pass. With a
        ``GradScaler`` pass it here: ``dL/dp`` is unscaled with ``scaler.get_scale()`` (the scaler's
        own ``unscale_`` is kept for the descent pass). If the probe's gradients overflowed, ``p``
        stays at its unperturbed value for this step (uniform for B.1, the random draw for B.2)
        and the scaler decides about the descent as usual.

        Example (two-call form with AMP):
            >>> import torch, mkopt
            >>> model = torch.nn.Linear(4, 2)
            >>> opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, probabilities="adv-mk", lr=0.1)
            >>> scaler = torch.amp.GradScaler("cpu")
            >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
            >>> loss_of = lambda: torch.nn.functional.cross_entropy(model(x), y)
            >>> opt.zero_grad()
            >>> scaler.scale(loss_of()).backward()      # probe: p = 1/e, records dL/dp
            >>> opt.ascend_probabilities(scaler)         # p <- adversarial p; gradients zeroed
            >>> scaler.scale(loss_of()).backward()      # descend at that p
            >>> scaler.unscale_(opt); _ = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            >>> scaler.step(opt); scaler.update()
            >>> opt.mk_step
            1
        """
        if not self.adversarial:
            raise RuntimeError(f"ascend_probabilities() is for probabilities='adversarial' or 'adv-mk', not {self.probabilities!r}")
        if self._phase != "probe":
            raise RuntimeError(
                "ascend_probabilities() follows a probe pass: call opt.zero_grad() at the start of the step, run the "
                "forward/backward, then ascend_probabilities() once"
            )
        sampler = self.expansion.sampler
        grads = self._probe_grads()
        if any(g is None for g in grads):
            raise RuntimeError(
                "no gradient reached p: run the probe forward/backward in training mode between opt.zero_grad() "
                "and opt.ascend_probabilities()"
            )
        if self._fused is not None and self._fused.on_device:
            # GPU path: the finite check and the loss scale stay on the device; the entropy estimate is the one read
            self._fused.ascend(self.adversarial_eps, mk_triton.step.ascent_factor(grads, scaler))
            self.last_p_entropy = self._fused.estimated_entropy()
            self.optimizer.zero_grad(set_to_none=True)
            self._p_uniform = False
            self._phase = "descent"
            return
        inverse_scale = 1.0
        if scaler is not None and scaler.is_enabled():
            inverse_scale = 1.0 / float(scaler.get_scale())
        # one reduction: the sum is finite iff every entry is (an overflowing sum only skips the ascent,
        # the safe side; summing in float64 instead cost a cast pass over every dL/dp)
        sums: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:  # one synchronization per device
            sums.setdefault(g.device, []).append(g.sum())
        finite = all(bool(torch.isfinite(torch.stack(s).sum())) for s in sums.values())
        eps = self.adversarial_eps * inverse_scale if finite else 0.0
        if self._fused is not None:  # one native pass per kernel writes W_adv; p_adv is recomputed by the update
            self._fused.ascend(eps)
            self.last_p_entropy = self._fused.estimated_entropy()
            self.optimizer.zero_grad(set_to_none=True)
            self._p_uniform = False
            self._phase = "descent"
            return
        with torch.no_grad():
            randomize = self.mode.randomize
            sampler.draw(self.mk_step, fill=False)  # this step's keys: the kernel regenerates B.2's Dirichlet draw
            steps: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # one per device and dtype, no host copy
            for slot, grad in zip(sampler.slots, grads):
                view = slot.view
                view.requires_grad_(False)
                view.grad = None
                step = steps.get((slot.device, grad.dtype))
                if step is None:
                    step = steps[(slot.device, grad.dtype)] = torch.full((), eps, dtype=grad.dtype, device=slot.device)
                adversarial.compiled_ascend_(
                    view, grad, step, slot.step_key, slot.offset_tensor, sampler.constants(slot.device), randomize,
                    sampler.compile_kernels(slot.device), required=sampler.compile_required,
                )  # fmt: skip
            torch.autograd.graph.increment_version(sampler.views)
            numel = [slot.shape.numel() for slot in sampler.slots]
            # on the device until the one read at the end (a read per tensor would synchronize per tensor on a GPU)
            entropies = [adversarial.estimated_entropy(slot.view, as_tensor=True).double() for slot in sampler.slots]
            self.last_p_entropy = float(sum(h * n for h, n in zip(entropies, numel)) / sum(numel))
        self.optimizer.zero_grad(set_to_none=True)
        self._p_uniform = False
        self._phase = "descent"

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients; in the adversarial modes also (re)start the step's probe pass."""
        super().zero_grad(set_to_none=set_to_none)
        if self.adversarial and not self._in_closure_step and not self._collapsed:
            self._arm_probe()

    def _probe_grads(self) -> list[torch.Tensor | None]:
        """The adversarial probe's gradients: ``dL/dp`` per buffer view (generic), ``dL/dW`` per proxy (fused)."""
        if self._fused is not None:
            return [kernel.proxy.grad for kernel in self._fused.kernels]
        return [view.grad for view in self.expansion.sampler.views]

    def _prepare(self, step: int, weights_written: bool = False) -> None:
        """Probabilities for step ``step``: drawn, uniform, or armed for the adversarial probe.

        Fused path: only the stream keys are set (no ``p`` is stored) and the proxies get the
        step's weights, unless the update kernels just wrote them (``weights_written``).
        """
        sampler = self.expansion.sampler
        if self._fused is not None:
            sampler.draw(step)  # keys only
            if self.adversarial:
                self._arm_probe()
            elif not weights_written:
                self._fused.write_weights()
        elif self.mode.regenerable:
            sampler.draw(step)
        elif self.mode.uniform:
            sampler.fill_uniform(step)
        else:
            sampler.step = step
            self._arm_probe()

    def _arm_probe(self) -> None:
        if self._fused is not None:
            self._fused.arm_probe()
            self._p_uniform = True
            self._phase = "probe"
            return
        sampler = self.expansion.sampler
        if not (self._phase == "probe" and sampler.step == self.mk_step and getattr(self, "_p_uniform", False)):
            sampler.fill_uniform(self.mk_step)  # skipped when already armed and untouched: no second fill
        for view in sampler.views:
            view.grad = None
            view.requires_grad_(True)
        self._p_uniform = True
        self._phase = "probe"

    # -- evaluation at the mean ---------------------------------------------------------------
    def eval(self) -> None:
        """Make the model read the plain mean of the copies even in training mode; :meth:`train` undoes it.

        ``model.eval()`` already evaluates at the mean; this is the optimizer-side switch that
        Hugging Face's ``Trainer`` calls around evaluation (the schedule-free convention), and it
        keeps dropout and batch-norm statistics as they are. Idempotent; training state is untouched.

        Example:
            >>> import torch, mkopt
            >>> model = torch.nn.Linear(4, 2)
            >>> opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1)
            >>> from mkopt.parametrization import mean_of_copies
            >>> opt.eval(); torch.equal(model.weight, mean_of_copies(model.parametrizations.weight.original))
            True
            >>> opt.train()
        """
        self._set_read_mean(True)

    def train(self) -> None:
        """Undo :meth:`eval`: the training forward mixes the copies with this step's ``p`` again."""
        self._set_read_mean(False)

    def _set_read_mean(self, value: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, MajorityKernel):
                module.read_mean = value
        self._evaluating = value

    # -- collapse, diagnostics, state -------------------------------------------------------
    def collapse(self) -> nn.Module:
        """Fold the model in place into its plain form (mean kernels) and return it; ends MK training."""
        if not self.expansion.sampler.regenerate:  # adversarial modes: p may still require grad
            for view in self.expansion.sampler.views:
                view.requires_grad_(False)
        if self._fused is not None:
            detach_proxies(self.expansion)
        collapse(self.model)
        self._collapsed = True
        return self.model

    def diagnostics(self, collapse_threshold: float = 1e-4) -> dict[str, float]:
        """Cheap training statistics as plain floats (log them every N steps).

        ``spread/<tensor>``: mean over copies of ``||W~[k] - W_mean|| / ||W_mean||``; ``spread``: the
        same over all kernels together; ``p_entropy`` (adversarial modes): mean normalized entropy
        of the last adversarial ``p`` (1 = uniform; estimated on at most 8192 evenly strided elements
        per tensor, weighted by tensor size); ``collapsed``: 1.0 when the copies have become
        indistinguishable (spread below ``collapse_threshold`` after step 0, and exactly 0 or not
        grown since the previous call: replicated copies start at 0 and move apart slowly at a
        small lr, which is no collapse), which also warns: MK then trains like a single model with a
        reduced learning rate (Lemma 4.3).
        """
        return copy_spread(self, collapse_threshold)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state in torch's layout (``state``, ``param_groups``) plus MK's own
        state under ``"mkopt"`` (also copied into every saved param group: ``torch.distributed.checkpoint``
        keeps only ``state`` and ``param_groups``).

        Example:
            >>> import torch, mkopt
            >>> opt = mkopt.MKOptimizer(torch.optim.Adam, torch.nn.Linear(4, 2), e=3)
            >>> sorted(opt.state_dict()), opt.state_dict()["mkopt"]["step"]
            (['mkopt', 'param_groups', 'state'], 0)
        """
        saved = self.optimizer.state_dict()
        mk = {
            "version": _STATE_VERSION,
            "e": self.e,
            "seed": self.expansion.seed,
            "step": self.mk_step,
            "probabilities": self.probabilities,
            "adversarial_eps": self.adversarial_eps,
            "lr_compensation": self.lr_compensation,
            "path": self.path,  # informative: either path loads the other's state
        }
        return with_mk_state(saved, mk)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (either path's; also the older ``{"optimizer", "mkopt"}`` layout);
        the next forward uses exactly the saved run's ``p``."""
        mk, state_dict = split_mk_state(state_dict)
        if mk["e"] != self.e:
            raise ValueError(f"state_dict was saved with e={mk['e']} but this MKOptimizer has e={self.e}")
        saved_mode = mk.get("probabilities", "dirichlet")
        if saved_mode != self.probabilities:
            raise ValueError(
                f"state_dict was saved with probabilities={saved_mode!r} but this MKOptimizer uses {self.probabilities!r}"
            )
        if mk.get("version", 1) < 3 and 4 <= self.e <= 16 and self.mode.stream:
            warnings.warn(
                f"this state_dict was saved by mkopt state version {mk.get('version', 1)}, whose Dirichlet draws for "
                f"e={self.e} differ from this version's (uniform spacings since version 3): the run continues with "
                "equally distributed but different p, not bit-identically. Resume with the mkopt commit that saved it "
                "for an exact continuation.",
                RuntimeWarning,
                stacklevel=2,
            )
        self.optimizer.load_state_dict(state_dict)
        # Optimizer.load_state_dict replaces param_groups and state: share the new objects again.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.expansion.seed = mk["seed"]
        self.expansion.sampler.seed = mk["seed"]
        self.adversarial_eps = float(mk.get("adversarial_eps", self.adversarial_eps))
        self._prepare(mk["step"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_shares_groups", False):
            self.optimizer.add_param_group(param_group)  # lands in the shared list
        else:  # Optimizer.__init__ registering the wrapped optimizer's groups
            super().add_param_group(param_group)

    def __repr__(self) -> str:
        return (
            f"MKOptimizer(e={self.e}, probabilities={self.probabilities!r}, path={self.path!r}, "
            f"seed={self.expansion.seed}, step={self.mk_step}, optimizer={self.optimizer!r})"
        )


def with_mk_state(saved: dict[str, Any], mk: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (a torch optimizer ``state_dict``) with MK's own state under ``"mkopt"``, at the top and
    in every param group: ``torch.distributed.checkpoint`` keeps only ``state`` and ``param_groups``.

    Example:
        >>> with_mk_state({"state": {}, "param_groups": [{"params": [0]}]}, {"step": 4})
        {'state': {}, 'param_groups': [{'params': [0], 'mkopt': {'step': 4}}], 'mkopt': {'step': 4}}
    """
    for group in saved["param_groups"]:
        group[STATE_KEY] = dict(mk)
    saved[STATE_KEY] = mk
    return saved


def split_mk_state(state_dict: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(MK's own state, the torch optimizer's state_dict)`` from an mkopt optimizer ``state_dict``.

    Reads torch's layout with ``"mkopt"`` at the top or in the param groups (what
    ``torch.distributed.checkpoint`` hands back), and the older ``{"optimizer", "mkopt"}`` layout.

    Example:
        >>> mk, torch_state = split_mk_state({"state": {}, "param_groups": [{"params": [], "mkopt": {"step": 4}}]})
        >>> mk["step"], torch_state["param_groups"]
        (4, [{'params': []}])
    """
    if isinstance(state_dict, dict) and "optimizer" in state_dict and STATE_KEY in state_dict:  # before torch's layout
        return state_dict[STATE_KEY], state_dict["optimizer"]
    if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
        raise ValueError(
            "not an mkopt optimizer state_dict (expected torch's 'state' and 'param_groups' with an 'mkopt' entry); to "
            "start from a plain optimizer's state, train a few steps instead: its moments refer to the unexpanded tensors"
        )
    mk = state_dict.get(STATE_KEY) or next((g[STATE_KEY] for g in state_dict["param_groups"] if STATE_KEY in g), None)
    if mk is None:
        raise ValueError(
            "not an MKOptimizer state_dict (it has no 'mkopt' entry): a plain torch optimizer saved it, whose moments "
            "refer to the unexpanded tensors, not e copies; start MK from the model's weights instead"
        )
    groups = [{k: v for k, v in group.items() if k != STATE_KEY} for group in state_dict["param_groups"]]
    return mk, {**{k: v for k, v in state_dict.items() if k != STATE_KEY}, "param_groups": groups}


def _existing_expansion(model: nn.Module, e: Any, seed: Any, targets: TargetSpec) -> Expansion | None:
    """The expansion of a model that ``mkopt.expand`` already expanded (checked against the arguments), else ``None``."""
    if not is_expanded(model):
        return None
    existing = expansion_of(model)
    driver = getattr(existing.sampler, "driver", None)
    if driver is not None and driver() is not None and driver().expansion is existing:
        raise ValueError(
            f"{type(model).__name__} is already trained by an MKOptimizer: build one MKOptimizer per model, or "
            "deploy/collapse it (mkopt.deploy(model) / opt.collapse()) before starting again"
        )
    if e is not None and e != existing.e:
        raise ValueError(f"the model was expanded with e={existing.e} but MKOptimizer got e={e!r}: drop e= or pass e={existing.e}")
    if seed is not None and seed != existing.seed:
        raise ValueError(f"the model was expanded with seed={existing.seed} but MKOptimizer got seed={seed!r}: drop seed=")
    if targets is not None:
        raise ValueError("the model is already expanded, so its targets are chosen: drop targets= (or pass it to expand())")
    return existing


def _adopt(expansion: Expansion, fused: bool, regenerable: bool) -> Expansion:
    """Train an expansion made by :func:`mkopt.expand`: fit its sampler to the path and the probability mode."""
    sampler = expansion.sampler
    if fused:
        sampler.regenerate = True  # the native kernels regenerate p: the buffers are not read again
        sampler.buffers.clear()
    elif sampler.regenerate and not regenerable:
        raise ValueError(
            "this probability mode keeps p in a buffer on the generic path, but the model was expanded without one: "
            "expand it with mkopt.expand(model, e, keep_p_buffer=True), or let MKOptimizer expand it"
        )
    return expansion


def _choose_path(path: str, optimizer_cls: type, model: nn.Module, targets: TargetSpec, e: Any, optimizer_kwargs: dict[str, Any]) -> str:
    """``"fused"`` or ``"generic"`` for the requested ``path`` (``"fused"`` that cannot run raises why)."""
    if path == "generic":
        return path
    if isinstance(e, bool) or not isinstance(e, int):
        return "generic"  # expand() rejects it with its own message
    if is_expanded(model):
        params = [t.param[0] for t in expansion_of(model).targets]  # one copy: the kernel's device and dtype
    else:
        params = [t.param for t in select_targets(model, targets)]
    return resolve_path(path, optimizer_cls, params, e, optimizer_kwargs)


def resolve_path(path: str, optimizer_cls: type, kernels: list[torch.Tensor], e: int, optimizer_kwargs: dict[str, Any]) -> str:
    """``"fused"`` where the fused kernels can step ``kernels`` (for ``"auto"`` and ``"fused"``), else ``"generic"``;
    ``"fused"`` that cannot run raises why. Shared by both optimizer forms.

    Example:
        >>> resolve_path("auto", torch.optim.RMSprop, [torch.zeros(2, 2)], 3, {})
        'generic'
    """
    if path == "generic":
        return path
    blocker = fused_path_blocker(optimizer_cls, kernels, e, optimizer_kwargs)
    if blocker is None:
        return "fused"
    if path == "fused":
        raise ValueError(f"path='fused' cannot run here: {blocker}. Use path='generic' (or 'auto', which picks it)")
    if not native.available():
        _warn_once_without_native(blocker)
    return "generic"


_warned_without_native = False


def _warn_once_without_native(reason: str) -> None:
    global _warned_without_native
    if not _warned_without_native:
        _warned_without_native = True
        warnings.warn(
            f"mkopt takes the generic path: {reason}. It trains the same way, with e-times larger gradients and a "
            "slower step; install a C++ compiler (g++) for the fused path.",
            RuntimeWarning,
            stacklevel=4,
        )


def _with_proxies(groups: Iterable[Any], proxy_of: dict[int, torch.Tensor], proxies: set[int]) -> list[Any]:
    """The user's params or param groups with every kernel's copies replaced by its proxy (each once)."""
    groups = list(groups)
    seen: set[int] = set()

    def substitute(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for param in params:
            param = proxy_of.get(id(param), param)
            if id(param) in proxies:
                if id(param) in seen:
                    continue  # model.parameters() lists the copies and the proxy: keep one
                seen.add(id(param))
            out.append(param)
        return out

    if groups and isinstance(groups[0], dict):
        return [{**group, "params": substitute(group["params"] if not isinstance(group["params"], torch.Tensor) else [group["params"]])} for group in groups]  # fmt: skip
    return substitute(groups)


def _rewrite_weights(optimizer_ref: "weakref.ref[MKOptimizer]") -> None:
    optimizer = optimizer_ref()
    if optimizer is not None and optimizer._fused is not None and not optimizer._collapsed:
        optimizer._fused.write_weights()


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


def _check_eps(eps: Any) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"adversarial_eps={eps!r} must be a finite number >= 0 (0 disables the ascent on p)")
