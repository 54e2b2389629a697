"""Data sets held in memory as tensors (they fit; no per-sample Python in the training loop)."""

from __future__ import annotations

import gzip
import os
import struct
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
    """The folder holding the four Fashion-MNIST IDX files; a clear error saying where it looked."""
    candidates = [Path(root)] if root is not None else []
    if os.environ.get("MKOPT_FASHION_MNIST"):
        candidates.append(Path(os.environ["MKOPT_FASHION_MNIST"]))
    candidates += [Path(p).expanduser() for p in FASHION_MNIST_SEARCH]
    for folder in candidates:
        if all(_idx_file(folder, name) is not None for name in FASHION_MNIST_FILES.values()):
            return folder
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
