"""Step-time and peak-memory ratio of MK training vs the plain baseline, measured side by side.

Run:  python bench/step_overhead.py [--device cuda] [--quick] [--out results/bench/step_overhead_cpu.md]

For each configuration the baseline and the MK model (same architecture, same data) are timed in
interleaved blocks (baseline block, MK block, repeated), so machine noise hits both alike; the
reported ratio is the median over blocks of MK time / baseline time. On CPU every configuration
is timed in two fresh processes: with glibc's default malloc, which hands large freed blocks back
to the kernel and page-faults them in again every step, and after ``mkopt.retain_freed_memory()``
(both the baseline and MK run under the same allocator in each process). "floor ratio": a third
variant timed in the same blocks, the plain model plus e - 1 extra copies of every kernel whose
gradients are written each step and stepped by the same optimizer, i.e. MK with free mixing and
free p; MK's distance to it is what mixing and p cost (Dirichlet rows only). Peak memory: on CUDA
``max_memory_allocated``; on CPU, in a fresh child process per variant, the peak RSS while it
builds the model and optimizer and trains 3 steps, minus the RSS just before (the kernel's peak
counter is reset there; both variants first train a tiny baseline and MK model, which starts the
thread pools and compiles mkopt's kernels, and glibc is set
to unmap blocks >= 128 KiB on free, so that resident memory follows live memory).
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from queue import Empty

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mkopt  # noqa: E402
from mkopt.experiments.runs import commit_of_tree  # noqa: E402
from mkopt.experiments.models import mlp  # noqa: E402


@dataclass(frozen=True)
class Config:
    name: str
    model: str
    optimizer: str
    batch: int
    e: int = 3
    mode: str = "dirichlet"
    compiled: bool = False  # time torch.compile(model) (baseline, floor and MK alike)


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
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10)
    raise ValueError(name)


OPTIMIZERS = {
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
    "adam-fused": (torch.optim.Adam, {"lr": 1e-3, "fused": True}),
    "sgd": (torch.optim.SGD, {"lr": 0.025, "momentum": 0.9}),
}


def build_optimizer(kind: str, model: nn.Module, mk_e: int | None, mode: str = "dirichlet"):
    cls, kwargs = OPTIMIZERS[kind]
    if mk_e is None:
        return cls(model.parameters(), **kwargs)
    return mkopt.MKOptimizer(cls, model, e=mk_e, probabilities=mode, **kwargs)


class CopiesWithoutMixing:
    """The floor MK cannot go below: the plain model's forward/backward, plus e - 1 extra copies of every
    kernel whose gradients are written (fresh tensors each step, as MK's are) and stepped by the same
    optimizer. MK minus this is the cost of mixing the copies and of p itself."""

    def __init__(self, kind: str, model: nn.Module, e: int) -> None:
        cls, kwargs = OPTIMIZERS[kind]
        kernels = [w for w in model.parameters() if w.dim() >= 2]
        self.copies = [(w, [torch.zeros_like(w) for _ in range(e - 1)]) for w in kernels]
        self.optimizer = cls([*model.parameters(), *(c for _, cs in self.copies for c in cs)], **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for w, copies in self.copies:
            for c in copies:
                c.grad = w.grad * 1.0
        self.optimizer.step()


def setup(config: Config, variant: str | bool, device: str):
    """``variant``: "base" (or False), "mk" (or True), or "floor" (:class:`CopiesWithoutMixing`)."""
    variant = {False: "base", True: "mk"}.get(variant, variant)
    torch.manual_seed(0)
    model = build_model(config.model).to(device)
    if device == "cuda" and config.model in ("cnn", "resnet18"):
        model = model.to(memory_format=torch.channels_last)
    if variant == "floor":
        opt = CopiesWithoutMixing(config.optimizer, model, config.e)
    else:
        opt = build_optimizer(config.optimizer, model, config.e if variant == "mk" else None, config.mode)
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


def time_ratio(config: Config, device: str, blocks: int, steps: int) -> dict[str, float]:
    """Median ms/step of each variant and median per-block ratios to the baseline (the floor only for p = dirichlet)."""
    variants = ["base", "mk"] + (["floor"] if config.mode == "dirichlet" else [])
    runs = {v: setup(config, v, device) for v in variants}
    for v in variants:
        for _ in range(3):
            train_step(*runs[v])
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(blocks):
        for v in variants:
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                train_step(*runs[v])
            sync(device)
            times[v].append((time.perf_counter() - start) / steps)
    out = {f"{v}_ms": statistics.median(times[v]) * 1e3 for v in variants}
    for v in variants[1:]:
        out[f"{v}_ratio"] = statistics.median(t / b for b, t in zip(times["base"], times[v]))
    return out


def _child_time(config: Config, device: str, blocks: int, steps: int, retain: bool, queue) -> None:
    if retain:
        mkopt.retain_freed_memory()
    queue.put(time_ratio(config, device, blocks, steps))


def time_ratio_in_child(config: Config, device: str, blocks: int, steps: int, retain: bool) -> dict[str, float]:
    """:func:`time_ratio` in a fresh process: no allocator state or thresholds carried over from other configs."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_time, args=(config, device, blocks, steps, retain, queue))
    proc.start()
    while True:  # a child that dies (out of memory, a crash) must not leave the bench waiting forever
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(f"timing child for {config} exited with code {proc.exitcode} without a result") from None
    proc.join()
    return result


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child_peak(config: Config, variant: str, device: str, queue) -> None:
    # Warm up both variants alike on a tiny model, baseline and MK: thread pools, library workspaces and
    # mkopt's compiled kernels are one-time process costs, not training memory.
    tiny = Config(config.name, "mlp8", config.optimizer, 4, config.e, config.mode)
    for mk in (False, True):
        for _ in range(2):
            train_step(*setup(tiny, mk, device))
    # Make resident memory track live memory: blocks >= 128 KiB mmapped and unmapped when freed, the
    # heap trimmed now. Otherwise memory freed earlier (compilation above, glibc's adaptive thresholds)
    # is reused without raising the peak, and MK would look cheaper than it is.
    libc = ctypes.CDLL("libc.so.6")
    for option in (-3, -1):  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
        libc.mallopt(option, 128 * 1024)
    libc.malloc_trim(0)
    rss_before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux >= 4.0)
    model, opt, x, y = setup(config, variant == "mk", device)
    for _ in range(3):
        train_step(model, opt, x, y)
    queue.put((_status_kib("VmHWM") - rss_before) * 1024)


def peak_memory_ratio(config: Config, device: str) -> tuple[float, float, float]:
    if device == "cuda":
        peaks = {}
        for mk in (False, True):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            run = setup(config, mk, device)
            for _ in range(3):
                train_step(*run)
            sync(device)
            peaks[mk] = torch.cuda.max_memory_allocated()
            del run
        return peaks[False] / 2**20, peaks[True] / 2**20, peaks[True] / peaks[False]
    ctx = mp.get_context("spawn")
    peaks = {}
    for variant in ("base", "mk"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_child_peak, args=(config, variant, device, queue))
        proc.start()
        peaks[variant] = queue.get()
        proc.join()
    return peaks["base"] / 2**20, peaks["mk"] / 2**20, peaks["mk"] / peaks["base"]


def configs(quick: bool) -> list[Config]:
    mlps = ["mlp100", "mlp200-100", "mlp400-200-100"]
    out = [Config(f"MLP {m[3:]}", m, opt, 256) for m in mlps for opt in ("adam", "sgd")]
    out.append(Config("MLP 400-200-100", "mlp400-200-100", "adam-fused", 256))
    out += [Config("small CNN", "cnn", "sgd", 64), Config("ResNet-18 32x32", "resnet18", "sgd", 64)]
    out += [Config("MLP 400-200-100", "mlp400-200-100", "adam", 256, e) for e in (2, 4, 8)]
    out += [Config(f"MLP {m[3:]}", m, "adam", 256, 3, "adv-mk") for m in mlps]
    out.append(Config("MLP 400-200-100", "mlp400-200-100", "adam-fused", 256, 3, "adv-mk"))
    if quick:
        out = [c for c in out if c.model == "mlp400-200-100" and c.optimizer == "adam" and c.e == 3]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="only the [400,200,100] MLP with Adam")
    parser.add_argument("--only", action="append", help="only configurations whose 'name optimizer p' contains this text (repeatable: any)")
    parser.add_argument("--compiled-model", action="store_true", help="wrap every model in torch.compile (baseline, floor and MK alike)")
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    commit = commit_of_tree()
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    header = [
        "# step_overhead: MK(e) / baseline, measured side by side",
        "",
        f"command: `python bench/step_overhead.py {' '.join(sys.argv[1:])}`  ",
        f"commit: {commit}, torch {torch.__version__}, device: {args.device} ({machine}), "
        f"{args.blocks} interleaved blocks x {args.steps} steps, median ratio",
        "",
        "| model | optimizer | batch | e | p | base ms/step | MK ms/step | time ratio | floor ratio | "
        "base ms/step (retained) | MK ms/step (retained) | time ratio (retained) | floor ratio (retained) | "
        "base peak MiB | MK peak MiB | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows = []
    chosen = [c for c in configs(args.quick) if not args.only or any(o in f"{c.name} {c.optimizer} {c.mode}" for o in args.only)]
    if args.compiled_model:
        chosen = [replace(c, name=f"{c.name} (torch.compile)", compiled=True) for c in chosen if c.mode == "dirichlet"]
    for config in chosen:
        if args.device == "cuda":  # the CUDA caching allocator already keeps freed blocks: one column set
            timings = [time_ratio(config, args.device, args.blocks, args.steps)]
        else:
            timings = [time_ratio_in_child(config, args.device, args.blocks, args.steps, retain) for retain in (False, True)]
        cells = []
        for t in timings + [None] * (2 - len(timings)):
            if t is None:
                cells += ["-"] * 4
                continue
            floor = f"{t['floor_ratio']:.2f}x" if "floor_ratio" in t else "-"
            cells += [f"{t['base_ms']:.1f}", f"{t['mk_ms']:.1f}", f"**{t['mk_ratio']:.2f}x**", floor]
        mem = ("-", "-", "-") if args.no_memory else tuple(f"{v:.1f}" if i < 2 else f"{v:.2f}x" for i, v in enumerate(peak_memory_ratio(config, args.device)))
        row = "| " + " | ".join([config.name, config.optimizer, str(config.batch), str(config.e), config.mode, *cells, *mem]) + " |"
        rows.append(row)
        print(row, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    main()
