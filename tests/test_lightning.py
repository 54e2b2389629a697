"""Lightning 2.x: configure_optimizers returns mkopt.optim.SGD over self.parameters(); one process and DDP."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

import lightning_worker  # noqa: E402

import mkopt  # noqa: E402


def manual_run(steps: int = 6):
    """The same training as the worker's, written as a plain loop."""
    module = lightning_worker.Classifier()
    opt = mkopt.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, e=3)
    loader = torch.utils.data.DataLoader(lightning_worker.data(), batch_size=8, shuffle=False)
    for step, (x, y) in zip(range(steps), loader):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module.net(x), y).backward()
        opt.step()
    return module, opt


def test_lightning_fit_equals_the_plain_loop_and_logs_diagnostics(tmp_path):
    lightning_worker.fit(str(tmp_path), devices=1)
    result = torch.load(tmp_path / "rank0.pt", weights_only=True)
    module, opt = manual_run()
    assert result["step"] == opt.mk_step == 6
    for got, want in zip(result["copies"], [c for _, c in opt.named_copies()]):
        assert torch.equal(got, want)  # validation in between (at the mean) changed no bit of training
    opt.eval()  # the fitted model was left at the mean
    for got, want in zip(result["params"], module.parameters()):
        assert torch.equal(got, want)
    assert result["metrics"]["mk/spread"] > 0 and result["metrics"]["mk/collapsed"] == 0.0
    x, y = lightning_worker.data(16)[:8]  # the last validation ran on the fitted model's mean
    with torch.no_grad():
        assert result["metrics"]["val_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(module.net(x), y)), rel=1e-6)
    ckpt = torch.load(sorted((tmp_path / "ckpt").glob("*step=3*.ckpt"))[0], weights_only=False)
    first = next(s for s in ckpt["optimizer_states"][0]["state"].values() if "copies" in s and s["copies"].shape[1:] == (16, 6))
    assert torch.equal(ckpt["state_dict"]["net.0.weight"], first["copies"].mean(0))  # mid-training checkpoint: the mean


@pytest.mark.slow
def test_lightning_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    for key in [k for k in env if k.startswith("SLURM_")]:
        env.pop(key)  # a CI runner inside a SLURM allocation must not turn this into a SLURM job
    subprocess.run([sys.executable, str(Path(__file__).parent / "lightning_worker.py"), str(tmp_path), "2"],
                   check=True, env=env, timeout=300)  # fmt: skip
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for a, b in zip(ranks[0]["copies"], ranks[1]["copies"]):
        assert torch.equal(a, b)  # the same p on every rank and averaged gradients
    module, opt = manual_run()
    for got, want in zip(ranks[0]["copies"], [c for _, c in opt.named_copies()]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert ranks[0]["step"] == 6 and ranks[0]["metrics"]["mk/spread"] > 0
