"""Table 1 (markdown) and the figures from a sweep's result store."""

from __future__ import annotations

import platform
import statistics
from pathlib import Path

import torch

from .runs import ResultStore, commit_of_tree
from .sweep import SweepConfig, select_lr

LABELS = {
    "baseline": "baseline",
    "baseline-long": "baseline-long",
    "mk": "MK (e=3)",
    "adv-mk": "Adv-MK (e=3)",
    "ensemble": "ensemble (3)",
    "distilled": "distilled",
    "subset": "subset (D.1)",
}
# The paper's Table 1 (CIFAR-10, batch 256), test accuracy %, (Adam, SGD): for reference only.
PAPER_CIFAR10 = {
    ("baseline", "A1"): ("51.79 ± 0.21", "51.24 ± 0.16"),
    ("ensemble", "A1"): ("52.27 ± 0.12", "52.55 ± 0.52"),
    ("distilled", "A1"): ("48.68 ± 0.86", "48.69 ± 0.33"),
    ("subset", "A1"): ("52.09 ± 0.16", "52.10 ± 0.20"),
    ("mk", "A1"): ("52.01 ± 0.10", "51.82 ± 0.15"),
    ("baseline", "A2"): ("52.99 ± 0.09", "52.64 ± 0.34"),
    ("ensemble", "A2"): ("54.36 ± 0.08", "54.87 ± 0.15"),
    ("distilled", "A2"): ("52.94 ± 0.26", "51.87 ± 0.89"),
    ("subset", "A2"): ("53.69 ± 0.20", "53.90 ± 0.15"),
    ("mk", "A2"): ("54.29 ± 0.20", "54.21 ± 0.24"),
    ("baseline", "A3"): ("53.79 ± 0.18", "53.30 ± 0.17"),
    ("ensemble", "A3"): ("55.62 ± 0.15", "56.56 ± 0.27"),
    ("distilled", "A3"): ("55.26 ± 0.32", "54.21 ± 0.31"),
    ("subset", "A3"): ("54.58 ± 0.15", "54.57 ± 0.34"),
    ("mk", "A3"): ("55.04 ± 0.12", "54.97 ± 0.31"),
}


def cell(store: ResultStore, config: SweepConfig, method: str, arch: str, optimizer: str) -> tuple[str, float | None]:
    """'mean ± std (lr)' of the test accuracy (%) over seeds at the selected lr."""
    lr = select_lr(store, config, method, arch, optimizer, config.seeds[0])
    if lr is None:
        return "—", None
    values = [100 * store.read(config.spec(method, arch, optimizer, lr, s))["test_accuracy"] for s in config.seeds if store.done(config.spec(method, arch, optimizer, lr, s))]
    if not values:
        return "—", None
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f} (n={len(values)}, lr {lr:.3g})", statistics.mean(values)


def table(store: ResultStore, config: SweepConfig, command: str) -> str:
    commit = commit_of_tree()
    lines = [
        f"# Table 1 on {config.dataset}: test accuracy (%) at the lr picked on validation, mean ± std over seeds",
        "",
        f"command: `{command}`  ",
        f"commit {commit}; seeds {list(config.seeds)} (lr chosen at seed {config.seeds[0]}); epochs: {config.base_epochs} "
        f"(baseline, ensemble members, distilled, subset), {config.long_epochs} (baseline-long, MK, Adv-MK); batch {config.batch}; "
        f"MK copies init={config.mk_init}; "
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "",
        "| method | arch | Adam | SGD | paper CIFAR-10 Adam | paper CIFAR-10 SGD |",
        "|---|---|---|---|---|---|",
    ]
    for a in config.archs:
        for m in config.methods:
            adam = cell(store, config, m, a, "adam")[0] if "adam" in config.optimizers else "—"
            sgd = cell(store, config, m, a, "sgd")[0] if "sgd" in config.optimizers else "—"
            paper = PAPER_CIFAR10.get((m, a), ("—", "—"))
            lines.append(f"| {LABELS.get(m, m)} | {a} | {adam} | {sgd} | {paper[0]} | {paper[1]} |")
    return "\n".join(lines) + "\n"


def plot_curves(store: ResultStore, config: SweepConfig, out_dir: Path) -> list[Path]:
    """Figure 5.3 analog (test loss, baseline vs MK, A1) and Figure 5.2 analog (train - test accuracy gap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    optimizer = config.optimizers[0]
    arch = "A1" if "A1" in config.archs else config.archs[0]

    def curves(method: str, arch_name: str):
        lr = select_lr(store, config, method, arch_name, optimizer, config.seeds[0])
        if lr is None:
            return None
        return store.read(config.spec(method, arch_name, optimizer, lr, config.seeds[0]))["curves"]

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    for method in ("baseline", "baseline-long", "mk"):
        c = curves(method, arch) if method in config.methods else None
        if c:
            ax.plot(range(1, len(c["test_loss"]) + 1), c["test_loss"], marker="o", ms=3, label=LABELS[method])
    ax.set(xlabel="epoch", ylabel="test loss (NLL)", title=f"{config.dataset}, {arch}, {optimizer} (Fig. 5.3 analog)")
    written.append(_save(fig, ax, out_dir / "test_loss_baseline_vs_mk.png"))

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    big = config.archs[-1]
    for method in ("baseline-long", "mk", "adv-mk", "distilled"):
        c = curves(method, big) if method in config.methods else None
        if c:
            gap = [100 * (tr - te) for tr, te in zip(c["train_accuracy"], c["test_accuracy"])]
            ax.plot(range(1, len(gap) + 1), gap, marker="o", ms=3, label=LABELS[method])
    ax.set(xlabel="epoch", ylabel="train - test accuracy (points)", title=f"{config.dataset}, {big}, {optimizer}: generalization gap")
    written.append(_save(fig, ax, out_dir / "generalization_gap.png"))
    return written


def _save(fig, ax, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a sweep without the plotted methods draws no curve: no empty legend (and no warning)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
