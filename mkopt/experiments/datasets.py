"""What identifies a sweep's data set: a readable label for folders, and a hash of its content.

Results are keyed by the data's content, not by the path string: a file replaced by other data
must never hand back a finished run's number (see :class:`mkopt.experiments.runs.ResultStore`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

from ..data import FASHION_MNIST_FILES, _idx_file, find_fashion_mnist
from ..errors import DataError

BUILTIN = ("fashion-mnist", "cifar10", "synthetic")
SYNTHETIC_VERSION = "synthetic-v1"  # the generated problem of sweep.load_dataset; bump when it changes


def check_name(name: str) -> None:
    """Refuse a data set name that is none of the known kinds (before any job is launched).

    Example:
        >>> check_name("mnist")
        Traceback (most recent call last):
        ...
        mkopt.errors.DataError: dataset='mnist' is unknown: use fashion-mnist, cifar10, npz:PATH (your own .npz) or synthetic
    """
    if name not in BUILTIN and not (name.startswith("npz:") and len(name) > 4):
        raise DataError(f"dataset={name!r} is unknown: use fashion-mnist, cifar10, npz:PATH (your own .npz) or synthetic")


def label(name: str) -> str:
    """A folder-safe, readable name for data set ``name`` (``npz:/data/my set.npz`` -> ``npz-my-set``).

    Example:
        >>> label("fashion-mnist"), label("npz:/data/my set.npz")
        ('fashion-mnist', 'npz-my-set')
    """
    check_name(name)
    if not name.startswith("npz:"):
        return name
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name[4:]).stem).strip("-.") or "data"
    return f"npz-{stem}"


def files_of(name: str) -> list[Path]:
    """The files data set ``name`` is read from (none for the generated ``synthetic``)."""
    check_name(name)
    if name == "synthetic":
        return []
    if name == "fashion-mnist":
        folder = find_fashion_mnist()
        return [_idx_file(folder, file) for file in FASHION_MNIST_FILES.values()]  # type: ignore[misc]
    if name == "cifar10":
        from ..data import CIFAR10_SEARCH

        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for folder in (Path(p).expanduser() for p in CIFAR10_SEARCH):
            if all((folder / n).is_file() for n in names):
                return [folder / n for n in names]
        raise DataError(f"CIFAR-10 not found in {', '.join(CIFAR10_SEARCH)}: get it with torchvision.datasets.CIFAR10('./data', download=True)")
    path = Path(name[4:]).expanduser()
    if not path.is_file():
        raise DataError(f"{path} does not exist: --dataset npz:PATH needs an .npz with x_train, y_train, x_test, y_test")
    return [path]


def fingerprint(name: str) -> str:
    """SHA-256 (first 16 hex digits) of the bytes of every file data set ``name`` is read from.

    Cached per (file, size, mtime), so a sweep hashes each file once per process.

    Example:
        >>> import tempfile, numpy as np
        >>> path = tempfile.mktemp(suffix=".npz"); np.savez(path, a=[1])
        >>> before = fingerprint(f"npz:{path}"); np.savez(path, a=[2])
        >>> before != fingerprint(f"npz:{path}"), fingerprint("synthetic")
        (True, 'synthetic-v1')
    """
    try:
        files = files_of(name)
    except FileNotFoundError as error:
        raise DataError(str(error)) from None
    if not files:
        return SYNTHETIC_VERSION
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(_file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def default_runs_folder(name: str, full: bool, root: str | os.PathLike = "runs") -> Path:
    """``runs/table1-quick`` for Fashion-MNIST (the main job), ``runs/table1-quick-<label>`` for other data.

    Example:
        >>> str(default_runs_folder("npz:/x/faces.npz", full=True))
        'runs/table1-full-npz-faces'
    """
    base = f"table1-{'full' if full else 'quick'}"
    return Path(root) / (base if name == "fashion-mnist" else f"{base}-{label(name)}")
