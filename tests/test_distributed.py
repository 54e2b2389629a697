"""DDP with MK on 2 CPU processes (gloo): ranks agree bit for bit, and match one process on the global batch."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import distributed_worker
from mkopt.distributed import DistributedContext, setup_distributed

WORLD = 2


def free_ports(count: int) -> tuple[int, ...]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = tuple(s.getsockname()[1] for s in sockets)
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(
        distributed_worker.run, args=(WORLD, free_ports(2), str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 180
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-rank DDP workers did not finish within 180 s")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_ranks_come_from_submitit_then_torchrun_variables(ranks):
    for r, result in enumerate(ranks):
        assert result["submitit"] == (r, WORLD, r, "gloo", "submitit", "cpu")
        assert result["torchrun"] == (r, WORLD, r, "gloo", "torchrun", "cpu")


MK_VARIANTS = ["fused", "generic", "adv-mk", "adv-mk-fused"]


@pytest.mark.parametrize("variant", MK_VARIANTS)
def test_copies_stay_bitwise_identical_across_ranks(ranks, variant):
    for a, b in zip(ranks[0][variant], ranks[1][variant]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", MK_VARIANTS)
def test_two_ranks_give_the_update_of_one_process_on_the_global_batch(ranks, variant):
    # Not bit-exact: DDP averages two half-batch means, one process takes one mean over 16 samples,
    # so the gradients differ by float64 rounding (~1e-16 relative); 5 steps keep that tiny.
    for ddp, single in zip(ranks[0][variant], ranks[0][variant + "-reference"]):
        assert ddp.shape == single.shape
        torch.testing.assert_close(ddp, single, rtol=1e-12, atol=1e-14)
    assert not all(torch.equal(a, b) for a, b in zip(ranks[0]["generic"], ranks[0]["adv-mk"]))  # modes differ
    for fused, generic in zip(ranks[0]["adv-mk-fused"], ranks[0]["adv-mk"], strict=True):  # the paths agree (rounding)
        torch.testing.assert_close(fused, generic, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("variant", MK_VARIANTS)
def test_mk_all_reduces_the_plain_models_bytes(ranks, variant):
    plain = ranks[0]["plain-bytes"]
    assert plain == 8 * (4 * 2 * 3 * 3 + 4 + 3 * 64 + 3)  # every float64 gradient of the plain model, once
    # Adv-MK also averages its probe: dL/dp on the generic path (e values per kernel element), dL/dW on the fused (1)
    probe = {"adv-mk": 8 * 3 * (4 * 2 * 3 * 3 + 3 * 64), "adv-mk-fused": 8 * (4 * 2 * 3 * 3 + 3 * 64)}.get(variant, 0)
    assert ranks[0][variant + "-bytes"] == ranks[1][variant + "-bytes"] == plain + probe


def test_mkoptimizer_refuses_a_ddp_wrapped_model(ranks):
    assert "build MKOptimizer on the bare model first, then wrap it" in ranks[0]["wrapped-error"]


def test_single_process_and_bad_environments(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert setup_distributed(device="cpu") == DistributedContext()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="WORLD_SIZE missing"):
        setup_distributed(device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT missing"):
        setup_distributed(device="cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match="backend='nccl' needs CUDA"):
        setup_distributed(backend="nccl", device="cpu")


def test_plain_multitask_srun_without_torchrun_or_submitit_is_refused(monkeypatch):
    """srun -n2 python recipe.py: each task would silently be rank 0 of its own run."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR", "LOCAL_RANK",
                 "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    with pytest.raises(RuntimeError, match=r"2-task SLURM step.*torchrun.*mkopt\.job\.RecipeJob"):
        setup_distributed(device="cpu")
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    monkeypatch.setenv("SLURM_PROCID", "1")  # any task but the first is certainly one of several
    with pytest.raises(RuntimeError, match="task 1 of"):
        setup_distributed(device="cpu")
    # the batch script of an `sbatch -n 2` allocation (no srun step) and a one-task step are single processes
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert setup_distributed(device="cpu") == DistributedContext()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert setup_distributed(device="cpu") == DistributedContext()
