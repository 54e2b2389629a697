"""ResNet-50 training step on one GPU: baseline vs MK (fused and generic paths) vs the fused design's floor, plus correctness.

Run (GPU, < 8 min, with bench/step_overhead.py): bench/gpu_session.sh; alone: python bench/gpu_resnet50.py --out results/bench/gpu_resnet50_<gpu>.md
Smoke (CPU, ~1 min): python bench/gpu_resnet50.py --device cpu --batch 4 --size 32 --repeats 1 --steps 1 --warmup 1 \
                         --configs bf16 --variants baseline,fused,fused-floor --out /tmp/gpu_resnet50_smoke.md

The step is the recipe's (mkopt/recipes/resnet50_imagenet.py): torchvision ``resnet50``, channels_last, SGD momentum
0.9, weight decay 1e-4, autocast. Variants (``--variants``):

- ``baseline``: torch.optim.SGD on the plain model;
- ``fused``: ``MKOptimizer(SGD, path="fused")`` (on CUDA: the Triton kernels, p regenerated, no p buffer);
- ``generic``: ``path="generic"`` (copies take gradients; on CUDA the mix/spread are Triton kernels);
- ``fused-floor``: the plain model plus an in-place streaming pass over the words the fused update moves per
  kernel element (2e + 1 fp32 words for momentum SGD): what the fused design cannot beat;
- ``adv-mk``: ``probabilities="adv-mk"`` on the fused path (two passes per step).

Configurations (``--configs``, comma-separated): ``bf16`` and ``fp16`` autocast (fp16 with a GradScaler), ``+compile``
wraps the model in ``torch.compile`` (only baseline and fused are timed then: compiling costs ~1 min per model).
Time: within a configuration every variant stays resident and is timed in interleaved blocks (each repeat runs
every variant for ``--steps`` steps, rotating the order); reported: median ms/step and the median over repeats of
variant / baseline. Memory (first configuration, CUDA): each variant alone, ``max_memory_allocated`` over
``--steps`` steps after warm-up. Targets (issue 12): fused <= 1.03x baseline; peak <= baseline + e * parameters +
(e - 1) * optimizer state. ``--budget-seconds`` stops starting configurations that would overrun (said in the report).

Correctness (first, a few seconds): the p stream on the device equals the CPU stream bit for bit; the fused path on
the device equals the CPU kernels and the generic path (float64); deploy equals eval; an fp16 overflow step is
skipped with copies, state and step untouched; a Dirichlet step makes no device-to-host synchronization and an
adversarial step at most one (``torch.cuda.set_sync_debug_mode``; on CPU, counted host reads of the Triton path
run under the interpreter, not counting torch's own optimizer reading its CPU step counter, no sync on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import mkopt
from mkopt import triton as mk_triton
from mkopt.provenance import commit_of_tree
from mkopt.sampling import counter_dirichlet_

ALL_VARIANTS = ("baseline", "fused", "generic", "fused-floor", "adv-mk")
COMPILED_VARIANTS = ("baseline", "fused")
TIME_TARGET = 1.03


# -- the variants ---------------------------------------------------------------------------------------------
class FusedFloor:
    """Plain SGD on the parameters MK would not expand, plus in-place streaming over the fused update's words
    (2e + 1 fp32 words per kernel element for momentum SGD: e copies and e buffers read and written, dL/dW in,
    the next W out), and plain SGD on the kernels' own memory for their gradient's sake. Persistent buffers."""

    def __init__(self, model: nn.Module, e: int, **kwargs: float) -> None:
        kernels = [p for p in model.parameters() if p.dim() >= 2]
        kernel_ids = {id(p) for p in kernels}
        others = [p for p in model.parameters() if id(p) not in kernel_ids]
        numel = sum(p.numel() for p in kernels)
        self.model = model
        self.optimizer = torch.optim.SGD(others, **kwargs) if others else None
        device = kernels[0].device
        self.state = torch.ones(2 * e, numel, device=device)
        self.weights = [torch.zeros_like(p) for p in kernels]  # the next W, in each kernel's own layout
        self.kernels = kernels

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
        self.state.mul_(1.0)
        pairs = [(w, p.grad) for w, p in zip(self.weights, self.kernels) if p.grad is not None]
        if pairs:
            torch._foreach_copy_([w for w, _ in pairs], [g for _, g in pairs])  # reads dL/dW, writes the next W


@dataclass
class Run:
    name: str
    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    opt: object
    scaler: torch.amp.GradScaler
    times: list[float] = field(default_factory=list)


def build(name: str, args: argparse.Namespace, device: torch.device, amp: str, compiled: bool) -> Run:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(device).to(memory_format=torch.channels_last)
    kwargs = dict(lr=0.1 * args.batch / 256, momentum=0.9, weight_decay=1e-4)
    if name == "baseline":
        opt: object = torch.optim.SGD(model.parameters(), **kwargs)
    elif name == "fused-floor":
        opt = FusedFloor(model, args.e, **kwargs)
    else:
        path = "generic" if name == "generic" else "fused"
        mode = "adv-mk" if name == "adv-mk" else "dirichlet"
        opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=args.e, path=path, probabilities=mode, **kwargs)
    forward = torch.compile(model) if compiled else model
    return Run(name, model, forward, opt, torch.amp.GradScaler(device.type, enabled=amp == "fp16"))


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None) -> None:
    def loss() -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=amp) if amp else contextlib.nullcontext():
            return F.cross_entropy(run.forward(x).float(), y)

    run.opt.zero_grad(set_to_none=True)
    if getattr(run.opt, "adversarial", False):
        run.scaler.scale(loss()).backward()  # probe at the mean
        run.opt.ascend_probabilities(run.scaler)
    run.scaler.scale(loss()).backward()
    if isinstance(run.opt, FusedFloor):
        run.opt.step()  # no scaler: the floor models traffic, not AMP
    else:
        run.scaler.step(run.opt)
        run.scaler.update()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def state_bytes(run: Run) -> tuple[int, int]:
    """(parameter bytes incl. MK's copies, optimizer-state bytes), counted from the tensors."""
    params = sum(p.numel() * p.element_size() for p in run.model.parameters())
    opt = run.opt if not isinstance(run.opt, FusedFloor) else run.opt.optimizer
    state = 0 if opt is None else sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return params, state


def measure_memory(name: str, args, device, x, y, amp, amp_name) -> tuple[float | None, tuple[int, int]]:
    """(peak MiB over --steps steps after warm-up, CUDA only; (param, state) bytes) with this variant alone."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run = build(name, args, device, amp_name, compiled=False)
    for _ in range(args.warmup):
        train_step(run, x, y, amp)
    sync(device)
    peak = None
    if device.type == "cuda":
        for _ in range(args.steps):
            train_step(run, x, y, amp)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    sizes = state_bytes(run)
    del run
    return peak, sizes


# -- correctness on this device --------------------------------------------------------------------------------
def small_cnn(dtype: torch.dtype, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5),
    ).to(device=device, dtype=dtype)  # fmt: skip


def train_small(device, path, cls, kwargs, steps=6, dtype=torch.float64, on_triton=False, **mk):
    model = small_cnn(dtype, device)
    with mk_triton.run_on_cpu() if on_triton and device.type == "cpu" else contextlib.nullcontext():
        opt = mkopt.MKOptimizer(cls, model, e=3, path=path, **mk, **kwargs)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            opt.zero_grad()
            for _ in range(2):  # accumulation
                x, y = torch.randn(4, 3, 8, 8, generator=g).to(device, dtype), torch.randint(0, 5, (4,), generator=g).to(device)
                (F.cross_entropy(model(x), y) / 2).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    return model, opt


def relative_difference(a: nn.Module, b: nn.Module) -> float:
    worst = 0.0
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        if x.is_floating_point():
            y = y.double().cpu()
            worst = max(worst, float((x.double().cpu() - y).abs().max() / y.abs().max().clamp_min(1e-12)))
    return worst


@contextlib.contextmanager
def counting_host_reads(device: torch.device):
    """Counts device-to-host synchronizations: CUDA's sync debug mode, or (CPU) calls that read a tensor's value."""
    counted: list[str] = []
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counted
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counted.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower())
        return
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__int__", "__bool__")}

    def counting(name, original):
        def read(tensor, *a, **k):
            # torch's own optimizers (the plain parameters) read their step counter, a CPU tensor even on a GPU run
            if "torch/optim/" not in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
                counted.append(name)
            return original(tensor, *a, **k)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield counted
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def check(results: list[tuple[str, bool, str]], what: str, passed: bool, detail: str) -> None:
    results.append((what, bool(passed), detail))
    print(f"  {'ok  ' if passed else 'FAIL'} {what}: {detail}", file=sys.stderr, flush=True)


def correctness(device: torch.device) -> list[tuple[str, bool, str]]:
    results: list[tuple[str, bool, str]] = []
    key = 987654321987
    same = True
    for dtype in (torch.float32, torch.float64):
        for e in (2, 3, 4, 16):
            ours = mk_triton.launch.probabilities(e, 5000, torch.tensor(key, device=device), 123, dtype).cpu()
            same &= torch.equal(ours, counter_dirichlet_(torch.empty(e, 5000, dtype=dtype), key=key, compiled=False, offset=123))
    check(results, "p stream on the device = CPU stream, bit for bit (e = 2, 3, 4, 16; float32, float64)", same, "equal" if same else "DIFFERENT")

    cases = {"SGD nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
             "AdamW amsgrad": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True))}  # fmt: skip
    for name, (cls, kwargs) in cases.items():
        fused, _ = train_small(device, "fused", cls, kwargs, on_triton=True)
        generic, _ = train_small(device, "generic", cls, kwargs, sampler_compile=device.type == "cuda" and None)
        cpu, _ = train_small(torch.device("cpu"), "fused", cls, kwargs)
        d_generic, d_cpu = relative_difference(fused, generic), relative_difference(fused, cpu)
        check(results, f"fused = generic, float64, 6 steps, {name}", d_generic <= 1e-6, f"max relative difference {d_generic:.1e}")
        check(results, f"fused on this device = fused C++ kernels on CPU, {name}", d_cpu <= 1e-6, f"max relative difference {d_cpu:.1e}")

    model, _ = train_small(device, "fused", torch.optim.SGD, dict(lr=0.1, momentum=0.9), on_triton=True)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, device=device)
    model.eval()
    deployed = mkopt.deploy(model).eval()
    d = float((deployed(x) - model(x)).abs().max())
    check(results, "deploy = eval of the expanded model (float64)", d <= 1e-10, f"max difference {d:.1e}")

    if device.type == "cuda":
        model = small_cnn(torch.float32, device)
        opt = mkopt.MKOptimizer(torch.optim.Adam, model, e=3, path="fused", lr=1e-2)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**100)  # the scaled fp16 gradients overflow
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(torch.randn(4, 3, 8, 8, device=device)).float(), torch.zeros(4, dtype=torch.long, device=device))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        untouched = all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and opt.mk_step == 0 and len(opt.state) == 0
        check(results, "fp16 overflow step skipped: copies, state and step untouched", untouched, f"mk_step={opt.mk_step}, scale now {scaler.get_scale():.0e}")

    for mode, limit in (("dirichlet", 0), ("adv-mk", 1)):
        for cls, kwargs in ((torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.AdamW, dict(lr=1e-2))):
            model = small_cnn(torch.float32, device)
            with mk_triton.run_on_cpu() if device.type == "cpu" else contextlib.nullcontext():
                opt = mkopt.MKOptimizer(cls, model, e=3, path="fused", probabilities=mode, **kwargs)
                x, y = torch.randn(4, 3, 8, 8, device=device), torch.randint(0, 5, (4,), device=device)
                for step in range(3):
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    with counting_host_reads(device) if step == 2 else contextlib.nullcontext() as reads:
                        if opt.adversarial:
                            opt.ascend_probabilities()
                            F.cross_entropy(model(x), y).backward()
                        opt.step()
            count = len(reads)
            check(results, f"host synchronizations in a {mode} step ({cls.__name__}, fused path)", count <= limit,
                  f"{count} (at most {limit})" + (f": {reads}" if reads else ""))  # fmt: skip
    return results


# -- the report ---------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke check")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--configs", default="bf16,fp16,bf16+compile", help="comma-separated: bf16 | fp16 | off, each optionally +compile")
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS), help=f"comma-separated subset of {ALL_VARIANTS}")
    parser.add_argument("--e", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved blocks per variant")
    parser.add_argument("--steps", type=int, default=5, help="steps per block (and for the memory phase)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-seconds", type=float, default=420.0, help="start no configuration after this much time")
    parser.add_argument("--no-correctness", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args()
    started = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible to torch: run on a GPU machine, or pass --device cpu --batch 4 --size 32 for a smoke check")
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(ALL_VARIANTS) or ({"baseline"} - set(variants))
    if unknown:
        raise SystemExit(f"--variants: {sorted(unknown)} unknown or missing (baseline is required); choose from {ALL_VARIANTS}")
    torch.backends.cudnn.benchmark = True
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)

    print("correctness on this device:", file=sys.stderr, flush=True)
    checks = [] if args.no_correctness else correctness(device)
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    lines = [
        "# ResNet-50 training step on one GPU: baseline vs MK (fused, generic) vs the fused design's floor",
        "",
        f"command: `python bench/gpu_resnet50.py {' '.join(sys.argv[1:])}`  ",
        f"commit: {commit_of_tree()}, torch {torch.__version__}{cuda}, device: **{machine}**; batch {args.batch}, "
        f"{args.size}x{args.size}, channels_last, SGD momentum 0.9 + weight decay, e={args.e}; {args.repeats} interleaved "
        f"repeats x {args.steps} steps after {args.warmup} warm-up steps, medians; seed 0  ",
        "variants: fused = MKOptimizer(path='fused') (**headline**), generic = path='generic', fused floor = plain model + "
        "in-place streaming of the fused update's 2e + 1 words per kernel element, adv-mk = fused path, Algorithm B.2 (two passes)",
        "",
    ]
    if checks:
        lines += ["## Correctness on this device", "", "| check | result | detail |", "|---|---|---|"]
        lines += [f"| {what} | {'pass' if passed else '**FAIL**'} | {detail} |" for what, passed, detail in checks]
        lines.append("")
    write_report(args.out, lines + ["(partial: correctness only so far)"])
    lines += ["## Step time and memory", "", "| config | variant | ms/step | time vs baseline | images/s | peak MiB | peak over baseline MiB | target |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    memory: dict[str, tuple[float | None, tuple[int, int]]] = {}
    skipped = []
    for number, config in enumerate(c for c in args.configs.split(",") if c):
        elapsed = time.monotonic() - started
        if number > 0 and elapsed > args.budget_seconds:
            skipped.append(config)
            continue
        amp_name, _, compile_flag = config.partition("+")
        if amp_name not in ("bf16", "fp16", "off") or compile_flag not in ("", "compile"):
            raise SystemExit(f"--configs: {config!r} is not bf16|fp16|off[+compile]")
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp_name]
        compiled = compile_flag == "compile"
        names = [v for v in variants if v in COMPILED_VARIANTS] if compiled else variants
        print(f"config {config}: {names} (elapsed {elapsed:.0f} s)", file=sys.stderr, flush=True)
        if number == 0:  # memory: each variant alone, once
            memory = {name: measure_memory(name, args, device, x, y, amp, amp_name) for name in names}
        gc.collect()
        runs = [build(name, args, device, amp_name, compiled) for name in names]
        for run in runs:
            for _ in range(args.warmup):
                train_step(run, x, y, amp)
        for r in range(args.repeats):
            for run in runs[r % len(runs) :] + runs[: r % len(runs)]:  # rotate the order every repeat
                sync(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    train_step(run, x, y, amp)
                sync(device)
                run.times.append((time.perf_counter() - start) / args.steps)
        base = runs[0]
        for run in runs:
            median = statistics.median(run.times)
            ratio = statistics.median(t / b for t, b in zip(run.times, base.times))
            peak, sizes = memory.get(run.name, (None, (0, 0))) if number == 0 else (None, (0, 0))
            base_peak, (base_params, base_state) = memory.get("baseline", (None, (0, 0)))
            over = "-" if peak is None or base_peak is None else f"{peak - base_peak:.0f}"
            target = "-"
            if run.name == "fused":
                target = f"time <= {TIME_TARGET:.2f}x: **{'met' if ratio <= TIME_TARGET else 'NOT met'}**"
                if peak is not None and base_peak is not None:
                    bound = (args.e * base_params + (args.e - 1) * base_state) / 2**20
                    target += f"; peak over baseline <= e x params + (e-1) x state = {bound:.0f} MiB: **{'met' if peak - base_peak <= bound else 'NOT met'}**"
            lines.append(f"| {config} | {run.name} | {median * 1e3:.1f} | **{ratio:.3f}x** | {args.batch / median:.0f} | "
                         f"{'-' if peak is None else f'{peak:.0f}'} | {over} | {target} |")  # fmt: skip
        del runs
        write_report(args.out, lines + ["", f"(partial: written after configuration {config}; the run went on)"])
    lines.append("")
    if device.type != "cuda":
        lines.append("Peak memory is measured on CUDA only (this was a CPU smoke check: its times say nothing about a GPU).")
    if skipped:
        lines.append(f"Not run (time budget of {args.budget_seconds:.0f} s reached): {', '.join(skipped)}.")
    lines.append(f"Total wall time: {time.monotonic() - started:.0f} s.")
    print("\n".join(lines))
    write_report(args.out, lines)


def write_report(out: Path | None, lines: list[str]) -> None:
    """Atomically (re)write the report: after every configuration, so a run cut short keeps what it measured."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
