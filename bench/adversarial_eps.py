"""Choosing the default ascent step eps for the adversarial modes, on real data (Fashion-MNIST).

Run:  python bench/adversarial_eps.py [--epochs 2] [--out results/adversarial_eps.md]

For each eps the paper's A2 MLP (784-200-100-10) trains with Adam (lr 1e-3, batch 256) under
Algorithm B.1 ('adversarial') and B.2 ('adv-mk'), e=3, one seed; reported: test accuracy of the
deployed model, the mean normalized entropy of the adversarial p in the last step (1 = uniform),
the copies' relative spread, and the typical size of dL/dp. eps = 0 is uniform p for B.1.
Copies start independent (init='independent'): with replicated copies B.1 never separates them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import mkopt
from mkopt.provenance import commit_of_tree
from mkopt.data import Split, load_fashion_mnist


def a2() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 10))


def run(mode: str, eps: float, train: Split, test: Split, epochs: int, init: str = "independent") -> dict:
    torch.manual_seed(0)
    model = a2()
    opt = mkopt.MKOptimizer(torch.optim.Adam, model, e=3, probabilities=mode, adversarial_eps=eps, lr=1e-3, init=init)
    order_gen = torch.Generator().manual_seed(1)
    grad_p_sizes = []
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=order_gen)
        for i in range(len(train) // 256):
            index = order[i * 256 : (i + 1) * 256]
            x, y = train.x[index], train.y[index]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if opt.adversarial:
                if i % 50 == 0:
                    grad_p_sizes.append(float(torch.cat([v.grad.abs().flatten() for v in opt.expansion.sampler.views]).median()))
                opt.ascend_probabilities()
                F.cross_entropy(model(x), y).backward()
            opt.step()
    stats = opt.diagnostics()
    plain = mkopt.deploy(model).eval()
    with torch.no_grad():
        accuracy = float((plain(test.x).argmax(1) == test.y).float().mean())
    return {
        "accuracy": accuracy,
        "entropy": stats.get("p_entropy", 1.0),
        "spread": stats["spread"],
        "grad_p": sorted(grad_p_sizes)[len(grad_p_sizes) // 2] if grad_p_sizes else float("nan"),
    }


def main() -> None:
    import warnings

    warnings.simplefilter("ignore", mkopt.KernelCollapseWarning)  # reported in the spread column
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    train, test = load_fashion_mnist()
    mean, std = train.x.mean(), train.x.std()
    train, test = Split((train.x - mean) / std, train.y), Split((test.x - mean) / std, test.y)
    commit = commit_of_tree()
    lines = [
        "# Ascent step eps for adversarial probabilities (B.1 / B.2), Fashion-MNIST",
        "",
        f"command: `python bench/adversarial_eps.py {' '.join(sys.argv[1:])}`, commit {commit}, seed 0, "
        f"A2 MLP, Adam lr 1e-3, batch 256, e=3, {args.epochs} epochs, CPU (2 threads)",
        "",
        "| mode | eps | test acc (deployed) | p entropy (last step) | copy spread | median dL/dp | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for init in ("replicate", "independent"):
        reference = run("dirichlet", 0.0, train, test, args.epochs, init)
        row = f"| dirichlet, init={init} (reference) | - | {reference['accuracy']:.4f} | - | {reference['spread']:.3f} | - | - |"
        lines.append(row)
        print(row, flush=True)
    for mode in ("adversarial", "adv-mk"):
        for eps in args.eps:
            start = time.perf_counter()
            r = run(mode, eps, train, test, args.epochs)
            row = (
                f"| {mode} | {eps:g} | {r['accuracy']:.4f} | {r['entropy']:.3f} | {r['spread']:.3f} | "
                f"{r['grad_p']:.2e} | {time.perf_counter() - start:.0f} |"
            )
            lines.append(row)
            print(row, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
