"""Checkpoints: expanded save/load, plain (pretrained) weights into an expanded model, bit-identical resume."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mkopt

HERE = Path(__file__).parent


def run_worker(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    subprocess.run([sys.executable, str(HERE / "resume_worker.py"), *args], check=True, env=env)


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    run_worker("12", str(tmp_path / "full.json"))
    run_worker("5", str(tmp_path / "first.json"), "--save-at", "5", str(tmp_path / "ckpt.pt"))
    run_worker("12", str(tmp_path / "second.json"), "--resume", str(tmp_path / "ckpt.pt"))
    full = json.loads((tmp_path / "full.json").read_text())
    first = json.loads((tmp_path / "first.json").read_text())
    second = json.loads((tmp_path / "second.json").read_text())
    assert first["losses"] + second["losses"] == full["losses"]  # exact float equality, 12 steps
    assert second["weights"] == full["weights"]


def test_optimizer_state_round_trip_in_lockstep():
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
        return model, mkopt.MKOptimizer(torch.optim.Adam, model, e=3, lr=1e-2, seed=3)

    def step(model, opt, i):
        g = torch.Generator().manual_seed(i)
        opt.zero_grad()
        loss = F.mse_loss(model(torch.randn(8, 6, generator=g)), torch.randn(8, 2, generator=g))
        loss.backward()
        opt.step()
        return loss

    a, opt_a = build()
    for i in range(4):
        step(a, opt_a, i)
    b, opt_b = build()
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as torch: a live state_dict aliases tensors
    assert opt_b.mk_step == opt_a.mk_step == 4
    for i in range(4, 10):
        assert torch.equal(step(a, opt_a, i), step(b, opt_b, i))
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_plain_pretrained_state_dict_is_replicated_into_the_copies():
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, init="independent")
    model.load_state_dict(pretrained.state_dict())  # strict
    stacked = model[0].parametrizations.weight.original
    assert all(torch.equal(stacked[k], pretrained[0].weight) for k in range(3))
    assert torch.equal(model[2].bias, pretrained[2].bias)


def test_expanded_checkpoint_round_trip_and_wrong_e(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, init="independent")
    torch.save(model.state_dict(), tmp_path / "mk.pt")
    again = nn.Linear(4, 3)
    mkopt.MKOptimizer(torch.optim.SGD, again, e=3, lr=0.1)
    again.load_state_dict(torch.load(tmp_path / "mk.pt"))
    assert torch.equal(again.parametrizations.weight.original, model.parametrizations.weight.original)
    other = nn.Linear(4, 3)
    mkopt.MKOptimizer(torch.optim.SGD, other, e=2, lr=0.1)
    with pytest.raises(ValueError, match=r"saved with e=3 .* expanded with e=2"):
        other.load_state_dict(torch.load(tmp_path / "mk.pt"))
    plain = mkopt.collapse_state_dict(torch.load(tmp_path / "mk.pt"))  # metadata survives torch.save
    assert list(plain) == ["weight", "bias"]


def test_optimizer_state_with_another_e_is_rejected():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    opt_a = mkopt.MKOptimizer(torch.optim.SGD, a, e=2, lr=0.1)
    opt_b = mkopt.MKOptimizer(torch.optim.SGD, b, e=3, lr=0.1)
    with pytest.raises(ValueError, match="e=2 but this MKOptimizer has e=3"):
        opt_b.load_state_dict(opt_a.state_dict())
    with pytest.raises(ValueError, match="not an MKOptimizer state_dict"):
        opt_b.load_state_dict(torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1).state_dict())
