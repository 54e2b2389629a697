"""Which tensors of a model become majority kernels.

A *target spec* is ``None`` (the paper's kernels: every floating parameter with ``ndim >= 2``),
a module type, a name pattern (``fnmatch`` on the parameter's qualified name, e.g.
``"encoder.*.weight"``), a predicate ``(name, tensor, module) -> bool``, or a list mixing these
(a tensor is targeted if any entry matches).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

Predicate = Callable[[str, torch.Tensor, nn.Module], bool]
TargetSpec = Union[None, type, str, Predicate, Sequence[Union[type, str, Predicate]]]


@dataclass
class Owner:
    """One (module, attribute) through which a tensor is reachable; tied tensors have several."""

    path: str  # qualified module name, "" for the root
    module: nn.Module
    attr: str

    @property
    def qualified_name(self) -> str:
        return f"{self.path}.{self.attr}" if self.path else self.attr


@dataclass
class TargetTensor:
    """A tensor to expand, with every place it is registered (so ties survive)."""

    param: nn.Parameter
    owners: list[Owner] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.owners[0].qualified_name


def is_default_kernel(name: str, tensor: torch.Tensor, module: nn.Module) -> bool:
    """The paper's kernels: floating parameters with at least 2 dims (biases and norm scales stay plain).

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> is_default_kernel("weight", lin.weight, lin), is_default_kernel("bias", lin.bias, lin)
        (True, False)
    """
    return tensor.is_floating_point() and tensor.dim() >= 2


def _compile(spec: TargetSpec) -> Predicate:
    if spec is None:
        return is_default_kernel
    if isinstance(spec, (type, str)) or callable(spec):
        entries: Iterable = [spec]
    elif isinstance(spec, Sequence):
        entries = spec
    else:
        raise TypeError(
            f"targets={spec!r} is not a target spec: pass None (the default kernels), a module type, a name pattern, "
            "a predicate (name, tensor, module) -> bool, or a list of these, e.g. targets=[nn.Linear, 'encoder.*.weight']"
        )
    matchers: list[Predicate] = []
    for entry in entries:
        if isinstance(entry, type) and issubclass(entry, nn.Module):
            matchers.append(lambda n, t, m, cls=entry: isinstance(m, cls) and t.dim() >= 2)
        elif isinstance(entry, str):
            matchers.append(lambda n, t, m, pattern=entry: fnmatch.fnmatchcase(n, pattern))
        elif callable(entry):
            matchers.append(entry)
        else:
            raise TypeError(
                f"targets entry {entry!r} is not a module type, a name pattern or a predicate; "
                "use e.g. targets=[nn.Linear, 'encoder.*.weight', lambda name, tensor, module: ...]"
            )
    return lambda n, t, m: any(match(n, t, m) for match in matchers)


def collect_parameter_owners(model: nn.Module) -> dict[int, TargetTensor]:
    """Every parameter of ``model`` keyed by identity, with all owners in registration order."""
    found: dict[int, TargetTensor] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is None:
                continue
            entry = found.setdefault(id(param), TargetTensor(param))
            if not any(o.module is module and o.attr == attr for o in entry.owners):
                entry.owners.append(Owner(path, module, attr))
    return found


def select_targets(model: nn.Module, spec: TargetSpec = None) -> list[TargetTensor]:
    """The tensors of ``model`` that ``spec`` selects, validated; raises if none or any is unsupported.

    Frozen tensors (``requires_grad=False``) are never trained, so expanding them would only cost
    ``e`` times their memory: the default spec skips them with a warning; an explicit spec that
    selects one is an error naming it.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> [t.name for t in select_targets(net)]
        ['0.weight', '2.weight']
    """
    predicate = _compile(spec)
    chosen = [
        target
        for target in collect_parameter_owners(model).values()
        if any(predicate(o.qualified_name, target.param, o.module) for o in target.owners)
    ]
    for target in chosen:
        _validate(target)  # first: an integer tensor is refused for its dtype, not as "frozen"
    # mkopt's own copies (an already expanded model; the fused path freezes them) are not the user's
    # frozen tensors: expand() refuses that model with its own message
    frozen = [t.name for t in chosen if not t.param.requires_grad and not _is_majority_kernel_stack(t)]
    if frozen and spec is not None:
        raise ValueError(
            f"targets={spec!r} selects frozen tensors {frozen} (requires_grad=False): they would be expanded to e "
            "copies and never trained. Unfreeze them (param.requires_grad_(True)) or exclude them from targets="
        )
    if frozen:
        warnings.warn(
            f"skipping frozen tensors {frozen} (requires_grad=False): expanding them would cost e times their memory "
            "and they are never trained; unfreeze them before building MKOptimizer to train them as majority kernels",
            UserWarning,
            stacklevel=3,
        )
        chosen = [t for t in chosen if t.param.requires_grad]
    if not chosen:
        raise ValueError(
            f"targets={spec!r} matched no tensor of {type(model).__name__}: nothing to expand. "
            "Check the names with [n for n, _ in model.named_parameters()] or pass targets=None "
            "for every floating parameter with ndim >= 2"
        )
    return chosen


def _is_majority_kernel_stack(target: TargetTensor) -> bool:
    from torch.nn.utils.parametrize import ParametrizationList

    from .parametrization import MajorityKernel

    return any(
        isinstance(o.module, ParametrizationList) and any(isinstance(p, MajorityKernel) for p in o.module)
        for o in target.owners
    )


def _validate(target: TargetTensor) -> None:
    param, name = target.param, target.name
    if not param.is_floating_point():
        raise TypeError(f"target {name!r} has dtype {param.dtype}; MK needs floating tensors: exclude it via targets=")
    if param.is_sparse or param.layout != torch.strided:
        raise TypeError(f"target {name!r} is a {param.layout} tensor; MK needs dense tensors: exclude it via targets=")
    for owner in target.owners:
        if isinstance(owner.module, nn.RNNBase):
            raise NotImplementedError(
                f"target {name!r} belongs to {type(owner.module).__name__}, whose flattened cuDNN weights "
                "are cached at construction and would ignore the mixture; exclude it, e.g. "
                f"targets=lambda name, t, m: t.dim() >= 2 and not isinstance(m, nn.RNNBase)"
            )
