"""Data input that would silently give a wrong result is refused (or warned about) with a clear message."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mkopt.data import find_fashion_mnist, load_cifar10, load_npz
from mkopt.experiments import sweep

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # the subprocess imports this checkout's mkopt


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(folder):
    folder.mkdir(parents=True)
    for name, shape in (("train-images-idx3-ubyte", (4, 28, 28)), ("train-labels-idx1-ubyte", (4,)),
                        ("t10k-images-idx3-ubyte", (2, 28, 28)), ("t10k-labels-idx1-ubyte", (2,))):  # fmt: skip
        write_idx(folder / name, np.zeros(shape))
    return folder


def test_an_explicit_fashion_mnist_folder_is_authoritative(tmp_path, monkeypatch):
    elsewhere = fake_fashion_mnist(tmp_path / "system-copy")
    monkeypatch.setattr("mkopt.data.FASHION_MNIST_SEARCH", (str(elsewhere),))
    monkeypatch.delenv("MKOPT_FASHION_MNIST", raising=False)
    assert find_fashion_mnist() == elsewhere  # without a path: the search finds the system copy
    with pytest.raises(FileNotFoundError, match=r"not found in .*missing \(the folder you passed\)"):
        find_fashion_mnist(tmp_path / "missing")
    monkeypatch.setenv("MKOPT_FASHION_MNIST", str(tmp_path / "env-missing"))
    with pytest.raises(FileNotFoundError, match=r"env-missing \(\$MKOPT_FASHION_MNIST\)"):
        find_fashion_mnist()


def test_demo_with_a_wrong_data_folder_fails_instead_of_using_another_copy(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkopt.cli", "demo", "--data", str(tmp_path / "wrong")],
                          capture_output=True, text=True, env=ENV)  # fmt: skip
    assert done.returncode == 1
    assert "Fashion-MNIST not found in" in done.stderr and "wrong" in done.stderr
    assert "Traceback" not in done.stderr


class Exploit:
    def __reduce__(self):
        return (print, ("ran code",))


def test_a_crafted_cifar_batch_is_refused_not_run(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": np.zeros((1, 3072), np.uint8), "labels": [0]}
        if name == "data_batch_3":
            entry["labels"] = Exploit()
        pickle.dump(entry, open(folder / name, "wb"))
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.print is not part of a CIFAR-10 batch"):
        load_cifar10(folder)
    assert "ran code" not in capsys.readouterr().out


def npz(path, x_train, y_train):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_train[:2], y_test=np.asarray(y_train)[:2])
    return path


@pytest.mark.parametrize("bad, message", [(np.nan, "NaN or inf"), (None, "every training feature has the same value")])
def test_sweep_refuses_features_that_standardize_to_nan(tmp_path, bad, message):
    x = np.ones((40, 3), np.float32)
    if bad is not None:
        x[::3, 1] = bad  # in the fit split whatever the validation draw
    path = npz(tmp_path / "bad.npz", x, np.arange(40) % 2)
    with pytest.raises(ValueError, match=message):
        sweep.load_dataset(f"npz:{path}")  # uncached per content: each file is read anew


def test_labels_without_class_zero_warn(tmp_path):
    path = npz(tmp_path / "shifted.npz", np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 10 + 1)
    with pytest.warns(UserWarning, match=r"train labels are 1\.\.10, so class 0 has no example.*subtract 1"):
        train, _ = load_npz(path)
    assert int(train.y.max()) == 10  # warned, not changed


def test_ensemble_members_load_with_weights_only(tmp_path, monkeypatch):
    config = sweep.SweepConfig(dataset="synthetic", archs=("A1",), optimizers=("adam",))
    ensemble = config.spec("ensemble", "A1", "adam", 1e-3, 0)
    members = [m.__class__(**{**m.__dict__, "epochs": 1}) for m in config.members(ensemble)]
    for member in members:
        sweep.execute((member, str(tmp_path), None))  # trains it and saves its weights for the ensemble
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    sweep.trained_ensemble(members, str(tmp_path))
    assert len(calls) == len(members) and all(k.get("weights_only") is True for k in calls)


def run_table1(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "mkopt.cli", "table1", *args], capture_output=True, text=True, cwd=tmp_path, env=ENV)


@pytest.mark.parametrize("dataset, message", [
    ("npz:missing.npz", "missing.npz does not exist: pass an .npz"),
    ("mnist", "dataset='mnist' is unknown: use fashion-mnist"),
    ("npz:broken.npz", "lacks ['y_test']"),
])  # fmt: skip
def test_table1_user_errors_are_one_clean_message(tmp_path, dataset, message):
    np.savez(tmp_path / "broken.npz", x_train=np.zeros((4, 2)), y_train=[0, 1, 0, 1], x_test=np.zeros((2, 2)))
    done = run_table1(tmp_path, "--dataset", dataset, "--workers", "2")
    assert done.returncode == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def tiny_npz(path, seed):
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.normal(size=(200, 6)), y_train=rng.integers(0, 3, 200),
             x_test=rng.normal(size=(50, 6)), y_test=rng.integers(0, 3, 50))  # fmt: skip


def test_finished_runs_are_keyed_by_the_datas_content_not_its_path(tmp_path, capsys):
    from mkopt.experiments.runs import StaleResultError

    data = tmp_path / "my data.npz"
    tiny_npz(data, 0)
    config = sweep.SweepConfig(dataset=f"npz:{data}", archs=("A1",), optimizers=("adam",), methods=("baseline",),
                               lrs={"adam": [1e-3]}, seeds=(0,), base_epochs=1, batch=64)  # fmt: skip
    store = sweep.run_sweep(config, tmp_path / "runs", progress=False)
    [(spec, result)] = store.all()
    assert spec.run_id.startswith("npz-my-data/baseline/")  # a readable folder, not "npz:/tmp/..."
    assert (tmp_path / "runs" / "npz-my-data").is_dir()
    sweep.run_sweep(config, tmp_path / "runs", progress=True)  # same content: reused, and said so
    assert "reused 1 finished run from" in capsys.readouterr().out
    before = sweep.load_dataset(f"npz:{data}")[0].x.clone()
    tiny_npz(data, 1)  # the same path now holds other data
    assert not torch.equal(sweep.load_dataset(f"npz:{data}")[0].x, before)  # the loader's cache is keyed by content
    with pytest.raises(StaleResultError, match=r"was made from other data .* its number would be stale"):
        sweep.run_sweep(config, tmp_path / "runs", progress=False)


def test_a_result_file_of_other_settings_is_refused(tmp_path):
    from mkopt.experiments.runs import ResultStore, RunSpec, StaleResultError

    store = ResultStore(tmp_path)
    spec = RunSpec("baseline", "A1", "adam", 0.0010000001, 0, 1, "synthetic")
    store.write(spec, {"test_accuracy": 0.5})
    close = RunSpec("baseline", "A1", "adam", 0.001, 0, 1, "synthetic")  # same file name (lr to 6 digits)
    assert store.path(close) == store.path(spec)
    with pytest.raises(StaleResultError, match="same file name, other settings"):
        store.done(close)


def test_default_results_folder_per_data_set():
    from mkopt.experiments.datasets import default_runs_folder

    assert default_runs_folder("fashion-mnist", full=False) == Path("runs/table1-quick")
    assert default_runs_folder("npz:/a/b/faces.npz", full=False) == Path("runs/table1-quick-npz-faces")
    assert default_runs_folder("cifar10", full=True) == Path("runs/table1-full-cifar10")
