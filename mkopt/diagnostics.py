"""Cheap statistics of the copies: how far apart they are, and whether they have collapsed."""

from __future__ import annotations

import warnings
from typing import Protocol

import torch


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
    for name, copies in opt.named_copies():
        stacked = copies.detach().float()
        if not bool(torch.isfinite(stacked).all()):
            nonfinite.append(name)
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
    collapsed = opt.mk_step > 0 and stats["spread"] < collapse_threshold
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

