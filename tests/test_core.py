"""Expansion and training semantics: the mixture, its gradient, e=1 equivalence, groups, the store."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import mkopt
from zoo import TiedLM, mlp


def make_mlp(dtype=torch.float64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return mlp().to(dtype)


def batch(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 4, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)


@pytest.mark.parametrize("regenerated", [True, False], ids=["p-regenerated", "p-buffer"])
def test_training_mode_reads_the_mixture_and_eval_reads_the_mean(regenerated):
    model = make_mlp()
    # the generic path's two p storages (the fused path: tests/test_fused_path.py)
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, init="independent", sampler_compile=regenerated, path="generic")
    assert opt.expansion.sampler.regenerate is regenerated
    layer = model[1]
    stacked = layer.parametrizations.weight.original
    p = layer.parametrizations.weight[0].p
    assert stacked.shape == (3, 20, 12) and p.shape == (3, 20, 12)
    assert not torch.equal(stacked[0], stacked[1])
    torch.testing.assert_close(layer.weight, (p * stacked).sum(0), rtol=0, atol=1e-15)
    assert torch.equal(layer.weight, layer.weight)  # p is fixed within a step, however often W is read
    model.eval()
    assert torch.equal(layer.weight, stacked.mean(0))
    model.train()
    p_before = p.clone()
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.mk_step == 1
    p = layer.parametrizations.weight[0].p
    assert not torch.equal(p, p_before)  # the step drew the next p
    torch.testing.assert_close(layer.weight, (p * stacked).sum(0), rtol=0, atol=1e-15)


def test_regenerated_and_buffered_p_train_identically():
    """The fused kernels rebuild exactly the p the buffer holds: same p, same weights, step after step."""
    runs = []
    for regenerated in (True, False):
        model = make_mlp()
        opt = mkopt.MKOptimizer(torch.optim.Adam, model, e=3, lr=1e-2, seed=5, sampler_compile=regenerated, path="generic")
        ps = []
        for step in range(4):
            x, y = batch(seed=step)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            ps.append(model[1].parametrizations.weight[0].p.clone())
            opt.step()
        runs.append((ps, [t.detach().clone() for t in model.parameters()]))
    (ps_a, w_a), (ps_b, w_b) = runs
    assert all(torch.equal(a, b) for a, b in zip(ps_a, ps_b))
    for a, b in zip(w_a, w_b):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_graph_keeps_the_p_of_its_own_forward():
    """Regenerated p: backward after the next draw still uses the forward's p (the key is saved)."""
    model = make_mlp()
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, init="independent", sampler_compile=True, path="generic")
    layer = model[1]
    x, y = batch()
    with parametrize.cached():
        w = layer.weight
        w.retain_grad()
        loss = F.cross_entropy(model(x), y)
    p_forward = layer.parametrizations.weight[0].p.clone()
    opt.expansion.sampler.draw(7)  # what a premature opt.step() would do
    assert not torch.equal(layer.parametrizations.weight[0].p, p_forward)
    loss.backward()
    assert torch.equal(layer.parametrizations.weight.original.grad, p_forward * w.grad.unsqueeze(0))


def test_gradient_of_copy_k_is_p_k_times_grad_w_exactly():
    model = make_mlp()
    mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, init="independent", path="generic")
    x, y = batch()
    with parametrize.cached():  # one W per layer for the whole forward, so its .grad is dL/dW
        weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        for w in weights.values():
            w.retain_grad()
        F.cross_entropy(model(x), y).backward()
    for name, w in weights.items():
        layer = model.get_submodule(name)
        p = layer.parametrizations.weight[0].p
        stacked = layer.parametrizations.weight.original
        assert torch.equal(stacked.grad, p * w.grad.unsqueeze(0))


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
        (torch.optim.Adam, {"lr": 1e-2}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    ],
)
def test_e1_reproduces_the_plain_optimizer_bit_for_bit(cls, kwargs):
    # the generic path runs torch's own update; the fused kernel's arithmetic differs in the last bits
    # (tests/test_fused_path.py::test_e1_fused_reproduces_the_torch_optimizer checks it to 1e-9)
    plain, expanded = make_mlp(torch.float32), make_mlp(torch.float32)
    plain_opt = cls(plain.parameters(), **kwargs)
    mk_opt = mkopt.MKOptimizer(cls, expanded, e=1, path="generic", **kwargs)
    for step in range(20):
        x, y = batch(torch.float32, seed=step)
        losses = []
        for model, opt in ((plain, plain_opt), (expanded, mk_opt)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss)
        assert torch.equal(losses[0], losses[1]), f"step {step}"
    for (name, a), b in zip(plain.state_dict().items(), mkopt.deploy(expanded).state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_per_group_settings_are_kept(path):
    model = make_mlp()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups = [{"params": decay, "weight_decay": 0.5}, {"params": no_decay, "weight_decay": 0.0}]
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=2, params=groups, lr=0.1, path=path)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    assert opt.param_groups is opt.optimizer.param_groups
    if path == "generic":
        assert all(p.shape[0] == 2 for p in opt.param_groups[0]["params"])  # the same Parameters, now stacked
    else:  # each kernel's N-sized proxy stands in the group where its copies were
        assert [p.shape for p in opt.param_groups[0]["params"]] == [model[i].weight.shape for i in (1, 3, 5)]
    biases = [p.detach().clone() for p in no_decay]
    weights = [p.detach().clone() for p in decay]
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: only weight decay moves anything
    assert all(torch.equal(a, b) for a, b in zip(biases, no_decay))
    assert all(torch.allclose(b, a * (1 - 0.1 * 0.5)) for a, b in zip(weights, decay))


def test_store_holds_every_copy_without_copying():
    model = make_mlp()
    opt = mkopt.MKOptimizer(torch.optim.Adam, model, e=3, init="independent")
    store = opt.store
    assert tuple(store.batch_size) == (3,)
    stacked = model[1].parametrizations.weight.original
    assert store["1", "weight"].data_ptr() == stacked.data_ptr()
    assert torch.equal(store[2]["1", "weight"], stacked[2])
    plain = mkopt.deploy(model)
    mean = store.mean(0)
    for key in ("1", "3", "5"):
        assert torch.equal(mean[key, "weight"], plain.get_submodule(key).weight)


def test_replicate_init_leaves_the_function_unchanged_and_independent_draws_new_copies():
    reference = make_mlp()
    x, _ = batch()
    for init in ("replicate", "independent"):
        model = make_mlp()
        mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, init=init, seed=7)
        stacked = model[1].parametrizations.weight.original
        if init == "replicate":
            assert all(torch.equal(stacked[k], reference[1].weight) for k in range(3))
            # p sums to 1 (to rounding) on identical copies: the function is unchanged, train and eval
            torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-13)
            torch.testing.assert_close(model.eval()(x), reference(x), rtol=0, atol=1e-13)
        else:
            assert not torch.equal(stacked[0], stacked[1])
            bound = 1 / 12**0.5  # nn.Linear's kaiming-uniform bound for fan_in 12
            assert float(stacked.detach().abs().max()) <= bound
            again = make_mlp()
            mkopt.MKOptimizer(torch.optim.SGD, again, e=3, lr=0.1, init=init, seed=7)
            assert torch.equal(again[1].parametrizations.weight.original, stacked)


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_tied_weights_are_expanded_once_and_stay_tied(path):
    torch.manual_seed(0)
    model = TiedLM()
    opt = mkopt.MKOptimizer(torch.optim.Adam, model, e=3, lr=1e-2, path=path)
    stacked = model.embed.parametrizations.weight.original
    assert stacked is model.head.parametrizations.weight.original and stacked.shape == (3, 50, 16)
    stepped = stacked if path == "generic" else model.embed.parametrizations.weight[0].proxy
    assert stepped is model.head.parametrizations.weight[0].proxy or path == "generic"  # one shared proxy
    assert sum(1 for p in opt.param_groups[0]["params"] if p is stepped) == 1
    tokens = torch.randint(0, 50, (4, 6))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        opt.step()
    assert model.embed.parametrizations.weight.original is model.head.parametrizations.weight.original
    assert torch.equal(model.embed.weight, model.head.weight)  # both owners read one stack with one p
    plain = mkopt.deploy(model)
    assert plain.embed.weight is plain.head.weight
    assert list(plain.state_dict()) == list(TiedLM().state_dict())


def test_default_targets_are_the_kernels():
    model = TiedLM()
    targets = [t.name for t in mkopt.select_targets(model)]
    assert targets == ["embed.weight", "mix.weight"]  # head.weight is the tied embed.weight
    enc = nn.TransformerEncoderLayer(8, 2, 16)
    names = [t.name for t in mkopt.select_targets(enc)]
    assert names == ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"]


def test_user_targets_by_type_pattern_and_predicate():
    model = make_mlp()
    assert [t.name for t in mkopt.select_targets(model, [nn.Linear])] == ["1.weight", "3.weight", "5.weight"]
    assert [t.name for t in mkopt.select_targets(model, "5.*")] == ["5.weight", "5.bias"]
    chosen = mkopt.select_targets(model, lambda name, t, m: t.shape[0] == 20)
    assert [t.name for t in chosen] == ["1.weight", "1.bias"]
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=2, targets="5.*", lr=0.1)
    assert model[5].parametrizations.bias.original.shape == (2, 3)
    assert not parametrize.is_parametrized(model[1])
    assert len(opt.store.flatten_keys(".").keys()) == 2
