"""SUBSET-BASELINE (paper appendix D, Algorithm D.1): submodular neuron selection before every step.

Each hidden layer keeps ``e * m`` candidate neurons (rows ``U_i``). Before each step, per layer,
a greedy algorithm picks ``m`` rows maximizing

    f(S) = alpha * sum_{i in S} u(i) - beta * sum_{(i, j) in S x S, (i, j) in E} s(i, j),

with ``u(i) = ||U_i|| + c``, ``s`` the cosine similarity of rows and ``E`` the symmetric
t-nearest-neighbour graph (t = 10) under ``s``. Eq. D.8 writes argmin, but the text and the
(1 - 1/e) guarantee concern *maximizing* a monotone submodular f (Nemhauser et al. 1978), so we
maximize. ``c`` defaults to the paper's ``max_l sum_{j: (l, j) in E} s(l, j)``. It adds the same
``alpha * c`` to every candidate's marginal gain, so it never changes which rows the greedy picks (it
only shifts f); pass ``c = beta / alpha * max_degree(E)`` to make f provably monotone (|s| <= 1).
"""

from __future__ import annotations

import numpy as np
import torch


def knn_similarity_graph(rows: torch.Tensor, t: int = 10) -> torch.Tensor:
    """``s(i, j)`` on the symmetric t-NN graph of the rows under cosine similarity, 0 off the graph.

    Example:
        >>> g = knn_similarity_graph(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), t=1)
        >>> bool(g[0, 1] > 0.99), float(g[0, 2])
        (True, 0.0)
    """
    unit = torch.nn.functional.normalize(rows, dim=1)
    similarity = unit @ unit.T
    similarity = (similarity + similarity.T) / 2  # exactly symmetric: a matmul need not be
    similarity.fill_diagonal_(float("-inf"))
    k = min(t, rows.shape[0] - 1)
    mask = torch.zeros_like(similarity, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, similarity.topk(k, dim=1).indices, True)
    mask = mask | mask.T
    similarity.fill_diagonal_(0.0)
    return torch.where(mask, similarity, torch.zeros_like(similarity))


def objective(selected: torch.Tensor, utility: torch.Tensor, graph: torch.Tensor, alpha: float, beta: float) -> float:
    """``f(S)``, counting each unordered pair once."""
    index = selected.long()
    pairs = graph.double()[index][:, index].triu(1).sum()
    return float(alpha * utility.double()[index].sum() - beta * pairs)


def greedy_select(utility: torch.Tensor, graph: torch.Tensor, m: int, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """Greedy maximization of ``f`` with ``|S| = m``; returns the selected indices in order of choice.

    Example:
        >>> greedy_select(torch.tensor([3.0, 2.0, 1.0]), torch.zeros(3, 3), m=2).tolist()
        [0, 1]
    """
    n = utility.shape[0]
    if not 0 < m <= n:
        raise ValueError(f"cannot select m={m} of {n} candidates")
    # numpy, and only each chosen row's graph neighbours updated: the loop runs m times per layer and step
    # (700 times for A3), where per-iteration torch overhead made selection 5x the cost of the training step
    gains = alpha * utility.detach().double().numpy().copy()
    dense = graph.detach().double().numpy()
    rows, cols = np.nonzero(dense)  # row-major: each row's neighbours are one slice
    neighbours = np.split(cols, np.searchsorted(rows, np.arange(1, n)))
    order = []
    for _ in range(m):
        i = int(gains.argmax())
        order.append(i)
        gains[neighbours[i]] -= beta * dense[i, neighbours[i]]  # each neighbour j of i now costs beta * s(i, j)
        gains[i] = -np.inf
    return torch.tensor(order, dtype=torch.long)


def select_rows(rows: torch.Tensor, m: int, t: int = 10, alpha: float = 1.0, beta: float = 1.0, c: float | None = None) -> torch.Tensor:
    """Algorithm D.1's per-layer selection: ``m`` of the candidate ``rows`` (sorted indices).

    Example (rows 0 and 1 point the same way: the pair costs more than row 1's extra norm gains):
        >>> select_rows(torch.tensor([[1.0, 0.0], [1.1, 0.0], [0.0, 1.0]]), 2, t=1).tolist()
        [1, 2]
    """
    graph = knn_similarity_graph(rows.detach().float(), t)
    if c is None:
        c = float(graph.sum(1).max())  # the paper's c
    utility = torch.linalg.vector_norm(rows.detach().float(), dim=1) + c
    return greedy_select(utility, graph, m, alpha, beta).sort().values
