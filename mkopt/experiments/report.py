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


def seed_results(store: ResultStore, config: SweepConfig, method: str, arch: str, optimizer: str) -> tuple[float | None, list[dict]]:
    """(selected lr, the finished results over seeds at it); (None, []) until the seed-0 grid is complete."""
    lr = select_lr(store, config, method, arch, optimizer, config.seeds[0])
    if lr is None:
        return None, []
    specs = [config.spec(method, arch, optimizer, lr, s) for s in config.seeds]
    return lr, [store.read(spec) for spec in specs if store.done(spec)]


def cell(store: ResultStore, config: SweepConfig, method: str, arch: str, optimizer: str) -> tuple[str, float | None]:
    """'mean ± std (lr)' of the test accuracy (%) over seeds at the selected lr."""
    lr, results = seed_results(store, config, method, arch, optimizer)
    if not results:
        return "—", None
    values = [100 * r["test_accuracy"] for r in results]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f} (n={len(values)}, lr {lr:.3g})", statistics.mean(values)


def budget_line(config: SweepConfig) -> str:
    """'epochs: 5 (baseline); 10 (baseline-long, MK, ...)', from the config's budget."""
    by_epochs: dict[int, list[str]] = {}
    for m in config.methods:
        label = LABELS.get(m, m) + (f", members: {config.member_method} runs" if m == "ensemble" else "")
        by_epochs.setdefault(config.epochs(m), []).append(label)
    return "epochs: " + "; ".join(f"{e} ({', '.join(ms)})" for e, ms in sorted(by_epochs.items())) + f" [budget={config.budget}]"


def run_commits(store: ResultStore, config: SweepConfig) -> str:
    """'abc1234 (n runs), ...': the commits that produced the finished runs this table reads (every
    grid lr at the selecting seed, every seed at the selected lr), most runs first. A resumed sweep
    mixes commits; the table's own commit says only which code wrote the report."""
    counts: dict[str, int] = {}
    for m in config.methods:
        for a in config.archs:
            for o in config.optimizers:
                lr, _ = seed_results(store, config, m, a, o)
                specs = {config.spec(m, a, o, x, config.seeds[0]) for x in config.lrs[o]}
                specs |= {config.spec(m, a, o, lr, s) for s in config.seeds} if lr is not None else set()
                for spec in specs:
                    if store.done(spec):
                        commit = str(store.read(spec).get("provenance", {}).get("commit") or "unknown")[:7]
                        counts[commit] = counts.get(commit, 0) + 1
    return ", ".join(f"{c} ({n} runs)" for c, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none finished"


def table(store: ResultStore, config: SweepConfig, command: str, problems: list[str] | None = None) -> str:
    commit = commit_of_tree()
    lines = [
        f"# Table 1 on {config.dataset}: test accuracy (%) at the lr picked on validation, mean ± std over seeds",
        "",
        f"command: `{command}`  ",
        f"report written at commit {commit}; runs from commits {run_commits(store, config)}  ",
        f"seeds {list(config.seeds)} (lr chosen at seed {config.seeds[0]}); {budget_line(config)}; batch {config.batch}; "
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
    sharpness = sharpness_table(store, config)
    if sharpness:
        lines += ["", sharpness]
    if problems:
        lines += ["", "**Warnings:**", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def protocol_warnings(store: ResultStore, config: SweepConfig, classes: int) -> list[str]:
    """Cells whose selected lr sits at an edge of its grid (the grid may cap them), and cells whose test
    accuracy ends near chance (below chance + 10% of the way to 100%: the budget or the lr is wrong)."""
    problems = []
    near_chance = 1 / classes + 0.1 * (1 - 1 / classes)
    for m in config.methods:
        for a in config.archs:
            for o in config.optimizers:
                lr, results = seed_results(store, config, m, a, o)
                grid = config.lrs[o]
                if lr is not None and len(grid) > 1 and lr in (min(grid), max(grid)):
                    edge = "top" if lr == max(grid) else "bottom"
                    problems.append(f"{m} {a} {o}: the selected lr {lr:.3g} is the {edge} of its grid "
                                    f"[{min(grid):.3g}, {max(grid):.3g}]: widen it (--lr-steps)")  # fmt: skip
                if results and statistics.mean(r["test_accuracy"] for r in results) < near_chance:
                    accuracy = 100 * statistics.mean(r["test_accuracy"] for r in results)
                    problems.append(f"{m} {a} {o}: test accuracy {accuracy:.1f}% is near chance ({100 / classes:.1f}%): "
                                    "too few steps or a bad lr grid (--full, more epochs, --lr-steps)")  # fmt: skip
    return problems


def sharpness_table(store: ResultStore, config: SweepConfig) -> str:
    """Lemma 4.2's stochastic sharpness of the MK runs at the selected lr: its peak and its end value."""
    rows = []
    for m in ("mk", "adv-mk"):
        if m not in config.methods:
            continue
        for a in config.archs:
            for o in config.optimizers:
                traces = [r["sharpness"]["trace"] for r in seed_results(store, config, m, a, o)[1] if "sharpness" in r]
                if not traces:
                    continue
                peak = statistics.mean(max(t["sharpness"] for t in trace) for trace in traces)
                end = statistics.mean(trace[-1]["sharpness"] for trace in traces)
                rows.append(f"| {LABELS[m]} | {a} | {o} | {peak:.4f} | {end:.4f} | {len(traces)} |")
    if not rows:
        return ""
    head = ["Stochastic sharpness Δ = E_p[L(θ_p)] − L(θ̄) (Lemma 4.2; on the first 1,024 training images, fixed, 8 Dirichlet draws, "
            "every 50 steps; mean over seeds; replicated copies start at Δ = 0):", "",
            "| method | arch | optimizer | peak Δ | final Δ | n |", "|---|---|---|---|---|---|"]  # fmt: skip
    return "\n".join(head + rows)


# The paper's claims that Table 1 / Fig. 5.2 / appendix B can test: (claim, method a, method b, metric).
# "a > b" on test accuracy, or on the train - test gap for "gap" (a's gap smaller).
CLAIMS = [
    ("MK > baseline (Table 1)", "mk", "baseline", "accuracy"),
    ("ensemble > MK (Table 1: the ensemble is the ceiling)", "ensemble", "mk", "accuracy"),
    ("MK > distilled (Table 1)", "mk", "distilled", "accuracy"),
    ("subset > baseline (Table 1)", "subset", "baseline", "accuracy"),
    ("MK ≥ subset (5.1: 'comparable or better')", "mk", "subset", "accuracy"),
    ("MK > baseline-long (Table 2's comparison, equal steps)", "mk", "baseline-long", "accuracy"),
    ("MK's train–test gap < baseline-long's (Fig. 5.2)", "mk", "baseline-long", "gap"),
    ("Adv-MK ≥ MK (appendix B: 'may lead a slightly better algorithm')", "adv-mk", "mk", "accuracy"),
]


def claims_table(store: ResultStore, config: SweepConfig) -> str:
    """'paper claim | here | holds?' from the run files: per claim, in how many (arch, optimizer) cells
    the claimed order holds, how many of those by more than the two methods' combined std over seeds,
    and the range of the difference (points). 'holds?' is yes (every cell), no (none) or partly."""
    lines = ["| paper claim | here (difference a − b in points, per cell) | holds? |", "|---|---|---|"]
    for claim, a, b, metric in CLAIMS:
        if a not in config.methods or b not in config.methods:
            continue
        diffs, clear = [], 0
        for arch in config.archs:
            for o in config.optimizers:
                ra, rb = seed_results(store, config, a, arch, o)[1], seed_results(store, config, b, arch, o)[1]
                if not ra or not rb:
                    continue
                va, vb = _metric(ra, metric), _metric(rb, metric)
                diff = statistics.mean(va) - statistics.mean(vb)
                noise = (_std(va) ** 2 + _std(vb) ** 2) ** 0.5
                diffs.append(diff)
                clear += diff > noise
        if not diffs:
            lines.append(f"| {claim} | (no finished cells) | — |")
            continue
        held = sum(d > 0 for d in diffs)
        verdict = "yes" if held == len(diffs) else "no" if held == 0 else "partly"
        lines.append(f"| {claim} | holds in {held}/{len(diffs)} cells ({clear} beyond 1 combined std); "
                     f"a − b from {min(diffs):+.2f} to {max(diffs):+.2f} | {verdict} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _metric(results: list[dict], metric: str) -> list[float]:
    if metric == "gap":  # smaller gap is better: negate so that "a > b" means a's gap is smaller
        return [-100 * (r["train_accuracy"] - r["test_accuracy"]) for r in results]
    return [100 * r["test_accuracy"] for r in results]


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


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

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    plotted = False
    for method, style in (("mk", "-"), ("adv-mk", "--")):
        for a in config.archs if method in config.methods else ():
            result = _result_at_selected_lr(store, config, method, a, optimizer)
            if result and "sharpness" in result:
                trace = result["sharpness"]["trace"]
                ax.plot([t["step"] for t in trace], [t["sharpness"] for t in trace], style, label=f"{LABELS[method]} {a}")
                plotted = True
    if plotted:
        ax.set(xlabel="optimizer step", ylabel="Δ = E_p[L(θ_p)] − L(θ̄)", title=f"{config.dataset}, {optimizer}: stochastic sharpness")
        written.append(_save(fig, ax, out_dir / "stochastic_sharpness.png"))
    else:
        plt.close(fig)
    return written


def _result_at_selected_lr(store: ResultStore, config: SweepConfig, method: str, arch: str, optimizer: str) -> dict | None:
    lr = select_lr(store, config, method, arch, optimizer, config.seeds[0])
    return None if lr is None else store.read(config.spec(method, arch, optimizer, lr, config.seeds[0]))


def _save(fig, ax, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a sweep without the plotted methods draws no curve: no empty legend (and no warning)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
