"""Step-time and peak-memory ratio of MK training vs the plain baseline, measured side by side.

Run:  python bench/step_overhead.py [--device cuda] [--quick] [--only TEXT ...] [--out results/bench/step_overhead_cpu.md]

For each configuration every variant below is built on the same architecture and data and timed in
interleaved blocks (baseline block, then one block of each other variant, repeated), so machine noise
hits all alike; a ratio is the median over blocks of variant time / baseline time in the same block.

- "fused": ``MKOptimizer(..., path="fused")``, the headline column; "generic": ``path="generic"``;
  "params": the params form, ``mkopt.optim.Adam(model.parameters(), e=e, ...)`` (same fused kernels,
  no parametrization in the forward: the model's own weight is the mixed kernel).
  While the installed mkopt has no ``path`` keyword, MK is built without it (its only, generic path)
  and the fused variant is left out (a note says so); likewise where the fused path refuses a
  configuration or falls back to the generic one.
- "floor": the plain model plus e - 1 extra copies of every kernel whose gradients are written each
  step and stepped by the same optimizer, i.e. the generic design with free mixing and free p.
- "fused floor": the plain model's forward/backward, the optimizer on the non-kernel parameters only,
  plus streaming that reads and writes the words the fused update reads and writes per kernel element
  (Adam/AdamW: 3e + 1 fp32 words each way; momentum SGD: 2e + 1), i.e. the fused design's floor: by
  default updated in place as the fused kernel does, with ``--fused-floor out-of-place`` one
  out-of-place ``torch.mul`` pass (~1.5x the DRAM traffic: write-allocate; see :class:`FusedTrafficFloor`).
- "fused floor + p": the fused floor plus the version-3 stream's p regenerated ``P_DRAWS`` = 3 times per
  kernel element and step (with s = sqrt(sum_k p_k^2) formed and one N-sized multiply each), as the fused
  design must: p_t for backward's s, p_t for the update, p_t+1 for the next W. Storing s instead of
  regenerating it would save one draw for N floats of memory (see ``results/bench/README.md``).
  The floors are timed for p = dirichlet only (Adv-MK adds a second pass they do not model).

On CPU every configuration is timed in two fresh processes: with glibc's default malloc (what a user
gets), which hands large freed blocks back to the kernel and page-faults them in again every step,
and after ``mkopt.retain_freed_memory()``. Slow configurations run fewer steps per block (about
``--block-seconds`` of baseline time per block, at most ``--steps``).

Peak memory. "live-tensor peak": the most bytes of tensors alive at once while building the model and
optimizer and training 3 steps (parameters incl. MK's copies, gradients, optimizer state,
activations and temporaries); on CPU from the allocation events of ``torch.profiler`` with
``profile_memory=True`` (everything is allocated inside the profiled region, after the same shapes
were already trained in that process, so no compilation is counted), on CUDA
``max_memory_allocated``. "RSS peak ratio" (CPU, the earlier method, kept for continuity): in a fresh
child process per variant, peak RSS while building and training 3 steps minus the RSS just before,
for MK built with mkopt's default path; both children first train a tiny baseline and MK model and
set glibc to unmap blocks >= 128 KiB on free, so that resident memory follows live memory.

Targets (the "target" column; "met" checks MK fused, or generic where there is no fused variant, under
the default malloc; step time ratios unless "mem"): paper MLP [400,200,100], batch 256, e = 3: Adam
<= 1.20x and live-tensor peak <= 2.0x, momentum SGD <= 1.20x, AdamW <= 1.25x, with torch's fused Adam
as the baseline's optimizer <= 1.35x; e = 8 Adam <= 1.8x; e = 2 no slower than e = 3; Adv-MK <= 2.3x;
small CNN <= 1.03x; CIFAR-stem ResNet-18 <= 1.05x; torchvision ResNet-18 at 32x32 <= 1.12x.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import inspect
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from queue import Empty
from typing import Any

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's chatter on stderr (children inherit it)

import torch
import torch.nn.functional as F
from torch import nn

import mkopt
from mkopt import native
from mkopt.experiments.models import mlp
from mkopt.fused_step import scale_grad_op
from mkopt.provenance import commit_of_tree

# The ``path`` keyword is new; until the installed mkopt has it, MK is built without it (generic only).
MK_HAS_PATH = "path" in inspect.signature(mkopt.MKOptimizer).parameters

TIMED = ("base", "fused", "params", "generic", "floor", "fused-floor", "fused-floor-p")  # column order; "base" first
MK_VARIANTS = ("fused", "params", "generic")
LABELS = {"fused": "fused", "params": "params form", "generic": "generic", "floor": "floor", "fused-floor": "fused floor", "fused-floor-p": "fused floor + p"}
PARAMS_FORM = {"adam": "Adam", "adam-fused": "Adam", "adamw": "AdamW", "sgd": "SGD"}  # mkopt.optim's classes


@dataclass(frozen=True)
class Target:
    time: float | None = None  # max MK / baseline step time
    memory: float | None = None  # max MK / baseline live-tensor peak
    not_slower_than_e: int | None = None  # time ratio <= that of the same configuration at this e

    def text(self) -> str:
        parts = []
        if self.time is not None:
            parts.append(f"≤ {self.time:.2f}x")
        if self.not_slower_than_e is not None:
            parts.append(f"≤ e={self.not_slower_than_e} row")
        if self.memory is not None:
            parts.append(f"mem ≤ {self.memory:.1f}x")
        return ", ".join(parts)


@dataclass(frozen=True)
class Config:
    name: str
    model: str
    optimizer: str
    batch: int
    e: int = 3
    mode: str = "dirichlet"
    compiled: bool = False  # time torch.compile(model) (every variant alike)
    target: Target | None = None
    fused_floor: str = "in-place"  # FusedTrafficFloor's traffic model

    def key(self) -> str:
        """What ``--only`` matches against."""
        return f"{self.name} {self.model} {self.optimizer} {self.mode} e={self.e}"


# -- models and optimizers ---------------------------------------------------------------------


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def build_model(name: str) -> nn.Module:
    if name.startswith("mlp"):  # hidden widths after "mlp", dash-separated
        return mlp(tuple(int(h) for h in name[3:].split("-")), inputs=3072, classes=10)
    if name == "cnn":
        return small_cnn()
    if name in ("resnet18", "resnet18-cifar"):
        import torchvision

        model = torchvision.models.resnet18(num_classes=10)
        if name == "resnet18-cifar":  # CIFAR stem: 3x3 stride-1 conv, no max-pool (32x32 maps in layer1)
            model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        return model
    raise ValueError(name)


OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
    "adam-fused": (torch.optim.Adam, {"lr": 1e-3, "fused": True}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3}),
    "sgd": (torch.optim.SGD, {"lr": 0.025, "momentum": 0.9}),
}


class FusedUnavailable(Exception):
    """The fused path cannot be built for this configuration (no ``path`` keyword, refused, or fell back)."""


def build_optimizer(kind: str, model: nn.Module, mk_e: int | None, mode: str = "dirichlet", path: str | None = None):
    """The baseline optimizer (``mk_e=None``) or MK; ``path=None`` leaves MK's path to mkopt's default."""
    cls, kwargs = OPTIMIZERS[kind]
    if mk_e is None:
        return cls(model.parameters(), **kwargs)
    if path is not None and MK_HAS_PATH:
        kwargs = {**kwargs, "path": path}
    elif path == "fused":
        raise FusedUnavailable("the installed mkopt.MKOptimizer has no `path` keyword")
    try:
        opt = mkopt.MKOptimizer(cls, model, e=mk_e, probabilities=mode, **kwargs)
    except ValueError as exc:  # mkopt's refusal says why; any other error is a bug and must surface
        if path != "fused":
            raise
        raise FusedUnavailable(f"MKOptimizer(path='fused') refused: {exc}") from exc
    built = getattr(opt, "path", "generic")  # an mkopt without `path` has only the generic path
    if path is not None and built != path:
        if path == "fused":
            raise FusedUnavailable(f"MKOptimizer(path='fused') built the {built!r} path")
        raise RuntimeError(f"MKOptimizer(path={path!r}) built the {built!r} path")
    return opt


def build_params_form(kind: str, model: nn.Module, e: int, mode: str):
    """MK's params form over ``model.parameters()`` (fused kernels; no parametrization), or
    :class:`FusedUnavailable` where mkopt has no such form or it does not take this configuration."""
    if mode != "dirichlet" or not hasattr(mkopt, "optim"):
        raise FusedUnavailable(f"no params form for p={mode!r}" if hasattr(mkopt, "optim") else "the installed mkopt has no mkopt.optim")
    cls = getattr(mkopt.optim, PARAMS_FORM[kind])
    kwargs = {k: v for k, v in OPTIMIZERS[kind][1].items() if k != "fused"}  # torch's fused flag: the baseline's
    return cls(model.parameters(), e=e, **kwargs)


def expandable(model: nn.Module) -> list[nn.Parameter]:
    """The tensors MK expands by default: floating parameters with ndim >= 2."""
    return [w for w in model.parameters() if w.is_floating_point() and w.dim() >= 2]


class CopiesWithoutMixing:
    """The floor of the generic design: the plain model's forward/backward, plus e - 1 extra copies of every
    kernel whose gradients are written (fresh tensors each step, as MK's are) and stepped by the same
    optimizer. MK minus this is the cost of mixing the copies and of p itself."""

    def __init__(self, kind: str, model: nn.Module, e: int) -> None:
        cls, kwargs = OPTIMIZERS[kind]
        self.copies = [(w, [torch.zeros_like(w) for _ in range(e - 1)]) for w in expandable(model)]
        self.optimizer = cls([*model.parameters(), *(c for _, cs in self.copies for c in cs)], **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for w, copies in self.copies:
            for c in copies:
                c.grad = w.grad * 1.0
        self.optimizer.step()


P_DRAWS = 3  # p regenerations per step in the fused design: backward's s, the update's p_t, the next W's p_t+1


def fused_update_words(kind: str, e: int) -> int:
    """fp32 words the fused MK update reads (and, as many, writes) per kernel element.

    Read: e copies, the optimizer's state per copy, one gradient of the mixed kernel. Written: e copies,
    the state, and the next mixed kernel."""
    cls, kwargs = OPTIMIZERS[kind]
    if issubclass(cls, (torch.optim.Adam, torch.optim.AdamW)):
        return 3 * e + 1  # exp_avg and exp_avg_sq per copy
    if issubclass(cls, torch.optim.SGD):
        return (2 * e + 1) if kwargs.get("momentum", 0) else (e + 1)
    raise ValueError(f"no fused traffic model for {cls.__name__}")


class FusedTrafficFloor:
    """The floor of the fused design: the plain model's forward/backward, the optimizer on the parameters
    MK would not expand, and streaming over persistent buffers that reads and writes exactly the words the
    fused update reads and writes per kernel element (N = kernel elements). Fused MK minus this is what
    its kernels lose to ideal streaming, plus p.

    ``traffic="out-of-place"``: one pass ``torch.mul(src, 1.0, out=dst)`` over [words, N]; the written
    buffer's lines are also read first (write-allocate), ~1.5x the DRAM traffic of an update in place.
    ``"in-place"``: what the fused kernel does with copies and state: ``state.mul_(1.0)`` over
    [words - 1, N], plus ``torch.mul(grad, 1.0, out=weight)`` over N (gradient in, next weight out)."""

    def __init__(self, kind: str, model: nn.Module, e: int, traffic: str = "in-place", p_draws: int = 0) -> None:
        cls, kwargs = OPTIMIZERS[kind]
        self.e, self.p_draws, self.draws_taken = e, p_draws, 0
        kernels = {id(w) for w in expandable(model)}
        numel = sum(w.numel() for w in model.parameters() if id(w) in kernels)
        others = [w for w in model.parameters() if id(w) not in kernels]
        self.model = model
        self.optimizer = cls(others, **kwargs) if others else None
        self.traffic = traffic
        words = fused_update_words(kind, e)
        device = next(model.parameters()).device
        # allocated (and touched) once, as the fused path's persistent copies and state are
        if traffic == "out-of-place":
            self.src = torch.ones(words, numel, device=device)
            self.dst = torch.zeros(words, numel, device=device)
        elif traffic == "in-place":
            self.state = torch.ones(words - 1, numel, device=device)
            self.grad = torch.ones(numel, device=device)
            self.weight = torch.zeros(numel, device=device)
        else:
            raise ValueError(f"traffic={traffic!r}: 'out-of-place' or 'in-place'")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)  # the kernels' gradients too: fresh each step, as MK's

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
        if self.traffic == "out-of-place":
            torch.mul(self.src, 1.0, out=self.dst)
        else:
            self.state.mul_(1.0)
            torch.mul(self.grad, 1.0, out=self.weight)
        grad, out = (self.grad, self.weight) if self.traffic == "in-place" else (self.src[0], self.dst[0])
        for _ in range(self.p_draws if self.e > 1 else 0):  # p of the v3 stream, with s and one N-sized pass
            self.draws_taken += 1
            if grad.device.type == "cpu":  # into a persistent buffer, as the fused kernels draw p without allocating
                native.scale_grad(grad, self.e, self.draws_taken, 0, out=out)
            else:
                scale_grad_op(grad, self.e, torch.tensor(self.draws_taken, device=grad.device), 0, False)


def setup(config: Config, variant: str | bool, device: str):
    """``variant``: "base" (or False), "fused", "params", "generic", "mk" (or True: MK with mkopt's default path),
    "floor" (:class:`CopiesWithoutMixing`) or "fused-floor" (:class:`FusedTrafficFloor`)."""
    variant = {False: "base", True: "mk"}.get(variant, variant)
    torch.manual_seed(0)
    model = build_model(config.model).to(device)
    if device == "cuda" and config.model.startswith(("cnn", "resnet")):
        model = model.to(memory_format=torch.channels_last)
    if variant == "floor":
        opt = CopiesWithoutMixing(config.optimizer, model, config.e)
    elif variant in ("fused-floor", "fused-floor-p"):
        opt = FusedTrafficFloor(config.optimizer, model, config.e, config.fused_floor, P_DRAWS if variant == "fused-floor-p" else 0)
    elif variant == "base":
        opt = build_optimizer(config.optimizer, model, None)
    elif variant == "params":
        opt = build_params_form(config.optimizer, model, config.e, config.mode)
    else:
        path = {"fused": "fused", "generic": "generic", "mk": None}[variant]
        opt = build_optimizer(config.optimizer, model, config.e, config.mode, path)
    x = torch.randn(config.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (config.batch,), device=device)
    return (torch.compile(model) if config.compiled else model), opt, x, y


def train_step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    if getattr(opt, "adversarial", False):  # Adv-MK: ascend on p, second pass at the adversarial p
        opt.ascend_probabilities()
        F.cross_entropy(model(x), y).backward()
    opt.step()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def busy_cores(seconds: float = 1.0) -> float | None:
    """Cores kept busy by any process over the next ``seconds`` (Linux ``/proc/stat``; None elsewhere)."""

    def sample() -> tuple[int, int, int]:
        lines = Path("/proc/stat").read_text().splitlines()
        ticks = [int(v) for v in lines[0].split()[1:]]  # the "cpu" line: all CPUs together
        cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        return sum(ticks), ticks[3] + ticks[4], cpus  # all, idle + iowait, CPUs

    try:
        total0, idle0, cpus = sample()
        time.sleep(seconds)
        total1, idle1, _ = sample()
    except (OSError, ValueError, IndexError):
        return None
    return cpus * (1 - (idle1 - idle0) / max(1, total1 - total0))


# -- timing ------------------------------------------------------------------------------------


def time_ratio(config: Config, device: str, blocks: int, steps: int, block_seconds: float) -> dict[str, Any]:
    """Median ms/step of each variant and median per-block ratios to the baseline.

    Returns ``{"ms": {variant: ms}, "ratio": {variant: x}, "steps": steps per block, "notes": [...]}``;
    a variant that could not be built (the fused path, see :class:`FusedUnavailable`) is absent."""
    wanted = ["base", *MK_VARIANTS] + (["floor", "fused-floor", "fused-floor-p"] if config.mode == "dirichlet" else [])
    runs, notes = {}, []
    for v in wanted:
        try:
            runs[v] = setup(config, v, device)
        except FusedUnavailable as exc:
            notes.append(f"no fused variant: {exc}")
    variants = list(runs)
    for v in variants:  # warm-up: first-step allocations, optimizer state, mkopt's compiled kernels
        for _ in range(3):
            train_step(*runs[v])
    # fewer steps per block where the baseline is slow, so that the full run stays within its budget
    probe = []
    for _ in range(2):
        sync(device)
        start = time.perf_counter()
        train_step(*runs["base"])
        sync(device)
        probe.append(time.perf_counter() - start)
    steps = max(1, min(steps, int(block_seconds / min(probe))))
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(blocks):
        for v in variants:
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                train_step(*runs[v])
            sync(device)
            times[v].append((time.perf_counter() - start) / steps)
    return {
        "ms": {v: statistics.median(times[v]) * 1e3 for v in variants},
        "ratio": {v: statistics.median(t / b for b, t in zip(times["base"], times[v])) for v in variants[1:]},
        "steps": steps,
        "notes": notes,
    }


# -- live-tensor peak --------------------------------------------------------------------------


def live_tensor_peak(config: Config, variant: str, device: str) -> int:
    """Most bytes of tensors alive at once while building ``variant`` and training it 3 steps.

    CPU: the profiler reports every allocation and free of the CPU allocator made while it runs; the
    running sum of those, starting from nothing, is the live bytes allocated in the region (tensors
    from before it are neither counted nor, when freed, subtracted). Everything is freed again inside
    the region, so that no later region sees frees of this one's blocks. Call it after the same shapes
    were trained in this process: compilation is then cached and not counted."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run = setup(config, variant, device)
        for _ in range(3):
            train_step(*run)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del run
        gc.collect()
        return peak
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run = setup(config, variant, device)
        for _ in range(3):
            train_step(*run)
        del run
        gc.collect()  # MK's model and optimizer reference each other
    cpu = torch._C._autograd.DeviceType.CPU
    events = [ev for ev in prof.profiler.kineto_results.events() if ev.name() == "[memory]" and ev.device_type() == cpu]
    if not events:
        raise RuntimeError(f"torch {torch.__version__}'s profiler reported no CPU allocations: no live-tensor peak (use --no-memory)")
    events.sort(key=lambda ev: ev.start_ns())
    live = peak = 0
    for ev in events:
        live += ev.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


# -- child processes ---------------------------------------------------------------------------


def _child_time(config: Config, device: str, blocks: int, steps: int, block_seconds: float, retain: bool, live: bool, queue) -> None:
    if retain:
        mkopt.retain_freed_memory()
    result = time_ratio(config, device, blocks, steps, block_seconds)
    if live:  # after timing: the same shapes were trained here, so nothing is compiled in the region
        gc.collect()
        result["live"] = {v: live_tensor_peak(config, v, device) for v in ("base", *MK_VARIANTS) if v in result["ms"]}
    queue.put(result)


def _run_child(target, args: tuple, what: str):
    """Run ``target(*args, queue)`` in a fresh process (no allocator state or thresholds carried over
    from other configurations) and return what it puts on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:  # a child that dies (out of memory, a crash) must not leave the bench waiting forever
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{what} child exited with code {proc.exitcode} without a result") from None
    proc.join()
    return result


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child_rss_peak(config: Config, variant: str, device: str, queue) -> None:
    # Warm up both variants alike on a tiny model, baseline and MK: thread pools, library workspaces and
    # mkopt's compiled kernels are one-time process costs, not training memory.
    tiny = Config(config.name, "mlp8", config.optimizer, 4, config.e, config.mode)
    for v in ("base", "mk"):
        for _ in range(2):
            train_step(*setup(tiny, v, device))
    # Make resident memory track live memory: blocks >= 128 KiB mmapped and unmapped when freed, the
    # heap trimmed now. Otherwise memory freed earlier (compilation above, glibc's adaptive thresholds)
    # is reused without raising the peak, and MK would look cheaper than it is.
    libc = ctypes.CDLL("libc.so.6")
    for option in (-3, -1):  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
        libc.mallopt(option, 128 * 1024)
    libc.malloc_trim(0)
    rss_before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux >= 4.0)
    model, opt, x, y = setup(config, variant, device)
    for _ in range(3):
        train_step(model, opt, x, y)
    queue.put((_status_kib("VmHWM") - rss_before) * 1024)


def rss_peak_ratio(config: Config, device: str) -> float:
    """Peak-RSS ratio, MK (mkopt's default path) / baseline, each in a fresh process (CPU only)."""
    peaks = {v: _run_child(_child_rss_peak, (config, v, device), f"RSS ({v})") for v in ("base", "mk")}
    return peaks["mk"] / peaks["base"]


# -- configurations and targets ----------------------------------------------------------------


def configs(quick: bool) -> list[Config]:
    """Every configuration, with the targets of the fused path (paper MLP = [400,200,100], batch 256)."""
    paper = "mlp400-200-100"
    mlps = ["mlp100", "mlp200-100", paper]
    targets = {  # (model, optimizer, e, p) -> target
        (paper, "adam", 3, "dirichlet"): Target(time=1.20, memory=2.0),
        (paper, "sgd", 3, "dirichlet"): Target(time=1.20),
        (paper, "adamw", 3, "dirichlet"): Target(time=1.25),
        (paper, "adam-fused", 3, "dirichlet"): Target(time=1.35),
        (paper, "adam", 8, "dirichlet"): Target(time=1.8),
        (paper, "adam", 2, "dirichlet"): Target(not_slower_than_e=3),
        ("cnn", "sgd", 3, "dirichlet"): Target(time=1.03),
        ("resnet18-cifar", "sgd", 3, "dirichlet"): Target(time=1.05),
        ("resnet18", "sgd", 3, "dirichlet"): Target(time=1.12),
    }
    out = [Config(f"MLP {m[3:]}", m, opt, 256) for m in mlps for opt in ("adam", "sgd")]
    out += [Config("MLP 400-200-100", paper, opt, 256) for opt in ("adamw", "adam-fused")]
    out += [
        Config("small CNN", "cnn", "sgd", 64),
        Config("ResNet-18 CIFAR-stem 32x32", "resnet18-cifar", "sgd", 64),
        Config("ResNet-18 32x32", "resnet18", "sgd", 64),
    ]
    out += [Config("MLP 400-200-100", paper, "adam", 256, e) for e in (2, 4, 8)]
    out += [Config(f"MLP {m[3:]}", m, "adam", 256, 3, "adv-mk") for m in mlps]
    out.append(Config("MLP 400-200-100", paper, "adam-fused", 256, 3, "adv-mk"))
    out = [replace(c, target=targets.get((c.model, c.optimizer, c.e, c.mode))) for c in out]
    out = [replace(c, target=Target(time=2.3)) if c.mode == "adv-mk" else c for c in out]
    if quick:  # one of each kind of code path, small: Adam (3e + 1 words), SGD on convolutions (2e + 1), Adv-MK
        out = [
            next(c for c in out if c.model == paper and c.optimizer == "adam" and c.e == 3 and c.mode == "dirichlet"),
            replace(next(c for c in out if c.model == "resnet18-cifar"), batch=4),
            replace(next(c for c in out if c.model == "mlp100" and c.mode == "adv-mk"), batch=64),
        ]
    return out


def met(config: Config, result: dict[str, Any], earlier: dict[tuple, dict[str, Any]]) -> str:
    """Whether MK under the default malloc meets the row's target: fused, or generic while fused is absent."""
    target = config.target
    if target is None:
        return "-"
    path = "fused" if "fused" in result["ratio"] else "generic"
    ratio = result["ratio"][path]
    failed = []
    if target.time is not None and ratio > target.time:
        failed.append("time")
    if target.memory is not None:
        if "live" not in result:
            return "? (no memory)"
        if result["live"][path] / result["live"]["base"] > target.memory:
            failed.append("memory")
    if target.not_slower_than_e is not None:
        other = earlier.get(_row_key(replace(config, e=target.not_slower_than_e)))
        if other is None or path not in other["ratio"]:
            return f"? (no e={target.not_slower_than_e} row)"
        if ratio > other["ratio"][path]:
            failed.append(f"slower than e={target.not_slower_than_e}")
    verdict = "yes" if not failed else "NO: " + ", ".join(failed)
    return verdict if path == "fused" else f"{verdict} [generic]"


def _row_key(config: Config) -> tuple:
    return (config.model, config.optimizer, config.batch, config.e, config.mode, config.compiled)


# -- the table ---------------------------------------------------------------------------------


def timing_cells(t: dict[str, Any] | None) -> list[str]:
    """base/fused/generic ms, then the four ratios (fused bold: the headline)."""
    if t is None:
        return ["-"] * (len(MK_VARIANTS) + len(TIMED))
    ms = [f"{t['ms'][v]:.1f}" if v in t["ms"] else "-" for v in ("base", *MK_VARIANTS)]
    ratios = [f"{t['ratio'][v]:.2f}x" if v in t["ratio"] else "-" for v in TIMED[1:]]
    if ratios[0] != "-":
        ratios[0] = f"**{ratios[0]}**"
    return ms + ratios


def memory_cells(live: dict[str, int] | None) -> list[str]:
    if live is None:
        return ["-"] * (1 + 2 * len(MK_VARIANTS))
    mib = [f"{live[v] / 2**20:.1f}" if v in live else "-" for v in ("base", *MK_VARIANTS)]
    return mib + [f"{live[v] / live['base']:.2f}x" if v in live else "-" for v in MK_VARIANTS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="smoke test: three small configurations, 3 blocks x 3 steps (< 3 min)")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="only configurations whose 'name model optimizer p e=E' contains TEXT, e.g. resnet18-cifar, "
                             "'400-200-100 adam dirichlet', 'e=8' (repeatable: any)")  # fmt: skip
    parser.add_argument("--compiled-model", action="store_true", help="wrap every model in torch.compile (all variants alike; no memory columns)")
    parser.add_argument("--blocks", type=int, help="interleaved blocks (default 7, --quick 3)")
    parser.add_argument("--steps", type=int, help="most steps per block (default 10, --quick 3)")
    parser.add_argument("--block-seconds", type=float, default=1.5, help="fewer steps per block where a baseline block would take longer")
    parser.add_argument("--fused-floor", choices=["out-of-place", "in-place"], default="in-place",
                        help="the fused floor's streaming: one torch.mul(src, 1.0, out=dst) pass, or copies and state updated in "
                             "place as the fused kernel does (less DRAM traffic: no write-allocate reads)")  # fmt: skip
    parser.add_argument("--no-memory", action="store_true", help="skip both memory measurements")
    parser.add_argument("--no-rss", action="store_true", help="skip the RSS measurement (two extra processes per configuration)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    blocks = args.blocks or (3 if args.quick else 7)
    steps = args.steps or (3 if args.quick else 10)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    notes = []
    if not MK_HAS_PATH:
        notes.append("mkopt.MKOptimizer has no `path` keyword yet: MK built without it (generic path only), no fused columns")
        log(f"note: {notes[-1]}")
    busy = busy_cores() if args.device == "cpu" else None
    if busy is not None and busy > 0.25:  # a descheduled intra-op thread stalls every parallel op
        notes.append(f"{busy:.1f} cores were busy with other processes at the start: timings may be noise")
        log(f"warning: {notes[-1]}")
    chosen = [c for c in configs(args.quick) if not args.only or any(o in c.key() for o in args.only)]
    chosen = [replace(c, fused_floor=args.fused_floor) for c in chosen]
    if args.compiled_model:
        chosen = [replace(c, name=f"{c.name} (torch.compile)", compiled=True) for c in chosen if c.mode == "dirichlet"]
    if not chosen:
        raise SystemExit(f"no configuration matches --only {args.only}")
    commit = commit_of_tree()
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    allocators = "default malloc" if args.device == "cpu" else "CUDA caching allocator"
    header = [
        "# step_overhead: MK(e) / baseline, measured side by side",
        "",
        f"command: `python bench/step_overhead.py {' '.join(sys.argv[1:])}`  ",
        f"commit: {commit}, torch {torch.__version__}, device: {args.device} ({machine}), "
        f"{blocks} interleaved blocks x up to {steps} steps (about {args.block_seconds:g} s of baseline per block at most), median ratio  ",
        "variants: fused = MKOptimizer(path='fused') (**headline**), params form = mkopt.optim.<Adam|AdamW|SGD>(model.parameters(), e=e), generic = path='generic', floor = plain model + e - 1 "
        f"stepped gradient copies, fused floor = plain model + streaming of the fused update's words ({args.fused_floor}), "
        f"+ p = also the v3 stream's p regenerated {P_DRAWS}x per element and step; "
        "live-tensor peak = most tensor bytes alive at once (build + 3 steps); RSS = earlier method, MK on mkopt's "
        "default path; met = MK fused (else generic) under the default malloc against the target",
        *(f"note: {n}  " for n in notes),
        "",
    ]
    columns = ["model", "optimizer", "batch", "e", "p", "target", "met", "steps/block"]
    for suffix in ("", " (retained)") if args.device == "cpu" else ("",):
        columns += [f"{LABELS.get(v, v)} ms/step{suffix}" for v in ("base", *MK_VARIANTS)]
        columns += [f"{LABELS[v]} ratio{suffix}" for v in TIMED[1:]]
    columns += [f"{LABELS.get(v, v)} live MiB" for v in ("base", *MK_VARIANTS)]
    columns += [f"live-tensor peak ratio ({LABELS[v]})" for v in MK_VARIANTS]
    columns += ["RSS peak ratio"] if args.device == "cpu" else []
    header += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    print("\n".join(header), flush=True)
    rows: list[str] = []
    results: dict[tuple, dict[str, Any]] = {}
    footnotes: list[str] = []  # why a row has no fused columns; rows timed while the machine was busy
    start_all = time.perf_counter()
    for i, config in enumerate(chosen, 1):
        busy = busy_cores(0.5) if args.device == "cpu" and i > 1 else None  # the first was checked above
        if busy is not None and busy > 0.25:  # between this bench's own processes: the load is someone else's
            log(f"warning: {busy:.1f} cores busy with other processes before this row: its timings may be noise")
            footnotes.append(f"- {config.name}, {config.optimizer}, e={config.e}, {config.mode}: {busy:.1f} cores were busy "
                             "with other processes just before this row was timed")  # fmt: skip
        start = time.perf_counter()
        log(f"[{i}/{len(chosen)}] {config.key()} batch {config.batch} ({allocators}{', retained' if args.device == 'cpu' else ''})")
        live = not args.no_memory and not config.compiled  # a compiled model would count its compilation
        if args.device == "cuda":  # the CUDA caching allocator already keeps freed blocks: one column set
            timings = [time_ratio(config, args.device, blocks, steps, args.block_seconds)]
            if live:
                timings[0]["live"] = {v: live_tensor_peak(config, v, args.device) for v in ("base", *MK_VARIANTS) if v in timings[0]["ms"]}
        else:  # live-tensor peak in the first child: it does not depend on the allocator
            timings = [
                _run_child(_child_time, (config, args.device, blocks, steps, args.block_seconds, retain, live and not retain), "timing")
                for retain in (False, True)
            ]  # fmt: skip
        if MK_HAS_PATH:  # without the keyword the missing fused variant is said once, in the header
            for n in dict.fromkeys(n for t in timings for n in t["notes"]):
                log(f"  note: {n}")
                footnotes.append(f"- {config.name}, {config.optimizer}, e={config.e}, {config.mode}: {n}")
        rss = "-"
        if args.device == "cpu" and live and not args.no_rss:
            rss = f"{rss_peak_ratio(config, args.device):.2f}x"
        main_t = timings[0]
        results[_row_key(config)] = main_t
        cells = [config.name, config.optimizer, str(config.batch), str(config.e), config.mode]
        cells += [config.target.text() if config.target else "-", met(config, main_t, results)]
        cells.append(" / ".join(str(t["steps"]) for t in timings))
        for t in timings:
            cells += timing_cells(t)
        cells += memory_cells(main_t.get("live"))
        cells += [rss] if args.device == "cpu" else []
        row = "| " + " | ".join(cells) + " |"
        rows.append(row)
        print(row, flush=True)
        log(f"  {time.perf_counter() - start:.0f} s (total {time.perf_counter() - start_all:.0f} s)")
    footer = ["", *footnotes] if footnotes else []
    if footer:
        print("\n".join(footer), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(header + rows + footer) + "\n")
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
