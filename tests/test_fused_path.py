"""The fused path (MK inside the optimizer) against the generic path and torch's own optimizers."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mkopt
from mkopt import native
from mkopt.sampling import counter_dirichlet_

pytestmark = pytest.mark.skipif(not native.available(), reason=f"fused kernels unavailable: {native.unavailable_reason()}")

SGD_VARIANTS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "dampening": dict(lr=0.1, momentum=0.8, dampening=0.3),
    "weight-decay": dict(lr=0.1, weight_decay=5e-2),
    "maximize": dict(lr=0.05, momentum=0.5, maximize=True),
}
ADAM_VARIANTS = {
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adam-amsgrad-wd": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adamw-amsgrad-maximize": (torch.optim.AdamW, dict(lr=1e-3, amsgrad=True, maximize=True, betas=(0.8, 0.99))),
}
CASES = {f"sgd-{k}": (torch.optim.SGD, v) for k, v in SGD_VARIANTS.items()} | ADAM_VARIANTS


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


def batches(dtype, steps, micro=2):
    g = torch.Generator().manual_seed(1)
    return [[(torch.randn(16, 6, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g)) for _ in range(micro)] for _ in range(steps)]


def train(path, cls, kwargs, *, e=3, dtype=torch.float64, steps=20, clip=0.5, schedule=True, tensor_lr=False, **mk):
    model = make_model(dtype)
    kwargs = dict(kwargs)
    if tensor_lr:
        kwargs["lr"] = torch.tensor(kwargs["lr"])
    opt = mkopt.MKOptimizer(cls, model, e=e, path=path, **mk, **kwargs)
    assert opt.path == path
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5) if schedule else None
    for micro in batches(dtype, steps):
        opt.zero_grad()
        for x, y in micro:  # gradient accumulation over two micro-batches
            (F.cross_entropy(model(x), y) / len(micro)).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
    return model, opt


def run_steps(model, opt, steps, dtype=torch.float64):
    """Plain training steps on one micro-batch each."""
    for micro in batches(dtype, steps, micro=1):
        opt.zero_grad()
        F.cross_entropy(model(micro[0][0]), micro[0][1]).backward()
        opt.step()


def assert_close_states(fused, generic, rtol):
    (model_f, opt_f), (model_g, opt_g) = fused, generic
    a, b = model_f.state_dict(), model_g.state_dict()
    assert list(a) == list(b)
    for key in a:
        scale = b[key].double().abs().max().clamp_min(1e-12)
        assert float((a[key].double() - b[key].double()).abs().max() / scale) <= rtol, key
    sa, sb = opt_f.state_dict()["state"], opt_g.state_dict()["state"]
    assert sorted(sa) == sorted(sb)
    for index in sa:
        assert sorted(sa[index]) == sorted(sb[index])
        for name, value in sa[index].items():
            other = sb[index][name]
            scale = other.double().abs().max().clamp_min(1e-12)
            assert float((value.double() - other.double()).abs().max() / scale) <= rtol, (index, name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_equals_generic_float64_with_clipping_schedule_and_accumulation(case):
    cls, kwargs = CASES[case]
    assert_close_states(train("fused", cls, kwargs), train("generic", cls, kwargs), rtol=1e-6)


@pytest.mark.parametrize("case", ["sgd-momentum", "adam", "adamw"])
def test_fused_equals_generic_with_lr_as_a_tensor(case):
    cls, kwargs = CASES[case]
    assert_close_states(train("fused", cls, kwargs, tensor_lr=True), train("generic", cls, kwargs, tensor_lr=True), rtol=1e-6)


@pytest.mark.parametrize("e", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("case", ["sgd-nesterov", "adam-amsgrad-wd"])
def test_fused_equals_generic_for_every_e(case, e):
    cls, kwargs = CASES[case]
    assert_close_states(train("fused", cls, kwargs, e=e, steps=8), train("generic", cls, kwargs, e=e, steps=8), rtol=1e-6)


@pytest.mark.parametrize("case", ["sgd-momentum", "adamw"])
def test_fused_equals_generic_in_float32(case):
    cls, kwargs = CASES[case]
    fused = train("fused", cls, kwargs, dtype=torch.float32, steps=10)
    assert_close_states(fused, train("generic", cls, kwargs, dtype=torch.float32, steps=10), rtol=2e-4)


@pytest.mark.parametrize("case", ["sgd-momentum", "adam"])
def test_fused_tracks_generic_in_bfloat16(case):
    # bf16 rounds every stored state; the fused kernel rounds only on stores, torch after every op
    cls, kwargs = CASES[case]
    fused = train("fused", cls, kwargs, dtype=torch.bfloat16, steps=3, clip=None)
    generic = train("generic", cls, kwargs, dtype=torch.bfloat16, steps=3, clip=None)
    for a, b in zip(fused[0].state_dict().values(), generic[0].state_dict().values()):
        assert float((a.float() - b.float()).abs().max()) <= 0.03 * float(b.float().abs().max())


def test_uniform_probabilities_and_lr_compensation_match_generic():
    cls, kwargs = CASES["sgd-momentum"]
    for mk in (dict(probabilities="uniform"), dict(lr_compensation=True)):
        assert_close_states(train("fused", cls, kwargs, **mk), train("generic", cls, kwargs, **mk), rtol=1e-6)


@pytest.mark.parametrize("case", ["sgd-nesterov", "adam-amsgrad-wd", "adamw"])
def test_e1_fused_reproduces_the_torch_optimizer(case):
    cls, kwargs = CASES[case]
    mk_model, _ = train("fused", cls, kwargs, e=1, schedule=False)
    model = make_model()
    opt = cls(model.parameters(), **kwargs)
    for micro in batches(torch.float64, 20):
        opt.zero_grad()
        for x, y in micro:
            (F.cross_entropy(model(x), y) / len(micro)).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
    deployed = mkopt.deploy(mk_model)
    for a, b in zip(deployed.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_proxy_gradient_has_the_copies_gradient_norm_and_is_n_sized():
    model = make_model()
    fused = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, path="fused")
    twin = make_model()
    generic = mkopt.MKOptimizer(torch.optim.SGD, twin, e=3, lr=0.1, path="generic")
    x, y = batches(torch.float64, 1)[0][0]
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(twin(x), y).backward()
    for layer, other in zip(model[::2], twin[::2]):
        mk = layer.parametrizations.weight[0]
        assert mk.proxy.grad.shape == layer.weight.shape  # N-sized, never e * N
        assert layer.parametrizations.weight.original.grad is None
        norm = torch.linalg.vector_norm(mk.proxy.grad)
        torch.testing.assert_close(norm, torch.linalg.vector_norm(other.parametrizations.weight.original.grad), rtol=1e-12, atol=0)
    grads_f = [p.grad for p in model.parameters() if p.grad is not None]
    grads_g = [p.grad for p in twin.parameters() if p.grad is not None]
    assert sum(g.numel() for g in grads_f) * 3 > sum(g.numel() for g in grads_g)  # e * N only on the generic path
    del fused, generic


def test_the_training_forward_reads_the_mixture_of_this_steps_p():
    model = make_model()
    opt = mkopt.MKOptimizer(torch.optim.Adam, model, e=4, lr=1e-2, path="fused")
    for _ in range(3):
        run_steps(model, opt, 1)
        for layer in model[::2]:
            mk = layer.parametrizations.weight[0]
            stack = layer.parametrizations.weight.original
            torch.testing.assert_close(layer.weight, (mk.p * stack).sum(0), rtol=1e-14, atol=1e-15)
    model.eval()
    torch.testing.assert_close(model[0].weight, model[0].parametrizations.weight.original.mean(0), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("e", [1, 2, 3, 4, 5, 8, 9, 16])
def test_native_p_stream_is_bit_identical_to_the_sampler(dtype, e):
    for offset in (0, 777_777):
        ours = native.probabilities(e, 1000, key=987654321987, offset=offset, dtype=dtype)
        reference = counter_dirichlet_(torch.empty(e, 1000, dtype=dtype), key=987654321987, compiled=False, offset=offset)
        assert torch.equal(ours, reference)


def test_grad_scaler_skips_an_overflowing_step_untouched():
    model = make_model(torch.float32)
    opt = mkopt.MKOptimizer(torch.optim.Adam, model, e=3, lr=1e-2, path="fused")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = batches(torch.float32, 1)[0][0]
    for _ in range(2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert opt.mk_step == 2
    before = copy.deepcopy((model.state_dict(), opt.state_dict(), [p.detach().clone() for p in model.parameters()]))
    p_before = model[0].parametrizations.weight[0].p
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.mk_step == 2
    for a, b in zip(model.state_dict().values(), before[0].values()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), before[2]):
        assert torch.equal(a, b)
    state = opt.state_dict()["state"]
    for index, entry in before[1]["state"].items():
        for name, value in entry.items():
            assert torch.equal(state[index][name], value)
    assert torch.equal(model[0].parametrizations.weight[0].p, p_before)


def test_model_state_dict_keeps_its_keys_and_loading_rewrites_the_weights():
    model = make_model()
    twin = make_model()
    mkopt.MKOptimizer(torch.optim.SGD, twin, e=3, lr=0.1, path="generic")
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, momentum=0.9, path="fused")
    assert list(model.state_dict()) == list(twin.state_dict())
    run_steps(model, opt, 3)
    saved = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.load_state_dict(saved)  # strict: no proxy key missing or unexpected
    stack = model[0].parametrizations.weight.original
    torch.testing.assert_close(model[0].weight, (model[0].parametrizations.weight[0].p * stack).sum(0), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("saved_on,resumed_on", [("fused", "fused"), ("generic", "fused"), ("fused", "generic")])
def test_checkpoint_resumes_across_paths(saved_on, resumed_on):
    cls, kwargs = CASES["adam-amsgrad-wd"]
    data = batches(torch.float64, 10, micro=1)

    def run(model, opt, steps):
        for micro in steps:
            opt.zero_grad()
            F.cross_entropy(model(micro[0][0]), micro[0][1]).backward()
            opt.step()

    model = make_model()
    opt = mkopt.MKOptimizer(cls, model, e=3, path=saved_on, **kwargs)
    run(model, opt, data[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    run(model, opt, data[5:])
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    resumed = make_model(seed=3)
    opt2 = mkopt.MKOptimizer(cls, resumed, e=3, path=resumed_on, **kwargs)
    opt2.load_state_dict(checkpoint["opt"])
    resumed.load_state_dict(checkpoint["model"])
    run(resumed, opt2, data[5:])
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        if saved_on == resumed_on:
            assert torch.equal(a, b)  # bit-identical within a path
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_deploy_and_collapse_give_plain_trainable_models():
    model = make_model()
    opt = mkopt.MKOptimizer(torch.optim.AdamW, model, e=3, lr=1e-2, path="fused")
    run_steps(model, opt, 2)
    x = torch.randn(5, 6, dtype=torch.float64)
    plain = mkopt.deploy(model.eval())
    assert list(plain.state_dict()) == list(make_model().state_dict())
    assert all(p.requires_grad for p in plain.parameters())
    assert torch.equal(plain(x), model(x))
    collapsed = opt.collapse()
    assert all(p.requires_grad for p in collapsed.parameters())
    assert sum(p.numel() for p in collapsed.parameters()) == sum(p.numel() for p in make_model().parameters())


def test_path_choice_and_its_errors():
    assert mkopt.MKOptimizer(torch.optim.RMSprop, make_model(), e=3, lr=1e-3).path == "generic"
    assert mkopt.MKOptimizer(torch.optim.SGD, make_model(), e=3, lr=1e-3).path == "fused"
    with pytest.raises(ValueError, match=r"path='fused' cannot run here: RMSprop has no fused MK kernel"):
        mkopt.MKOptimizer(torch.optim.RMSprop, make_model(), e=3, lr=1e-3, path="fused")
    assert mkopt.MKOptimizer(torch.optim.SGD, make_model(), e=3, lr=1e-3, probabilities="adv-mk").path == "fused"
    with pytest.raises(ValueError, match=r"path='fast' is unknown"):
        mkopt.MKOptimizer(torch.optim.SGD, make_model(), e=3, lr=1e-3, path="fast")
    with pytest.raises(ValueError, match=r"float16"):
        mkopt.MKOptimizer(torch.optim.SGD, make_model(torch.float16), e=3, lr=1e-3, path="fused")


def test_without_a_compiler_auto_takes_the_generic_path_and_warns(monkeypatch):
    import mkopt.optimizer as optimizer_module

    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", "no C++ compiler found (set CXX, or install g++)")
    monkeypatch.setattr(optimizer_module, "_warned_without_native", False)
    with pytest.warns(RuntimeWarning, match="generic path: the fused CPU kernels could not be built"):
        opt = mkopt.MKOptimizer(torch.optim.SGD, make_model(), e=3, lr=0.1)
    assert opt.path == "generic"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        mkopt.MKOptimizer(torch.optim.SGD, make_model(), e=3, lr=0.1)


def test_unused_kernel_keeps_copies_and_state_but_follows_p():
    model = make_model()
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, momentum=0.9, path="fused")
    x, y = batches(torch.float64, 1)[0][0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    stack = model[4].parametrizations.weight.original.clone()
    buffer = opt.state[model[4].parametrizations.weight[0].proxy]["momentum_buffer"].clone()
    opt.zero_grad()
    F.cross_entropy(model[:4](x)[:, :3], y).backward()  # the last layer gets no gradient
    opt.step()
    assert torch.equal(model[4].parametrizations.weight.original, stack)
    assert torch.equal(opt.state[model[4].parametrizations.weight[0].proxy]["momentum_buffer"], buffer)
    torch.testing.assert_close(model[4].weight, (model[4].parametrizations.weight[0].p * stack).sum(0), rtol=1e-14, atol=1e-15)


ADVERSARIAL_CASES = [("adv-mk", "replicate", 100.0), ("adversarial", "independent", 30.0), ("adv-mk", "independent", 1e4)]


@pytest.mark.parametrize("mode,init,eps", ADVERSARIAL_CASES)
@pytest.mark.parametrize("case", ["sgd-nesterov", "adamw"])
def test_adversarial_modes_fused_equal_generic_with_the_closure(case, mode, init, eps):
    cls, kwargs = CASES[case]
    runs = {}
    for path in ("fused", "generic"):
        model = make_model()
        opt = mkopt.MKOptimizer(cls, model, e=3, path=path, probabilities=mode, init=init, adversarial_eps=eps, **kwargs)
        entropies = []
        for micro in batches(torch.float64, 8, micro=1):
            x, y = micro[0]

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            entropies.append(opt.last_p_entropy)
        runs[path] = (model, opt, entropies)
    assert_close_states(runs["fused"][:2], runs["generic"][:2], rtol=1e-6)
    assert runs["fused"][2] == pytest.approx(runs["generic"][2], rel=1e-9)  # small tensors: the estimate sees every element
    assert min(runs["fused"][2]) < 0.999  # the ascent moved p away from uniform


def test_adversarial_fused_two_call_form_with_grad_scaler_matches_generic():
    runs = {}
    for path in ("fused", "generic"):
        model = make_model(torch.float32)
        opt = mkopt.MKOptimizer(torch.optim.Adam, model, e=3, path=path, probabilities="adv-mk", adversarial_eps=1e4, lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
        for micro in batches(torch.float32, 5, micro=1):
            x, y = micro[0]
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()  # probe at the mean
            opt.ascend_probabilities(scaler)
            layer = model[0]
            torch.testing.assert_close(layer.weight, (layer.parametrizations.weight[0].p * layer.parametrizations.weight.original).sum(0))
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        assert opt.mk_step == 5
        runs[path] = (model, opt)
    assert_close_states(runs["fused"], runs["generic"], rtol=2e-4)


def test_adversarial_fused_probe_reads_the_mean_and_step_needs_the_ascent():
    model = make_model()
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, path="fused", probabilities="adv-mk", lr=0.1)
    x, y = batches(torch.float64, 1)[0][0]
    opt.zero_grad()
    stack = model[0].parametrizations.weight.original
    torch.testing.assert_close(model[0].weight, stack.mean(0), rtol=1e-15, atol=1e-15)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="takes two passes per step"):
        opt.step()


def test_a_registered_mode_combining_known_facts_runs_on_both_paths():
    from mkopt.modes import _REGISTRY, ProbabilityMode, register_probability_mode

    mode = register_probability_mode(ProbabilityMode("uniform-test", uniform=True))
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_probability_mode(mode)
        runs = [train(path, torch.optim.SGD, dict(lr=0.1, momentum=0.9), probabilities="uniform-test", steps=4) for path in ("fused", "generic")]
        assert_close_states(*runs, rtol=1e-9)
        reference = train("fused", torch.optim.SGD, dict(lr=0.1, momentum=0.9), probabilities="uniform", steps=4)
        for a, b in zip(runs[0][0].state_dict().values(), reference[0].state_dict().values()):
            assert torch.equal(a, b)
    finally:
        del _REGISTRY["uniform-test"]
    with pytest.raises(ValueError, match=r"probabilities='uniform-test' is unknown: use one of \('dirichlet'"):
        mkopt.MKOptimizer(torch.optim.SGD, make_model(), e=3, lr=0.1, probabilities="uniform-test")


def test_native_build_is_cached_and_safe_when_ranks_build_at_once(tmp_path):
    """Two processes build into one empty cache at once: both load a complete library, one file remains."""
    import os
    import subprocess
    import sys
    import time

    script = (
        "import torch, time; from mkopt import native; t = time.monotonic(); assert native.available(), native.unavailable_reason(); "
        "p = native.probabilities(3, 10, key=1); assert torch.allclose(p.sum(0), torch.ones(10)); print(time.monotonic() - t)"
    )
    env = {**os.environ, "MKOPT_CACHE_DIR": str(tmp_path)}
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert max(float(out.strip().splitlines()[-1]) for out, _ in outputs) < 60  # first build, two at once on 2 cores
    assert [path.suffix for path in tmp_path.iterdir()] == [".so"]  # no scratch files left behind
    again = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and float(again.stdout.strip().splitlines()[-1]) < 5  # cached: no rebuild
    assert time.monotonic() - started < 240


@pytest.mark.slow
def test_torch_compile_traces_the_fused_path_in_one_graph_without_recompiling():
    """fullgraph=True: no graph break at the proxy's gradient op; the step's key is data (no recompiles)."""
    model = make_model(torch.float32)
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, momentum=0.9, path="fused")
    compiled = torch.compile(model, fullgraph=True)
    reference = make_model(torch.float32)
    ref_opt = mkopt.MKOptimizer(torch.optim.SGD, reference, e=3, lr=0.1, momentum=0.9, path="fused")
    for step, micro in enumerate(batches(torch.float32, 5, micro=1)):
        x, y = micro[0]
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            opt.zero_grad()
            F.cross_entropy(compiled(x), y).backward()
        opt.step()
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_native_build_falls_back_to_plain_libm_without_libmvec(tmp_path):
    import os
    import subprocess
    import sys

    script = (
        "from mkopt import native; native._MVEC = ['-DMK_WITH_MVEC', '-lno_such_vector_math_library']; "
        "assert native.available(), native.unavailable_reason(); print(native.probabilities(3, 4, key=5).sum(0).tolist())"
    )
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, "MKOPT_CACHE_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(tmp_path.glob("*.so"))) == 1
