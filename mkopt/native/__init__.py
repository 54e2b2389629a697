"""mkopt's fused CPU kernels: a small C++ library built on first use, cached, called through ctypes.

Why not ``torch.utils.cpp_extension``: its headers alone take ~1 minute to compile on 2 cores;
this source includes none of torch's and builds in a few seconds. The kernels run on torch's
own OpenMP runtime (``libgomp.so.1`` is already loaded by torch, so the dynamic linker binds
ours to it: one thread pool, sized by ``torch.set_num_threads``).

The cache (``$MKOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mkopt``, else ``~/.cache/mkopt``) is
keyed by the source, the compiler's version and this CPU's instruction-set flags (the build
uses ``-march=native``), so a cache shared by different machines never hands one of them code
it cannot run. Several processes building at once (DDP ranks) each write their own temporary
file and ``os.replace`` it into place: every reader sees a complete library.

The build links glibc's vector math library (``-lmvec``: 16 ``logf`` per AVX-512 call for Adv-MK's
ascent) where it can, and plain libm otherwise.

Without a C++ compiler :func:`available` is False and says why (:func:`unavailable_reason`);
:class:`mkopt.MKOptimizer` then takes the generic path and warns once.

Example:
    >>> import torch
    >>> from mkopt import native
    >>> if native.available():
    ...     p = native.probabilities(3, 5, key=7)
    ...     print(tuple(p.shape), bool(torch.allclose(p.sum(0), torch.ones(5))))
    ... else:
    ...     print((3, 5), True)
    (3, 5) True
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("mk_cpu.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC", "-std=c++17"]
_MVEC = ["-DMK_WITH_MVEC", "-lmvec"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(_SUFFIX)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None


class StepArgs(ctypes.Structure):
    """Mirror of ``StepArgs`` in ``mk_cpu.cpp`` (field order and types must match)."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("offset", ctypes.c_int64),
        ("key_now", ctypes.c_uint64),
        ("key_next", ctypes.c_uint64),
        ("e", ctypes.c_int32),
        ("uniform", ctypes.c_int32),
        ("has_grad", ctypes.c_int32),
        ("maximize", ctypes.c_int32),
        ("lr", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("grad_scale", ctypes.c_double),
        ("momentum", ctypes.c_double),
        ("dampening", ctypes.c_double),
        ("nesterov", ctypes.c_int32),
        ("first_momentum", ctypes.c_int32),
        ("beta1", ctypes.c_double),
        ("beta2", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("step_size", ctypes.c_double),
        ("bias2_sqrt", ctypes.c_double),
        ("amsgrad", ctypes.c_int32),
        ("decoupled", ctypes.c_int32),
        ("adversarial", ctypes.c_int32),
        ("randomize", ctypes.c_int32),
        ("ascent_step", ctypes.c_double),
        ("uniform_next", ctypes.c_int32),
    ]


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("MKOPT_CACHE_DIR"):
        return Path(os.environ["MKOPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mkopt"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), version.encode(), " ".join(_FLAGS + _MVEC).encode(), _cpu_flags().encode(), platform.machine().encode()):
        digest.update(part)
        digest.update(b"\0")
    target = cache_dir() / f"mk_cpu-{digest.hexdigest()[:20]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        # glibc's vector math library first (vectorized logf for Adv-MK's ascent); without it, plain libm
        result = subprocess.run([compiler, *_FLAGS, *_MVEC, str(_SOURCE), "-o", scratch], capture_output=True, text=True)
        if result.returncode != 0:
            result = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", scratch], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {_SOURCE.name}:\n{result.stderr[-2000:]}")
        os.chmod(scratch, 0o755)
        os.replace(scratch, target)  # atomic: a concurrent reader sees the old name absent or complete
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return target


def _load() -> ctypes.CDLL | None:
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is not None or _failure is not None:
            return _library
        compiler = _compiler()
        if compiler is None:
            _failure = "no C++ compiler found (set CXX, or install g++)"
            return None
        try:
            library = ctypes.CDLL(str(_build(compiler)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            _failure = f"{type(error).__name__}: {error}"
            return None
        _declare(library)
        _library = library
        return library


def _declare(library: ctypes.CDLL) -> None:
    i32, i64, u64, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p
    args = ctypes.POINTER(StepArgs)
    for suffix in _SUFFIX.values():
        getattr(library, f"mk_probabilities_{suffix}").argtypes = [i32, i64, i64, u64, i32, ptr]
        getattr(library, f"mk_mix_{suffix}").argtypes = [i32, i64, i64, u64, i32, ptr, ptr]
        getattr(library, f"mk_scale_grad_{suffix}").argtypes = [i32, i64, i64, u64, i32, ptr, ptr]
        getattr(library, f"mk_sgd_{suffix}").argtypes = [args, ptr, ptr, ptr, ptr, ptr, ptr]
        getattr(library, f"mk_adam_{suffix}").argtypes = [args, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
        getattr(library, f"mk_ascend_{suffix}").argtypes = [args, ptr, ptr, ptr, ptr, ptr]
        getattr(library, f"mk_adversarial_probabilities_{suffix}").argtypes = [args, ptr, ptr, ptr]
        for name in ("probabilities", "mix", "scale_grad", "sgd", "adam", "ascend", "adversarial_probabilities"):
            getattr(library, f"mk_{name}_{suffix}").restype = None


def available() -> bool:
    """Whether the fused CPU kernels are built (building them now if needed, a few seconds once)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (``None`` when it is True)."""
    _load()
    return _failure


def max_e() -> int:
    """The largest ``e`` the fused kernels take (larger ``e`` runs on the generic path)."""
    library = _require()
    library.mk_max_e.restype = ctypes.c_int
    return int(library.mk_max_e())


def _require() -> ctypes.CDLL:
    library = _load()
    if library is None:
        raise RuntimeError(f"mkopt's fused CPU kernels are unavailable: {_failure}")
    return library


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _function(name: str, dtype: torch.dtype):
    if dtype not in _SUFFIX:
        raise TypeError(f"mkopt's fused kernels take {[str(d) for d in SUPPORTED_DTYPES]}, not {dtype}")
    return getattr(_require(), f"mk_{name}_{_SUFFIX[dtype]}")


def _check(tensor: torch.Tensor, what: str) -> None:
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"{what} must be a contiguous CPU tensor (got device={tensor.device}, contiguous={tensor.is_contiguous()})")


def probabilities(e: int, n: int, key: int, offset: int = 0, uniform: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Columns ``offset .. offset + n`` of stream ``key`` as a ``[e, n]`` tensor (the values of
    :func:`mkopt.sampling.counter_dirichlet_`, bit for bit up to ``e = 16``)."""
    out = torch.empty(e, n, dtype=dtype)
    _function("probabilities", dtype)(e, n, offset, key & (2**64 - 1), int(uniform), out.data_ptr())
    return out


def mix_(copies: torch.Tensor, out: torch.Tensor, key: int, offset: int, uniform: bool = False) -> torch.Tensor:
    """``out = sum_k p_k * copies[k]`` with ``p`` regenerated (``copies``: ``[e, *out.shape]``)."""
    _check(copies, "copies")
    _check(out, "out")
    e = copies.shape[0]
    _function("mix", copies.dtype)(e, out.numel(), offset, key & (2**64 - 1), int(uniform), copies.data_ptr(), out.data_ptr())
    return out


def scale_grad(grad: torch.Tensor, e: int, key: int, offset: int, uniform: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sqrt(sum_k p_k^2) * grad`` in a new tensor, or in ``out`` (contiguous, like ``grad``; ``grad`` made contiguous first)."""
    grad = grad.contiguous()
    if out is None:
        out = torch.empty_like(grad)
    elif not out.is_contiguous() or out.shape != grad.shape or out.dtype != grad.dtype:
        raise ValueError(f"out must be a contiguous {grad.dtype} tensor of shape {tuple(grad.shape)}, got {out.dtype} {tuple(out.shape)}")
    _function("scale_grad", grad.dtype)(e, grad.numel(), offset, key & (2**64 - 1), int(uniform), grad.data_ptr(), out.data_ptr())
    return out


def sgd_(args: StepArgs, copies: torch.Tensor, w: torch.Tensor, grad: torch.Tensor | None, momentum_buffer: torch.Tensor | None,
         probe: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> None:  # fmt: skip
    """One fused MK-SGD update of ``copies`` (and ``momentum_buffer``), writing the next ``w``.

    ``probe``: the adversarial modes' probe gradient ``dL/dW`` (``args.adversarial``); ``weight``:
    B.2's per-element mixing weight saved by :func:`ascend_`."""
    _function("sgd", copies.dtype)(
        ctypes.byref(args), copies.data_ptr(), w.data_ptr(), _pointer(grad), _pointer(momentum_buffer), _pointer(probe),
        _pointer(weight))  # fmt: skip


def adam_(args: StepArgs, copies: torch.Tensor, w: torch.Tensor, grad: torch.Tensor | None, exp_avg: torch.Tensor,
          exp_avg_sq: torch.Tensor, max_exp_avg_sq: torch.Tensor | None, probe: torch.Tensor | None = None,
          weight: torch.Tensor | None = None) -> None:  # fmt: skip
    """One fused MK-Adam(W) update of ``copies`` and the moments, writing the next ``w``."""
    _function("adam", copies.dtype)(
        ctypes.byref(args), copies.data_ptr(), w.data_ptr(), _pointer(grad), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
        _pointer(max_exp_avg_sq), _pointer(probe), _pointer(weight),
    )  # fmt: skip


def ascend_(args: StepArgs, copies: torch.Tensor, probe: torch.Tensor, w: torch.Tensor, norm: torch.Tensor,
            weight: torch.Tensor | None = None) -> None:  # fmt: skip
    """Adversarial step: ``w = sum_k p_k W~_k`` and ``norm = sqrt(sum_k p_k^2)`` with ``p`` from ``probe`` (B.1/B.2);
    B.2 also saves its per-element mixing weight in ``weight`` (float32, or float64 for float64 copies)."""
    _function("ascend", copies.dtype)(
        ctypes.byref(args), copies.data_ptr(), probe.data_ptr(), w.data_ptr(), norm.data_ptr(), _pointer(weight))


def adversarial_probabilities(args: StepArgs, copies: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """The adversarial ``p`` (``[e, n]``, float32 or float64) the fused kernels use for ``args``."""
    p_dtype = torch.float64 if copies.dtype == torch.float64 else torch.float32
    out = torch.empty(args.e, args.n, dtype=p_dtype)
    _function("adversarial_probabilities", copies.dtype)(ctypes.byref(args), copies.data_ptr(), probe.data_ptr(), out.data_ptr())
    return out
