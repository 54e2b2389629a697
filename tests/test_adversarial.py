"""Adversarial probabilities (B.1, B.2), uniform mode, lr compensation, diagnostics."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mkopt
from mkopt.adversarial import adversarial_probabilities, divergence_from_uniform, mix_with_random, normalize_simplex


def make(mode="adversarial", e=3, dtype=torch.float64, seed=0, cls=torch.optim.SGD, **kwargs):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)
    kwargs.setdefault("lr", 0.1)
    opt = mkopt.MKOptimizer(cls, model, e=e, probabilities=mode, init="independent", seed=seed, **kwargs)
    return model, opt


def data(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=g, dtype=dtype), torch.randint(0, 3, (32,), generator=g)


def test_grad_p_equals_autograd_on_an_explicit_p_leaf():
    model, opt = make(path="generic")  # the generic path's dL/dp (the fused path's ascent: tests/test_fused_path.py)
    x, y = data()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # probe pass at p = 1/e
    layers = [model[0], model[2]]
    library = [layer.parametrizations.weight[0].p.grad.clone() for layer in layers]
    stacks = [layer.parametrizations.weight.original.detach() for layer in layers]
    ps = [torch.full_like(s, 1 / 3, requires_grad=True) for s in stacks]
    h = torch.tanh(F.linear(x, (ps[0] * stacks[0]).sum(0), model[0].bias))
    loss = F.cross_entropy(F.linear(h, (ps[1] * stacks[1]).sum(0), model[2].bias), y)
    expected = torch.autograd.grad(loss, ps)
    for got, want in zip(library, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_b1_does_not_decrease_the_loss_and_yields_valid_distributions():
    model, opt = make(adversarial_eps=1e-2)
    x, y = data()
    opt.zero_grad()
    uniform_loss = F.cross_entropy(model(x), y)
    uniform_loss.backward()
    opt.ascend_probabilities()
    for layer in (model[0], model[2]):
        p = layer.parametrizations.weight[0].p
        assert bool((p >= 0).all())
        torch.testing.assert_close(p.sum(0), torch.ones_like(p[0]), rtol=0, atol=1e-12)
        assert not torch.allclose(p, torch.full_like(p, 1 / 3))
    with torch.no_grad():
        adversarial_loss = F.cross_entropy(model(x), y)
    assert float(adversarial_loss) >= float(uniform_loss)


def test_normalize_and_divergence_weight():
    q = torch.tensor([[0.2, -1.0, 3.0], [0.8, -2.0, 0.0], [1.0, -0.5, 1.0]])
    p = normalize_simplex(q)
    torch.testing.assert_close(p[:, 0], torch.tensor([0.1, 0.4, 0.5]))
    torch.testing.assert_close(p[:, 1], torch.full((3,), 1 / 3))  # every entry clamped: uniform
    torch.testing.assert_close(p[:, 2], torch.tensor([0.75, 0.0, 0.25]))
    uniform = torch.full((3, 4), 1 / 3, dtype=torch.float64)
    one_hot = torch.eye(3, 4, dtype=torch.float64)[:, :3]
    torch.testing.assert_close(divergence_from_uniform(uniform), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(divergence_from_uniform(one_hot), torch.ones(3, dtype=torch.float64))
    u = divergence_from_uniform(torch.distributions.Dirichlet(torch.ones(3)).sample((1000,)).T)
    assert bool((u >= 0).all() and (u <= 1).all())
    random = torch.full((3, 4), 0.2, dtype=torch.float64)
    torch.testing.assert_close(mix_with_random(uniform, random), random, rtol=0, atol=1e-12)  # u = 0: random
    torch.testing.assert_close(mix_with_random(one_hot, random[:, :3]), one_hot)  # u = 1: all adversarial
    assert torch.equal(adversarial_probabilities(torch.zeros(3, 2), 5.0), torch.full((3, 2), 1 / 3))


@pytest.mark.parametrize("mode", ["adversarial", "adv-mk"])
def test_closure_form_and_two_call_form_give_identical_updates(mode):
    a, opt_a = make(mode)
    b, opt_b = make(mode)
    for step in range(3):
        x, y = data(seed=step)

        def closure():
            opt_a.zero_grad()
            loss = F.cross_entropy(a(x), y)
            loss.backward()
            return loss

        loss_a = opt_a.step(closure)
        opt_b.zero_grad()
        loss_b = F.cross_entropy(b(x), y)
        loss_b.backward()
        opt_b.ascend_probabilities()
        F.cross_entropy(b(x), y).backward()
        opt_b.step()
        assert torch.equal(loss_a, loss_b)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert opt_a.mk_step == opt_b.mk_step == 3


@pytest.mark.parametrize("mode", ["adversarial", "adv-mk"])
def test_grad_scaler_loop_with_an_overflowing_step(mode):
    model, opt = make(mode, dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = data(torch.float32)

    def iteration(blow_up: bool) -> None:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        opt.ascend_probabilities(scaler)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss * (float("inf") if blow_up else 1.0)).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        scaler.step(opt)
        scaler.update()

    for _ in range(3):
        iteration(False)
    assert opt.mk_step == 3
    weights = copy.deepcopy(model.state_dict())  # copies and plain parameters (not the fused path's proxies,
    state = copy.deepcopy(opt.optimizer.state_dict())  # which hold the ascent's W until the next probe is armed)
    iteration(True)
    assert opt.mk_step == 3  # skipped: no parameter, state or step counter moved
    assert all(torch.equal(a, b) for a, b in zip(weights.values(), model.state_dict().values()))
    assert all(torch.equal(a["momentum_buffer"], b["momentum_buffer"]) if a.get("momentum_buffer") is not None else True
               for a, b in zip(state["state"].values(), opt.optimizer.state_dict()["state"].values()))
    iteration(False)  # the next step starts a clean probe
    assert opt.mk_step == 4
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("mode", ["dirichlet", "uniform", "adversarial", "adv-mk"])
def test_resume_is_bit_identical_in_every_mode(mode):
    def run(model, opt, steps):
        losses = []
        for step in steps:
            x, y = data(seed=100 + step)

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            if opt.adversarial:
                losses.append(opt.step(closure))
            else:
                losses.append(closure())
                opt.step()
        return losses

    a, opt_a = make(mode, cls=torch.optim.Adam, lr=1e-2)
    full = run(a, opt_a, range(6))
    b, opt_b = make(mode, cls=torch.optim.Adam, lr=1e-2)
    first = run(b, opt_b, range(3))
    saved_model, saved_opt = copy.deepcopy(b.state_dict()), copy.deepcopy(opt_b.state_dict())
    c, opt_c = make(mode, cls=torch.optim.Adam, lr=1e-2, seed=0)
    c.load_state_dict(saved_model)
    opt_c.load_state_dict(saved_opt)
    rest = run(c, opt_c, range(3, 6))
    assert all(torch.equal(u, v) for u, v in zip(first + rest, full))


def mean_and_baseline_steps(e: int, **mk_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step from identical weights: (step of the MK mean kernel, step of the baseline weight)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    model = copy.deepcopy(plain)
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=e, lr=0.1, **mk_kwargs)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    before = plain[0].weight.detach().clone()
    x, y = data()
    for m, o in ((plain, plain_opt), (model, opt)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    mean_step = model[0].parametrizations.weight.original.detach().mean(0) - before
    return mean_step, plain[0].weight.detach() - before


def test_uniform_mode_with_sgd_moves_the_mean_by_lr_over_e():
    for e in (1, 2, 3, 4):
        mean_step, baseline_step = mean_and_baseline_steps(e, probabilities="uniform")
        torch.testing.assert_close(mean_step, baseline_step / e, rtol=1e-10, atol=1e-15)


def test_lr_compensation_makes_the_mean_move_like_the_baseline():
    mean_step, baseline_step = mean_and_baseline_steps(3, lr_compensation=True)  # dirichlet p
    torch.testing.assert_close(mean_step, baseline_step, rtol=1e-10, atol=1e-15)
    with pytest.raises(ValueError, match="Adam is scale-invariant"):
        mkopt.MKOptimizer(torch.optim.Adam, nn.Linear(2, 2), lr_compensation=True)


def test_diagnostics_spread_entropy_and_collapse_warning():
    model, opt = make("adversarial")
    x, y = data()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.ascend_probabilities()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    stats = opt.diagnostics()
    assert set(stats) == {"spread/0.weight", "spread/2.weight", "spread", "p_entropy", "collapsed", "nonfinite"}
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["spread"] > 0.1 and 0 < stats["p_entropy"] <= 1 and stats["collapsed"] == 0.0
    stacked = model[0].parametrizations.weight.original
    with torch.no_grad():  # make the copies equal: collapse
        for layer in (model[0], model[2]):
            s = layer.parametrizations.weight.original
            s.copy_(s.mean(0, keepdim=True).expand_as(s))
    with pytest.warns(mkopt.KernelCollapseWarning, match="collapsed"):
        assert opt.diagnostics()["collapsed"] == 1.0
    assert stacked.shape[0] == 3


def test_bad_inputs():
    with pytest.raises(ValueError, match="probabilities='sharp' is unknown"):
        make("sharp")
    with pytest.raises(ValueError, match="with init='replicate' never separates the copies"):
        mkopt.MKOptimizer(torch.optim.SGD, nn.Linear(3, 3), probabilities="adversarial", lr=0.1)
    with pytest.raises(ValueError, match="adversarial_eps=-1.0 must be a finite number >= 0"):
        make(adversarial_eps=-1.0)
    model, opt = make("adversarial")
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="takes two passes per step"):
        opt.step()
    _, plain_opt = make("dirichlet")
    with pytest.raises(RuntimeError, match="is for probabilities='adversarial' or 'adv-mk'"):
        plain_opt.ascend_probabilities()
    model, opt = make("adv-mk")
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="no gradient reached p"):
        opt.ascend_probabilities()


@pytest.mark.parametrize("e", [2, 3, 5])
@pytest.mark.parametrize("randomize", [False, True], ids=["B.1", "B.2"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fused_ascent_equals_the_reference_functions(e, randomize, compiled):
    """The per-copy kernel computes exactly the documented composition, including entries clamped to 0;
    B.2's random draw is the stream's own columns (what the sampler would have written)."""
    from mkopt.adversarial import compiled_ascend_, estimated_entropy, normalized_entropy
    from mkopt.sampling import counter_dirichlet_, splitmix64_constants

    g = torch.Generator().manual_seed(e)
    grad = torch.randn(e, 4, 300, generator=g, dtype=torch.float64)
    grad[:, 0, :5] = 0.0  # elements left at uniform
    key, offset = torch.tensor(99), torch.tensor(1000)
    drawn = counter_dirichlet_(torch.empty(e, 1200, dtype=torch.float64), key=99, offset=1000, compiled=False).view(e, 4, 300)
    step = torch.tensor(2.0, dtype=torch.float64)  # large enough that some entries clamp at 0
    expected = adversarial_probabilities(grad * step, 1.0)
    assert bool((expected == 0).any())
    if randomize:
        expected = mix_with_random(expected, drawn)
    p = torch.full((e, 4, 300), float("nan"), dtype=torch.float64)  # the kernel must not read p
    compiled_ascend_(p, grad, step, key, offset, splitmix64_constants(), randomize, compiled)
    torch.testing.assert_close(p, expected, rtol=1e-12, atol=1e-15)
    assert estimated_entropy(p, columns=10**6) == pytest.approx(float(normalized_entropy(expected)), rel=1e-12)
    per_element = 1 - divergence_from_uniform(expected).flatten()  # a 300-column subsample: within 5 standard errors
    assert abs(estimated_entropy(p, columns=300) - float(per_element.mean())) < 5 * float(per_element.std()) / 300**0.5


def test_collapse_warning_spares_copies_that_are_still_moving_apart():
    """Replicated copies start with spread 0 and separate by ~lr*|g|*std(p) per step: under the
    threshold at a small lr, but growing, which is no collapse. Uniform p never separates them
    (identical copies) and copies that stop moving apart under the threshold still warn."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 20), torch.randint(0, 3, (64,))

    def trained(probabilities: str, steps: int):
        model = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 3))
        opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=1e-3, probabilities=probabilities, init="replicate")
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return model, opt

    model, opt = trained("dirichlet", 1)
    spreads = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", mkopt.KernelCollapseWarning)
        for _ in range(3):
            stats = opt.diagnostics()
            assert 0 < stats["spread"] < 1e-4 and stats["collapsed"] == 0.0
            spreads.append(stats["spread"])
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert spreads == sorted(spreads) and len(set(spreads)) == 3  # growing: separating
    assert opt.diagnostics(collapse_threshold=1.0)["collapsed"] == 0.0  # below 1.0, but grown since the last call
    with pytest.warns(mkopt.KernelCollapseWarning, match="collapsed"):  # no step since: not moving apart
        assert opt.diagnostics(collapse_threshold=1.0)["collapsed"] == 1.0
    _, uniform = trained("uniform", 3)
    with pytest.warns(mkopt.KernelCollapseWarning, match="collapsed"):
        stats = uniform.diagnostics()
    assert stats["spread"] < 1e-6 and stats["collapsed"] == 1.0
    copies = uniform.model[0].parametrizations.weight.original
    assert torch.equal(copies[0], copies[1]) and torch.equal(copies[0], copies[2])
