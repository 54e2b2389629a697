"""Plot MK's step-time ratio against e from a ``bench/step_overhead.py`` table (the [400,200,100] MLP, Adam).

Run:  python bench/plot_step_overhead.py results/bench/step_overhead_cpu.md --out results/bench/step_overhead_vs_e.png

Three curves per allocator: MK / baseline, the floor (plain model + e - 1 stepped gradient copies, i.e.
MK with free mixing and free p) / baseline, and the line e itself (what training e independent models
would cost). The gap between MK and its floor is what mixing the copies and p cost.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def read_rows(table: Path) -> list[dict[str, str]]:
    lines = [line for line in table.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
        rows.append(dict(zip(header, cells)))
    return rows


def ratio(cell: str) -> float:
    return float(cell.rstrip("x"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(args.table) if r["model"] == "MLP 400-200-100" and r["optimizer"] == "adam" and r["p"] == "dirichlet"]
    if not rows:
        raise SystemExit(f"{args.table} has no 'MLP 400-200-100 | adam | dirichlet' rows: run bench/step_overhead.py without --only")
    rows.sort(key=lambda r: int(r["e"]))
    es = [int(r["e"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for suffix, style, label in (("", "--", "default malloc"), (" (retained)", "-", "retain_freed_memory()")):
        ax.plot(es, [ratio(r["fused ratio" + suffix]) for r in rows], "o" + style, color="C0", label=f"MK fused path, {label}")
        ax.plot(es, [ratio(r["generic ratio" + suffix]) for r in rows], "^" + style, color="C2", label=f"MK generic path, {label}")
        ax.plot(es, [ratio(r["fused floor ratio" + suffix]) for r in rows], "s" + style, color="C1", label=f"fused-design floor, {label}")
    ax.plot(es, es, ":", color="gray", label="e (e separate models)")
    ax.set_xlabel("e (copies per kernel)")
    ax.set_ylabel("step time / baseline step time")
    ax.set_title("MLP 3072-400-200-100-10, Adam, batch 256, CPU")
    ax.set_xticks(es)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
