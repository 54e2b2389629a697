"""CPU training speed: keep freed memory in the process instead of handing it back to the kernel.

glibc's ``malloc`` serves large blocks with ``mmap`` and trims the heap after large frees, so a
training step that allocates and frees tens of megabytes (gradients, optimizer temporaries)
pays for fresh zeroed pages every step. MK allocates ``e`` times the gradient and optimizer
memory of the plain model, so it pays ``e`` times as much: on the paper's largest MLP these page
faults were about half of MK's overhead (``bench/step_overhead.py``). GPU allocators cache
freed blocks for the same reason; on CPU, PyTorch's launcher ``python -m torch.backends.xeon.run_cpu``
preloads jemalloc or tcmalloc where installed. :func:`retain_freed_memory` is the dependency-free
equivalent for glibc: the process keeps up to ``limit_bytes`` of freed memory for reuse (its
resident size stays at its peak, like a CUDA caching allocator's reserved memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
_MAX_INT = 2**31 - 1  # mallopt takes a C int


def retain_freed_memory(limit_bytes: int = 2**30) -> None:
    """Make glibc keep freed blocks up to ``limit_bytes`` for reuse (process-wide, for the process's lifetime).

    Equivalent to starting Python with
    ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=N:glibc.malloc.trim_threshold=N``. Call it once
    at the start of a CPU training process; it changes speed, never results. Raises on a
    platform without glibc (macOS, musl): there, preload jemalloc or tcmalloc instead.

    Example:
        >>> retain_freed_memory()  # process-wide; returns nothing
    """
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or not 0 < limit_bytes <= _MAX_INT:
        raise ValueError(f"limit_bytes={limit_bytes!r} must be an int in 1 .. {_MAX_INT} (glibc's mallopt takes a C int)")
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        raise RuntimeError(
            f"retain_freed_memory() tunes glibc's malloc, but this process runs on {libc_name or platform.system()!r}: "
            "preload jemalloc or tcmalloc instead (e.g. python -m torch.backends.xeon.run_cpu, or LD_PRELOAD)"
        )
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # the mmap threshold first: setting either one fixes both, so glibc stops adapting them itself
    for option, name in ((_M_MMAP_THRESHOLD, "M_MMAP_THRESHOLD"), (_M_TRIM_THRESHOLD, "M_TRIM_THRESHOLD")):
        if libc.mallopt(option, ctypes.c_int(limit_bytes)) != 1:
            raise RuntimeError(f"glibc rejected mallopt({name}, {limit_bytes}): pass a smaller limit_bytes")
