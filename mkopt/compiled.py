"""One policy for mkopt's small elementwise kernels: compiled once with ``torch.compile``, eager as fallback.

The kernels (probability draw, fused mixing, adversarial ascent) are pure functions; compiling
only fuses their passes. The compiled draw gives bit-identical values to the eager one for
e <= 16; the mixing and ascent kernels may differ from eager in the last bit (fused
multiply-adds). Where the compiler is unavailable (no C++ toolchain, unsupported platform) mkopt
warns once and runs every kernel eagerly, unless compilation was requested explicitly.
"""

from __future__ import annotations

import logging
import threading
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch



class _DropCudaHomeNotice(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." notice.

    torch.utils.cpp_extension logs it on import whenever a CUDA toolkit is installed on a machine
    without a GPU; inductor imports that module for every CPU kernel mkopt compiles, so each run
    printed it although nothing CUDA is built. Only that one message is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_DropCudaHomeNotice())

_compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}
_lock = threading.Lock()
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
    """``fn(*args)``, through ``torch.compile`` when ``compiled`` (dynamic sizes; one graph per e, dtype, rank).

    If the compiled call fails, ``fn`` runs eagerly: when that fails too, the error is the kernel's
    own and is raised; otherwise compilation is broken in this process, which warns once and makes
    every later kernel eager. ``required=True`` (the user passed ``sampler_compile=True``) raises
    the compilation error instead.

    Example:
        >>> run_kernel(torch.add, torch.ones(2), torch.ones(2), compiled=False)
        tensor([2., 2.])
    """
    global _failed
    if required and _failed:
        raise RuntimeError("sampler_compile=True, but torch.compile already failed in this process (see the earlier warning)")
    if not compiled or _failed:
        return fn(*args)
    kernel = _kernel_for(fn, args)
    try:
        return kernel(*args)
    except Exception as compile_error:  # no C++ compiler, unsupported platform, ... or a bug in the kernel
        if required:
            raise
        out = fn(*args)  # a genuine error in the kernel raises here, with its own message
        _failed = True
        warnings.warn(
            f"mkopt could not compile its kernels ({type(compile_error).__name__}: {compile_error}); running them "
            "eagerly instead: same values, several times slower. Install a C++ compiler for torch.compile, or pass "
            "sampler_compile=False to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return out


def _kernel_for(fn: Callable[..., Any], args: tuple[Any, ...]) -> Callable[..., Any]:
    """One compiled function per (kernel, e, dtypes, ranks, flags), each over its own code object.

    Dynamo caches graphs per code object and stops compiling one after ``recompile_limit`` (8)
    graphs; a process can need more variants of one kernel than that (several e, dtypes, grad
    modes). A copy of the code object per variant keeps every cache small without touching the
    global limit.
    """
    key = (fn, *(_describe(a) for a in args))
    kernel = _compiled.get(key)
    if kernel is None:
        with _lock:
            kernel = _compiled.get(key)
            if kernel is None:
                code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{len(_compiled)}")
                variant = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
                kernel = _compiled[key] = torch.compile(variant, fullgraph=True, dynamic=True)
    return kernel


def _describe(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):  # the first size of a >= 2-D tensor is e: specialized by the kernels' loops
        return (arg.dtype, arg.device.type, arg.dim(), arg.shape[0] if arg.dim() >= 2 else None)
    return arg
