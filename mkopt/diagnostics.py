"""Cheap statistics of MK training: how far apart the copies are (and whether they collapsed), what the
adversarial ascent does to ``p`` (appendix B), and Lemma 4.2's stochastic sharpness."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # annotations only: the optimizer imports this module
    from .optimizer import MKOptimizer


class Diagnosable(Protocol):
    """What the statistics read from an optimizer (:class:`mkopt.MKOptimizer` or an ``mkopt.optim`` one);
    typed by shape, so this module does not import the optimizers that import it."""

    last_p_entropy: float | None

    @property
    def mk_step(self) -> int: ...

    def named_copies(self) -> list[tuple[str, torch.Tensor]]: ...


class KernelCollapseWarning(UserWarning):
    """The copies of the majority kernels have become indistinguishable."""


@torch.no_grad()
def copy_spread(opt: Diagnosable, collapse_threshold: float = 1e-4) -> dict[str, float]:
    """See :meth:`MKOptimizer.diagnostics`.

    Example:
        >>> import torch, mkopt
        >>> opt = mkopt.MKOptimizer(torch.optim.SGD, torch.nn.Linear(3, 3), e=2, lr=0.1, init="independent")
        >>> stats = opt.diagnostics(); stats["spread"] > 0, stats["collapsed"], stats["nonfinite"]
        (True, 0.0, 0.0)
    """
    stats: dict[str, float] = {}
    deviation_total = norm_total = 0.0
    nonfinite: list[str] = []
    identical = True  # every kernel's copies equal bit for bit (their mean may still differ by rounding)
    for name, copies in opt.named_copies():
        stacked = copies.detach().float()
        if not bool(torch.isfinite(stacked).all()):
            nonfinite.append(name)
        identical = identical and bool((stacked == stacked[:1]).all())
        mean = stacked.mean(0)
        deviation = torch.linalg.vector_norm((stacked - mean).flatten(1), dim=1).mean()
        norm = torch.linalg.vector_norm(mean)
        stats[f"spread/{name}"] = float(deviation / norm.clamp_min(1e-30))
        deviation_total += float(deviation) ** 2
        norm_total += float(norm) ** 2
    stats["spread"] = (deviation_total / max(norm_total, 1e-60)) ** 0.5
    stats["nonfinite"] = float(len(nonfinite))  # kernels whose copies hold NaN/inf: spread is then meaningless
    if nonfinite:
        warnings.warn(
            f"MK copies of {nonfinite} hold NaN/inf at step {opt.mk_step}: the training diverged (lower the lr, or "
            "resume from an earlier checkpoint); spread and collapse cannot be measured",
            RuntimeWarning,
            stacklevel=3,
        )
    if opt.last_p_entropy is not None:
        stats["p_entropy"] = opt.last_p_entropy
    separating = _separating(opt, stats["spread"], identical)  # called on every measurement: it records the spread
    collapsed = opt.mk_step > 0 and stats["spread"] < collapse_threshold and not separating
    stats["collapsed"] = float(collapsed)
    if collapsed:
        warnings.warn(
            f"MK copies have collapsed (relative spread {stats['spread']:.2e} < {collapse_threshold:g} at step "
            f"{opt.mk_step}): training now behaves like a single model at lr/e (Lemma 4.3). Dirichlet or adv-mk "
            "probabilities keep the copies apart; uniform or pure adversarial p let them merge.",
            KernelCollapseWarning,
            stacklevel=3,
        )
    return stats


_LAST_SPREAD: "weakref.WeakKeyDictionary[Any, float]" = weakref.WeakKeyDictionary()


def _separating(opt: Diagnosable, spread: float, identical: bool) -> bool:
    """Whether copies below the collapse threshold are still moving apart, not merging: a replicated
    start has spread 0 and grows by about lr * |g| * std(p) per step, which stays under 1e-4 for many
    steps at a small lr. Identical copies never count (uniform p from replicated copies keeps them
    so for good); otherwise the spread must have grown since this optimizer's previous measurement, and a
    first measurement gets the benefit of the doubt (the next one decides)."""
    previous = _LAST_SPREAD.get(opt)
    _LAST_SPREAD[opt] = spread
    if identical:
        return False
    return previous is None or spread > previous


def loggable(opt: Diagnosable, prefix: str = "mk/", per_tensor: bool = False) -> dict[str, float]:
    """``opt.diagnostics()`` as the flat ``{name: float}`` a logger takes, names under ``prefix``; per-tensor
    spreads only with ``per_tensor=True`` (one per kernel is a lot of curves). What every integration logs:
    the Hugging Face and Lightning callbacks and the recipes' TensorBoard rows.

    Example:
        >>> import torch, mkopt
        >>> opt = mkopt.optim.SGD(torch.nn.Linear(3, 3).parameters(), lr=0.1, e=2)
        >>> sorted(loggable(opt))
        ['mk/collapsed', 'mk/nonfinite', 'mk/spread']
    """
    return {prefix + key: value for key, value in opt.diagnostics().items() if per_tensor or "/" not in key}


@torch.no_grad()
def adversarial_statistics(opt: MKOptimizer) -> dict[str, float]:
    """What B.1's ascent does to ``p`` this step, read from the probe pass (call it between the probe's
    ``backward()`` and :meth:`~mkopt.MKOptimizer.ascend_probabilities`).

    Over every element of every expanded kernel: ``u_mean``, the mean of B.2's mixing weight
    ``u = KL(p_adv || uniform) / log e`` (0: the ascent left ``p`` uniform, B.2 is plain MK; 1: one-hot);
    ``p_adv_deviation``, the mean of ``|p_adv - 1/e|``; ``p_adv_entropy``, the mean normalized entropy
    of ``p_adv`` (``1 - u_mean``); ``saturated``, the fraction of elements with ``u > 0.99``.
    ``p_adv = Normalize(1/e + eps * dL/dp)`` (:func:`mkopt.adversarial.adversarial_probabilities`)
    with ``dL/dp[k] = W~[k] * dL/dW``: the fused path's probe yields ``dL/dW`` at the mean, the
    generic path's yields ``dL/dp`` itself. B.2 then uses ``u * p_adv + (1 - u) * p_dirichlet``.

    Example:
        >>> import torch, mkopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = mkopt.MKOptimizer(torch.optim.Adam, model, e=3, probabilities="adv-mk", adversarial_eps=0.0, lr=0.1)
        >>> opt.zero_grad(); model(torch.randn(8, 4)).square().mean().backward()
        >>> adversarial_statistics(opt)["u_mean"]  # eps = 0: p_adv is uniform
        0.0
    """
    from .adversarial import adversarial_probabilities, divergence_from_uniform

    if not opt.adversarial:
        raise RuntimeError(f"adversarial_statistics() is for probabilities='adversarial' or 'adv-mk', not {opt.probabilities!r}")
    grads = opt._probe_grads()
    if any(g is None for g in grads):
        raise RuntimeError("no probe gradient: call adversarial_statistics() after the probe's backward(), before ascend_probabilities()")
    fused = opt.path == "fused"
    u_total = deviation_total = saturated = count = 0.0
    for target, grad in zip(opt.expansion.targets, grads):
        copies = target.param.detach().float()
        grad_p = copies * grad.float() if fused else grad.float().reshape(copies.shape)
        p_adv = adversarial_probabilities(grad_p.flatten(1), opt.adversarial_eps)
        u = divergence_from_uniform(p_adv)
        u_total += float(u.sum())
        saturated += float((u > 0.99).sum())
        deviation_total += float((p_adv - 1 / opt.e).abs().mean(0).sum())
        count += u.numel()
    return {
        "u_mean": u_total / count,
        "p_adv_entropy": 1 - u_total / count,
        "p_adv_deviation": deviation_total / count,
        "saturated": saturated / count,
    }


@torch.no_grad()
def stochastic_sharpness(
    opt: MKOptimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    draws: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """Lemma 4.2's stochastic sharpness ``Delta = E_p[L(theta_p)] - L(theta_mean)`` on one fixed batch.

    ``theta_p = sum_k p_k W~[k]`` per element with ``p ~ Dirichlet(1, ..., 1)``, the distribution MK
    trains with, estimated with ``draws`` draws from a generator seeded with ``seed`` (its own: the
    optimizer's probability stream is not touched, so training continues bit-identically);
    ``theta_mean`` is the deployed mean. Both are evaluated on a deployed (plain, eval-mode) copy
    with :func:`torch.func.functional_call`, so this works on both optimizer paths and leaves the
    model as it was. Returns ``sharpness`` (Delta, signed: the paper's bound uses its absolute
    value), ``loss_mean_weights`` and ``loss_sampled`` (the mean over draws). Pass the same batch
    and seed every time to follow Delta over training: the paper attributes MK's generalization
    to this term shrinking.

    Example:
        >>> import torch, mkopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1)  # replicated copies: theta_p = mean
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> abs(stochastic_sharpness(opt, x, y)["sharpness"]) < 1e-6  # sum_k p_k = 1 up to rounding
        True
    """
    from torch.func import functional_call

    from .deploy import deploy

    if draws < 1:
        raise ValueError(f"draws={draws} must be >= 1 (the number of Dirichlet draws averaged)")
    plain = deploy(opt.model).eval()
    mean_loss = float(loss_fn(plain(inputs), targets))
    generator = torch.Generator().manual_seed(seed)
    copies = [(target.name, target.param.detach()) for target in opt.expansion.targets]
    total = 0.0
    for _ in range(draws):
        weights = {}
        for name, stacked in copies:
            p = torch.empty(stacked.shape, dtype=torch.float32).exponential_(generator=generator)
            p = p / p.sum(0, keepdim=True)  # normalized Exp(1) draws = Dirichlet(1, ..., 1), per element
            weights[name] = (p.to(stacked.device, stacked.dtype) * stacked).sum(0)
        total += float(loss_fn(functional_call(plain, weights, (inputs,)), targets))
    sampled = total / draws
    return {"sharpness": sampled - mean_loss, "loss_mean_weights": mean_loss, "loss_sampled": sampled}


def diagnostics(
    opt: MKOptimizer,
    collapse_threshold: float = 1e-4,
    sharpness_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
    draws: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`copy_spread` plus, given a fixed ``sharpness_batch = (inputs, targets)``, Lemma 4.2's
    stochastic sharpness (:func:`stochastic_sharpness`, cross-entropy, ``draws`` Dirichlet draws).

    Example:
        >>> import torch, mkopt
        >>> opt = mkopt.MKOptimizer(torch.optim.SGD, torch.nn.Linear(4, 3), e=2, lr=0.1, init="independent")
        >>> stats = diagnostics(opt, sharpness_batch=(torch.randn(8, 4), torch.randint(0, 3, (8,))))
        >>> sorted(k for k in stats if "/" not in k)
        ['collapsed', 'loss_mean_weights', 'loss_sampled', 'nonfinite', 'sharpness', 'spread']
    """
    stats = copy_spread(opt, collapse_threshold)
    if sharpness_batch is not None:
        stats.update(stochastic_sharpness(opt, *sharpness_batch, draws=draws, seed=seed))
    return stats
