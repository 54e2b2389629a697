"""Adversarial probabilities (paper appendix B): Algorithm B.1 and its randomized variant B.2.

B.1 starts each step from uniform ``p = 1/e``, takes ``dL/dp`` on the batch (for a kernel
``dL/dp[k] = W~[k] * dL/dW``, per element), ascends ``p <- p + eps * dL/dp`` and normalizes back
onto the simplex; the weights' gradients are then taken at that ``p``. B.2 additionally mixes in a
Dirichlet(1) draw, weighted by how far the adversarial ``p`` is from uniform.

Normalize (the paper leaves it open): clamp every entry at 0, then divide by the sum over the
copies; an element whose entries all clamp to 0 becomes uniform. For small ``eps`` this is, to
first order, a step along ``dL/dp`` minus its mean over the copies (a projection onto the
simplex's tangent space), so the loss does not decrease to first order.

B.2's mixing weight ``u = KL(p || uniform) / log e`` is taken **per element**: ``p`` is drawn per
element, and B.2 exists to re-inject randomness exactly where the adversarial ``p`` stays uniform
(the copies of that element have become equal, so ``dL/dp`` is the same for every copy). A
per-tensor aggregate would let a few far-from-uniform elements switch the randomness off for all.
"""

from __future__ import annotations

import math

import torch

from .compiled import run_kernel
from .sampling import probability_rows

# Default ascent step on p, from the sweep in results/adversarial_eps.md (Fashion-MNIST MLPs, Adam, replicated
# copies, 3 seeds): |dL/dp| = |W~ * dL/dW| is ~1e-5, so at eps = 100 B.2's mixing weight u averages 2e-5..2e-4
# (Adv-MK = MK plus a wasted pass); u grows by decades up to eps ~ 1e5 and then stays put (~0.05-0.07), since
# for large eps Normalize(1/e + eps * dL/dp) tends to (W~_k dL/dW)_+ / sum_j (W~_j dL/dW)_+, which does not
# depend on eps. 1e5 is the smallest decade at that plateau on both A1 and A3, at MK's accuracy; no eps beat MK.
# eps is not scale-free (it multiplies a gradient whose size depends on the model and loss): check u with
# mkopt.diagnostics.adversarial_statistics on your model. With init="independent" an earlier 2-epoch screening
# saw large eps (>= 1e3-1e4) cost accuracy.
DEFAULT_ADVERSARIAL_EPS = 1e5


def normalize_simplex(q: torch.Tensor) -> torch.Tensor:
    """Per element (dim 0 = copies): clamp at 0, divide by the sum; all-zero elements become uniform.

    Example:
        >>> normalize_simplex(torch.tensor([[0.5, -1.0], [1.5, -2.0]])).T.tolist()
        [[0.25, 0.75], [0.5, 0.5]]
    """
    return torch.stack(_normalized_rows(list(q)))


def adversarial_probabilities(grad_p: torch.Tensor, eps: float) -> torch.Tensor:
    """Algorithm B.1: ``Normalize(1/e + eps * dL/dp)``, per element over dim 0.

    Example:
        >>> adversarial_probabilities(torch.tensor([[1.0], [0.0]]), eps=0.5).flatten().tolist()
        [0.6666666865348816, 0.3333333432674408]
    """
    e = grad_p.shape[0]
    return normalize_simplex(grad_p * eps + 1 / e)


def divergence_from_uniform(p: torch.Tensor) -> torch.Tensor:
    """``u = KL(p || uniform) / log e`` per element (dim 0 = copies): 0 at uniform, 1 at one-hot.

    Example:
        >>> divergence_from_uniform(torch.tensor([[0.5, 1.0], [0.5, 0.0]])).tolist()
        [0.0, 1.0]
    """
    return _row_divergence(list(p))


def mix_with_random(p_adversarial: torch.Tensor, p_random: torch.Tensor) -> torch.Tensor:
    """Algorithm B.2: ``u * p + (1 - u) * p_random`` with the per-element ``u`` above.

    Example:
        >>> mix_with_random(torch.tensor([[1.0], [0.0]]), torch.tensor([[0.3], [0.7]])).flatten().tolist()
        [1.0, 0.0]
    """
    u = divergence_from_uniform(p_adversarial)
    return u * p_adversarial + (1 - u) * p_random


def normalized_entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean over elements of ``H(p) / log e`` (1 = uniform everywhere, 0 = one-hot everywhere).

    Example:
        >>> float(normalized_entropy(torch.tensor([[0.5, 1.0], [0.5, 0.0]])))
        0.5
    """
    return 1 - divergence_from_uniform(p).mean()


def ascend_(p: torch.Tensor, grad_p: torch.Tensor, step: torch.Tensor, key: torch.Tensor, offset: torch.Tensor,
            constants: torch.Tensor, randomize: bool) -> None:  # fmt: skip
    """One adversarial update of a ``[e, ...]`` block of ``p``, in place: B.1, or B.2 if ``randomize``.

    ``step`` is the 0-dim ``eps / loss_scale``. B.2's Dirichlet draw is regenerated here from the
    stream ``key`` at columns ``offset ..`` (the values :class:`~mkopt.sampling.DirichletSampler`
    would have written), so no separate draw pass is needed. Written per copy (rows) so that
    ``torch.compile`` fuses it into one loop that reads ``grad_p`` and writes ``p``.

    Example:
        >>> from mkopt.sampling import splitmix64_constants
        >>> p = torch.full((2, 3), 0.5)
        >>> grad = torch.tensor([[1.0, 0, 0], [0, 0, 0]])
        >>> ascend_(p, grad, torch.tensor(0.5), torch.tensor(0), torch.tensor(0), splitmix64_constants(), False)
        >>> [round(v, 4) for v in p[0].tolist()]
        [0.6667, 0.5, 0.5]
    """
    e = p.shape[0]
    flat, grad = p.reshape(e, -1), grad_p.reshape(e, -1)
    new = _normalized_rows([grad[k] * step + 1 / e for k in range(e)])  # adversarial_probabilities(grad_p * step, 1)
    if randomize:  # mix_with_random with this step's Dirichlet draw
        u = _row_divergence(new)
        drawn = probability_rows(flat.shape[1], e, key, offset, constants, p.dtype) if e > 1 else [torch.ones_like(u)]
        new = [u * a + (1 - u) * r for a, r in zip(new, drawn)]
    if torch.compiler.is_compiling():
        flat.copy_(torch.stack(new))  # one loop with e stores
    else:
        for k, row in enumerate(new):
            flat[k].copy_(row)


def estimated_entropy(p: torch.Tensor, columns: int = 8192, as_tensor: bool = False) -> float | torch.Tensor:
    """:func:`normalized_entropy` of a ``[e, ...]`` block, on at most ``columns`` evenly strided elements.

    A diagnostic: the exact value costs ``e`` logarithms per weight, as much as the ascent itself.
    ``as_tensor``: a 0-dim tensor on ``p``'s device (no host read; on a GPU a read synchronizes).

    Example:
        >>> estimated_entropy(torch.full((2, 100_000), 0.5))
        1.0
    """
    flat = p.reshape(p.shape[0], -1)
    stride = -(-flat.shape[1] // columns)  # ceiling: at most ``columns`` elements
    entropy = normalized_entropy(flat[:, ::stride])
    return entropy if as_tensor else float(entropy)


# The math above, per copy: lists of [n] rows instead of [e, n] tensors, so that inductor emits one
# elementwise loop (reductions over dim 0 compiled to a loop per sum). The reference functions and the
# fused ascent share these, so they cannot drift apart.
def _row_sum(rows: list[torch.Tensor]) -> torch.Tensor:
    return sum(rows[1:], rows[0])


def _normalized_rows(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Clamp at 0, divide by the sum over copies; an element whose entries all clamp to 0 becomes uniform."""
    clamped = [r.clamp_min(0) for r in rows]
    total = _row_sum(clamped)
    tiny = torch.finfo(total.dtype).tiny
    return [torch.where(total > 0, c / total.clamp_min(tiny), 1 / len(rows)) for c in clamped]


def _row_divergence(rows: list[torch.Tensor]) -> torch.Tensor:
    """:func:`divergence_from_uniform` of the columns formed by ``rows``."""
    e = len(rows)
    if e == 1:
        return torch.zeros_like(rows[0])
    tiny = torch.finfo(rows[0].dtype).tiny  # r * log(max(r, tiny)) = xlogy(r, r) up to denormal r; vectorizes, xlogy does not
    kl = _row_sum([r * torch.log(r.clamp_min(tiny)) for r in rows]) + math.log(e)
    return (kl / math.log(e)).clamp(0.0, 1.0)


def compiled_ascend_(p: torch.Tensor, grad_p: torch.Tensor, step: torch.Tensor, key: torch.Tensor, offset: torch.Tensor,
                     constants: torch.Tensor, randomize: bool, compiled: bool, required: bool = False) -> None:  # fmt: skip
    """:func:`ascend_`, through ``torch.compile`` when ``compiled`` (one fused pass instead of ~15)."""
    run_kernel(ascend_, p, grad_p, step, key, offset, constants, randomize, compiled=compiled, required=required)
