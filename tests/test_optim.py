"""mkopt.optim (the params form) and the framework-facing surface of both forms: eval()/train(),
torch-layout state_dicts, DCP, device/dtype moves, expand() then MKOptimizer()."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mkopt

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
}


def net(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


def batches(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def train(model, opt, data, between=None):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if between is not None:
            between()


def copies_of(opt, param):
    return dict(opt.named_copies())[opt._name(param)]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_params_form_equals_model_form_bit_for_bit(name):
    """Same targets in the same order: the same p stream and the same fused kernels, so the same bits."""
    cls, kwargs = OPTIMIZERS[name]
    a, b = net(), net()
    model_form = mkopt.MKOptimizer(cls, a, e=3, **kwargs)
    params_form = mkopt.optim.wrap(cls)(b.parameters(), e=3, **kwargs)
    assert model_form.path == params_form.path == "fused"
    data = batches(6)
    train(a, model_form, data)
    train(b, params_form, data)
    for i in (0, 2):
        assert torch.equal(a[i].parametrizations.weight.original, copies_of(params_form, b[i].weight))
        assert torch.equal(a[i].bias, b[i].bias)
    a.eval()
    params_form.eval()
    x = data[0][0]
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_generic_params_form_matches_fused(name):
    cls, kwargs = OPTIMIZERS[name]
    a, b = net(torch.float64), net(torch.float64)
    fused = mkopt.optim.wrap(cls)(a.parameters(), e=4, **kwargs)
    generic = mkopt.optim.wrap(cls)(b.parameters(), e=4, path="generic", **kwargs)
    assert (fused.path, generic.path) == ("fused", "generic")
    data = batches(10, torch.float64)
    train(a, fused, data)
    train(b, generic, data)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-9, atol=1e-12)
    sa, sb = fused.state_dict()["state"], generic.state_dict()["state"]
    assert sorted(sa) == sorted(sb)
    for index in sa:
        assert sorted(sa[index]) == sorted(sb[index])
        for key, value in sa[index].items():
            assert torch.allclose(value.double(), sb[index][key].double(), rtol=1e-9, atol=1e-12), (index, key)


def test_wrap_runs_any_optimizer_on_the_generic_path():
    RMSprop = mkopt.optim.wrap(torch.optim.RMSprop)
    assert mkopt.optim.wrap(torch.optim.RMSprop) is RMSprop
    model = net(torch.float64)
    reference = net(torch.float64)
    opt = RMSprop(model.parameters(), lr=1e-3, e=3)
    model_form = mkopt.MKOptimizer(torch.optim.RMSprop, reference, e=3, lr=1e-3)
    assert opt.path == model_form.path == "generic"
    data = batches(5, torch.float64)
    train(model, opt, data)
    train(reference, model_form, data)
    for i in (0, 2):
        assert torch.allclose(copies_of(opt, model[i].weight), reference[i].parametrizations.weight.original, rtol=1e-10)
    assert set(opt.state_dict()["state"][0]) == {"copies", "step", "square_avg"}


@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize("form", ["params", "model"])
def test_lemma_4_3_one_sgd_step_then_eval(form, path):
    """From a replicated start W0 every p gives copies W0 - lr p_k g0, whose mean is W0 - (lr/e) g0."""
    model = net(torch.float64)
    w0 = model[0].weight.detach().clone()
    x, y = batches(1, torch.float64)[0]
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y).backward()
    g0 = reference[0].weight.grad
    e, lr = 3, 0.1
    if form == "params":
        opt = mkopt.optim.SGD(model.parameters(), lr=lr, e=e, path=path)
    else:
        opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=e, lr=lr, path=path)
    train(model, opt, [(x, y)])
    opt.eval()
    assert torch.allclose(model[0].weight, w0 - (lr / e) * g0, rtol=0, atol=1e-15)
    opt.train()


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_eval_train_round_trips_change_no_bit(path):
    a, b = net(), net()
    opt_a = mkopt.optim.Adam(a.parameters(), lr=1e-2, e=3, path=path)
    opt_b = mkopt.optim.Adam(b.parameters(), lr=1e-2, e=3, path=path)

    def round_trip():
        opt_b.eval()
        opt_b.eval()  # idempotent
        weight = b[0].weight.clone()
        assert torch.equal(weight, copies_of(opt_b, b[0].weight).mean(0))
        opt_b.train()
        opt_b.train()

    data = batches(5)
    train(a, opt_a, data)
    train(b, opt_b, data, between=round_trip)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    opt_b.eval()
    with pytest.raises(RuntimeError, match=r"eval mode .*opt.train\(\)"):
        opt_b.step()


def test_model_form_eval_reads_the_mean_in_training_mode():
    model = net()
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1)
    train(model, opt, batches(2))
    x = batches(1)[0][0]
    opt.eval()
    at_mean = model(x)
    plain = mkopt.deploy(copy.deepcopy(model))
    assert torch.equal(at_mean, plain(x))
    opt.train()
    assert not torch.equal(model(x), at_mean)


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_params_form_state_dict_resumes_bit_identically(path):
    data = batches(8)
    a = net()
    opt_a = mkopt.optim.AdamW(a.parameters(), lr=1e-2, e=3, path=path)
    train(a, opt_a, data)
    b = net(seed=5)  # other weights: the optimizer state carries the copies
    opt_b = mkopt.optim.AdamW(b.parameters(), lr=1e-2, e=3, path=path)
    train(a, opt_a, data[:4])
    saved_model, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(opt_a.state_dict())
    train(a, opt_a, data[4:])
    b.load_state_dict(saved_model)
    opt_b.load_state_dict(saved_opt)
    assert opt_b.mk_step == 12
    train(b, opt_b, data[4:])
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_state_dict_layout_and_refusals():
    model = net()
    opt = mkopt.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, e=2)
    train(model, opt, batches(1))
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "mkopt"}
    assert sd["mkopt"]["step"] == 1 and all(g["mkopt"]["step"] == 1 for g in sd["param_groups"])
    assert set(sd["state"][0]) == {"copies", "momentum_buffer"} and sd["state"][0]["copies"].shape == (2, 12, 6)
    plain = torch.optim.SGD(net().parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="no 'mkopt' entry"):
        opt.load_state_dict(plain.state_dict())
    other = mkopt.optim.SGD(net().parameters(), lr=0.1, momentum=0.9, e=3)
    with pytest.raises(ValueError, match="saved with e=2 but this optimizer has e=3"):
        other.load_state_dict(sd)


def test_model_form_reads_its_older_state_dict_layout():
    model = net()
    opt = mkopt.MKOptimizer(torch.optim.Adam, model, e=3, lr=1e-2)
    train(model, opt, batches(2))
    new = copy.deepcopy(opt.state_dict())  # torch's load_state_dict keeps the tensors it is given
    old = {"optimizer": {"state": new["state"], "param_groups": [{k: v for k, v in g.items() if k != "mkopt"} for g in new["param_groups"]]},
           "mkopt": new["mkopt"]}  # fmt: skip
    twin = copy.deepcopy(model)
    opt_twin = mkopt.MKOptimizer(torch.optim.Adam, twin, e=3, lr=1e-2)
    twin.load_state_dict(model.state_dict())
    opt_twin.load_state_dict(old)
    data = batches(3)
    train(model, opt, data)
    train(twin, opt_twin, data)
    for pa, pb in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(pa, pb)


def test_clipping_sees_the_copies_gradient_norm():
    """||W.grad|| = ||(p_k dL/dW)_k||: the norm the generic model form's copies have."""
    a, b = net(torch.float64), net(torch.float64)
    alive = [mkopt.optim.SGD(a.parameters(), lr=0.1, e=3), mkopt.MKOptimizer(torch.optim.SGD, b, e=3, lr=0.1, path="generic")]
    x, y = batches(1, torch.float64)[0]
    F.cross_entropy(a(x), y).backward()
    F.cross_entropy(b(x), y).backward()
    norm_a = torch.nn.utils.clip_grad_norm_(a.parameters(), 1e9)
    norm_b = torch.nn.utils.clip_grad_norm_(b.parameters(), 1e9)
    assert torch.allclose(norm_a, norm_b, rtol=1e-12) and len(alive) == 2  # the gradient hook lives with its optimizer


def test_grad_scaler_skips_an_overflowing_step():
    model = net()
    opt = mkopt.optim.Adam(model.parameters(), lr=1e-2, e=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = batches(1)[0]
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.mk_step == 1
    for a, b in zip(model.parameters(), before[1]):
        assert torch.equal(a, b)
    for index, entry in before[0]["state"].items():
        for key, value in entry.items():
            assert torch.equal(opt.state_dict()["state"][index][key], value)


def test_closure_is_run_like_torch_optimizers():
    model = net()
    opt = mkopt.optim.SGD(model.parameters(), lr=0.1, e=2)
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and opt.mk_step == 1


def test_copies_follow_a_dtype_move_after_building():
    model = net()
    opt = mkopt.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, e=3)
    train(model, opt, batches(2))
    model.to(torch.float64)
    train(model, opt, batches(2, torch.float64))
    state = opt.state[model[0].weight]
    assert state["copies"].dtype == state["momentum_buffer"].dtype == torch.float64
    assert opt.mk_step == 4
    opt.eval()
    assert torch.equal(model[0].weight, state["copies"].mean(0))


def test_meta_initialization_then_to_empty():
    with torch.device("meta"):
        model = net()
    model.to_empty(device="cpu")
    for module in model:
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    opt = mkopt.optim.SGD(model.parameters(), lr=0.1, e=3)
    train(model, opt, batches(1))
    meta = nn.Linear(3, 3, device="meta")
    meta.to_empty(device="cpu")
    nn.init.zeros_(meta.weight)
    mkopt.MKOptimizer(torch.optim.SGD, meta, e=2, lr=0.1)
    assert meta.parametrizations.weight.original.shape == (2, 3, 3)


def test_expand_then_mkoptimizer_trains_the_expansion():
    a, b = net(), net()
    mkopt.expand(a, e=4, seed=3)
    opt_a = mkopt.MKOptimizer(torch.optim.Adam, a, lr=1e-2)
    opt_b = mkopt.MKOptimizer(torch.optim.Adam, b, e=4, seed=3, lr=1e-2)
    assert opt_a.e == 4 and opt_a.path == "fused"
    data = batches(4)
    train(a, opt_a, data)
    train(b, opt_b, data)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    c = net()
    mkopt.expand(c, e=2)
    with pytest.raises(ValueError, match="expanded with e=2 but MKOptimizer got e=3"):
        mkopt.MKOptimizer(torch.optim.SGD, c, e=3, lr=0.1)


def test_a_plain_optimizer_over_an_expanded_model_warns():
    model = net()
    mkopt.expand(model, e=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batches(1)[0]
    with pytest.warns(RuntimeWarning, match="no MKOptimizer drives it: p is never redrawn"):
        F.cross_entropy(model(x), y).backward()
    opt.step()


def test_targets_and_refusals():
    model = net()
    frozen = nn.Linear(2, 2)
    frozen.weight.requires_grad_(False)
    opt = mkopt.optim.SGD([*model.parameters(), frozen.weight], lr=0.1, e=2)
    assert [tuple(p.shape) for p in opt.targets()] == [(12, 6), (3, 12)]
    del opt  # one live MK optimizer per parameter
    only_first = mkopt.optim.SGD(model.parameters(), lr=0.1, e=2, targets=[model[0].weight])
    assert only_first.targets() == [model[0].weight]
    other = net()
    by_predicate = mkopt.optim.SGD(other.parameters(), lr=0.1, e=2, targets=lambda p: p.dim() == 1)
    assert [tuple(p.shape) for p in by_predicate.targets()] == [(12,), (3,)]
    with pytest.raises(ValueError, match="adversarial modes"):
        mkopt.optim.SGD(model.parameters(), lr=0.1, probabilities="adv-mk")
    with pytest.raises(ValueError, match="init='independent'"):
        mkopt.optim.SGD(model.parameters(), lr=0.1, init="independent")
    with pytest.raises(ValueError, match="e=0 is not an expansion factor"):
        mkopt.optim.SGD(model.parameters(), lr=0.1, e=0)
    with pytest.raises(TypeError, match="base class"):
        mkopt.optim.MKParamOptimizer(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not among the optimizer's params"):
        mkopt.optim.SGD(model[0].parameters(), lr=0.1, targets=[model[2].weight])


def _dcp_round_trip(tmp_path, build):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        data = batches(6)
        model, opt = build(0)
        train(model, opt, data[:3])
        model_sd, opt_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=str(tmp_path / "ckpt"))
        train(model, opt, data[3:])
        fresh, fresh_opt = build(7)
        model_sd, opt_sd = get_state_dict(fresh, fresh_opt)
        loaded = {"model": model_sd, "optim": opt_sd}
        dcp.load(loaded, checkpoint_id=str(tmp_path / "ckpt"))
        set_state_dict(fresh, fresh_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        assert fresh_opt.mk_step == 3
        train(fresh, fresh_opt, data[3:])
        for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
            assert torch.equal(a, b), name
    finally:
        dist.destroy_process_group()


def test_dcp_round_trip_params_form(tmp_path):
    def build(seed):
        model = net(seed=seed)
        return model, mkopt.optim.Adam(model.parameters(), lr=1e-2, e=3)

    _dcp_round_trip(tmp_path, build)


def test_dcp_round_trip_model_form(tmp_path):
    def build(seed):
        model = net(seed=seed)
        return model, mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.05, momentum=0.9)

    _dcp_round_trip(tmp_path, build)


@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize("form", ["params", "model"])
def test_p_and_the_state_follow_a_move_after_building(form, path):
    """model.to(float64) after the optimizer: p is regenerated for the new placement, Adam's state follows."""
    model = net()
    if form == "params":
        opt = mkopt.optim.Adam(model.parameters(), lr=1e-2, e=3, path=path)
    else:
        opt = mkopt.MKOptimizer(torch.optim.Adam, model, e=3, lr=1e-2, path=path)
    train(model, opt, batches(2))
    model.to(torch.float64)
    train(model, opt, batches(3, torch.float64))
    assert opt.mk_step == 5
    states = [v for s in opt.state_dict()["state"].values() for v in s.values() if v.dim() > 0]
    assert states and all(v.dtype == torch.float64 for v in states)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_a_scheduler_drives_both_paths(path):
    """Schedulers edit the user-facing groups; the generic path's inner optimizer follows every step."""
    model = net(torch.float64)
    opt = mkopt.optim.SGD(model.parameters(), lr=0.1, momentum=0.0, e=3, path=path)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step == 0 else 0.0)
    train(model, opt, batches(1, torch.float64))
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    frozen = [c.clone() for _, c in opt.named_copies()] + [model[0].bias.detach().clone()]
    train(model, opt, batches(2, torch.float64))
    for before, (_, after) in zip(frozen, opt.named_copies()):
        assert torch.equal(before, after)
    assert torch.equal(frozen[-1], model[0].bias)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_triton_params_form_trains_like_the_cpu_kernels(name):
    """The params form through the GPU path's Triton kernels (interpreted on CPU) = through the C++ kernels."""
    mk_triton = pytest.importorskip("mkopt.triton")
    if not mk_triton.available():
        pytest.skip(f"Triton cannot run here: {mk_triton.unavailable_reason()}")
    cls, kwargs = OPTIMIZERS[name]
    a, b = net(torch.float64), net(torch.float64)
    cpu = mkopt.optim.wrap(cls)(a.parameters(), e=3, **kwargs)
    data = batches(3, torch.float64)
    train(a, cpu, data)
    with mk_triton.run_on_cpu():
        gpu_code = mkopt.optim.wrap(cls)(b.parameters(), e=3, **kwargs)
        train(b, gpu_code, data)
        gpu_code.eval()
    cpu.eval()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-12, atol=1e-14)


def test_parameter_groups_equal_the_model_forms_groups():
    """Per-group settings (no weight decay on biases) reach the copies exactly as in the model form."""
    a, b = net(), net()

    def groups(model):
        return [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
                {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0, "lr": 5e-3}]  # fmt: skip

    model_form = mkopt.MKOptimizer(torch.optim.AdamW, a, e=3, lr=1e-2, params=groups(a))
    params_form = mkopt.optim.AdamW(groups(b), lr=1e-2, e=3)
    data = batches(4)
    train(a, model_form, data)
    train(b, params_form, data)
    assert [g["weight_decay"] for g in params_form.param_groups] == [0.1, 0.0]
    for i in (0, 2):
        assert torch.equal(a[i].parametrizations.weight.original, copies_of(params_form, b[i].weight))
        assert torch.equal(a[i].bias, b[i].bias)


def test_weights_loaded_after_building_are_adopted_before_the_first_step():
    """model.load_state_dict after building the optimizer (and DDP's broadcast): the copies replicate it."""
    pretrained = net(seed=3).state_dict()
    model = net()
    opt = mkopt.optim.SGD(model.parameters(), lr=0.0, e=3)
    model.load_state_dict(pretrained)
    train(model, opt, batches(1))
    opt.eval()
    for key, value in model.state_dict().items():
        assert torch.allclose(value, pretrained[key], atol=1e-7), key
    opt.train()
    with torch.no_grad():
        model[0].weight.add_(1.0)  # after training started: said once, then rewritten from the copies
    with pytest.warns(RuntimeWarning, match="written outside the optimizer after training started"):
        train(model, opt, batches(1))


def test_one_mk_optimizer_per_parameter_and_other_refusals():
    model = net()
    opt = mkopt.optim.SGD(model.parameters(), lr=0.1, e=2)
    with pytest.raises(ValueError, match="already belongs to a live mkopt optimizer"):
        mkopt.optim.Adam(model.parameters(), lr=0.1, e=2)
    del opt
    import gc

    gc.collect()
    mkopt.optim.Adam(model.parameters(), lr=0.1, e=2)  # the old one is gone: its hooks went with it
    with pytest.raises(ValueError, match="no parameter qualifies as an MK target"):
        mkopt.optim.SGD([nn.Parameter(torch.zeros(10))], lr=0.1)
    with pytest.raises(ValueError, match="needs a closure"):
        mkopt.optim.wrap(torch.optim.LBFGS)
    a = net()
    saved = mkopt.optim.SGD(a.parameters(), lr=0.1, e=2, lr_compensation=True).state_dict()
    with pytest.raises(ValueError, match="lr_compensation=True"):
        mkopt.optim.SGD(net().parameters(), lr=0.1, e=2).load_state_dict(saved)
