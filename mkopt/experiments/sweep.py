"""The Table-1 protocol as a resumable sweep.

Phase 1: every (method, arch, optimizer, lr) of the grid at seed 0; the ensemble's members (its
own baseline-long runs, :func:`~mkopt.experiments.methods.member_specs`) before the ensemble;
distilled last (its teacher is the ensemble at the ensemble's selected lr). Phase 2: the selected
lr per (method, arch, optimizer), picked by validation accuracy at seed 0, rerun with the other
seeds. Every run writes its result atomically; rerunning the same sweep skips finished runs, so a
killed sweep loses at most the runs in flight. Baseline(-long) runs also keep their final weights
(``<runs>/models/<run id>.pt``, not in git): an ensemble is made of them.
"""

from __future__ import annotations

import functools
import os
import pickle
import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..allocator import retain_freed_memory
from ..checkpoint import atomic_write
from ..data import Split, load_cifar10, load_fashion_mnist, load_npz, validation_split
from ..errors import DataError
from . import datasets, methods
from ..launch import InlineLauncher, Launcher
from ..adversarial import DEFAULT_ADVERSARIAL_EPS
from .runs import ResultStore, RunSpec, commit_of_tree

# Epoch budget per method. The paper's (section 5.2, budget="paper"): BASELINE trains BASE epochs;
# BASELINE-LONG, MK and Adv-MK train LONG (MK needs more steps); ENSEMBLE is three BASELINE-LONG
# models, DISTILLED is BASELINE-LONG plus the KD loss, and SUBSET (the discrete analogue of MK)
# gets MK's steps too. budget="short" is the ablation where ensemble (members: baseline runs),
# distilled and subset train BASE epochs, as the first version of this harness did.
BASE_EPOCHS = 5
LONG_EPOCHS = 10
BUDGETS = ("paper", "short")
SHORT_IN_ABLATION = ("ensemble", "distilled", "subset")
# Version of the methods whose definition changed with section 5.2 / Algorithm D.1 (ensembles of baseline-long
# members, KD from them, subset with fan-in m): part of their run ids, so results of the older protocol are never reused.
PROTOCOL = 2
PROTOCOL_METHODS = ("subset", "ensemble", "distilled")


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
    budget: str = "paper"  # see BUDGETS above

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"budget={self.budget!r} is unknown: use one of {BUDGETS}")

    def epochs(self, method: str) -> int:
        if method == "baseline" or (self.budget == "short" and method in SHORT_IN_ABLATION):
            return self.base_epochs
        return self.long_epochs

    @property
    def member_method(self) -> str:
        """What an ensemble member is: a baseline-long run (paper), a baseline run (short ablation)."""
        return "baseline-long" if self.budget == "paper" else "baseline"

    def members(self, ensemble: RunSpec) -> list[RunSpec]:
        return methods.member_specs(ensemble, self.member_method)

    def spec(self, method: str, arch: str, optimizer: str, lr: float, seed: int) -> RunSpec:
        """The run of one cell; its options name every setting that changes the result beyond the fields (so a
        result made under other settings, e.g. an older protocol, never has this run's id)."""
        options: list[tuple[str, Any]] = []
        if method in ("mk", "adv-mk") and self.mk_init != "replicate":
            options.append(("init", self.mk_init))
        if method == "adv-mk":
            options.append(("eps", DEFAULT_ADVERSARIAL_EPS))
        if method in PROTOCOL_METHODS:
            options.append(("protocol", PROTOCOL))
        if method == "ensemble":
            options.append(("members", self.member_method))
        return RunSpec(method, arch, optimizer, lr, seed, self.epochs(method), self.dataset, self.batch, self.e, tuple(sorted(options)))


def load_dataset(name: str) -> tuple[Split, Split, Split, int, int]:
    """(fit, validation, test, input features, classes); standardized with the fit split's statistics.

    ``name``: ``fashion-mnist``, ``cifar10``, ``npz:PATH``, or ``synthetic`` (a small generated
    teacher-labelled problem for tests). Missing or malformed data raises :class:`mkopt.errors.DataError`
    (one clear message, no traceback on the command line).
    """
    datasets.check_name(name)
    try:
        content = datasets.fingerprint(name)  # the cache key: a replaced file is read again
    except (OSError, DataError):
        content = ""  # missing or unreadable: the reader below says which file and what to do
    return _load_cached(name, content)


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, sha256: str) -> tuple[Split, Split, Split, int, int]:
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


def model_path(root: str | os.PathLike, spec: RunSpec) -> Path:
    """Where a baseline(-long) run keeps its final weights (ensembles are made of them)."""
    return Path(root) / "models" / f"{spec.run_id}.pt"


KEEPS_WEIGHTS = ("baseline", "baseline-long")


def execute(job: tuple[RunSpec, str, list[RunSpec] | None]) -> dict[str, Any]:
    """Run one spec (module-level: picklable for process pools and SLURM).

    ``job = (spec, root, members)``: ``members`` are the trained runs an ensemble is made of, or a
    distilled run's teacher is made of; their weights must be in ``root`` (the sweep runs them first).
    """
    spec, root, members = job
    torch.set_num_threads(int(os.environ.get("MKOPT_THREADS", torch.get_num_threads())))
    if platform.libc_ver()[0] == "glibc":  # CPU training: reuse freed blocks instead of faulting them in every step
        try:
            retain_freed_memory()
        except RuntimeError as error:  # an older glibc caps the thresholds lower: speed only, so train anyway
            warnings.warn(f"{error}; training with glibc's default allocator (slower, same results)", RuntimeWarning, stacklevel=2)
    fit, val, test, inputs, classes = load_dataset(spec.dataset)
    if spec.method == "ensemble":
        assert members is not None
        store = ResultStore(root)
        return methods.evaluate_ensemble(trained_ensemble(members, root), [(m, store.read(m)) for m in members], fit, val, test)
    teacher = trained_ensemble(members, root) if spec.method == "distilled" and members is not None else None
    trainee = methods.build(spec, inputs, classes, teacher)
    result = {**methods.train(trainee, spec, fit, val, test), "data_sha256": datasets.fingerprint(spec.dataset)}
    if spec.method in KEEPS_WEIGHTS:
        assert isinstance(trainee, methods.Plain)
        state = {k: v.detach().clone() for k, v in trainee.model.state_dict().items()}
        path = model_path(root, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda out: torch.save(state, out))  # the one atomic writer (temp + fsync + rename)
    return result


def trained_ensemble(members: list[RunSpec], root: str | os.PathLike) -> methods.Ensemble:
    """The ensemble of the trained runs ``members``, from their saved weights."""
    fit, val, test, inputs, classes = load_dataset(members[0].dataset)
    models = []
    for spec in members:
        path = model_path(root, spec)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the weights of ensemble member {spec.run_id} are missing; run the sweep (it trains the "
                "members before the ensemble), or delete that member's result file so the sweep retrains it"
            )
        model = methods.arch(spec.arch, inputs, classes)
        model.load_state_dict(torch.load(path, weights_only=True))
        models.append(model)
    return methods.Ensemble(models)


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
    reused: set[RunSpec] = set()  # finished before this call, not by it
    ran: set[RunSpec] = set()
    provenance = _provenance()
    first_seed, other_seeds = config.seeds[0], config.seeds[1:]
    ensembles = "ensemble" in config.methods or "distilled" in config.methods
    single = tuple(m for m in config.methods if m not in ("ensemble", "distilled"))

    def done(spec: RunSpec, weights: bool = False) -> bool:
        return store.done(spec) and (not weights or model_path(root, spec).is_file())

    def ensemble_lr(arch: str, optimizer: str) -> float:
        lr = select_lr(store, config, "ensemble", arch, optimizer, first_seed)
        if lr is None:
            raise RuntimeError(f"ensemble {arch} {optimizer}: the ensemble grid must finish before distillation")
        return lr

    def job(spec: RunSpec) -> tuple[RunSpec, str, list[RunSpec] | None]:
        if spec.method == "ensemble":
            return spec, str(root), config.members(spec)
        if spec.method == "distilled":  # the teacher: the ensemble of the same seed at the ensemble's lr
            teacher = config.spec("ensemble", spec.arch, spec.optimizer, ensemble_lr(spec.arch, spec.optimizer), spec.seed)
            return spec, str(root), config.members(teacher)
        return spec, str(root), None

    def run(specs: list[RunSpec], label: str, weights: bool = False) -> None:
        """``weights``: these runs are ensemble members, redone if their weights are missing."""
        unique = list(dict.fromkeys(specs))
        jobs = [job(spec) for spec in unique if not done(spec, weights)]
        reused.update(spec for spec in unique if spec not in ran and done(spec, weights))
        bar = _progress(len(jobs), label) if progress and jobs else None
        for (spec, _, _), result in launcher.run(execute, jobs):
            store.write(spec, {**result, "provenance": provenance})
            ran.add(spec)
            if bar is not None:
                bar.set_postfix_str(f"{spec.method} {spec.arch} {spec.optimizer} lr={spec.lr:.4g}: test {result['test_accuracy']:.4f}")
                bar.update()
        if bar is not None:
            bar.close()

    def members_of(ensemble_specs: list[RunSpec]) -> list[RunSpec]:
        return [member for spec in ensemble_specs for member in config.members(spec)]

    cells = [(a, o) for a in config.archs for o in config.optimizers]
    grid = lambda chosen: [config.spec(m, a, o, lr, first_seed) for m in chosen for a, o in cells for lr in config.lrs[o]]  # noqa: E731
    def pending_members(ensemble_specs: list[RunSpec], distilled_specs: list[RunSpec] = ()) -> list[RunSpec]:
        """The members whose weights something still needs: unfinished ensembles, and the teachers of unfinished
        distilled runs (weights are not committed: a finished store rebuilds its table without retraining them)."""
        needed = [spec for spec in ensemble_specs if not done(spec)]
        needed += [teacher_of(spec) for spec in distilled_specs if not done(spec)]
        return members_of(needed)

    def teacher_of(spec: RunSpec) -> RunSpec:
        return config.spec("ensemble", spec.arch, spec.optimizer, ensemble_lr(spec.arch, spec.optimizer), spec.seed)

    run(grid(single), "lr grid")
    if ensembles:
        run(members_of([s for s in grid(("ensemble",)) if not done(s)]), "lr grid (ensemble members)", weights=True)
        run(grid(("ensemble",)), "lr grid (ensembles)")
    if "distilled" in config.methods:
        run(pending_members([], grid(("distilled",))), "lr grid (teacher members)", weights=True)
        run(grid(("distilled",)), "lr grid (distilled)")
    seeded = [config.spec(m, a, o, select_lr(store, config, m, a, o, first_seed), s) for m in config.methods for a, o in cells for s in other_seeds]
    if ensembles:  # the teachers of the distilled seeds too, even when "ensemble" itself is not reported
        teachers = [config.spec("ensemble", a, o, ensemble_lr(a, o), s) for a, o in cells for s in other_seeds]
        reported = [t for t in teachers if "ensemble" in config.methods]
        distilled = [s for s in seeded if s.method == "distilled"]
        run(pending_members(reported, distilled), "seeds (ensemble members)", weights=True)
        run(reported, "seeds (ensembles)")
    run([s for s in seeded if s.method != "ensemble"], "seeds at the selected lr")
    reused -= ran  # a member reused for its result, then retrained for its missing weights
    if progress and reused:
        print(f"reused {len(reused)} finished run{'s' if len(reused) != 1 else ''} from {root}")
    return store


def _provenance() -> dict[str, Any]:
    return {"commit": commit_of_tree(), "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(), "threads": os.environ.get("MKOPT_THREADS", str(torch.get_num_threads()))}


def _progress(total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="run")
