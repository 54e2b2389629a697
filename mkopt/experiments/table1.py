"""``mkopt table1``: the paper's Table 1 protocol on Fashion-MNIST (or CIFAR-10 / your .npz).

The quick version (default) runs A1 and A2, both optimizers, three learning rates (``1.5^i`` times
the paper's base lr, i = 0, 2, 4; ``--lr-steps`` changes them) and two seeds with a short epoch
budget (2 / 4 epochs, raised on small data sets so every run takes at least ``QUICK_MIN_STEPS``
optimizer steps; 144 runs, 7.5 min wall with ``--workers 2`` (the default) on the idle 2-core CI-class
machine, measured at commit a8e7a0a); ``--full`` runs the paper's grid (A1-A3, ten
learning rates, three seeds, 5 / 10 epochs; ~2 h 10 min estimated, see results/README.md). Budgets follow section 5.2 (``--budget short`` is the ablation with 5-epoch ensemble
members, distilled and subset). After the sweep it warns when a selected lr sits at the edge of its
grid (widen it with ``--lr-steps``) and when a cell ends near chance. Results go to ``--runs`` (one JSON per run; a
rerun resumes), the table and figures to ``--out``. ``--launcher slurm --profile slurm/profiles/X.yaml``
submits each phase of the sweep as a SLURM job array (``local``: submitit's local executor); this
process gathers the results as jobs finish, and a resubmitted sweep skips the finished runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from .. import launch
from . import datasets
from ..launch.base import Launcher
from .methods import LR_BASE, LR_GRID, METHODS
from .report import claims_table, plot_curves, protocol_warnings, table
from .sweep import BUDGETS, SweepConfig, load_dataset, run_sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true", help="the paper's full grid (A1-A3, 10 lrs, 3 seeds)")
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist | cifar10 | npz:PATH")
    parser.add_argument("--runs", type=Path, default=None,
                        help="result store (default runs/table1-<quick|full>, runs/table1-<quick|full>-<data> for other data)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="table + figures (default: same as --runs)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="local worker processes, each with cpus/workers threads (default: 2)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--archs", nargs="+", default=None, choices=["A1", "A2", "A3"], help="subset of architectures (ablations)")
    parser.add_argument("--optimizers", nargs="+", default=None, choices=["adam", "sgd"], help="subset of optimizers (ablations)")
    parser.add_argument("--lr-steps", nargs=2, type=int, default=None, metavar=("LO", "HI"),
                        help="lr grid base * 1.5^i for i in [LO, HI] (paper: -4 5; quick default: 0, 2, 4); finished runs are reused")
    parser.add_argument("--budget", default="paper", choices=list(BUDGETS),
                        help="paper: section 5.2 (ensemble of baseline-long runs, distilled and subset on the long budget); "
                        "short: the ablation with ensemble members, distilled and subset on the baseline's budget")
    parser.add_argument("--mk-init", default="replicate", choices=["replicate", "independent"], help="init of the MK copies (ablation)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override any SweepConfig setting the flags build, typed and checked by mkopt.config "
                             "(e.g. --set seeds=[0,1,2] base_epochs=3 lrs.adam=[1e-3,2e-3])")  # fmt: skip
    launch.add_launcher_arguments(parser)  # --launcher inline|pool|local|slurm --profile --job-dir --cluster


def make_launcher(args: argparse.Namespace) -> Launcher:
    """``--launcher`` (default: ``pool`` when ``--workers`` > 1, else ``inline``) with its settings.

    Each pool worker gets cpus/workers torch threads; each local/SLURM job gets ``cpus_per_task``.
    """
    launcher = launch.launcher_from_args(args, workers=args.workers)
    if isinstance(launcher, launch.SubmititLauncher):
        os.environ.setdefault("MKOPT_THREADS", str(launcher.profile.cpus_per_task))  # jobs inherit the environment
    elif args.workers > 1 and args.launcher in (None, "pool"):
        os.environ.setdefault("MKOPT_THREADS", str(max(1, (os.cpu_count() or 2) // args.workers)))
    return launcher


# The quick grid: three points, so the selected lr can sit inside it. Short budgets favour large steps: with
# (-2, 0, 2) the top point won in 27 of 28 cells (Fashion-MNIST, quick job at commit 44d37f3), so (0, 2, 4).
QUICK_LR_STEPS = (0, 2, 4)
QUICK_MIN_STEPS = 400  # optimizer steps of the quick job's shortest run (Fashion-MNIST: 2 epochs = 420 steps)


def lr_grid(low: int, high: int, step: int = 1) -> dict[str, list[float]]:
    """``base * 1.5^i`` for ``i = low, low + step, ..., high`` per optimizer (bit-equal to the paper's grid).

    Example:
        >>> [round(lr, 6) for lr in lr_grid(-2, 2, 2)["adam"]]
        [0.000444, 0.001, 0.00225]
    """
    if low > high:
        raise SystemExit(f"--lr-steps {low} {high}: LO must be <= HI")
    return {o: [base * 1.5**i for i in range(low, high + 1, step)] for o, base in LR_BASE.items()}


def config_for(args: argparse.Namespace) -> SweepConfig:
    subset = {k: tuple(v) for k, v in (("archs", args.archs), ("optimizers", args.optimizers)) if v}
    common = dict(dataset=args.dataset, methods=tuple(args.methods), mk_init=args.mk_init, budget=getattr(args, "budget", "paper"))
    if args.full:
        lrs = lr_grid(*args.lr_steps) if args.lr_steps else dict(LR_GRID)
        return SweepConfig(lrs=lrs, **common, **subset)
    low, high = QUICK_LR_STEPS[0], QUICK_LR_STEPS[-1]
    lrs = lr_grid(*args.lr_steps) if args.lr_steps else lr_grid(low, high, QUICK_LR_STEPS[1] - low)
    return SweepConfig(lrs=lrs, seeds=(0, 1), base_epochs=2, long_epochs=4, **common, **{"archs": ("A1", "A2"), **subset})


def with_min_steps(config: SweepConfig, train_size: int, min_steps: int) -> SweepConfig:
    """``config`` with both epoch budgets multiplied by the smallest factor that gives its shortest run
    ``min_steps`` optimizer steps on ``train_size`` examples (their ratio, and so MK's longer budget, kept).

    Example:
        >>> c = with_min_steps(SweepConfig(base_epochs=2, long_epochs=4, batch=256), train_size=1000, min_steps=400)
        >>> c.base_epochs, c.long_epochs  # 3 steps per epoch: 134 epochs for 402 steps
        (134, 268)
    """
    steps_per_epoch = max(1, train_size // config.batch)
    factor = max(1, -(-min_steps // (steps_per_epoch * config.base_epochs)))
    return replace(config, base_epochs=config.base_epochs * factor, long_epochs=config.long_epochs * factor)


def with_overrides(config: SweepConfig, overrides: list[str]) -> SweepConfig:
    """``config`` with ``key=value`` overrides through mkopt's one config system (typed; unknown keys refused).

    Example:
        >>> base = SweepConfig(dataset="synthetic")
        >>> with_overrides(base, ["seeds=[0]", "lrs.adam=[1e-3]"]).seeds, with_overrides(base, ["lrs.adam=[1e-3]"]).lrs["adam"]
        ((0,), [0.001])
    """
    if not overrides:
        return config
    from ..config import load_config

    values = dataclasses.asdict(config)
    return load_config(SweepConfig, None, list(overrides), values=values, source="flags")


def run(args: argparse.Namespace) -> int:
    config = with_overrides(config_for(args), args.set)
    fit = load_dataset(config.dataset)[0]  # missing or malformed data: one clear error here, before any job starts
    epochs_set = any(o.split("=", 1)[0].strip() in ("base_epochs", "long_epochs") for o in args.set)
    if not args.full and not epochs_set:  # the quick job's floor on optimizer steps (for the final batch and data)
        config = with_min_steps(config, len(fit), QUICK_MIN_STEPS)
    runs = args.runs or datasets.default_runs_folder(config.dataset, args.full)
    out = args.out or runs
    launcher = make_launcher(args)
    if isinstance(launcher, launch.SubmititLauncher):
        runs = runs.resolve()  # jobs may start in another working directory
    store = run_sweep(config, runs, launcher)
    command = "mkopt table1 " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["table1"] else sys.argv[1:])
    problems = protocol_warnings(store, config, classes=load_dataset(config.dataset)[4])
    for problem in problems:
        warnings.warn(problem, UserWarning, stacklevel=1)
    text = table(store, config, command.strip(), problems)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table1.md").write_text(text)
    claims = f"# Paper claims against this table\n\nFrom `{out / 'table1.md'}`'s runs (command there).\n\n" + claims_table(store, config)
    (out / "claims.md").write_text(claims)
    figures = plot_curves(store, config, out)
    print("\n" + text)
    print(f"wrote {out / 'table1.md'}, " + ", ".join(str(f) for f in figures))
    return 0
