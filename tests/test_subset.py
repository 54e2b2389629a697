"""Algorithm D.1's greedy selection against brute force."""

import itertools
import math

import pytest
import torch

from mkopt.experiments.subset import greedy_select, knn_similarity_graph, objective, select_rows


def brute_force(utility, graph, m, alpha, beta):
    return max(objective(torch.tensor(s), utility, graph, alpha, beta) for s in itertools.combinations(range(len(utility)), m))


@pytest.mark.parametrize("seed", range(12))
def test_greedy_is_within_1_minus_1_over_e_of_the_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(9, 4, generator=g)
    graph = knn_similarity_graph(rows, t=3)
    c = float((graph != 0).sum(1).max())  # monotone: every marginal gain >= 0
    utility = torch.linalg.vector_norm(rows, dim=1) + c
    for m in (2, 3, 5):
        greedy = objective(greedy_select(utility, graph, m), utility, graph, 1.0, 1.0)
        best = brute_force(utility, graph, m, 1.0, 1.0)
        assert greedy >= (1 - 1 / math.e) * best - 1e-9
        assert greedy <= best + 1e-9


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_exact_when_the_objective_is_modular(seed):
    g = torch.Generator().manual_seed(seed)
    utility = torch.rand(10, generator=g)
    graph = knn_similarity_graph(torch.randn(10, 3, generator=g), t=4)
    for m in (1, 4, 7):
        chosen = greedy_select(utility, graph, m, beta=0.0)
        assert objective(chosen, utility, graph, 1.0, 0.0) == pytest.approx(brute_force(utility, graph, m, 1.0, 0.0))
        assert set(chosen.tolist()) == set(utility.topk(m).indices.tolist())


def test_similar_rows_are_not_selected_together():
    base = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    rows = torch.cat([base, base + 0.01])  # each direction twice
    chosen = select_rows(rows, 3, t=1, beta=10.0).tolist()
    assert sorted(i % 3 for i in chosen) == [0, 1, 2]


def test_bad_m():
    with pytest.raises(ValueError, match="cannot select m=5 of 3"):
        greedy_select(torch.ones(3), torch.zeros(3, 3), 5)
