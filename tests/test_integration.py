"""The torch ecosystem around an MKOptimizer: LR schedulers, clipping, autocast + GradScaler, compile."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mkopt


def setup(e=3, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=e, lr=0.1, momentum=0.9, **kwargs)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    return model, opt, x, y


def test_lr_scheduler_drives_the_shared_param_groups():
    model, opt, x, y = setup()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    lrs = []
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        lrs.append(opt.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.01, 0.01, 0.001, 0.001])


def test_clip_grad_norm_clips_the_copies_gradients():
    model, opt, x, y = setup()
    (F.cross_entropy(model(x), y) * 1000).backward()
    total = nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
    assert float(total) > 0.5
    # the fused path's copies take no gradient (their proxy's carries the same norm)
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None]))
    assert float(clipped) == pytest.approx(0.5, rel=1e-4)
    opt.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_with_grad_scaler_trains_and_skips_overflowing_steps(dtype):
    model, opt, x, y = setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert opt.mk_step == 4 and losses[-1] < losses[0]
    # an overflowing step: skipped by the scaler; weights, optimizer state and p untouched
    weights = [p.detach().clone() for p in model.parameters()]
    p_now = model[0].parametrizations.weight[0].p.clone()
    opt.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.mk_step == 4
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert torch.equal(model[0].parametrizations.weight[0].p, p_now)
    assert scaler.get_scale() < 2.0**10


def test_step_with_closure():
    model, opt, x, y = setup()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    second = opt.step(closure)
    assert opt.mk_step == 2 and float(second) < float(first)


def test_redrawing_buffered_p_between_forward_and_backward_is_an_error():
    # buffer mode (the regenerated p keeps its forward's key instead: test_core.test_a_graph_keeps_the_p_of_its_own_forward)
    model, opt, x, y = setup(sampler_compile=False, path="generic")
    loss = F.cross_entropy(model(x), y)
    opt.step()  # draws the next p in place while the graph still needs the old one
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.slow
def test_torch_compile_trains_an_expanded_model():
    model, opt, x, y = setup()
    eager = [p.detach().clone() for p in model.parameters()]
    compiled = torch.compile(model)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not all(torch.equal(a, b) for a, b in zip(eager, model.parameters()))
    # the compiled graph must see each step's new p (not a constant baked in at trace time)
    reference, ref_opt, _, _ = setup()
    for _ in range(3):
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_resuming_a_version_2_state_warns_where_the_stream_changed():
    for e, warns in ((4, True), (3, False)):
        model, opt, x, y = setup(e=e)
        state = opt.state_dict()
        state["mkopt"]["version"] = 2
        again_model, again, _, _ = setup(e=e)
        if warns:
            with pytest.warns(RuntimeWarning, match="not bit-identically"):
                again.load_state_dict(state)
        else:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("error")
                again.load_state_dict(state)
