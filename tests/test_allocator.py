"""retain_freed_memory: a training-like allocation churn stops page-faulting; bad input is refused."""

import subprocess
import sys

import pytest

import mkopt

CHURN = """
import ctypes, resource, sys, torch
import mkopt
# glibc's static default (mmap every block >= 128 KiB) without its run-time adaptation, which makes
# the default's fault count depend on the process's history: a reproducible worst case to start from
assert ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024) == 1
if sys.argv[1] == "retain":
    mkopt.retain_freed_memory()
faults = []
for _ in range(8):  # a step's worth of gradients and optimizer temporaries: 6 x 16 MiB, freed together
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(4 * 2**20) for _ in range(6)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[3:]))  # steady state, after glibc's own thresholds have adapted
"""


def steady_state_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counts and glibc are Linux facts")
def test_retained_memory_is_reused_without_page_faults():
    default, retained = steady_state_faults("default"), steady_state_faults("retain")
    pages_per_step = 6 * 16 * 2**20 // 4096
    assert default > pages_per_step  # each block is handed back and faulted in again every step
    assert retained < pages_per_step // 50  # ... unless glibc is told to keep them


@pytest.mark.parametrize("limit", [0, -1, 2**31, 1.5, True])
def test_bad_limit_is_refused_with_the_range(limit):
    with pytest.raises(ValueError, match="limit_bytes"):
        mkopt.retain_freed_memory(limit)
