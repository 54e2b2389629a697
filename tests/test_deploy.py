"""Deploy and collapse: plain classes, keys, sizes, ties; the deployed model equals the eval-mode MK model."""

import copy

import pytest
import torch
from torch import nn

import mkopt
from zoo import randomize_batchnorm, zoo

ZOO = zoo()


def train_a_little(model: nn.Module, make_input, opt, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        opt.zero_grad()
        out = model(make_input(g))
        (out.float() ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("name", list(ZOO))
def test_deployed_model_matches_eval_mode_mk_model(name):
    make_model, make_input = ZOO[name]
    torch.manual_seed(0)
    reference = make_model().double()
    model = copy.deepcopy(reference)
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.05, momentum=0.9, init="independent")
    train_a_little(model, lambda g: _cast(make_input(g)), opt)
    randomize_batchnorm(model, torch.Generator().manual_seed(5))
    model.eval()
    plain = mkopt.deploy(model)
    x = _cast(make_input(torch.Generator().manual_seed(9)))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-12, atol=1e-12)
    # an ordinary model: original classes, keys in order, same size
    assert [type(m) for m in plain.modules()] == [type(m) for m in reference.modules()]
    assert list(plain.state_dict()) == list(reference.state_dict())
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in reference.parameters())
    assert not mkopt.is_expanded(plain) and mkopt.is_expanded(model)
    reference.load_state_dict(plain.state_dict())  # strict: loads into the plain architecture


def _cast(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.is_floating_point() else x


def test_deploy_uses_the_mean_whatever_the_mode():
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, init="independent")
    stacked = model.parametrizations.weight.original.detach().clone()
    model.train()  # training mode would read a random mixture: deploy must not
    plain = mkopt.deploy(model)
    assert torch.equal(plain.weight, stacked.mean(0))
    assert plain.training  # flags are kept; only the weights are collapsed
    assert opt.mk_step == 0 and mkopt.is_expanded(model)


def test_bfloat16_mean_is_accumulated_in_float32():
    model = nn.Linear(64, 64).to(torch.bfloat16)
    mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, init="independent")
    stacked = model.parametrizations.weight.original.detach()
    plain = mkopt.deploy(model)
    assert plain.weight.dtype == torch.bfloat16
    assert torch.equal(plain.weight, stacked.float().mean(0).to(torch.bfloat16))


def test_collapse_in_place_keeps_parameter_identity_and_ends_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    weight = model[0].weight
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=2, lr=0.1)
    expected = model[0].parametrizations.weight.original.detach().mean(0)
    returned = opt.collapse()
    assert returned is model and type(model[0]) is nn.Linear
    assert model[0].weight is weight and torch.equal(weight, expected)
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    with pytest.raises(RuntimeError, match="collapsed"):
        opt.step()


def test_deploying_a_copy_leaves_the_original_expanded_model_working():
    model = nn.Linear(4, 2)
    mkopt.MKOptimizer(torch.optim.SGD, model, e=2, lr=0.1)
    twin = copy.deepcopy(model)
    mkopt.deploy(twin)
    mkopt.collapse(twin)
    x = torch.randn(3, 4)
    assert model(x).shape == (3, 2)  # parametrize shares generated classes across deepcopies


def test_collapse_state_dict_offline_equals_deploy():
    make_model, _ = ZOO["tied_lm"]
    torch.manual_seed(0)
    model = make_model()
    mkopt.MKOptimizer(torch.optim.Adam, model, e=3, init="independent")
    saved = model.state_dict()
    collapsed = mkopt.collapse_state_dict(saved)
    deployed = mkopt.deploy(model).state_dict()
    assert list(collapsed) == list(deployed)
    for key in deployed:
        assert torch.equal(collapsed[key], deployed[key]), key
    assert collapsed["embed.weight"] is collapsed["head.weight"]  # one tensor, still tied


def test_deploy_keeps_extra_parametrizations_of_other_tensors():
    model = nn.Linear(5, 5)
    nn.utils.parametrize.register_parametrization(model, "bias", nn.Identity())
    mkopt.MKOptimizer(torch.optim.SGD, model, e=2, targets="weight", lr=0.1)
    plain = mkopt.deploy(model)
    assert nn.utils.parametrize.is_parametrized(plain, "bias") and not nn.utils.parametrize.is_parametrized(plain, "weight")
    assert plain.weight.shape == (5, 5)
