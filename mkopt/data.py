"""Data sets held in memory as tensors (they fit; no per-sample Python in the training loop)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_SEARCH = (
    "/usr/share/datasets/fashion-mnist",  # Debian package dataset-fashion-mnist
    "~/.cache/mkopt/fashion-mnist",
    "./data/FashionMNIST/raw",  # torchvision.datasets.FashionMNIST(root="./data", download=True)
)


@dataclass
class Split:
    """A labelled data set in memory: ``x`` float32 ``[n, ...]``, ``y`` int64 ``[n]``."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not.

    Example:
        >>> import tempfile, numpy as np
        >>> f = tempfile.NamedTemporaryFile(suffix=".idx", delete=False)
        >>> _ = f.write(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([7, 8, 9])); f.close()
        >>> read_idx(f.name).tolist()
        [7, 8, 9]
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {body.size} values")
    return body.reshape(shape)


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the four Fashion-MNIST IDX files; a clear error saying where it looked.

    An explicit ``root`` (then ``$MKOPT_FASHION_MNIST``) is authoritative: when it lacks the files
    this is an error, never a silent fall back to another copy. Without either, the usual places
    are searched.

    Example:
        >>> import tempfile
        >>> find_fashion_mnist(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: Fashion-MNIST not found in ... (the folder you passed)...
    """
    if root is not None:
        candidates, origin = [Path(root).expanduser()], "the folder you passed"
    elif os.environ.get("MKOPT_FASHION_MNIST"):
        candidates, origin = [Path(os.environ["MKOPT_FASHION_MNIST"]).expanduser()], "$MKOPT_FASHION_MNIST"
    else:
        candidates, origin = [Path(p).expanduser() for p in FASHION_MNIST_SEARCH], ""
    for folder in candidates:
        if all(_idx_file(folder, name) is not None for name in FASHION_MNIST_FILES.values()):
            return folder
    if origin:
        names = ", ".join(f"{n}(.gz)" for n in FASHION_MNIST_FILES.values())
        raise FileNotFoundError(f"Fashion-MNIST not found in {candidates[0]} ({origin}): it must hold {names}")
    raise FileNotFoundError(
        "Fashion-MNIST not found; looked in: "
        + ", ".join(str(c) for c in candidates)
        + ". Get it with `apt-get install dataset-fashion-mnist` (Debian), or online with "
        "`torchvision.datasets.FashionMNIST('./data', download=True)`, or pass the folder holding "
        "train-images-idx3-ubyte(.gz) etc. (or set MKOPT_FASHION_MNIST)"
    )


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(root: str | os.PathLike | None = None) -> tuple[Split, Split]:
    """Fashion-MNIST train (60k) and test (10k) as float32 images in [0, 1], shape ``[n, 1, 28, 28]``."""
    folder = find_fashion_mnist(root)
    arrays = {key: read_idx(_idx_file(folder, name)) for key, name in FASHION_MNIST_FILES.items()}

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        if len(x) != len(y):
            raise ValueError(f"{folder}: {len(x)} images but {len(y)} labels")
        return Split(torch.from_numpy(x.copy()).float().div_(255).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))

    return split(arrays["x_train"], arrays["y_train"]), split(arrays["x_test"], arrays["y_test"])


CIFAR10_SEARCH = ("./data/cifar-10-batches-py", "~/.cache/mkopt/cifar-10-batches-py")


def validate_split(x: torch.Tensor, y: torch.Tensor, name: str, classes: int | None = None) -> None:
    """Shapes and labels a classification split must have; errors say what is wrong and where."""
    if x.dim() < 2:
        raise ValueError(f"{name}: x must be [n, ...features] with n samples, got shape {tuple(x.shape)}")
    if y.dim() != 1 or len(y) != len(x):
        raise ValueError(f"{name}: y must be [n] labels for the {len(x)} samples of x, got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be integers 0..C-1, got dtype {y.dtype}")
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"{name}: labels must be integers 0..C-1, found {int(y.min())}")
    if classes is not None and len(y) and int(y.max()) >= classes:
        raise ValueError(f"{name}: label {int(y.max())} is out of range for {classes} classes (train labels are 0..{classes - 1})")


def load_npz(path: str | os.PathLike) -> tuple[Split, Split]:
    """A user data set: an ``.npz`` with ``x_train, y_train, x_test, y_test`` (features any shape).

    Integer images (uint8) are scaled to [0, 1]; labels must be integers ``0..C-1``.

    Example:
        >>> import tempfile, numpy as np
        >>> path = tempfile.mktemp(suffix=".npz")
        >>> np.savez(path, x_train=np.zeros((4, 3)), y_train=[0, 1, 0, 1], x_test=np.ones((2, 3)), y_test=[1, 0])
        >>> train, test = load_npz(path); tuple(train.x.shape), test.y.tolist()
        ((4, 3), [1, 0])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass an .npz with arrays x_train, y_train, x_test, y_test")
    with np.load(path, allow_pickle=False) as archive:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in archive.files]
        if missing:
            raise ValueError(f"{path} lacks {missing}; it has {sorted(archive.files)} (needed: x_train, y_train, x_test, y_test)")
        arrays = {k: archive[k] for k in ("x_train", "y_train", "x_test", "y_test")}

    def tensor_x(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(a))
        return x.float().div_(255) if x.dtype == torch.uint8 else x.float()

    train = Split(tensor_x(arrays["x_train"]), torch.from_numpy(np.asarray(arrays["y_train"])))
    test = Split(tensor_x(arrays["x_test"]), torch.from_numpy(np.asarray(arrays["y_test"])))
    validate_split(train.x, train.y, f"{path} (train)")
    classes = int(train.y.max()) + 1
    if len(train.y) and int(train.y.min()) > 0:
        warnings.warn(
            f"{path}: train labels are {int(train.y.min())}..{classes - 1}, so class 0 has no example and the model gets "
            f"{classes} outputs; labels are expected as 0..C-1 (subtract {int(train.y.min())} if yours start there)",
            UserWarning,
            stacklevel=2,
        )
    validate_split(test.x, test.y, f"{path} (test)", classes)
    if train.x.shape[1:] != test.x.shape[1:]:
        raise ValueError(f"{path}: x_train samples have shape {tuple(train.x.shape[1:])} but x_test {tuple(test.x.shape[1:])}")
    return Split(train.x, train.y.long()), Split(test.x, test.y.long())


def load_cifar10(root: str | os.PathLike | None = None) -> tuple[Split, Split]:
    """CIFAR-10 from torchvision's ``cifar-10-batches-py`` folder: [n, 3, 32, 32] floats in [0, 1].

    Get it online with ``torchvision.datasets.CIFAR10('./data', download=True)``.
    """
    candidates = [Path(root)] if root is not None else [Path(p).expanduser() for p in CIFAR10_SEARCH]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    folder = next((c for c in candidates if all((c / n).is_file() for n in names)), None)
    if folder is None:
        raise FileNotFoundError(
            "CIFAR-10 (python format) not found; looked in: " + ", ".join(str(c) for c in candidates)
            + ". It needs data_batch_1..5 and test_batch: get them online with "
            "torchvision.datasets.CIFAR10('./data', download=True) (creates ./data/cifar-10-batches-py)"
        )

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(folder / name, "rb") as handle:
            entry = _CifarUnpickler(handle, encoding="latin1").load()
        if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
            raise ValueError(f"{folder / name}: expected a CIFAR-10 batch (a dict with 'data' and 'labels')")
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{folder / name}: expected data of shape [n, 3072], got {data.shape}")
        return data.reshape(-1, 3, 32, 32), np.asarray(entry["labels"], dtype=np.int64)

    parts = [batch(n) for n in names]
    train_x = np.concatenate([p[0] for p in parts[:5]])
    train_y = np.concatenate([p[1] for p in parts[:5]])
    train = Split(torch.from_numpy(train_x).float().div_(255), torch.from_numpy(train_y))
    test = Split(torch.from_numpy(parts[5][0]).float().div_(255), torch.from_numpy(parts[5][1]))
    validate_split(train.x, train.y, f"{folder} (train)", 10)
    validate_split(test.x, test.y, f"{folder} (test)", 10)
    return train, test


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds (dicts, lists, str/bytes, numpy arrays): a crafted file
    that names any other callable is refused instead of run."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"{module}.{name} is not part of a CIFAR-10 batch: refusing to load it (the file is not torchvision's "
                "cifar-10-batches-py, or it was tampered with)"
            )
        return super().find_class(module, name)


def validation_split(train: Split, fraction: float = 0.1, seed: int = 0) -> tuple[Split, Split]:
    """A fixed, seeded (train, validation) split carved from ``train`` (validation is for lr selection only).

    Example:
        >>> full = Split(torch.arange(10.0).unsqueeze(1), torch.arange(10) % 2)
        >>> fit, val = validation_split(full, 0.2, seed=0); len(fit), len(val)
        (8, 2)
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction={fraction} must be in (0, 1)")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    cut = int(round(len(train) * fraction))
    held, kept = order[:cut], order[cut:]
    return Split(train.x[kept], train.y[kept]), Split(train.x[held], train.y[held])
