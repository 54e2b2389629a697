"""Bad input never yields a silently wrong result: diverged copies, odd integer types, frozen targets."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mkopt
from mkopt.deploy import collapse, collapse_state_dict, deploy


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def diverged() -> tuple[nn.Sequential, mkopt.MKOptimizer]:
    model = net()
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1)
    with torch.no_grad():
        model[2].parametrizations.weight.original[1, 0, 0] = float("nan")
        model[0].parametrizations.weight.original[2, 1, 1] = float("inf")
    return model, opt


@pytest.mark.parametrize("verb", [deploy, collapse])
def test_deploy_and_collapse_refuse_nonfinite_copies_by_name(verb):
    model, _ = diverged()
    with pytest.raises(ValueError, match=r"'0\.weight' has 1 non-finite value\(s\).*allow_nonfinite=True"):
        verb(model)
    assert mkopt.is_expanded(model)  # refused before anything changed
    plain = verb(model, allow_nonfinite=True)
    assert torch.isnan(plain[2].weight[0, 0]) and torch.isinf(plain[0].weight[1, 1])


def test_collapse_state_dict_refuses_nonfinite_copies_by_key():
    model, _ = diverged()
    saved = model.state_dict()
    with pytest.raises(ValueError, match=r"'0\.parametrizations\.weight\.original' has 1 non-finite"):
        collapse_state_dict(saved)
    assert torch.isinf(collapse_state_dict(saved, allow_nonfinite=True)["0.weight"][1, 1])


def test_diagnostics_flag_nonfinite_copies():
    _, opt = diverged()
    with pytest.warns(RuntimeWarning, match=r"\['0\.weight', '2\.weight'\] hold NaN/inf"):
        stats = opt.diagnostics()
    assert stats["nonfinite"] == 2.0 and stats["collapsed"] == 0.0


def test_finite_model_reports_zero_nonfinite_without_warning():
    opt = mkopt.MKOptimizer(torch.optim.SGD, net(), e=2, lr=0.1, init="independent")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.diagnostics()["nonfinite"] == 0.0


@pytest.mark.parametrize("e", [np.int64(3), np.int32(3), torch.tensor(3)])
def test_any_integer_type_is_an_expansion_factor(e):
    model = net()
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=e, lr=0.1)
    assert type(opt.e) is int and opt.e == 3
    assert model[0].parametrizations.weight.original.shape == (3, 3, 4)


def test_non_spec_targets_name_what_a_spec_is():
    with pytest.raises(TypeError, match=r"targets=42 is not a target spec: pass None"):
        mkopt.MKOptimizer(torch.optim.SGD, net(), targets=42, lr=0.1)


def test_frozen_tensors_are_skipped_with_a_warning_by_default():
    model = net()
    model[0].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"skipping frozen tensors \['0\.weight'\]"):
        mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1)
    assert model[0].weight.shape == (3, 4) and not hasattr(model[0], "parametrizations")
    assert model[2].parametrizations.weight.original.shape == (3, 2, 3)


def test_frozen_tensors_named_explicitly_are_an_error():
    model = net()
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"selects frozen tensors \['0\.weight'\].*Unfreeze"):
        mkopt.MKOptimizer(torch.optim.SGD, model, targets="*.weight", lr=0.1)


def test_random_streams_live_in_one_table_with_disjoint_ranges():
    from mkopt.streams import STREAMS, stream_id

    ranges = sorted((s.base, s.base + s.span, name) for name, s in STREAMS.items())
    for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
        assert end <= start, f"streams {first} and {second} overlap"
    # the values that define saved runs' bits never move
    assert (stream_id("probabilities"), stream_id("independent_init", 3)) == (0, 1_000_006)
    assert (stream_id("data_order"), stream_id("sample", 7)) == (0x0DA7A0, (0x5A3F1E << 32) + 7)
