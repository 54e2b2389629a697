"""One policy for mkopt's small elementwise kernels: compiled once with ``torch.compile``, eager as fallback.

The kernels (probability draw, fused mixing, adversarial ascent) are pure functions whose
compiled and eager forms give the same values (bit-identical for e <= 16); compiling only fuses
their passes. Where the compiler is unavailable (no C++ toolchain, unsupported platform) mkopt
warns once and runs every kernel eagerly, unless compilation was requested explicitly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

_compiled: dict[Callable[..., Any], Callable[..., Any]] = {}
_failed = False


def compile_by_default(device: torch.device, compiled: bool | None) -> bool:
    """``compiled`` if given, else whether mkopt compiles by default on ``device`` (CPU only: tested there).

    Example:
        >>> compile_by_default(torch.device("cpu"), None), compile_by_default(torch.device("cuda"), None)
        (True, False)
    """
    return device.type == "cpu" if compiled is None else compiled


def compiler_failed() -> bool:
    """Whether a kernel failed to compile in this process (every kernel then runs eagerly)."""
    return _failed


def run_kernel(fn: Callable[..., Any], *args: Any, compiled: bool, required: bool = False) -> Any:
    """``fn(*args)``, through ``torch.compile`` when ``compiled`` (one graph per e and dtype, dynamic sizes).

    ``required=True`` (the user passed ``sampler_compile=True``) raises a compilation error
    instead of falling back.

    Example:
        >>> run_kernel(torch.add, torch.ones(2), torch.ones(2), compiled=False)
        tensor([2., 2.])
    """
    global _failed
    if compiled and not _failed:
        kernel = _compiled.get(fn)
        if kernel is None:
            kernel = _compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=True)
        # one graph per (kernel, e, dtype, grad mode, ...): allow more than dynamo's default of 8 per function.
        # Set and restored directly: config.patch() costs 4x more, on every call of a per-layer kernel.
        config = torch._dynamo.config
        limit = config.recompile_limit
        config.recompile_limit = max(limit, 64)
        try:
            return kernel(*args)
        except Exception as error:  # no C++ compiler, unsupported platform, ...
            if required:
                raise
            _failed = True
            warnings.warn(
                f"mkopt could not compile its kernels ({type(error).__name__}: {error}); running them eagerly "
                "instead: same values, several times slower. Install a C++ compiler for torch.compile, or pass "
                "sampler_compile=False to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
        finally:
            config.recompile_limit = limit
    return fn(*args)

