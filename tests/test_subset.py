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


def test_d1_structure_outputs_expanded_inputs_are_the_selected_units():
    """Algorithm D.1 on a small network: W_r in R^{n_r x m_r x e} (only outputs expanded), each layer reads
    the m inputs of the plain network, initialized for fan-in m; a selected candidate k * m + j feeds input j;
    the forward is exactly that; only selected rows (and their biases) get gradients."""
    from mkopt.experiments import methods
    from mkopt.experiments.runs import RunSpec

    inputs, classes = 7, 3
    spec = RunSpec("subset", "A2", "sgd", 0.1, 0, 1, "synthetic", e=3)  # widths (200, 100)
    subset = methods.Subset(spec, inputs, classes)
    assert [tuple(layer.weight.shape) for layer in subset.hidden] == [(3 * 200, inputs), (3 * 100, 200)]
    assert tuple(subset.output.weight.shape) == (classes, 100)
    for layer, fan_in in zip(subset.hidden, (inputs, 200)):  # nn.Linear's init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = fan_in**-0.5
        assert float(layer.weight.abs().max()) <= bound
        assert float(layer.weight.abs().max()) > 0.95 * bound
    chosen = subset.select()
    assert [len(rows) for rows in chosen] == [200, 100]
    assert all(bool((rows[1:] > rows[:-1]).all()) for rows in chosen)  # sorted, distinct
    x = torch.randn(5, inputs)
    h = torch.relu(x @ subset.hidden[0].weight[chosen[0]].T + subset.hidden[0].bias[chosen[0]])
    h = torch.relu(h @ subset.hidden[1].weight[chosen[1]][:, chosen[0] % 200].T + subset.hidden[1].bias[chosen[1]])
    expected = h @ subset.output.weight[:, chosen[1] % 100].T + subset.output.bias
    torch.testing.assert_close(subset.forward(x, chosen), expected)
    torch.nn.functional.cross_entropy(subset.forward(x, chosen), torch.tensor([0, 1, 2, 0, 1])).backward()
    for layer, rows in zip(subset.hidden, chosen):
        unselected = torch.ones(layer.out_features, dtype=torch.bool)
        unselected[rows] = False
        assert float(layer.weight.grad[unselected].abs().max()) == 0.0
        assert float(layer.bias.grad[unselected].abs().max()) == 0.0
        assert float(layer.weight.grad[rows].abs().sum()) > 0
    # "feeds input j" literally: scatter each selected unit into its output's slot (copies of one output add up)
    with torch.no_grad():
        first = torch.relu(x @ subset.hidden[0].weight[chosen[0]].T + subset.hidden[0].bias[chosen[0]])
        slots = torch.zeros(5, 200).index_add_(1, chosen[0] % 200, first)
        second, _ = subset.layers(chosen)[1]
        torch.testing.assert_close(first @ second.T, slots @ subset.hidden[1].weight[chosen[1]].T)
    final = subset.final_model()
    with torch.no_grad():
        torch.testing.assert_close(final(x), subset.forward(x, subset.select()))


def test_paper_c_does_not_change_the_greedy_choice():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(12, 5, generator=g)
    paper = select_rows(rows, 4, t=3)
    for c in (0.0, 3.0, 100.0):
        assert torch.equal(select_rows(rows, 4, t=3, c=c), paper)
