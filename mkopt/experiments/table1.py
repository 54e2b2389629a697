"""``mkopt table1``: the paper's Table 1 protocol on Fashion-MNIST (or CIFAR-10 / your .npz).

The quick version (default, ~6 min on 2 cores) runs A1 and A2, both optimizers, two learning
rates and two seeds with a short epoch budget (2 / 4 epochs); ``--full`` runs the paper's grid
(A1-A3, ten learning rates, three seeds, 5 / 10 epochs; ~2.5 h on 2 cores with ``--workers 2``). Results go to ``--runs`` (one JSON per run; a
rerun resumes), the table and figures to ``--out``. ``--launcher slurm --profile slurm/profiles/X.yaml``
submits each phase of the sweep as a SLURM job array (``local``: submitit's local executor); this
process gathers the results as jobs finish, and a resubmitted sweep skips the finished runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from .. import launch
from . import datasets
from ..launch.base import Launcher
from .methods import LR_BASE, LR_GRID, METHODS
from .report import plot_curves, table
from .sweep import SweepConfig, load_dataset, run_sweep


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
                        help="with --full: lr grid base * 1.5^i for i in [LO, HI] (paper: -4 5); finished runs are reused")
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


def config_for(args: argparse.Namespace) -> SweepConfig:
    subset = {k: tuple(v) for k, v in (("archs", args.archs), ("optimizers", args.optimizers)) if v}
    if args.full:
        lrs = dict(LR_GRID)
        if args.lr_steps:
            low, high = args.lr_steps
            if low > high:
                raise SystemExit(f"--lr-steps {low} {high}: LO must be <= HI")
            lrs = {o: [base * 1.5**i for i in range(low, high + 1)] for o, base in LR_BASE.items()}
        return SweepConfig(dataset=args.dataset, methods=tuple(args.methods), mk_init=args.mk_init, lrs=lrs, **subset)
    if args.lr_steps:
        raise SystemExit("--lr-steps needs --full (the quick run uses two fixed learning rates)")
    quick_lrs = {o: [grid[4], grid[6]] for o, grid in LR_GRID.items()}  # 1.5^0 and 1.5^2 times the base lr
    return SweepConfig(
        dataset=args.dataset, methods=tuple(args.methods), lrs=quick_lrs,
        seeds=(0, 1), base_epochs=2, long_epochs=4, mk_init=args.mk_init, **{"archs": ("A1", "A2"), **subset},
    )  # fmt: skip


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
    load_dataset(config.dataset)  # missing or malformed data: one clear error here, before any job starts
    runs = args.runs or datasets.default_runs_folder(config.dataset, args.full)
    out = args.out or runs
    launcher = make_launcher(args)
    if isinstance(launcher, launch.SubmititLauncher):
        runs = runs.resolve()  # jobs may start in another working directory
    store = run_sweep(config, runs, launcher)
    command = "mkopt table1 " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["table1"] else sys.argv[1:])
    text = table(store, config, command.strip())
    out.mkdir(parents=True, exist_ok=True)
    (out / "table1.md").write_text(text)
    figures = plot_curves(store, config, out)
    print("\n" + text)
    print(f"wrote {out / 'table1.md'}, " + ", ".join(str(f) for f in figures))
    return 0
