"""The compile-or-fallback policy: a broken compiler degrades to eager (with a warning and buffered p),
a bug inside a kernel is raised as itself, and sampler_compile=True never falls back."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mkopt
from mkopt import compiled


@pytest.fixture
def broken_compiler(monkeypatch):
    def compile_that_fails(fn, **kwargs):
        def call(*args):
            raise RuntimeError("simulated: no C++ compiler")

        return call

    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_failed", False)
    monkeypatch.setattr(compiled.torch, "compile", compile_that_fails)
    yield
    # monkeypatch restores torch.compile, the cache and the flag


def test_a_broken_compiler_warns_once_and_buffers_p(broken_compiler):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.warns(RuntimeWarning, match="could not compile"):
        opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, path="generic")  # the fused path compiles nothing
    assert compiled.compiler_failed() and not opt.expansion.sampler.regenerate  # eager regeneration would hash twice
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.mk_step == 2


def test_a_bug_inside_a_kernel_is_raised_as_itself(broken_compiler):
    def kernel(x):
        raise ValueError("a genuine bug")

    with pytest.raises(ValueError, match="a genuine bug"):
        compiled.run_kernel(kernel, torch.ones(2), compiled=True)
    assert not compiled.compiler_failed()  # not mistaken for a missing compiler


def test_sampler_compile_true_raises_instead_of_falling_back(broken_compiler):
    with pytest.raises(RuntimeError, match="simulated: no C"):
        mkopt.MKOptimizer(torch.optim.SGD, nn.Linear(4, 2), e=3, lr=0.1, sampler_compile=True, path="generic")


def test_many_kernel_variants_compile_past_dynamos_per_function_limit():
    """More (e, dtype) variants than dynamo's recompile_limit (8) of one kernel: all compiled, none eager."""
    from mkopt.sampling import counter_dirichlet_

    for e in range(2, 8):
        for dtype in (torch.float32, torch.float64):
            compiled_p = counter_dirichlet_(torch.empty(e, 50, dtype=dtype), key=3, compiled=True)
            assert torch.equal(compiled_p, counter_dirichlet_(torch.empty(e, 50, dtype=dtype), key=3, compiled=False))
    assert not compiled.compiler_failed()
