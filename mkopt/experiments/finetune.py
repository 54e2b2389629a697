"""Fine-tune a pretrained sequence classifier with BASELINE / MK / Adv-MK; evaluate as it trains.

Used by ``mkopt/recipes/finetune_rotten_tomatoes.py``. One run = (method, seed): AdamW with linear
warmup and decay, dynamic padding, validation accuracy every ``eval_every`` steps, test accuracy of
the deployed (plain, mean-of-copies) model at the end. Each run's result is written atomically;
a rerun skips finished runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..deploy import deploy
from ..optimizer import MKOptimizer

METHODS = ("baseline", "mk", "adv-mk")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that fixes a fine-tuning run except method and seed (see the recipe's YAML)."""

    model_path: str = ""
    max_length: int = 64
    batch: int = 32
    steps: int = 400
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    eval_every: int = 40
    eval_batch: int = 128
    e: int = 3
    split_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_length", "batch", "steps", "eval_every", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup={self.warmup} is a fraction of the steps in [0, 1)")


@dataclass
class Encoded:
    """Token ids (unpadded, truncated) and labels."""

    ids: list[list[int]]
    labels: torch.Tensor
    pad_id: int = 0

    def batch(self, rows: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Pad to the longest row of this batch (snippets are short: most batches pad far below max_length)."""
        width = max(len(self.ids[r]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(self.ids[r])] = torch.tensor(self.ids[r])
            mask[i, : len(self.ids[r])] = 1
        return {"input_ids": ids, "attention_mask": mask}, self.labels[rows]


def encode(tokenizer: Any, texts: list[str], labels: list[int], max_length: int) -> Encoded:
    """Tokenize once, up front (no tokenizer in the training loop)."""
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, torch.tensor(labels), tokenizer.pad_token_id or 0)


@torch.no_grad()
def accuracy_and_loss(model: torch.nn.Module, data: Encoded, batch: int) -> tuple[float, float]:
    """Eval-mode accuracy and mean cross-entropy (for an MK model: at the mean of the copies)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data.ids)), key=lambda r: len(data.ids[r]))  # length-sorted: little padding
    correct, total_loss = 0, 0.0
    for start in range(0, len(order), batch):
        inputs, labels = data.batch(order[start : start + batch])
        logits = model(**inputs).logits
        correct += (logits.argmax(-1) == labels).sum().item()
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
    model.train(was_training)
    return correct / len(order), total_loss / len(order)


def linear_warmup_decay(steps: int, warmup: float) -> Callable[[int], float]:
    """LR multiplier: linear 0 -> 1 over ``warmup * steps``, then linear 1 -> 0 (BERT fine-tuning's schedule).

    Example:
        >>> f = linear_warmup_decay(10, 0.2); [round(f(s), 2) for s in (0, 1, 2, 6, 10)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
        >>> linear_warmup_decay(10, 0.0)(0)
        1.0
    """
    ramp = math.ceil(warmup * steps)
    return lambda s: s / ramp if s < ramp else max(0.0, (steps - s) / max(1, steps - ramp))  # ramp 0: no warmup


def build_optimizer(method: str, model: torch.nn.Module, config: FinetuneConfig, seed: int) -> torch.optim.Optimizer:
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    if method == "baseline":
        return torch.optim.AdamW(model.parameters(), **kwargs)
    if method == "mk":
        return MKOptimizer(torch.optim.AdamW, model, e=config.e, seed=seed, **kwargs)
    if method == "adv-mk":
        return MKOptimizer(torch.optim.AdamW, model, e=config.e, seed=seed, probabilities="adv-mk", **kwargs)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


@dataclass
class RunResult:
    method: str
    seed: int
    test_accuracy: float
    test_loss: float
    final_val_accuracy: float
    best_val_accuracy: float
    best_val_step: int
    curve: list[dict[str, float]] = field(default_factory=list)  # step, val_accuracy, val_loss, train_loss
    seconds_per_step: float = 0.0
    parameters_trained: int = 0
    parameters_deployed: int = 0


def finetune(
    method: str,
    seed: int,
    config: FinetuneConfig,
    make_model: Callable[[], torch.nn.Module],
    train: Encoded,
    val: Encoded,
    test: Encoded,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[RunResult, torch.nn.Module]:
    """One fine-tuning run; returns its result and the deployed plain model.

    The classifier head's init and the data order depend on ``seed``; MK's p stream uses the same
    seed. Validation is evaluated at step 0 and every ``eval_every`` steps (eval mode: the mean of
    the copies, i.e. exactly the model that would be deployed at that step).
    """
    torch.manual_seed(seed)
    model = make_model()
    model.train()
    opt = build_optimizer(method, model, config, seed)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(config.steps, config.warmup))
    trained = opt.trained_parameters() if isinstance(opt, MKOptimizer) else sum(p.numel() for p in model.parameters())
    order_rng = torch.Generator().manual_seed(seed)
    order: list[int] = []
    curve: list[dict[str, float]] = []
    recent: list[float] = []

    def evaluate(step: int) -> None:
        acc, loss = accuracy_and_loss(model, val, config.eval_batch)
        point = {"step": step, "val_accuracy": acc, "val_loss": loss, "train_loss": sum(recent) / len(recent) if recent else float("nan")}
        curve.append(point)
        recent.clear()
        if progress is not None:
            progress(step, point)

    evaluate(0)
    warmup_steps = min(5, config.steps - 1)  # s/step excludes the first steps (sampler compile, allocator warm-up)
    started, eval_seconds = time.perf_counter(), 0.0
    for step in range(1, config.steps + 1):
        if step == warmup_steps + 1:
            started, eval_seconds = time.perf_counter(), 0.0
        if len(order) < config.batch:  # reshuffle each epoch; the last partial batch is carried over
            order += torch.randperm(len(train.ids), generator=order_rng).tolist()
        rows, order = order[: config.batch], order[config.batch :]
        inputs, labels = train.batch(rows)

        def closure() -> torch.Tensor:
            loss = F.cross_entropy(model(**inputs).logits, labels)
            loss.backward()
            return loss

        opt.zero_grad(set_to_none=True)
        if method == "adv-mk":
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.step()
        schedule.step()
        recent.append(float(loss.detach()))
        if not math.isfinite(recent[-1]):
            raise FloatingPointError(f"{method} seed {seed}: loss {recent[-1]} at step {step}; lower lr={config.lr}")
        if step % config.eval_every == 0 or step == config.steps:
            tick = time.perf_counter()
            evaluate(step)
            eval_seconds += time.perf_counter() - tick
    seconds_per_step = (time.perf_counter() - started - eval_seconds) / (config.steps - warmup_steps)
    plain = deploy(model) if method != "baseline" else model
    plain.eval()
    test_acc, test_loss = accuracy_and_loss(plain, test, config.eval_batch)
    best = max(curve, key=lambda c: c["val_accuracy"])
    result = RunResult(
        method, seed, test_acc, test_loss, curve[-1]["val_accuracy"], best["val_accuracy"], int(best["step"]), curve,
        seconds_per_step, trained, sum(p.numel() for p in plain.parameters()),
    )
    return result, plain


def result_dict(result: RunResult, config: FinetuneConfig) -> dict[str, Any]:
    return {"config": asdict(config), **asdict(result)}


def result_path(root: Path, method: str, seed: int) -> Path:
    return root / "runs" / f"{method}-s{seed}.json"
