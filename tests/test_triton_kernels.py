"""The GPU path's Triton kernels, run on CPU tensors under Triton's interpreter, against the CPU kernels and references.

No GPU is needed: :mod:`mkopt.triton.launch` runs CPU tensors through an interpreted copy of the kernels
(the same source the GPU compiles; a slow test also compiles them for a CUDA target). Sizes are small
and not multiples of the block (the interpreter is slow); ``block=`` forces several blocks per tensor.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mkopt
from mkopt import native
from mkopt import triton as mk_triton
from mkopt.fused import _mix, _spread
from mkopt.sampling import counter_dirichlet_, splitmix64_constants

pytestmark = pytest.mark.skipif(not mk_triton.available(), reason=f"Triton unavailable: {mk_triton.unavailable_reason()}")
needs_native = pytest.mark.skipif(not native.available(), reason=f"the C++ kernels to compare with are unavailable: {native.unavailable_reason()}")

E_VALUES = [1, 2, 3, 4, 8, 16]
N, BLOCK = 300, 128  # three blocks, the last one ragged
KEY = 987654321987


def launch():
    return mk_triton.launch


def p_dtype_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- the p stream, mix, spread, scale ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("e", E_VALUES + [5])
def test_triton_p_stream_is_bit_identical_to_the_reference(dtype, e):
    for offset in (0, 2**40 + 3):  # a large offset: 64-bit counters
        ours = launch().probabilities(e, N, torch.tensor(KEY), offset, dtype, block=BLOCK)
        reference = counter_dirichlet_(torch.empty(e, N, dtype=dtype), key=KEY, compiled=False, offset=offset)
        assert torch.equal(ours, reference)
    uniform = launch().probabilities(e, N, torch.tensor(KEY), 0, dtype, uniform=True, block=BLOCK)
    assert torch.equal(uniform, torch.full((e, N), 1.0 / e, dtype=dtype))


@pytest.mark.parametrize("e", [17, 32])
def test_triton_p_stream_above_16_copies_matches_to_rounding(e):
    # normalized exponentials: logarithms may differ in the last bit between implementations
    ours = launch().probabilities(e, N, torch.tensor(KEY), 5, torch.float32, block=BLOCK)
    reference = counter_dirichlet_(torch.empty(e, N), key=KEY, compiled=False, offset=5)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)


def test_triton_kernels_take_a_single_element_at_offset_one():
    copies = torch.randn(3, 1)
    key = torch.tensor(KEY)
    p = counter_dirichlet_(torch.empty(3, 1), key=KEY, compiled=False, offset=1)
    assert torch.equal(launch().mix(copies, key, 1, torch.float32), _mix(copies, key, torch.tensor(1), splitmix64_constants(), torch.float32))
    w = torch.empty(1)
    launch().fused_update_(copies, w, torch.ones(1), key_now=1, key_next=KEY, offset=1, lr=0.1, adam=False)
    torch.testing.assert_close(w, (p * copies).sum(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("e", E_VALUES)
def test_triton_mix_and_spread_are_bit_identical_to_the_generic_path(dtype, e):
    g = torch.Generator().manual_seed(e)
    copies = torch.randn(e, 15, 20, generator=g).to(dtype)
    grad = torch.randn(15, 20, generator=g).to(dtype)
    key, offset, constants, p_dtype = torch.tensor(KEY), 77, splitmix64_constants(), p_dtype_of(dtype)
    w = launch().mix(copies, key, offset, p_dtype, block=BLOCK)
    spread = launch().spread(grad, e, key, offset, p_dtype, scale=3.0, block=BLOCK)
    if e == 1:  # the generic path short-cuts e = 1: W = W~_0, dL/dW~_0 = dL/dW * scale
        assert torch.equal(w, copies[0]) and torch.equal(spread[0], grad * 3.0)
        return
    assert torch.equal(w, _mix(copies.reshape(e, -1), key, torch.tensor(offset), constants, p_dtype).view(15, 20))
    reference = _spread(grad.reshape(-1), key, torch.tensor(offset), constants, e, p_dtype, 3.0).view(e, 15, 20)
    assert torch.equal(spread, reference)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("e", E_VALUES)
def test_triton_scale_grad_is_bit_identical_to_the_cpu_kernel(dtype, e):
    grad = torch.randn(N, generator=torch.Generator().manual_seed(3)).to(dtype)
    ours = launch().scale_grad(grad, e, torch.tensor(KEY), 11, block=BLOCK)
    assert torch.equal(ours, native.scale_grad(grad, e, KEY, 11))


# -- the fused update --------------------------------------------------------------------------------
SGD_OPTIONS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov-wd": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "dampening": dict(lr=0.1, momentum=0.8, dampening=0.3),
    "weight-decay-maximize": dict(lr=0.05, weight_decay=5e-2, maximize=True, momentum=0.5),
}
ADAM_OPTIONS = {
    "adam": dict(lr=1e-2),
    "adam-amsgrad-wd": dict(lr=1e-2, amsgrad=True, weight_decay=1e-2),
    "adamw": dict(lr=1e-2, weight_decay=0.1, decoupled=True),
    "adamw-amsgrad-maximize": dict(lr=1e-3, amsgrad=True, maximize=True, betas=(0.8, 0.99), weight_decay=0.1, decoupled=True),
}


def _state(e, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(e, n, generator=g).to(dtype) for _ in range(2)] + [torch.rand(e, n, generator=g).to(dtype) for _ in range(2)]


def _native_args(e, n, key_now, key_next, options, adam, t, has_grad):
    args = native.StepArgs(n=n, offset=11, key_now=key_now, key_next=key_next, e=e, has_grad=int(has_grad),
                           maximize=int(options.get("maximize", False)), lr=options["lr"],
                           weight_decay=options.get("weight_decay", 0.0), grad_scale=1.0)  # fmt: skip
    if adam:
        beta1, beta2 = options.get("betas", (0.9, 0.999))
        args.beta1, args.beta2, args.eps = beta1, beta2, 1e-8
        args.step_size, args.bias2_sqrt = options["lr"] / (1 - beta1**t), math.sqrt(1 - beta2**t)
        args.amsgrad, args.decoupled = int(options.get("amsgrad", False)), int(options.get("decoupled", False))
    else:
        args.momentum, args.dampening = options.get("momentum", 0.0), options.get("dampening", 0.0)
        args.nesterov, args.first_momentum = int(options.get("nesterov", False)), int(t == 1)
    return args


def _triton_kwargs(options, adam, t, lr_tensor):
    lr = torch.tensor(options["lr"], dtype=torch.float64) if lr_tensor else options["lr"]
    kwargs = dict(key_now=KEY + t, key_next=KEY + t + 1, offset=11, lr=lr, adam=adam, weight_decay=options.get("weight_decay", 0.0),
                  maximize=options.get("maximize", False), block=BLOCK)  # fmt: skip
    if adam:
        kwargs.update(decoupled=options.get("decoupled", False), betas=options.get("betas", (0.9, 0.999)), eps=1e-8)
    else:
        kwargs.update(momentum=options.get("momentum", 0.0), dampening=options.get("dampening", 0.0),
                      nesterov=options.get("nesterov", False), first_momentum=t == 1)  # fmt: skip
    return kwargs


def run_update_pair(name, e, dtype, steps=2, lr_tensor=False, has_grad=True):
    """``steps`` fused updates of the same tensors by the Triton kernel and by the C++ kernel."""
    adam = name in ADAM_OPTIONS
    options = (ADAM_OPTIONS if adam else SGD_OPTIONS)[name]
    copies, grad_seed, m, v = _state(e, N, dtype, seed=e)
    vmax = v.clone() if options.get("amsgrad") else None
    ours = dict(copies=copies.clone(), m=m.clone(), v=v.clone(), vmax=None if vmax is None else vmax.clone(), w=torch.empty(N, dtype=dtype))
    theirs = dict(copies=copies.clone(), m=m.clone(), v=v.clone(), vmax=None if vmax is None else vmax.clone(), w=torch.empty(N, dtype=dtype))
    step_tensor = torch.zeros((), dtype=torch.float32)
    momentum = options.get("momentum", 0.0) != 0
    for t in range(1, steps + 1):
        grad = torch.randn(N, generator=torch.Generator().manual_seed(100 + t)).to(dtype) if has_grad else None
        kwargs = _triton_kwargs(options, adam, t, lr_tensor)
        if adam:
            step_tensor += 1
            launch().fused_update_(ours["copies"], ours["w"], grad, exp_avg=ours["m"], exp_avg_sq=ours["v"],
                                   max_exp_avg_sq=ours["vmax"], step=step_tensor, **kwargs)  # fmt: skip
            native.adam_(_native_args(e, N, KEY + t, KEY + t + 1, options, True, t, has_grad), theirs["copies"], theirs["w"], grad,
                         theirs["m"], theirs["v"], theirs["vmax"])  # fmt: skip
        else:
            launch().fused_update_(ours["copies"], ours["w"], grad, momentum_buffer=ours["m"] if momentum else None, **kwargs)
            native.sgd_(_native_args(e, N, KEY + t, KEY + t + 1, options, False, t, has_grad), theirs["copies"], theirs["w"], grad,
                        theirs["m"] if momentum else None)  # fmt: skip
    return ours, theirs


def max_relative_difference(ours, theirs):
    worst = 0.0
    for name, value in ours.items():
        if value is None:
            continue
        other = theirs[name].double()
        worst = max(worst, float((value.double() - other).abs().max() / other.abs().max().clamp_min(1e-30)))
    return worst


@needs_native
@pytest.mark.parametrize("name", sorted(SGD_OPTIONS) + sorted(ADAM_OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_fused_update_matches_the_cpu_kernel_for_every_option(name, dtype):
    ours, theirs = run_update_pair(name, 3, dtype)
    if name in SGD_OPTIONS:  # the same IEEE operations in the same order: the same bits
        for key in ours:
            assert ours[key] is None or torch.equal(ours[key], theirs[key]), key
    else:  # Adam's bias corrections: exp2(t log2 beta) on the device, beta**t on the host (last-bit differences)
        assert max_relative_difference(ours, theirs) <= (1e-12 if dtype == torch.float64 else 1e-6)


@needs_native
@pytest.mark.parametrize("e", E_VALUES)
@pytest.mark.parametrize("name", ["nesterov-wd", "adam-amsgrad-wd"])
def test_triton_fused_update_matches_the_cpu_kernel_for_every_e(name, e):
    ours, theirs = run_update_pair(name, e, torch.float64)
    assert max_relative_difference(ours, theirs) <= 1e-12


@needs_native
@pytest.mark.parametrize("name", ["momentum", "adamw"])
def test_triton_fused_update_in_bfloat16_with_lr_as_a_tensor_and_without_a_gradient(name):
    ours, theirs = run_update_pair(name, 3, torch.bfloat16, lr_tensor=True)
    assert max_relative_difference(ours, theirs) <= 1e-2  # bf16 stores: one rounding step apart at most
    ours, theirs = run_update_pair(name, 3, torch.float64, has_grad=False, steps=1)
    assert max_relative_difference(ours, theirs) == 0.0  # copies and state untouched, W rewritten with p_t+1


def test_triton_fused_update_keeps_fp32_copies_for_a_bf16_weight():
    """Mixed storage: fp32 copies and state, bf16 weight and gradient (the kernel converts on load and store)."""
    e = 3
    copies, _, m, v = _state(e, N, torch.float32, seed=5)
    grad = torch.randn(N, generator=torch.Generator().manual_seed(9))
    kwargs = _triton_kwargs(ADAM_OPTIONS["adam"], True, 1, False)
    full = dict(copies=copies.clone(), m=m.clone(), v=v.clone(), w=torch.empty(N))
    mixed = dict(copies=copies.clone(), m=m.clone(), v=v.clone(), w=torch.empty(N, dtype=torch.bfloat16))
    for state, g in ((full, grad.bfloat16().float()), (mixed, grad.bfloat16())):
        launch().fused_update_(state["copies"], state["w"], g, exp_avg=state["m"], exp_avg_sq=state["v"], step=torch.ones(()), **kwargs)
    for key in ("copies", "m", "v"):
        assert torch.equal(full[key], mixed[key]), key
    assert torch.equal(mixed["w"], full["w"].bfloat16())


# -- the adversarial ascent ----------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("randomize", [False, True])
@pytest.mark.parametrize("dtype,e", [(torch.float64, 2), (torch.float64, 3), (torch.float32, 3), (torch.float64, 8), (torch.float64, 16)])
def test_triton_ascent_and_adversarial_p_match_the_cpu_kernel(dtype, e, randomize):
    g = torch.Generator().manual_seed(e)
    copies = torch.randn(e, N, generator=g).to(dtype)
    probe = (torch.randn(N, generator=g) * 1e-3).to(dtype)
    probe[:7] = 0  # elements whose ascent leaves p uniform (B.2: u = 0, the draw itself)
    step = 300.0
    args = native.StepArgs(n=N, offset=11, key_now=KEY, e=e, adversarial=1, randomize=int(randomize), ascent_step=step)
    p_dtype = p_dtype_of(dtype)
    w, norm, u = torch.empty(N, dtype=dtype), torch.empty(N, dtype=dtype), torch.empty(N, dtype=p_dtype)
    native.ascend_(args, copies, probe, w, norm, u if randomize else None)
    ours_w, ours_norm, ours_u = torch.empty_like(w), torch.empty_like(norm), torch.empty_like(u)
    factor = torch.tensor(0.5)  # the device factor (e.g. 1 / loss scale) times the host's step
    launch().ascend_(copies, probe, ours_w, ours_norm, ours_u if randomize else None, factor, 2 * step, KEY, 11, randomize, block=BLOCK)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5  # B.2 takes logarithms (libm / libmvec vs the interpreter's)
    torch.testing.assert_close(ours_w, w, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(ours_norm, norm, rtol=tolerance, atol=tolerance)
    if randomize:
        torch.testing.assert_close(ours_u, u, rtol=tolerance, atol=tolerance)
    p = launch().adversarial_probabilities(copies, probe, factor, 2 * step, KEY, 11, randomize, block=BLOCK)
    torch.testing.assert_close(p, native.adversarial_probabilities(args, copies, probe), rtol=tolerance, atol=tolerance)
    assert (p[:, 7:] - 1 / e).abs().max() > 1e-3  # the ascent moved p
    if not randomize:
        assert torch.equal(p[:, :7], torch.full((e, 7), 1 / e, dtype=p.dtype))
    zero = launch().adversarial_probabilities(copies, probe, torch.tensor(0.0), step, KEY, 11, False, block=BLOCK)
    assert torch.equal(zero, torch.full((e, N), 1 / e, dtype=p.dtype))  # a zero factor (overflowed probe): no ascent


# -- the whole fused path through the Triton kernels (MKOptimizer on CPU, interpreted) -----------------------
def make_model(dtype=torch.float64, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12, bias=bias), nn.Tanh(), nn.Linear(12, 3, bias=bias)).to(dtype)


def train(cls, kwargs, triton, *, e=3, dtype=torch.float64, steps=4, bias=True, path="fused", **mk):
    model = make_model(dtype, bias)
    kwargs = dict(kwargs)
    if kwargs.pop("tensor_lr", False):
        kwargs["lr"] = torch.tensor(kwargs["lr"])  # a fresh tensor per run: the scheduler writes into it
    with mk_triton.run_on_cpu() if triton else contextlib.nullcontext():
        opt = mkopt.MKOptimizer(cls, model, e=e, path=path, **mk, **kwargs)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            batches = [(torch.randn(8, 6, generator=g).to(dtype), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]

            def closure():
                opt.zero_grad()
                for x, y in batches:  # gradient accumulation over two micro-batches
                    (F.cross_entropy(model(x), y) / len(batches)).backward()
                nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                return 0.0

            if opt.adversarial:
                opt.step(closure)
            else:
                closure()
                opt.step()
            sched.step()
    return model, opt


OPTIMIZER_CASES = {
    "sgd-nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "sgd-dampening-maximize": (torch.optim.SGD, dict(lr=0.1, momentum=0.8, dampening=0.3, maximize=True)),
    "adam-amsgrad": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adamw-lr-tensor": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, tensor_lr=True)),
}


def assert_models_close(a, b, rtol):
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-12)) <= rtol, key


@needs_native
@pytest.mark.parametrize("case", sorted(OPTIMIZER_CASES))
def test_triton_fused_path_trains_like_the_cpu_kernels(case):
    cls, kwargs = OPTIMIZER_CASES[case]
    model_t, opt_t = train(cls, kwargs, triton=True)
    model_n, opt_n = train(cls, kwargs, triton=False)
    assert_models_close(model_t, model_n, rtol=1e-6)
    for state_t, state_n in zip(opt_t.state.values(), opt_n.state.values()):
        for name, value in state_t.items():
            torch.testing.assert_close(value.double(), state_n[name].double(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("case,mk", [("sgd-nesterov", dict(lr_compensation=True)), ("adamw", {})])
def test_triton_generic_path_regenerates_p_and_trains_like_the_reference(case, mk):
    """The generic path's GPU code (Triton mix and spread, no p buffer) against its eager torch kernels."""
    cls, kwargs = OPTIMIZER_CASES[case]
    model_t, opt_t = train(cls, kwargs, triton=True, path="generic", **mk)
    assert opt_t.expansion.sampler.regenerate and not opt_t.expansion.sampler.buffers  # p never stored
    model_r, opt_r = train(cls, kwargs, triton=False, path="generic", sampler_compile=False, **mk)
    assert not opt_r.expansion.sampler.regenerate
    assert_models_close(model_t, model_r, rtol=1e-6)
    model_f, _ = train(cls, kwargs, triton=True, path="fused", **mk)
    assert_models_close(model_f, model_t, rtol=1e-6)  # and the fused path's GPU code agrees with it


@needs_native
@pytest.mark.parametrize("mode,init", [("adv-mk", "replicate"), ("adversarial", "independent"), ("uniform", "replicate")])
def test_triton_fused_path_probability_modes_train_like_the_cpu_kernels(mode, init):
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    runs = [train(torch.optim.AdamW, kwargs, triton=t, probabilities=mode, init=init, adversarial_eps=1e3) for t in (True, False)]
    assert_models_close(runs[0][0], runs[1][0], rtol=1e-6)
    if mode != "uniform":
        assert runs[0][1].last_p_entropy == pytest.approx(runs[1][1].last_p_entropy, rel=1e-9)


@needs_native
def test_triton_adversarial_two_call_form_with_grad_scaler_matches_the_cpu_kernels():
    runs = []
    for triton in (True, False):
        model = make_model(torch.float32)
        with mk_triton.run_on_cpu() if triton else contextlib.nullcontext():
            opt = mkopt.MKOptimizer(torch.optim.Adam, model, e=3, path="fused", probabilities="adv-mk", adversarial_eps=1e4, lr=1e-2)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
            g = torch.Generator().manual_seed(2)
            for _ in range(3):
                x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
                opt.zero_grad()
                scaler.scale(F.cross_entropy(model(x), y)).backward()  # probe at the mean
                opt.ascend_probabilities(scaler)
                scaler.scale(F.cross_entropy(model(x), y)).backward()
                scaler.step(opt)
                scaler.update()
        runs.append(model)
    assert_models_close(*runs, rtol=1e-5)


class HostReads:
    """Counts the calls that read a tensor's value back to the host (on CUDA: a device-to-host synchronization)."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name, original):
        def wrapper(tensor, *args, **kwargs):
            self.calls.append(name)
            return original(tensor, *args, **kwargs)

        return wrapper


@pytest.mark.parametrize("cls,kwargs,bias", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-4), True),
    (torch.optim.AdamW, dict(lr=torch.tensor(1e-2), weight_decay=0.1), False),  # torch's own Adam reads its CPU step count
])  # fmt: skip
def test_triton_dirichlet_step_reads_nothing_back_from_the_device(monkeypatch, cls, kwargs, bias):
    model = make_model(torch.float32, bias=bias)
    with mk_triton.run_on_cpu():
        opt = mkopt.MKOptimizer(cls, model, e=3, path="fused", **kwargs)
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        for step in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            reads = HostReads(monkeypatch) if step == 2 else None  # the first steps create the state
            opt.step()
            if reads is not None:
                monkeypatch.undo()
                assert reads.calls == []
    assert opt.mk_step == 3


def test_triton_adversarial_step_reads_back_once(monkeypatch):
    model = make_model(torch.float32, bias=False)
    with mk_triton.run_on_cpu():
        opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, path="fused", probabilities="adv-mk", lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        for step in range(2):
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            reads = HostReads(monkeypatch) if step == 1 else None
            opt.ascend_probabilities(scaler)
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            opt.step()  # (scaler.step(opt) reads its found-inf flag itself: that is the scaler's, not MK's)
            if reads is not None:
                monkeypatch.undo()
                assert reads.calls == ["__float__"]  # the entropy diagnostic, once per step
    assert 0 < opt.last_p_entropy < 1


# -- registration, path choice, compilation for a GPU --------------------------------------------------
def test_triton_ops_are_registered_with_fake_implementations():
    key = torch.tensor(KEY)
    copies, grad = torch.randn(3, 5, 7), torch.randn(5, 7)
    torch.library.opcheck(mk_triton.ops.mix, (copies, key, 3, False, torch.float32), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(mk_triton.ops.spread, (grad, 3, key, 3, torch.float32, 2.0), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(mk_triton.ops.probabilities, (3, 10, key, 0, torch.float64, False), test_utils=("test_schema", "test_faketensor"))


def test_triton_fused_path_is_chosen_for_cuda_kernels():
    from types import SimpleNamespace

    from mkopt.fused_step import fused_path_blocker

    on_gpu = [SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype) for dtype in (torch.float32, torch.float16)]
    assert fused_path_blocker(torch.optim.AdamW, on_gpu, 3, {}) is None
    assert "maximum e=32" in fused_path_blocker(torch.optim.SGD, on_gpu, 33, {})
    wrong = [SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.int8)]
    assert "take" in fused_path_blocker(torch.optim.SGD, wrong, 3, {})


@pytest.mark.slow
def test_triton_kernels_compile_for_a_cuda_target():
    """The interpreter accepts code the compiler rejects: compile every kernel for sm_90 (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from mkopt.triton import kernels

    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    scalars = {"n": "i32", "offset": "i64", "start": "i32", "run": "i32", "key_now": "i64", "key_next": "i64", "key_ptr": "*i64", "step_ptr": "*fp32"}
    scalars |= {name: "fp64" for name in ("lr_value", "weight_decay", "momentum", "dampening", "beta1", "beta2", "eps",
                                          "log2_beta1", "log2_beta2", "ascent_scale", "scale")}  # fmt: skip
    common = dict(E=3, BLOCK=1024, DOUBLE=False)
    update = dict(HAS_GRAD=True, UNIFORM=False, UNIFORM_NEXT=False, ADVERSARIAL=True, RANDOMIZE=True, MAXIMIZE=True, LR_TENSOR=True,
                  HAS_MOMENTUM=True, FIRST_MOMENTUM=False, NESTEROV=True)  # fmt: skip
    cases = [
        (kernels.fused_update_kernel, "*bf16", {**common, **update, "ADAM": False, "DECAY": 1, "AMSGRAD": False}),
        (kernels.fused_update_kernel, "*fp32", {**common, **update, "ADAM": True, "DECAY": 2, "AMSGRAD": True}),
        (kernels.mix_kernel, "*fp64", {**common, "DOUBLE": True, "UNIFORM": False}),
        (kernels.mix_kernel, "*fp32", {**common, "UNIFORM": False, "n": 1, "offset": 1}),  # Triton makes an int 1 a constant
        (kernels.spread_kernel, "*fp16", {**common, "SCALED": True}),
        (kernels.scale_grad_kernel, "*fp32", {**common, "UNIFORM": False}),
        (kernels.probabilities_kernel, "*fp32", {**common, "E": 16, "UNIFORM": False}),
        (kernels.ascend_kernel, "*fp32", {**common, "RANDOMIZE": True, "WEIGHT_OUT": True}),
        (kernels.adversarial_probabilities_kernel, "*fp32", {**common, "RANDOMIZE": True}),
        (kernels.adversarial_divergence_kernel, "*fp32", {**common, "RANDOMIZE": True}),
    ]
    for fn, pointer, constants in cases:
        signature = {name: "constexpr" if name in constants else scalars.get(name, pointer) for name in fn.arg_names}
        compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants), target=GPUTarget("cuda", 90, 32))
        assert "ptx" in compiled.asm


@pytest.mark.slow  # a fresh interpreter: ~10 s
def test_triton_missing_leaves_the_cpu_paths_working():
    """Where Triton cannot be imported, mkopt imports, says why, and trains on the CPU kernels."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` now raises ImportError
        "import torch, mkopt\nfrom mkopt import triton as mk_triton\n"
        "assert not mk_triton.available() and 'triton cannot be imported' in mk_triton.unavailable_reason()\n"
        "assert not mk_triton.handles(torch.device('cuda'))\n"
        "model = torch.nn.Linear(4, 3)\nopt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1)\n"
        "model(torch.randn(2, 4)).sum().backward(); opt.step(); print(opt.mk_step)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("1")


def test_triton_regenerated_p_read_back_from_a_parametrization_is_the_stream():
    model = make_model(torch.float32)
    with mk_triton.run_on_cpu():
        mkopt.MKOptimizer(torch.optim.SGD, model, e=4, lr=0.1, path="generic")
        mk = model[0].parametrizations.weight[0]
        slot = mk.slot
        reference = counter_dirichlet_(torch.empty(4, slot.shape.numel()), key=slot.sampler.seeds[slot.key], compiled=False, offset=slot.offset)
        assert torch.equal(mk.p, reference.view(4, *slot.shape))
