"""From majority kernels back to an ordinary model: always the plain mean of the copies.

The mean is taken whatever mode the model is in (a random mixture is never baked into a shipped
model), accumulated in float32 for fp16/bf16, with the same arithmetic as the eval-mode
parametrization, so an eval-mode MK model and its deployed copy compute bit-identical outputs.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .expand import _EXPANSION_ATTR, METADATA_KEY, RecordPlainKeys, ReplicatePlainWeights, expansion_of
from .parametrization import mean_of_copies

_STACKED_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)parametrizations\.(?P<attr>[^.]+)\.original$")


def collapse(model: nn.Module, *, allow_nonfinite: bool = False) -> nn.Module:
    """Fold an expanded model in place into its plain form and return it.

    Copies holding NaN or inf (a diverged run) are refused with the tensor's name, before anything
    changes; ``allow_nonfinite=True`` collapses them anyway.

    Afterwards the model has its original module classes, parameter objects (now holding the
    mean kernels), ties, and state_dict keys in the original order. An optimizer built over the
    expanded model cannot step it any more.

    Example:
        >>> import mkopt
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> _ = mkopt.expand(net, e=3)
        >>> type(collapse(net)[0]).__name__, tuple(net[0].weight.shape)
        ('Linear', (3, 4))
    """
    expansion = expansion_of(model)
    if not allow_nonfinite:
        _refuse_nonfinite((t.name, t.param) for t in expansion.targets)
    with torch.no_grad():
        for index, target in enumerate(expansion.targets):
            param = target.param
            param.set_(mean_of_copies(param.detach()).contiguous())
            param.grad = None  # a [e, ...] gradient would not fit the plain tensor
            if index < len(expansion.requires_grad):  # the fused path froze the copies: trainable again
                param.requires_grad_(expansion.requires_grad[index])
    for target in expansion.targets:
        for owner in target.owners:
            _own_parametrized_class(owner.module)
            parametrize.remove_parametrizations(owner.module, owner.attr, leave_parametrized=False)
    for path, order in expansion.parameter_orders.items():
        module = model.get_submodule(path)
        _reorder_parameters(module, order)
        _drop_hooks(module._load_state_dict_pre_hooks, ReplicatePlainWeights)
    _drop_hooks(model._state_dict_hooks, RecordPlainKeys)
    object.__delattr__(model, _EXPANSION_ATTR)
    return model


def deploy(model: nn.Module, *, allow_nonfinite: bool = False) -> nn.Module:
    """A new plain model whose kernels are the mean of ``model``'s copies; ``model`` is left as is.

    The copy keeps ``model``'s train/eval flags; call ``.eval()`` for inference as usual. Copies
    holding NaN or inf are refused with the tensor's name (``allow_nonfinite=True`` ships them).

    Example:
        >>> import mkopt, torch
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> opt = mkopt.MKOptimizer(torch.optim.SGD, net, e=3, lr=0.1)
        >>> plain = deploy(net.eval())
        >>> list(plain.state_dict()) == ['0.weight', '0.bias', '2.weight', '2.bias']
        True
        >>> x = torch.randn(5, 4); torch.equal(net(x), plain(x))
        True
    """
    expansion = expansion_of(model)  # clear errors before copying anything
    if not allow_nonfinite:
        _refuse_nonfinite((t.name, t.param) for t in expansion.targets)
    return collapse(copy.deepcopy(model), allow_nonfinite=True)


def collapse_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, allow_nonfinite: bool = False
) -> "OrderedDict[str, torch.Tensor]":
    """Collapse a saved expanded ``state_dict`` offline (no model needed) into a plain one.

    Every ``<prefix>parametrizations.<name>.original`` stack becomes ``<prefix><name>`` = mean of
    copies; tied entries stay one tensor. Keys follow the plain model's order when the checkpoint
    carries mkopt's metadata (any state_dict of an expanded model does).

    Example:
        >>> import mkopt
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> _ = mkopt.expand(net, e=2)
        >>> list(collapse_state_dict(net.state_dict()))
        ['0.weight', '0.bias']
    """
    collapsed: OrderedDict[str, torch.Tensor] = OrderedDict()
    means: dict[tuple, torch.Tensor] = {}
    found = False
    for key, value in state_dict.items():
        match = _STACKED_KEY.match(key)
        if match is None:
            collapsed[key] = value
            continue
        found = True
        if not allow_nonfinite:
            _refuse_nonfinite([(key, value)])
        identity = _storage_identity(value)  # state_dict() detaches: ties share storage, not objects
        if identity not in means:
            means[identity] = mean_of_copies(value.detach())
        collapsed[match["prefix"] + match["attr"]] = means[identity]
    if not found:
        raise ValueError("state_dict has no '...parametrizations.<name>.original' entries: it is not an expanded mkopt checkpoint")
    metadata = getattr(state_dict, "_metadata", {}) or {}
    record = metadata.get("", {}).get(METADATA_KEY)
    if record is not None and set(record["keys"]) == set(collapsed):
        collapsed = OrderedDict((k, collapsed[k]) for k in record["keys"])
    return collapsed


def _refuse_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise naming the first stack of copies that holds NaN or inf (a diverged run must not ship silently)."""
    for name, stack in named:
        finite = torch.isfinite(stack.detach())
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise ValueError(
                f"{name!r} has {bad} non-finite value(s) (NaN/inf) among its copies: the training diverged, and its "
                "mean would ship them. Resume from an earlier checkpoint or lower the lr; pass allow_nonfinite=True "
                "to deploy it anyway"
            )


def _reorder_parameters(module: nn.Module, order: list[str]) -> None:
    """Restore ``_parameters``' insertion order (parametrize re-registers ``W`` last)."""
    params = module._parameters
    for name in [n for n in order if n in params] + [n for n in params if n not in order]:
        params[name] = params.pop(name)


def _drop_hooks(hooks: dict, kind: type) -> None:
    for key in [k for k, h in hooks.items() if isinstance(getattr(h, "hook", h), kind)]:
        del hooks[key]


def _own_parametrized_class(module: nn.Module) -> None:
    """Give ``module`` a private copy of its generated ``Parametrized*`` class.

    ``copy.deepcopy`` shares that class between a module and its copies, and
    ``remove_parametrizations`` deletes the property from the class: without this, deploying a
    copy would strip the weights from the original model too.
    """
    cls = module.__class__
    if getattr(cls, "_mkopt_private", False):
        return
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    namespace["_mkopt_private"] = True
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _storage_identity(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
