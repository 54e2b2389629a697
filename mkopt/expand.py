"""Expanding a model in place: every target tensor ``W`` becomes a ``[e, *W.shape]`` stack of copies.

The Parameter objects keep their identity (``torch.nn.utils.parametrize`` resizes them with
``set_``), so parameter groups built from ``model.parameters()`` stay valid. Tied tensors are
expanded once and every owner reads the same stack.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tensordict import TensorDict
from torch import nn
from torch.nn.utils import parametrize

from .parametrization import MajorityKernel
from .compiled import compile_by_default
from . import triton as mk_triton
from .fused import fused_kernels_compile, on_triton
from .sampling import DirichletSampler, step_seed
from .streams import stream_id
from .targets import TargetSpec, TargetTensor, select_targets

Init = Literal["replicate", "independent"]
INITS: tuple[str, ...] = ("replicate", "independent")
METADATA_KEY = "mkopt"
_EXPANSION_ATTR = "_mkopt_expansion"


@dataclass
class Expansion:
    """What :func:`expand` did to a model; kept on the model, read by the optimizer and by deploy.

    Example:
        >>> exp = expand(nn.Linear(3, 2), e=4)
        >>> exp.e, [t.name for t in exp.targets], tuple(exp.store.batch_size)
        (4, ['weight'], (4,))
    """

    e: int
    seed: int
    targets: list[TargetTensor]
    sampler: DirichletSampler
    store: TensorDict
    original_keys: list[str]  # the plain model's state_dict keys, in order
    parameter_orders: dict[str, list[str]] = field(default_factory=dict)  # module path -> _parameters order
    requires_grad: list[bool] = field(default_factory=list)  # each target's flag before expansion (the fused path clears it)


def expansion_of(model: nn.Module) -> Expansion:
    """The :class:`Expansion` of an expanded model; a clear error otherwise.

    Example:
        >>> net = nn.Linear(3, 2); _ = expand(net, e=2)
        >>> expansion_of(net).e
        2
    """
    found = getattr(model, _EXPANSION_ATTR, None)
    if found is None:
        raise ValueError(
            f"{type(model).__name__} is not expanded by mkopt: build mkopt.MKOptimizer(optimizer_cls, model, e=...) "
            "first (or, for a saved expanded state_dict, use mkopt.collapse_state_dict)"
        )
    return found


def is_expanded(model: nn.Module) -> bool:
    """Whether ``model`` currently carries majority kernels.

    Example:
        >>> is_expanded(nn.Linear(2, 2))
        False
    """
    return getattr(model, _EXPANSION_ATTR, None) is not None or any(
        isinstance(p, MajorityKernel)
        for m in model.modules()
        if parametrize.is_parametrized(m)
        for plist in m.parametrizations.values()
        for p in plist
    )


def _check_e(e: Any) -> int:
    """``e`` as a Python int: any integer type (``numpy.int64`` from a config or a grid) via ``operator.index``."""
    try:
        value = None if isinstance(e, bool) else operator.index(e)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"e={e!r} is not an expansion factor: pass an int >= 1 (the paper uses e=3; e=1 is plain training)")
    return value


def _replicate(e: int):
    return lambda w: w.detach().unsqueeze(0).repeat(e, *([1] * w.dim())).contiguous()


def _independent(e: int, seed: int, index: int, target: TargetTensor):
    """Copies drawn with the owning layer's own initializer, each from its own seeded RNG stream."""
    owner = target.owners[0]
    reset = getattr(owner.module, "reset_parameters", None) or getattr(owner.module, "_reset_parameters", None)
    if reset is None:
        raise ValueError(
            f"init='independent' needs {type(owner.module).__name__}.reset_parameters() to draw copies of "
            f"{target.name!r}; it has none: use init='replicate' or exclude the tensor via targets="
        )
    device = target.param.device

    def copies(w: torch.Tensor) -> torch.Tensor:
        out = []
        for k in range(e):
            scratch = copy.deepcopy(owner.module)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(step_seed(seed, k, stream=stream_id("independent_init", index)))
                getattr(scratch, reset.__name__)()
            out.append(getattr(scratch, owner.attr).detach().to(w.dtype))
        return torch.stack(out)

    return copies


class ReplicatePlainWeights:
    """Load-state-dict pre-hook: a plain ``W`` in a checkpoint is replicated into the ``[e, ...]`` stack.

    Lets a pretrained (unexpanded) checkpoint load into an expanded model, like torch's weight_norm
    compatibility hook; rejects a stack saved with another ``e``.
    """

    def __init__(self, attrs: list[str], e: int) -> None:
        self.attrs = attrs
        self.e = e

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        for attr in self.attrs:
            plain_key, stacked_key = prefix + attr, f"{prefix}parametrizations.{attr}.original"
            if stacked_key in state_dict:
                saved = state_dict[stacked_key]
                current = module.parametrizations[attr].original
                if saved.dim() == current.dim() and saved.shape[0] != self.e:
                    raise ValueError(
                        f"{stacked_key!r} was saved with e={saved.shape[0]} but this model is expanded with "
                        f"e={self.e}: build MKOptimizer with e={saved.shape[0]}, or collapse the checkpoint with "
                        "mkopt.collapse_state_dict and load the plain weights (they are replicated)"
                    )
            elif plain_key in state_dict:
                plain = state_dict.pop(plain_key)
                state_dict[stacked_key] = plain.unsqueeze(0).expand(self.e, *plain.shape)


class RecordPlainKeys:
    """State-dict post-hook: stores ``e`` and the plain key order in the state_dict's metadata."""

    def __init__(self, e: int, original_keys: list[str]) -> None:
        self.e = e
        self.original_keys = original_keys

    def __call__(self, module, state_dict, prefix, local_metadata) -> None:
        local_metadata[METADATA_KEY] = {"e": self.e, "keys": list(self.original_keys)}


def expand(
    model: nn.Module,
    e: int = 3,
    *,
    targets: TargetSpec = None,
    init: Init = "replicate",
    seed: int = 0,
    sampler_compile: bool | None = None,
    keep_p_buffer: bool = False,
    regenerate_p: bool | None = None,
) -> Expansion:
    """Turn every target tensor of ``model`` into ``e`` majority-kernel copies, in place.

    ``init="replicate"`` (default) makes every copy equal to the current weight, so the model
    computes exactly what it did before (the paper's recipe for pretrained models, and a clean
    start from scratch: copies diverge from the first step because each gets ``p_k * grad``).
    ``init="independent"`` draws each copy with the layer's own ``reset_parameters``.
    ``sampler_compile``: see :func:`mkopt.sampling.counter_dirichlet_` (``None``: compile on CPU).
    Where the kernels are compiled (CPU by default) or Triton kernels (CUDA), ``p`` is regenerated inside them and never stored
    (:mod:`mkopt.fused`); ``keep_p_buffer=True`` stores it in flat buffers instead, as the
    adversarial modes need (their ``p`` comes from gradients). ``regenerate_p=True`` skips that
    choice (the fused path's native kernels regenerate ``p`` themselves).

    Most users call :class:`mkopt.MKOptimizer`, which expands and builds the optimizer.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> exp = expand(net, e=3)
        >>> tuple(exp.store[0]["0", "weight"].shape), tuple(net[0].weight.shape)
        ((3, 4), (3, 4))
    """
    e = _check_e(e)
    if init not in INITS:
        raise ValueError(f"init={init!r} is unknown: use one of {INITS}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} must be an int")
    if is_expanded(model):
        raise ValueError(
            f"{type(model).__name__} is already expanded: build one MKOptimizer per model, or deploy/collapse it "
            "(mkopt.deploy(model) / opt.collapse()) before expanding again"
        )
    chosen = select_targets(model, targets)
    for target in chosen:
        if target.param.grad is not None:
            raise ValueError(
                f"{target.name!r} holds a .grad from before expansion (shape {tuple(target.param.grad.shape)}); "
                "call model.zero_grad(set_to_none=True) before building MKOptimizer"
            )
    original_keys = list(model.state_dict().keys())
    if regenerate_p is not None:
        regenerate = regenerate_p
    else:
        on_gpu = bool(chosen) and all(on_triton(t.param) for t in chosen) and e <= mk_triton.MAX_E
        regenerate = not keep_p_buffer and (on_gpu or all(compile_by_default(t.param.device, sampler_compile) for t in chosen))
        if regenerate and not on_gpu:  # eager regeneration would hash twice per step: without a compiler, buffer p instead
            regenerate = fused_kernels_compile(e, chosen[0].param, required=sampler_compile is True)
    sampler = DirichletSampler(e, seed, compiled=sampler_compile, regenerate=regenerate)
    parameter_orders: dict[str, list[str]] = {}
    views = [sampler.allocate(t.param.device, t.param.dtype, t.param.shape) for t in chosen]
    sampler.draw(0)  # registration runs the parametrization once: p must exist
    sampler.driven = True  # ... and that forward is not training: no "never redrawn" warning for it
    for index, (target, p) in enumerate(zip(chosen, views)):
        copies = _replicate(e) if init == "replicate" else _independent(e, seed, index, target)
        for number, owner in enumerate(target.owners):
            parameter_orders.setdefault(owner.path, list(owner.module._parameters.keys()))
            tied = number > 0  # later owners receive the stack the first one built
            parametrize.register_parametrization(
                owner.module, owner.attr, MajorityKernel(e, p, copies=None if tied else copies, tied=tied), unsafe=tied
            )
    for path in parameter_orders:
        module = model.get_submodule(path)
        attrs = sorted({o.attr for t in chosen for o in t.owners if o.module is module})
        module.register_load_state_dict_pre_hook(ReplicatePlainWeights(attrs, e))
    model.register_state_dict_post_hook(RecordPlainKeys(e, original_keys))
    store = TensorDict({}, batch_size=[e])
    for target in chosen:
        store[tuple(target.name.split("."))] = target.param
    requires_grad = [t.param.requires_grad for t in chosen]
    sampler.driven = False  # until an MKOptimizer adopts the expansion
    expansion = Expansion(e, seed, chosen, sampler, store, original_keys, parameter_orders, requires_grad)
    object.__setattr__(model, _EXPANSION_ATTR, expansion)
    return expansion
