"""MK vs baseline on Fashion-MNIST: train both, deploy the MK model, check the deployed model.

Trains the paper's A3 network (784-400-200-100-10, ReLU) with Adam (batch 256) as a plain
baseline and with MKOptimizer (e=3) for the same number of epochs, tracks test accuracy after
every epoch, deploys the MK model to a plain network and verifies that it is an ordinary model of
the original size whose predictions equal the eval-mode MK model's. Writes ``results.json`` and
``curves.png`` into ``--out``. A single seed and a fixed lr: the lr-tuned, multi-seed comparison is
the Table-1 harness's job.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import MKOptimizer, deploy
from .data import Split, load_fashion_mnist
from .errors import DataError
from .experiments.models import arch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files (default: search)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--e", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))


@torch.no_grad()
def predictions(model: nn.Module, data: Split, batch: int = 2048) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([model(data.x[i : i + batch]).argmax(1) for i in range(0, len(data), batch)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, data: Split) -> float:
    return float((predictions(model, data) == data.y).float().mean())


def train(name: str, model: nn.Module, opt: torch.optim.Optimizer, train_set: Split, test_set: Split, args) -> list[float]:
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(args.seed + 1)  # same batch order for both methods
    steps_per_epoch = len(train_set) // 256
    curve = []
    with tqdm(total=args.epochs * steps_per_epoch, desc=f"{name:>8}", unit="step", leave=True) as bar:
        for _ in range(args.epochs):
            order = torch.randperm(len(train_set), generator=generator)
            for i in range(steps_per_epoch):
                index = order[i * 256 : (i + 1) * 256]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(train_set.x[index]), train_set.y[index])
                loss.backward()
                opt.step()
                bar.update()
            curve.append(accuracy(model, test_set))
            bar.set_postfix(test_acc=f"{curve[-1]:.4f}", loss=f"{loss.item():.3f}")
    return curve


def run(args: argparse.Namespace) -> int:
    try:
        train_set, test_set = load_fashion_mnist(args.data)
    except (OSError, ValueError) as error:  # the reader's message names the folder and how to get the data
        raise DataError(str(error)) from None
    mean, std = train_set.x.mean(), train_set.x.std()
    train_set = Split((train_set.x - mean) / std, train_set.y)
    test_set = Split((test_set.x - mean) / std, test_set.y)
    torch.manual_seed(args.seed)
    initial = arch("A3", 784, 10)
    baseline, mk_model = copy.deepcopy(initial), copy.deepcopy(initial)

    start = time.perf_counter()
    base_curve = train("baseline", baseline, torch.optim.Adam(baseline.parameters(), lr=args.lr), train_set, test_set, args)
    base_time = time.perf_counter() - start
    start = time.perf_counter()
    mk_opt = MKOptimizer(torch.optim.Adam, mk_model, e=args.e, lr=args.lr, seed=args.seed)
    mk_curve = train(f"MK e={args.e}", mk_model, mk_opt, train_set, test_set, args)
    mk_time = time.perf_counter() - start

    plain = deploy(mk_model).eval()
    same_predictions = bool(torch.equal(predictions(plain, test_set), predictions(mk_model, test_set)))
    reference = arch("A3", 784, 10)
    reference.load_state_dict(plain.state_dict())  # strict: the deployed weights fit the plain class
    params = sum(p.numel() for p in plain.parameters())
    checks = {
        "deployed predictions == eval-mode MK predictions": same_predictions,
        "deployed classes == original classes": [type(m) for m in plain.modules()] == [type(m) for m in initial.modules()],
        "deployed parameter count == original": params == sum(p.numel() for p in initial.parameters()),
        "deployed state_dict keys == original": list(plain.state_dict()) == list(initial.state_dict()),
    }
    results = {
        "data": "Fashion-MNIST (60k train / 10k test)",
        "model": "A3 MLP 784-400-200-100-10",
        "optimizer": f"Adam lr={args.lr}, batch 256",
        "epochs": args.epochs,
        "seed": args.seed,
        "e": args.e,
        "test_accuracy_per_epoch": {"baseline": base_curve, "mk": mk_curve},
        "final_test_accuracy": {"baseline": base_curve[-1], "mk_deployed": accuracy(plain, test_set)},
        "train_seconds": {"baseline": round(base_time, 1), "mk": round(mk_time, 1)},
        "deployed_parameters": params,
        "checks": checks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(base_curve, mk_curve, args, args.out / "curves.png")

    print(f"\nFashion-MNIST, A3 MLP, Adam lr={args.lr}, {args.epochs} epochs, seed {args.seed}")
    print(f"  baseline       test accuracy {base_curve[-1]:.4f}   ({base_time:.0f} s)")
    print(f"  MK e={args.e} deployed test accuracy {results['final_test_accuracy']['mk_deployed']:.4f}   ({mk_time:.0f} s)")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    print(f"  wrote {args.out / 'results.json'} and {args.out / 'curves.png'}")
    return 0 if all(checks.values()) else 1


def _plot(base: list[float], mk: list[float], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(base) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    ax.plot(epochs, base, marker="o", label="baseline")
    ax.plot(epochs, mk, marker="s", label=f"MK (e={args.e}), eval = mean kernels")
    ax.set(xlabel="epoch", ylabel="test accuracy", title=f"Fashion-MNIST, A3 MLP, Adam lr={args.lr}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
