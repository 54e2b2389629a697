"""Preemption-safe checkpoints (mkopt.checkpoint) and the signal guard / Checkpointable entry (mkopt.job)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mkopt
from mkopt.checkpoint import (
    CheckpointCorruptWarning, CheckpointError, CheckpointStore, atomic_write, capture_training_state, restore_training_state,
)  # fmt: skip
from mkopt.job import PreemptionGuard, RecipeJob

ROOT = Path(__file__).resolve().parents[1]


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.bin"
    atomic_write(target, lambda f: f.write(b"old"))

    def interrupted(handle):
        handle.write(b"half of the new")
        raise KeyboardInterrupt  # what a signal handler raising mid-write looks like

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_a_preemption_handler_that_saves_and_exits_during_a_save(tmp_path):
    """SIGUSR2 arrives while step 2 is being written; the handler saves step 3 and exits (as submitit does)."""
    store = CheckpointStore(tmp_path, keep=2)
    store.save({"step": 1}, 1)
    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        if obj.get("step") == 2:
            f.write(b"PK partial")
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)  # the handler runs here, between bytecodes
        return real_save(obj, f, *args, **kwargs)

    def handler(signum, frame):
        store.save({"step": 3}, 3)
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, handler)
    try:
        torch.save, saved = slow_save, torch.save
        with pytest.raises(SystemExit):
            store.save({"step": 2}, 2)
    finally:
        torch.save = saved
        signal.signal(signal.SIGUSR2, previous)
    state, path = store.load_latest()
    assert state == {"step": 3} and path.name == "ckpt-0000000003.pt"
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / "ckpt-0000000002.pt").exists()


def test_a_process_killed_mid_write_never_leaves_a_half_written_latest(tmp_path):
    """SIGTERM without a handler (SIGKILL alike) ends the writer mid-file: latest stays the previous checkpoint."""
    child = textwrap.dedent(
        f"""
        import sys, time, torch
        from mkopt.checkpoint import CheckpointStore
        store = CheckpointStore({str(tmp_path)!r})
        store.save({{"w": torch.arange(1000.0)}}, 1)
        real = torch.save
        def stuck(obj, f, *a, **k):  # write part of step 2, then hang: the kill lands mid-write
            f.write(b"PK" + bytes(4096)); f.flush(); print("writing", flush=True); time.sleep(60)
        torch.save = stuck
        store.save({{"w": torch.zeros(1000)}}, 2)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert process.stdout.readline().strip() == "writing"
        assert list(tmp_path.glob(".tmp-*")), "the child should be in the middle of a write"
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        process.kill()
    state, path = CheckpointStore(tmp_path).load_latest()
    assert path.name == "ckpt-0000000001.pt" and torch.equal(state["w"], torch.arange(1000.0))
    CheckpointStore(tmp_path).save({"w": torch.ones(2)}, 2)  # the next writer removes the killed one's temporary
    assert not list(tmp_path.glob(".tmp-*"))


def test_corrupt_or_truncated_latest_falls_back_to_the_previous_good_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (1, 2):
        store.save({"step": step, "w": torch.full((256,), float(step))}, step)
    newest = store.path(2)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.warns(CheckpointCorruptWarning, match=rf"{newest}.*truncated.*falling back to .*ckpt-0000000001\.pt"):
        state, path = store.load_latest()
    assert state["step"] == 1 and path == store.path(1)

    flipped = bytearray(data)
    flipped[len(flipped) - 200] ^= 0xFF  # same size, torch.load would not notice
    newest.write_bytes(bytes(flipped))
    with pytest.warns(CheckpointCorruptWarning, match="SHA-256"):
        assert store.load_latest()[0]["step"] == 1

    newest.write_bytes(data)
    (tmp_path / "latest.json").write_text("{ not json")  # a damaged manifest: the files, newest first, unverified
    with pytest.warns(CheckpointCorruptWarning, match=r"manifest .*latest\.json is unreadable"):
        assert store.load_latest()[0]["step"] == 2

    store.path(1).write_bytes(b"garbage")
    newest.write_bytes(b"")
    with pytest.warns(CheckpointCorruptWarning), pytest.raises(CheckpointError, match=r"ckpt-0000000002\.pt[\s\S]*ckpt-0000000001\.pt"):
        store.load_latest()


def test_store_keeps_the_newest_and_the_previous_and_starts_empty(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep=2)
    assert store.load_latest() is None
    for step in range(1, 5):
        store.save({"step": step}, step)
    assert [p.name for p in store.checkpoints()] == ["ckpt-0000000004.pt", "ckpt-0000000003.pt"]
    manifest = json.loads((tmp_path / "ckpt" / "latest.json").read_text())
    assert [e["step"] for e in manifest["checkpoints"]] == [4, 3] and all(len(e["sha256"]) == 64 for e in manifest["checkpoints"])
    with pytest.raises(ValueError, match="keep at least 1"):
        CheckpointStore(tmp_path, keep=0)


def test_a_save_after_a_fallback_drops_the_corrupt_newer_checkpoint_and_keeps_the_good_one(tmp_path):
    """Resumed from 900 because 1200 is corrupt: saving 1000 must keep 900 (the fallback), not 1200."""
    store = CheckpointStore(tmp_path, keep=2)
    for step in (900, 1200):
        store.save({"step": step, "w": torch.full((256,), float(step))}, step)
    data = store.path(1200).read_bytes()
    store.path(1200).write_bytes(data[: len(data) // 2])
    with pytest.warns(CheckpointCorruptWarning):
        assert store.load_latest()[0]["step"] == 900
    store.save({"step": 1000}, 1000)
    assert [p.name for p in store.checkpoints()] == ["ckpt-0000001000.pt", "ckpt-0000000900.pt"]
    assert not store.path(1200).exists()
    manifest = json.loads((tmp_path / "latest.json").read_text())
    assert [e["step"] for e in manifest["checkpoints"]] == [1000, 900]


def test_atomic_write_gives_the_umask_mode_not_mkstemps_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
        os.umask(0o027)
        atomic_write(tmp_path / "b.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(previous)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o640


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, seed=4, lr=0.1, momentum=0.9, weight_decay=1e-4, sampler_compile=False)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 4], 0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    return model, opt, sched, scaler


def train(model, opt, sched, scaler, steps):
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()


def test_training_state_round_trip_through_the_store_is_bit_identical(tmp_path):
    reference = build()
    train(*reference, range(6))
    first = build()
    train(*first, range(3))
    CheckpointStore(tmp_path).save(capture_training_state(first[0], first[1], scheduler=first[2], scaler=first[3], progress={"step": 3}), 3)
    resumed = build()
    state, _ = CheckpointStore(tmp_path).load_latest()
    assert restore_training_state(state, resumed[0], resumed[1], scheduler=resumed[2], scaler=resumed[3]) == {"step": 3}
    train(*resumed, range(3, 6))
    for a, b in zip(reference[0].state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(a, b)
    assert resumed[1].mk_step == 6 and resumed[2].get_last_lr() == reference[2].get_last_lr()
    with pytest.raises(ValueError, match="has scheduler state but scheduler=None"):
        restore_training_state(state, *build()[:2])


def test_guard_defers_the_signal_to_the_step_boundary_and_job_checkpoint_saves():
    job = RecipeJob(ROOT / "mkopt" / "recipes" / "resnet50_imagenet.py", {"out": "/tmp/x"})
    events = []
    job.attach(lambda: events.append("saved"))

    def submitit_like(signum, frame):
        events.append(("requeue", type(job.checkpoint()).__name__))

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        with PreemptionGuard() as guard:
            assert guard.active
            os.kill(os.getpid(), signal.SIGUSR2)
            events.append("mid-step")
            guard.check()
        assert signal.getsignal(signal.SIGUSR2) is submitit_like  # restored on exit
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert events == ["mid-step", "saved", ("requeue", "DelayedSubmission")]
    clone = pickle.loads(pickle.dumps(job))  # the live saver is never pickled
    assert clone._saver is None and clone.config == job.config
    with PreemptionGuard() as guard:  # no Python handler registered: the guard stays out of the way
        assert not guard.active
