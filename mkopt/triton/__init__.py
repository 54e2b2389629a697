"""The GPU path: mkopt's MK kernels in Triton, the CUDA counterpart of the CPU kernels in :mod:`mkopt.native`.

- :mod:`mkopt.triton.kernels`: the device code (``p`` regenerated from the stream key, bit-identical to the
  CPU stream; the fused SGD/Adam(W) update; the generic path's mix and spread; the adversarial ascent);
- :mod:`mkopt.triton.launch`: launchers (grids, constants; never a host-device synchronization);
- :mod:`mkopt.triton.ops`: the ``torch.library`` ops (``mkopt::triton_*``) that ``torch.compile`` traces around;
- :mod:`mkopt.triton.step`: the fused path's update of one kernel on the GPU (called by :mod:`mkopt.fused_step`).

On CUDA tensors the kernels are compiled; on CPU tensors they run under Triton's interpreter (slow:
that is how they are tested without a GPU, and how :func:`run_on_cpu` lets a test drive the fused
path's GPU code on CPU).

Example:
    >>> from mkopt import triton as mk_triton
    >>> mk_triton.available() or mk_triton.unavailable_reason() is not None
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_failure: str | None = None
try:
    import triton  # noqa: F401
except ImportError as error:  # torch's CPU wheels on some platforms come without it
    _failure = f"triton cannot be imported ({error}); it is installed with torch on Linux"

_on_cpu = False


def available() -> bool:
    """Whether Triton can be imported (the kernels then run on CUDA, and interpreted on CPU)."""
    return _failure is None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (``None`` when it is True)."""
    return _failure


def handles(device: torch.device) -> bool:
    """Whether the fused path runs its kernels for ``device`` in Triton: CUDA, or CPU inside :func:`run_on_cpu`."""
    return available() and (device.type == "cuda" or (_on_cpu and device.type == "cpu"))


@contextlib.contextmanager
def run_on_cpu() -> Iterator[None]:
    """Route the fused path's CPU kernels through the Triton kernels (interpreted) instead of the C++ ones.

    For tests: it runs the GPU path's code, launches included, on CPU tensors.

    Example:
        >>> with run_on_cpu():
        ...     handles(torch.device("cpu")) == available()
        True
    """
    global _on_cpu
    previous, _on_cpu = _on_cpu, True
    try:
        yield
    finally:
        _on_cpu = previous


if available():  # the submodules import triton
    from . import launch, ops, step  # noqa: E402
    from .kernels import MAX_E  # noqa: E402
    from .launch import STORAGE_DTYPES  # noqa: E402
else:
    MAX_E = 0
    STORAGE_DTYPES: tuple[torch.dtype, ...] = ()
