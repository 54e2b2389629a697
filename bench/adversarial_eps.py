"""Does Adv-MK's ascent step eps mean anything? A sweep over decades, through the Table-1 harness.

Run:  python bench/adversarial_eps.py [--eps 1e2 1e3 ...] [--archs A1 A3] [--seeds 0 1 2] [--epochs 10]
                                      [--runs results/adversarial_eps_runs] [--out results/adversarial_eps.md]

Each (arch, eps, seed) is one Table-1 Adv-MK run (Algorithm B.2, e = 3, Adam, batch 256, replicated
copies, Fashion-MNIST with the harness's 6,000-image validation split) at the lr MK selected for that
cell in Table 1, so MK's own runs (same lr, seeds, epochs, batch order) are the reference row.
Every 25 steps the run records, from the probe pass, B.2's mixing weight u = KL(p_adv || uniform) / log e
(mean over all weights), the mean |p_adv - 1/e|, the fraction of weights with u > 0.99, and the entropy
of the p actually trained with (:func:`mkopt.diagnostics.adversarial_statistics`). Runs are one JSON
each under ``--runs``, written atomically: rerun the same command to resume. Order: seed-major (every
(arch, eps) at seed 0 first), so a sweep cut short still covers every eps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import mkopt  # noqa: F401  (the installed package the harness runs)
from mkopt.experiments.runs import ResultStore, RunSpec
from mkopt.experiments.sweep import LONG_EPOCHS, _provenance, execute

# The lr MK selected on validation in Table 1 (results/table1_fashion_mnist/table1.md), Adam.
MK_LR = {"A1": 0.0015, "A2": 0.001, "A3": 0.001}
TABLE1_RUNS = Path("results/table1_fashion_mnist/runs")


def spec_of(arch: str, eps: float | None, seed: int, epochs: int) -> RunSpec:
    method, options = ("mk", ()) if eps is None else ("adv-mk", (("eps", eps),))
    return RunSpec(method, arch, "adam", MK_LR[arch], seed, epochs, options=options)


def summary(results: list[dict]) -> dict[str, float]:
    """Means over seeds of the run-level figures (each run: mean over its whole trace)."""
    out: dict[str, float] = {}
    accuracies = [100 * r["test_accuracy"] for r in results]
    out["acc"], out["acc_std"] = statistics.mean(accuracies), statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    traces = [r["adversarial"]["trace"] for r in results if "adversarial" in r]
    for key in ("u_mean", "p_entropy", "p_adv_deviation", "saturated"):
        if traces:
            out[key] = statistics.mean(statistics.mean(t[key] for t in trace) for trace in traces)
            last = [trace[-len(trace) // 10 or -1 :] for trace in traces]  # the last tenth of training
            out[key + "_end"] = statistics.mean(statistics.mean(t[key] for t in tail) for tail in last)
    out["seconds"] = statistics.mean(r["seconds"] for r in results)
    return out


def report(args: argparse.Namespace, store: ResultStore, reference: ResultStore, command: str) -> str:
    commits = sorted({store.read(s)["provenance"]["commit"] for a in args.archs for e in args.eps for s in
                      [spec_of(a, e, seed, args.epochs) for seed in args.seeds] if store.done(s)})  # fmt: skip
    lines = [
        "# Adv-MK (Algorithm B.2): what the ascent step eps does, Fashion-MNIST",
        "",
        f"command: `{command}`  ",
        f"commit(s) {', '.join(commits) or '-'}; seeds {list(args.seeds)} (each row: the seeds finished so far, n); "
        f"Adam at MK's Table-1 lr (A1 {MK_LR['A1']}, A3 {MK_LR['A3']}); e = 3, replicated copies, batch 256, "
        f"{args.epochs} epochs; machine: x86_64, 2 cores shared with other jobs, 1 worker, torch {_provenance()['torch']}",
        "",
        "Columns: **mean u** = mean over all weights and over training (sampled every 25 steps) of B.2's mixing "
        "weight u = KL(p_adv ‖ uniform)/log e (0: B.2 is exactly MK; 1: p_adv one-hot); (end) = the last tenth of "
        "training; |p_adv − 1/e| = mean over weights and copies; sat. = fraction of weights with u > 0.99; "
        "H(p) = mean normalized entropy of the p trained with (B.2's mix; Dirichlet(1) alone gives ≈ 0.76); "
        "test acc. = deployed model, mean ± std over seeds. MK rows: Table 1's MK runs (same lr, seeds, epochs "
        "and batch order; their commit is in their run files).",
        "",
        "| arch | eps | mean u | mean u (end) | mean abs(p_adv − 1/e) | sat. | H(p) | test acc. (%) | n | s/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch in args.archs:
        mk = [reference.read(s) for s in (spec_of(arch, None, seed, args.epochs) for seed in args.seeds) if reference.done(s)]
        if mk:
            m = summary(mk)
            lines.append(f"| {arch} | MK (Dirichlet) | 0 | 0 | 0 | 0 | – | {m['acc']:.2f} ± {m['acc_std']:.2f} | {len(mk)} | {m['seconds']:.0f} |")
        for eps in args.eps:
            done = [store.read(s) for s in (spec_of(arch, eps, seed, args.epochs) for seed in args.seeds) if store.done(s)]
            if not done:
                lines.append(f"| {arch} | {eps:g} | (not run) | | | | | | 0 | |")
                continue
            r = summary(done)
            lines.append(
                f"| {arch} | {eps:g} | {r['u_mean']:.2e} | {r['u_mean_end']:.2e} | {r['p_adv_deviation']:.2e} | "
                f"{r['saturated']:.3f} | {r['p_entropy']:.3f} | {r['acc']:.2f} ± {r['acc_std']:.2f} | {len(done)} | {r['seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


READING = "## Reading"  # a hand-written section at the end of --out, kept when the table is rewritten


def write_report(path: Path, text: str) -> None:
    old = path.read_text() if path.is_file() else ""
    kept = old[old.index(READING):] if READING in old else ""
    path.write_text(text + ("\n" + kept if kept else ""))


def main() -> None:
    warnings.simplefilter("ignore", mkopt.KernelCollapseWarning)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eps", type=float, nargs="+", default=[1e2, 1e3, 1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--archs", nargs="+", default=["A1", "A3"], choices=sorted(MK_LR))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=LONG_EPOCHS)
    parser.add_argument("--runs", type=Path, default=Path("results/adversarial_eps_runs"))
    parser.add_argument("--reference", type=Path, default=TABLE1_RUNS, help="result store holding MK's Table-1 runs")
    parser.add_argument("--out", type=Path, default=Path("results/adversarial_eps.md"))
    parser.add_argument("--report-only", action="store_true", help="rebuild the table from the finished runs")
    args = parser.parse_args()
    store, reference = ResultStore(args.runs), ResultStore(args.reference)
    command = "python bench/adversarial_eps.py " + " ".join(a for a in sys.argv[1:] if a != "--report-only")
    provenance = _provenance()
    todo = [spec_of(a, e, s, args.epochs) for s in args.seeds for a in args.archs for e in args.eps]
    todo = [] if args.report_only else [s for s in todo if not store.done(s)]
    for i, spec in enumerate(todo):
        start = time.perf_counter()
        result = execute((spec, str(args.runs), None))
        store.write(spec, {**result, "provenance": provenance})
        trace = result["adversarial"]["trace"]
        print(f"[{i + 1}/{len(todo)}] {spec.run_id}: test {result['test_accuracy']:.4f}, mean u "
              f"{statistics.mean(t['u_mean'] for t in trace):.2e}, {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
        write_report(args.out, report(args, store, reference, command))
    write_report(args.out, report(args, store, reference, command))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
