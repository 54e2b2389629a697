"""Tables and validation curves from :mod:`mkopt.experiments.glue_finetune` runs (Table 4, appendix C).

Reads ``<out_dir>/<label>/seed<k>/<task>/{result.json,eval.csv}``; methods are rows, seeds give
mean ± std (sample std), each cell is the ``best`` (default; T5's protocol: the best validation
evaluation of the run) or ``final`` evaluation.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .glue import GLUE_ENTRIES, TABLE4_COLUMNS, glue_average

__all__ = ["collect", "table4", "plot_curves"]

_PANEL_TITLES = {
    "cola": "CoLA (Matthews)", "sst2": "SST-2 (acc)", "mrpc": "MRPC (mean of F1, acc)",
    "stsb": "STS-B (mean of Pearson, Spearman)", "qqp": "QQP (mean of acc, F1)", "mnli_m": "MNLI-m (acc)",
    "mnli_mm": "MNLI-mm (acc)", "qnli": "QNLI (acc)", "rte": "RTE (acc)",
}  # fmt: skip


def collect(out_dir: str | Path) -> dict[str, dict[int, dict[str, dict[str, Any]]]]:
    """label -> seed -> task -> result.json contents, for every finished task under ``out_dir``.

    Example:
        >>> import tempfile
        >>> collect(tempfile.mkdtemp())
        {}
    """
    found: dict[str, dict[int, dict[str, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for path in sorted(Path(out_dir).glob("*/seed*/*/result.json")):
        result = json.loads(path.read_text())
        found[result["label"]][int(result["seed"])][result["task"]] = result
    order = sorted(found, key=lambda label: (label != "baseline", label))
    return {label: dict(found[label]) for label in order}


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table4(out_dir: str | Path, which: str = "best") -> str:
    """Markdown table in the layout of the paper's Table 4 (GLUE average first), mean ± std over seeds.

    The GLUE average is filled only for seeds that ran every Table-4 task.

    Example:
        >>> import tempfile
        >>> table4(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        FileNotFoundError: no finished GLUE runs (<label>/seed<k>/<task>/result.json) under ...
    """
    runs = collect(out_dir)
    if not runs:
        raise FileNotFoundError(f"no finished GLUE runs (<label>/seed<k>/<task>/result.json) under {out_dir}")
    columns = [c for c in TABLE4_COLUMNS if any(c[0] in _entries(seeds, which).get(s, {}) for seeds in runs.values() for s in seeds)]
    header = ["method", "seeds", "GLUE avg"] + [title for _, _, title in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, seeds in runs.items():
        entries = _entries(seeds, which)
        averages = [glue_average(e) for e in entries.values() if all(k in e for k in GLUE_ENTRIES)]
        cells = [label, str(len(seeds)), _cell(averages)]
        for entry, metric, _ in columns:
            cells.append(_cell([e[entry][metric] for e in entries.values() if entry in e]))
        lines.append("| " + " | ".join(cells) + " |")
    note = f"\n{which} validation evaluation of each run; mean ± sample std over seeds; GLUE avg needs all of {list(GLUE_ENTRIES)}."
    return "\n".join(lines) + "\n" + note + "\n"


def _entries(seeds: dict[int, dict[str, dict[str, Any]]], which: str) -> dict[int, dict[str, dict[str, float]]]:
    """seed -> entry ("mnli_m") -> metric -> value, from the chosen evaluation of each task."""
    out: dict[int, dict[str, dict[str, float]]] = {}
    for seed, tasks in seeds.items():
        out[seed] = {entry: metrics for result in tasks.values() for entry, metrics in result[which]["metrics"].items()}
    return out


def plot_curves(out_dir: str | Path, path: str | Path | None = None) -> Path:
    """Validation score (mean of the entry's metrics) against step, one panel per entry, one line per
    method (mean over seeds) — the paper's appendix C figures. Written to ``out_dir/curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for file in sorted(Path(out_dir).glob("*/seed*/*/eval.csv")):
        label = file.parents[2].name
        per_step: dict[tuple[int, str], list[float]] = defaultdict(list)
        with open(file, newline="") as handle:
            for row in csv.DictReader(handle):
                per_step[(int(row["step"]), row["entry"])].append(float(row["value"]))
        for (step, entry), values in per_step.items():
            curves[entry][label][step].append(sum(values) / len(values))
    if not curves:
        raise FileNotFoundError(f"no eval.csv under {out_dir}/<label>/seed<k>/<task>/")
    entries = [e for e in GLUE_ENTRIES if e in curves] + sorted(set(curves) - set(GLUE_ENTRIES))
    cols = min(3, len(entries))
    rows = -(-len(entries) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, entry in zip(axes.flat, entries):
        for label in sorted(curves[entry], key=lambda name: (name != "baseline", name)):
            steps = sorted(curves[entry][label])
            ax.plot(steps, [statistics.mean(curves[entry][label][s]) for s in steps], marker=".", label=label)
        ax.set_title(_PANEL_TITLES.get(entry, entry))
        ax.set_xlabel("step")
        ax.set_ylabel("validation score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(entries) :]:
        ax.axis("off")
    fig.tight_layout()
    target = Path(path) if path is not None else Path(out_dir) / "curves.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
