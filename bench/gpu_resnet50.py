"""ResNet-50 training step on a GPU: baseline vs MK (e=3) vs Adv-MK, time and peak memory side by side.

Run (GPU):   python bench/gpu_resnet50.py [--batch 256] [--amp bf16|fp16] [--out results/bench/gpu_resnet50.md]
Smoke (CPU): python bench/gpu_resnet50.py --device cpu --batch 8 --size 64 --repeats 2 --steps 1

The step is the recipe's (mkopt/recipes/resnet50_imagenet.py): torchvision ``resnet50``, channels_last,
autocast (bf16 where supported, else fp16 with a GradScaler), SGD momentum 0.9, weight decay 1e-4;
MK and Adv-MK wrap the same SGD with ``mkopt.MKOptimizer`` (Adv-MK: the two-call form, two passes).

Time: all three models stay resident and are timed in interleaved blocks (each repeat runs every
variant for ``--steps`` steps, in a rotating order), so clock and thermal drift hit them alike;
reported: the median step time and the median over repeats of variant/baseline.
Memory (CUDA): each variant alone, after warm-up, ``max_memory_allocated`` over ``--steps`` steps.
State: bytes of parameters + gradients + optimizer state (+ MK's probability buffers), counted
from the tensors. Targets (issue 5): MK time <= 1.03x baseline; MK peak-memory overhead <=
e x (parameters + gradients + optimizer state) of the baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import mkopt
from mkopt.provenance import commit_of_tree

VARIANTS = {"baseline": None, "MK": "dirichlet", "Adv-MK": "adv-mk"}
TIME_TARGET = 1.03


@dataclass
class Run:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    times: list[float] = field(default_factory=list)


def build(name: str, args: argparse.Namespace, device: torch.device) -> Run:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(device).to(memory_format=torch.channels_last)
    kwargs = dict(lr=0.1 * args.batch / 256, momentum=0.9, weight_decay=1e-4)
    mode = VARIANTS[name]
    if mode is None:
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), **kwargs)
    else:
        compile_sampler = {"auto": None, "on": True, "off": False}[args.sampler_compile]
        opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=args.e, probabilities=mode, sampler_compile=compile_sampler, **kwargs)
    return Run(name, model, opt, torch.amp.GradScaler(device.type, enabled=args.amp == "fp16"))


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None) -> None:
    def loss() -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=amp) if amp else contextlib.nullcontext():
            return F.cross_entropy(run.model(x).float(), y)

    run.opt.zero_grad(set_to_none=True)
    if getattr(run.opt, "adversarial", False):
        run.scaler.scale(loss()).backward()  # probe at p = 1/e
        run.opt.ascend_probabilities(run.scaler)
    run.scaler.scale(loss()).backward()
    run.scaler.step(run.opt)
    run.scaler.update()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def state_bytes(run: Run) -> int:
    """Parameters + gradients + optimizer state (+ MK's probability buffers), in bytes."""
    tensors = [p for p in run.model.parameters()] + [p.grad for p in run.model.parameters() if p.grad is not None]
    tensors += [v for s in run.opt.state.values() for v in s.values() if torch.is_tensor(v)]
    if isinstance(run.opt, mkopt.MKOptimizer):
        tensors += list(run.opt.expansion.sampler.buffers.values())
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_memory(name: str, args: argparse.Namespace, device: torch.device, x, y, amp) -> tuple[float | None, int]:
    """(peak MiB over --steps steps after warm-up, CUDA only; state bytes) with this variant alone in memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    run = build(name, args, device)
    for _ in range(args.warmup):
        train_step(run, x, y, amp)
    sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.steps):
            train_step(run, x, y, amp)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    state = state_bytes(run)
    del run
    return peak, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke check")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto", help="auto: bf16 on GPUs that support it, else fp16; off on CPU")
    parser.add_argument("--e", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved blocks per variant")
    parser.add_argument("--steps", type=int, default=10, help="steps per block (and for the memory phase)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sampler-compile", choices=["auto", "on", "off"], default="auto", help="MKOptimizer(sampler_compile=...): auto = compile on CPU only")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible to torch: run on a GPU machine, or pass --device cpu --batch 8 --size 64 for a smoke check")
    if args.amp == "auto":
        args.amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "off"
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]
    torch.backends.cudnn.benchmark = True
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)

    memory = {name: measure_memory(name, args, device, x, y, amp) for name in VARIANTS}
    runs = [build(name, args, device) for name in VARIANTS]
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
    commit = commit_of_tree()
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    lines = [
        "# ResNet-50 training step: baseline vs MK vs Adv-MK",
        "",
        f"device: **{machine}**  ",
        f"command: `python bench/gpu_resnet50.py {' '.join(sys.argv[1:])}`  ",
        f"commit {commit}, torch {torch.__version__}{cuda}; batch {args.batch}, {args.size}x{args.size}, amp {args.amp}, "
        f"channels_last, SGD momentum, e={args.e}, sampler_compile={args.sampler_compile}; "
        f"{args.repeats} interleaved repeats x {args.steps} steps, medians",
        "",
        "| variant | ms/step | time vs baseline | images/s | peak MiB | peak overhead MiB | state MiB (params+grads+opt) |",
        "|---|---|---|---|---|---|---|",
    ]
    ratios = {}
    for run in runs:
        median = statistics.median(run.times)
        ratios[run.name] = statistics.median(t / b for t, b in zip(run.times, base.times))
        peak, state = memory[run.name]
        overhead = "-" if peak is None else f"{peak - memory['baseline'][0]:.0f}"
        peak_text = "-" if peak is None else f"{peak:.0f}"
        lines.append(
            f"| {run.name} | {median * 1e3:.1f} | **{ratios[run.name]:.3f}x** | {args.batch / median:.0f} | {peak_text} | {overhead} | {state / 2**20:.0f} |"
        )
    bound = args.e * memory["baseline"][1] / 2**20
    state_overhead = (memory["MK"][1] - memory["baseline"][1]) / 2**20
    lines += [
        "",
        f"Targets: MK time <= {TIME_TARGET:.2f}x: **{'met' if ratios['MK'] <= TIME_TARGET else 'NOT met'}** ({ratios['MK']:.3f}x).",
        f"MK state overhead (copies, their gradients and momentum, p buffers): {state_overhead:.0f} MiB against e x baseline state = {bound:.0f} MiB.",
    ]
    if memory["MK"][0] is not None:
        overhead = memory["MK"][0] - memory["baseline"][0]
        lines.append(
            f"MK peak-memory overhead <= e x baseline state ({bound:.0f} MiB): **{'met' if overhead <= bound else 'NOT met'}** ({overhead:.0f} MiB)."
        )
    else:
        lines.append("Peak memory is measured on CUDA only (this was a CPU smoke check).")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    main()
