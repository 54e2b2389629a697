"""Lemma 4.2's stochastic sharpness and the adversarial ascent's statistics (mkopt.diagnostics), on both paths."""

import math

import pytest
import torch
import torch.nn.functional as F

import mkopt
from mkopt.adversarial import divergence_from_uniform, normalize_simplex
from mkopt.diagnostics import adversarial_statistics, diagnostics, stochastic_sharpness


def mse(output, target):
    return (output.squeeze(-1) - target).square().mean()


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_sharpness_of_a_linear_model_matches_the_dirichlet_variance(path):
    """For y = x . theta and squared loss, Delta = E_p[(x . theta_p - y)^2] - (x . mean - y)^2 = mean_n sum_i x_ni^2 Var(theta_p,i),
    and with p ~ Dirichlet(1) over e copies Var(theta_p,i) = sum_k (W_k,i - mean_i)^2 / (e (e + 1))."""
    torch.manual_seed(0)
    e = 3
    model = torch.nn.Linear(4, 1, bias=False)
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=e, lr=0.1, init="independent", path=path)
    copies = opt.expansion.targets[0].param.detach()  # [e, 1, 4]
    x = torch.randn(32, 4)
    y = mkopt.deploy(model)(x).squeeze(-1).detach() + 0.1  # near the mean model: a small cross term, a precise estimate
    variance = (copies - copies.mean(0)).square().sum(0)[0] / (e * (e + 1))
    expected = float((x.square() * variance).sum(1).mean())
    stats = stochastic_sharpness(opt, x, y, loss_fn=mse, draws=2000)
    assert stats["sharpness"] == pytest.approx(expected, rel=0.05)
    assert stats["sharpness"] == pytest.approx(stats["loss_sampled"] - stats["loss_mean_weights"])
    plain = mkopt.deploy(model)
    assert stats["loss_mean_weights"] == pytest.approx(float(mse(plain(x), y)), rel=1e-6)


def test_sharpness_is_the_same_on_both_paths_and_leaves_training_untouched():
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))

    def run(path, measure):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        opt = mkopt.MKOptimizer(torch.optim.Adam, model, e=3, lr=0.01, path=path, seed=5)
        deltas = []
        for _ in range(4):
            if measure:
                deltas.append(stochastic_sharpness(opt, x[:16], y[:16], draws=3, seed=2)["sharpness"])
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return [t.param.detach().clone() for t in opt.expansion.targets], deltas

    for path in ("fused", "generic"):
        measured, deltas = run(path, True)
        plain, _ = run(path, False)
        assert all(torch.equal(a, b) for a, b in zip(measured, plain))  # the optimizer's p stream is not touched
        assert deltas[0] == pytest.approx(0.0, abs=1e-6) and deltas[-1] > 0  # replicated copies drift apart
    fused_weights, fused_deltas = run("fused", True)
    generic_weights, generic_deltas = run("generic", True)
    assert fused_deltas == pytest.approx(generic_deltas, rel=1e-4, abs=1e-7)


def test_diagnostics_adds_sharpness_only_with_a_batch():
    opt = mkopt.MKOptimizer(torch.optim.SGD, torch.nn.Linear(4, 3), e=2, lr=0.1, init="independent")
    assert "sharpness" not in diagnostics(opt)
    with pytest.raises(ValueError, match="draws=0"):
        stochastic_sharpness(opt, torch.randn(2, 4), torch.tensor([0, 1]), draws=0)


@pytest.mark.parametrize("eps", [0.0, 30.0, 1e6])
def test_adversarial_statistics_equal_a_hand_computation_on_both_paths(eps):
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    found = {}
    for path in ("fused", "generic"):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3, bias=False)
        opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, init="independent", probabilities="adv-mk",
                                adversarial_eps=eps, path=path)  # fmt: skip
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        found[path] = adversarial_statistics(opt)
        opt.ascend_probabilities()  # the statistics left the step intact
        F.cross_entropy(model(x), y).backward()
        opt.step()
    torch.manual_seed(0)  # the same model and copies as both runs above, before their step
    twin = torch.nn.Linear(5, 3, bias=False)
    twin_opt = mkopt.MKOptimizer(torch.optim.SGD, twin, e=3, lr=0.1, init="independent", probabilities="adv-mk", path="generic")
    mean = twin_opt.expansion.targets[0].param.detach().mean(0)
    grad_w = torch.func.grad(lambda w: F.cross_entropy(x @ w.T, y))(mean)  # dL/dW at p = 1/e
    stacked = twin_opt.expansion.targets[0].param.detach()
    p_adv = normalize_simplex(1 / 3 + eps * stacked * grad_w)
    u = divergence_from_uniform(p_adv)
    for stats in found.values():
        assert stats["u_mean"] == pytest.approx(float(u.mean()), abs=1e-6)
        assert stats["p_adv_deviation"] == pytest.approx(float((p_adv - 1 / 3).abs().mean()), abs=1e-6)
        assert stats["p_adv_entropy"] == pytest.approx(1 - stats["u_mean"])
        assert stats["saturated"] == pytest.approx(float((u > 0.99).float().mean()))
    if eps == 0.0:
        assert found["fused"]["u_mean"] == 0.0
    if eps == 1e6:  # huge eps: p_adv -> (W~_k dL/dW)_+ / sum_j (W~_j dL/dW)_+, which no longer depends on eps
        limit = normalize_simplex(stacked * grad_w)
        assert found["generic"]["u_mean"] == pytest.approx(float(divergence_from_uniform(limit).mean()), abs=1e-3)
    assert not math.isnan(found["fused"]["u_mean"])


def test_adversarial_statistics_need_a_probe_pass():
    model = torch.nn.Linear(4, 2)
    with pytest.raises(RuntimeError, match="not 'dirichlet'"):
        adversarial_statistics(mkopt.MKOptimizer(torch.optim.SGD, model, e=2, lr=0.1))
    model = torch.nn.Linear(4, 2)
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=2, lr=0.1, probabilities="adv-mk")
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="after the probe's backward"):
        adversarial_statistics(opt)
