"""The Table-1 protocol as a resumable sweep.

Phase 1: every (method, arch, optimizer, lr) of the grid at seed 0 (distilled last: its teacher
is the ensemble at the ensemble's selected lr). Phase 2: the selected lr per (method, arch,
optimizer), picked by validation accuracy at seed 0, rerun with the other seeds. Every run writes
its result atomically; rerunning the same sweep skips finished runs, so a killed sweep loses at
most the runs in flight.
"""

from __future__ import annotations

import functools
import os
import pickle
import platform
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..allocator import retain_freed_memory
from ..checkpoint import atomic_write
from ..data import Split, load_cifar10, load_fashion_mnist, load_npz, validation_split
from ..errors import DataError
from . import datasets, methods
from ..launch import InlineLauncher, Launcher
from .runs import ResultStore, RunSpec, commit_of_tree

# Epoch budget per method (full grid). MK needs more steps (paper 5.1): the MK variants and
# baseline-long get LONG, everything else BASE. Ensemble members and the distillation student
# train for BASE epochs, like the baseline they are built from. 5 / 10 epochs keep the full grid
# (~560 runs) near 2.5 h on 2 CPU cores (measured: A3 epoch 1.4 s baseline, 2.4 s MK, 5.2 s
# Adv-MK, 3.8 s ensemble, 10.8 s subset).
BASE_EPOCHS = 5
LONG_EPOCHS = 10


@dataclass
class SweepConfig:
    dataset: str = "fashion-mnist"
    archs: tuple[str, ...] = ("A1", "A2", "A3")
    optimizers: tuple[str, ...] = ("adam", "sgd")
    methods: tuple[str, ...] = methods.METHODS
    lrs: dict[str, list[float]] = field(default_factory=lambda: dict(methods.LR_GRID))
    seeds: tuple[int, ...] = (0, 1, 2)
    base_epochs: int = BASE_EPOCHS
    long_epochs: int = LONG_EPOCHS
    e: int = 3
    batch: int = 256
    mk_init: str = "replicate"  # init of the MK copies (mk, adv-mk); "independent" for the ablation

    def epochs(self, method: str) -> int:
        return self.long_epochs if method in ("baseline-long", "mk", "adv-mk") else self.base_epochs

    def spec(self, method: str, arch: str, optimizer: str, lr: float, seed: int) -> RunSpec:
        options = (("init", self.mk_init),) if method in ("mk", "adv-mk") and self.mk_init != "replicate" else ()
        return RunSpec(method, arch, optimizer, lr, seed, self.epochs(method), self.dataset, self.batch, self.e, options)


@functools.lru_cache(maxsize=4)
def load_dataset(name: str) -> tuple[Split, Split, Split, int, int]:
    """(fit, validation, test, input features, classes); standardized with the fit split's statistics.

    ``name``: ``fashion-mnist``, ``cifar10``, ``npz:PATH``, or ``synthetic`` (a small generated
    teacher-labelled problem for tests). Missing or malformed data raises :class:`mkopt.errors.DataError`
    (one clear message, no traceback on the command line).
    """
    datasets.check_name(name)
    try:
        return _load_dataset(name)
    except DataError:
        raise
    except (OSError, ValueError, pickle.UnpicklingError) as error:  # the readers' messages name the file and the fix
        raise DataError(str(error)) from None


def _load_dataset(name: str) -> tuple[Split, Split, Split, int, int]:
    if name == "fashion-mnist":
        train, test = load_fashion_mnist()
    elif name == "cifar10":
        train, test = load_cifar10()
    elif name.startswith("npz:"):
        train, test = load_npz(name[4:])
    elif name == "synthetic":
        g = torch.Generator().manual_seed(0)
        teacher = torch.randn(20, 4, generator=g)
        x = torch.randn(1400, 20, generator=g)
        y = (x @ teacher + 0.5 * torch.randn(1400, 4, generator=g)).argmax(1)
        train, test = Split(x[:1000], y[:1000]), Split(x[1000:], y[1000:])
    fit, val = validation_split(train, 0.1, seed=0)
    mean, std = fit.x.mean(), fit.x.std()
    if not bool(torch.isfinite(fit.x).all()):
        raise ValueError(f"dataset={name!r}: the training features hold NaN or inf; clean or impute them before the sweep")
    if float(std) == 0.0:
        raise ValueError(f"dataset={name!r}: every training feature has the same value ({float(mean):g}); nothing to learn")
    norm = lambda s: Split(((s.x - mean) / std).flatten(1), s.y)  # noqa: E731
    classes = int(train.y.max()) + 1
    return norm(fit), norm(val), norm(test), fit.x[0].numel(), classes


def execute(job: tuple[RunSpec, str, RunSpec | None]) -> dict[str, Any]:
    """Run one spec (module-level: picklable for process pools and SLURM)."""
    spec, root, teacher_spec = job
    torch.set_num_threads(int(os.environ.get("MKOPT_THREADS", torch.get_num_threads())))
    if platform.libc_ver()[0] == "glibc":  # CPU training: reuse freed blocks instead of faulting them in every step
        try:
            retain_freed_memory()
        except RuntimeError as error:  # an older glibc caps the thresholds lower: speed only, so train anyway
            warnings.warn(f"{error}; training with glibc's default allocator (slower, same results)", RuntimeWarning, stacklevel=2)
    fit, val, test, inputs, classes = load_dataset(spec.dataset)
    teacher = trained_teacher(teacher_spec, root) if spec.method == "distilled" else None
    trainee = methods.build(spec, inputs, classes, teacher)
    return {**methods.train(trainee, spec, fit, val, test), "data_sha256": datasets.fingerprint(spec.dataset)}


def trained_teacher(spec: RunSpec, root: str) -> methods.Ensemble:
    """The ensemble of ``spec``, trained once and cached (atomically) under ``root/teachers``."""
    fit, val, test, inputs, classes = load_dataset(spec.dataset)
    ensemble = methods.Ensemble(spec, inputs, classes)
    path = Path(root) / "teachers" / f"{spec.run_id}-{datasets.fingerprint(spec.dataset)}.pt"  # keyed by the data's content
    if path.is_file():
        state = torch.load(path, weights_only=True)
        with torch.no_grad():
            for name, value in state.items():
                ensemble.params[name].copy_(value)
        return ensemble
    methods.train(ensemble, spec, fit, val, test)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach() for k, v in ensemble.params.items()}
    atomic_write(path, lambda out: torch.save(state, out))  # the one atomic writer (temp + fsync + rename)
    return ensemble


def select_lr(store: ResultStore, config: SweepConfig, method: str, arch: str, optimizer: str, seed: int = 0) -> float | None:
    """The grid lr with the best validation accuracy at ``seed`` (None until the grid is complete)."""
    scores = []
    for lr in config.lrs[optimizer]:
        spec = config.spec(method, arch, optimizer, lr, seed)
        if not store.done(spec):
            return None
        scores.append((store.read(spec)["val_accuracy"], -lr, lr))  # ties: the smaller lr
    return max(scores)[2]


def run_sweep(config: SweepConfig, root: str | os.PathLike, launcher: Launcher | None = None, progress: bool = True) -> ResultStore:
    """Run (or resume) the whole protocol; returns the store with every result."""
    launcher = launcher or InlineLauncher()
    store = ResultStore(root, {config.dataset: datasets.fingerprint(config.dataset)})
    reused = 0
    provenance = _provenance()
    first_seed, other_seeds = config.seeds[0], config.seeds[1:]
    without_distilled = tuple(m for m in config.methods if m != "distilled")

    def jobs_for(specs: list[RunSpec]) -> list[tuple[RunSpec, str, RunSpec | None]]:
        out = []
        for spec in specs:
            if store.done(spec):
                continue
            teacher = None
            if spec.method == "distilled":
                teacher_lr = select_lr(store, config, "ensemble", spec.arch, spec.optimizer, first_seed)
                if teacher_lr is None:
                    raise RuntimeError(f"{spec.run_id}: the ensemble grid must finish before distillation")
                teacher = replace(config.spec("ensemble", spec.arch, spec.optimizer, teacher_lr, first_seed), seed=spec.seed)
            out.append((spec, str(root), teacher))
        return out

    def run(specs: list[RunSpec], label: str) -> None:
        nonlocal reused
        jobs = jobs_for(specs)
        reused += len(specs) - len(jobs)
        bar = _progress(len(jobs), label) if progress else None
        for (spec, _, _), result in launcher.run(execute, jobs):
            store.write(spec, {**result, "provenance": provenance})
            if bar is not None:
                bar.set_postfix_str(f"{spec.method} {spec.arch} {spec.optimizer} lr={spec.lr:.4g}: test {result['test_accuracy']:.4f}")
                bar.update()
        if bar is not None:
            bar.close()

    grid = lambda chosen: [  # noqa: E731
        config.spec(m, a, o, lr, first_seed) for m in chosen for a in config.archs for o in config.optimizers for lr in config.lrs[o]
    ]
    run(grid(without_distilled), "lr grid")
    if "distilled" in config.methods:
        run(grid(("distilled",)), "lr grid (distilled)")
    seeded = []
    for m in config.methods:
        for a in config.archs:
            for o in config.optimizers:
                lr = select_lr(store, config, m, a, o, first_seed)
                seeded += [config.spec(m, a, o, lr, s) for s in other_seeds]
    run(seeded, "seeds at the selected lr")
    if progress and reused:
        print(f"reused {reused} finished run{'s' if reused != 1 else ''} from {root}")
    return store


def _provenance() -> dict[str, Any]:
    return {"commit": commit_of_tree(), "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(), "threads": os.environ.get("MKOPT_THREADS", str(torch.get_num_threads()))}


def _progress(total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="run")
