"""Data readers: IDX, CIFAR-10 python batches, user .npz, validation split; clear errors."""

import gzip
import pickle

import numpy as np
import pytest
import torch

from mkopt.data import Split, load_cifar10, load_fashion_mnist, load_npz, read_idx, validation_split


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def test_fashion_mnist_reader_on_generated_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28))
    labels = np.array([0, 9, 3, 3, 1])
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:2], False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:2], False)
    train, test = load_fashion_mnist(tmp_path)
    assert train.x.shape == (5, 1, 28, 28) and test.x.shape == (2, 1, 28, 28)
    assert torch.equal(train.x[1, 0], torch.from_numpy(images[1]).float() / 255)
    assert train.y.tolist() == [0, 9, 3, 3, 1] and train.y.dtype == torch.int64


def test_truncated_idx_and_missing_data_fail_clearly(tmp_path, monkeypatch):
    write_idx(tmp_path / "bad", np.zeros((4, 2)), False)
    (tmp_path / "bad").write_bytes((tmp_path / "bad").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "bad")
    monkeypatch.setattr("mkopt.data.FASHION_MNIST_SEARCH", (str(tmp_path / "empty"),))
    monkeypatch.delenv("MKOPT_FASHION_MNIST", raising=False)
    with pytest.raises(FileNotFoundError, match=r"looked in: .*empty.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist()


def test_cifar10_reader_on_a_generated_folder(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        pickle.dump({"data": data, "labels": [1, 2, 9]}, open(folder / name, "wb"))
    train, test = load_cifar10(folder)
    assert train.x.shape == (15, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    raw = pickle.load(open(folder / "test_batch", "rb"))["data"]
    assert torch.equal(test.x[0, 2], torch.from_numpy(raw[0, 2048:].reshape(32, 32)).float() / 255)  # channel-major rows
    with pytest.raises(FileNotFoundError, match="torchvision.datasets.CIFAR10"):
        load_cifar10(tmp_path / "nowhere")


def test_npz_reader_and_its_errors(tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=np.zeros((6, 2, 2), np.uint8) + 255, y_train=[0, 1, 2, 0, 1, 2], x_test=np.zeros((2, 2, 2), np.uint8), y_test=[2, 0])
    train, test = load_npz(path)
    assert train.x.shape == (6, 2, 2) and float(train.x.max()) == 1.0 and test.y.tolist() == [2, 0]
    np.savez(path, x_train=np.zeros((3, 2)), y_train=[0, 1], x_test=np.zeros((1, 2)), y_test=[0])
    with pytest.raises(ValueError, match=r"y must be \[n\] labels for the 3 samples"):
        load_npz(path)
    np.savez(path, x_train=np.zeros((2, 2)), y_train=[0, 1], x_test=np.zeros((1, 2)), y_test=[5])
    with pytest.raises(ValueError, match="label 5 is out of range for 2 classes"):
        load_npz(path)
    np.savez(path, x_train=np.zeros((2, 2)), y_train=[0.0, 1.0], x_test=np.zeros((1, 2)), y_test=[0])
    with pytest.raises(ValueError, match="labels must be integers"):
        load_npz(path)
    np.savez(path, x=np.zeros(2))
    with pytest.raises(ValueError, match=r"lacks \['x_train', 'y_train', 'x_test', 'y_test'\]"):
        load_npz(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_npz(tmp_path / "nope.npz")


def test_validation_split_is_fixed_disjoint_and_complete():
    data = Split(torch.arange(100.0).unsqueeze(1), torch.arange(100) % 3)
    fit, val = validation_split(data, 0.1, seed=3)
    again, val_again = validation_split(data, 0.1, seed=3)
    assert torch.equal(val.x, val_again.x) and len(val) == 10 and len(fit) == 90
    assert sorted(torch.cat([fit.x, val.x]).flatten().tolist()) == list(range(100))
    with pytest.raises(ValueError, match="must be in"):
        validation_split(data, 1.5)
