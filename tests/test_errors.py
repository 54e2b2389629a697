"""Bad input fails with an exception that names the value and the fix."""

import pytest
import torch
from torch import nn

import mkopt


def linear():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("e", [0, -1, 2.5, "3", True])
def test_bad_expansion_factor(e):
    with pytest.raises(ValueError, match=rf"e={e!r} is not an expansion factor: pass an int >= 1"):
        mkopt.MKOptimizer(torch.optim.SGD, linear(), e=e, lr=0.1)


def test_targets_matching_nothing():
    with pytest.raises(ValueError, match=r"targets='decoder\.\*' matched no tensor of Sequential"):
        mkopt.MKOptimizer(torch.optim.SGD, linear(), targets="decoder.*", lr=0.1)


def test_bad_targets_entry():
    with pytest.raises(TypeError, match="is not a module type, a name pattern or a predicate"):
        mkopt.MKOptimizer(torch.optim.SGD, linear(), targets=[3], lr=0.1)


def test_non_floating_target():
    model = linear()
    model.register_parameter("table", nn.Parameter(torch.zeros(3, 3, dtype=torch.int64), requires_grad=False))
    with pytest.raises(TypeError, match="'table' has dtype torch.int64; MK needs floating tensors"):
        mkopt.expand(model, targets="table")


def test_sparse_target():
    model = linear()
    model.register_parameter("sp", nn.Parameter(torch.eye(3).to_sparse(), requires_grad=False))
    with pytest.raises(TypeError, match="'sp' is a torch.sparse_coo tensor; MK needs dense tensors"):
        mkopt.expand(model, targets="sp")


def test_already_expanded():
    model = linear()
    first = mkopt.MKOptimizer(torch.optim.SGD, model, lr=0.1)  # alive: a second one would fight it over p
    with pytest.raises(ValueError, match="already trained by an MKOptimizer: build one MKOptimizer per model"):
        mkopt.MKOptimizer(torch.optim.SGD, model, lr=0.1)
    del first


@pytest.mark.parametrize("bad", [torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), "SGD", nn.Linear, None])
def test_bad_optimizer_class(bad):
    with pytest.raises(TypeError, match="optimizer class|not a torch.optim.Optimizer subclass"):
        mkopt.MKOptimizer(bad, linear(), lr=0.1)


def test_gradient_left_from_before_expansion():
    model = linear()
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(ValueError, match=r"'0.weight' holds a .grad .*zero_grad\(set_to_none=True\)"):
        mkopt.MKOptimizer(torch.optim.SGD, model, lr=0.1)


def test_rnn_weights_are_refused_loudly():
    model = nn.Sequential(nn.LSTM(4, 4))
    with pytest.raises(NotImplementedError, match="LSTM, whose flattened cuDNN weights"):
        mkopt.MKOptimizer(torch.optim.SGD, model, lr=0.1)


def test_deploying_a_model_that_is_not_expanded():
    with pytest.raises(ValueError, match="is not expanded by mkopt"):
        mkopt.deploy(linear())
    with pytest.raises(ValueError, match="not an expanded mkopt checkpoint"):
        mkopt.collapse_state_dict(linear().state_dict())


def test_unknown_init_and_init_without_reset():
    with pytest.raises(ValueError, match="init='orthogonal' is unknown"):
        mkopt.MKOptimizer(torch.optim.SGD, linear(), init="orthogonal", lr=0.1)

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3))

        def forward(self, x):
            return x @ self.w

    with pytest.raises(ValueError, match="needs Custom.reset_parameters"):
        mkopt.MKOptimizer(torch.optim.SGD, Custom(), init="independent", lr=0.1)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        mkopt.MKOptimizer(torch.optim.SGD, [nn.Parameter(torch.ones(2, 2))], lr=0.1)
