"""Fine-tuning a seq2seq model (T5) on GLUE tasks, BASELINE or Majority Kernels, with continuous evaluation.

The paper's section 5.3 / appendix C protocol: per task, load the pretrained model, expand its
kernels by replication (MK, ``e=3``) or not (BASELINE), fine-tune, and evaluate on the validation
split(s) every ``eval_every`` steps by greedy decoding (T5's text-to-text format, see
:mod:`mkopt.experiments.glue`). MK evaluates in ``eval()`` mode (the mean of the copies, i.e. the
model it would deploy) and, with ``save_model=True``, saves ``mkopt.deploy(model)``.

Layout of a run (``<label>`` is ``baseline`` or ``mk_e3``): ``<out_dir>/<label>/seed<k>/<task>/``
with ``train.csv`` (step, loss, lr, seconds), ``eval.csv`` (step, entry, metric, value),
``result.json`` (the best and the final evaluation) and optionally ``model/``;
``<out_dir>/<label>/seed<k>/config.yaml`` records the resolved config. A finished task is skipped
when the same config runs again; inside a task, ``checkpoints/`` (every ``checkpoint_every`` steps,
written atomically by :class:`mkopt.checkpoint.CheckpointStore`) lets a killed run resume at its
last checkpoint with the same batches, ``p`` and logs, bit for bit; they are removed once the task's
``result.json`` exists. A progress bar per task shows the step, the loss and the last evaluation.

``model="tiny-random"`` builds a 2-layer T5 with random weights and a word-level tokenizer
made from the training texts: no download, for smoke tests only.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..checkpoint import CheckpointStore, atomic_write, capture_training_state, restore_training_state
from .glue import TASKS, GlueTask, get_task, load_split, task_metrics, to_text
from .runs import write_json_atomic

__all__ = ["GlueRunConfig", "run", "run_task", "evaluate", "tiny_t5_and_tokenizer", "OPTIMIZERS"]

OPTIMIZERS: dict[str, str] = {"adamw": "AdamW", "adafactor": "Adafactor", "sgd": "SGD"}
METHODS = ("baseline", "mk")


@dataclass
class GlueRunConfig:
    """Everything one ``mkopt/recipes/t5_glue.py`` run needs (the YAML keys).

    Example:
        >>> GlueRunConfig(method="mk", e=3).label
        'mk_e3'
        >>> GlueRunConfig(method="mkk")
        Traceback (most recent call last):
        ...
        ValueError: method='mkk' is unknown: use 'baseline' or 'mk'
    """

    method: str = "mk"  # "baseline" or "mk"
    e: int = 3
    probabilities: str = "dirichlet"
    targets: Any = None  # mkopt target spec: None (every ndim>=2 kernel), an fnmatch pattern or a list of them
    model: str = "t5-small"  # hub name or local folder (from_pretrained), or "tiny-random"
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    data: str = "hub"  # "hub", "generated", or a folder of <task>/<split>.jsonl
    generated_examples: int = 64  # per split, with data=generated
    seed: int = 0
    optimizer: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    batch_size: int = 32
    max_steps: int = 10_000
    max_input_length: int = 256
    max_target_length: int = 8
    eval_every: int = 500
    eval_at_start: bool = True
    eval_batch_size: int = 64
    eval_max_examples: int | None = None
    report: str = "best"  # which evaluation a summary reports: "best" (T5's protocol) or "final"
    out_dir: str = "runs/t5_glue"
    device: str = "auto"
    threads: int | None = None
    sampler_compile: bool | None = None
    save_model: bool = False
    checkpoint_every: int = 1000  # steps between resumable checkpoints inside a task (0: none); removed when the task ends
    progress: bool = True  # a tqdm bar per task (steps, loss, last evaluation)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown: use 'baseline' or 'mk'")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is unknown: use one of {sorted(OPTIMIZERS)}")
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        for name in self.tasks:
            get_task(name)  # unknown task -> clear error before anything loads
        if self.report not in ("best", "final"):
            raise ValueError(f"report={self.report!r}: use 'best' or 'final'")
        for key in ("max_steps", "batch_size", "eval_every", "eval_batch_size", "max_input_length", "max_target_length", "e"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be an int >= 1")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every={self.checkpoint_every!r} must be an int >= 0 (0: no checkpoints inside a task)")

    @property
    def label(self) -> str:
        if self.method == "baseline":
            return "baseline"
        return f"mk_e{self.e}" + ("" if self.probabilities == "dirichlet" else f"_{self.probabilities}")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def tiny_t5_and_tokenizer(texts: list[str], seed: int = 0, d_model: int = 32) -> tuple[nn.Module, Any]:
    """A randomly initialized 2-layer T5 and a word-level tokenizer over ``texts`` (offline smoke tests).

    Example:
        >>> model, tok = tiny_t5_and_tokenizer(["sst2 sentence: good film.", "positive", "negative"])
        >>> tok("sst2 sentence: good film.")["input_ids"][-1] == tok.eos_token_id, model.config.num_layers
        (True, 2)
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    specials = ["<pad>", "</s>", "<unk>"]
    words = sorted({w for text in texts for w in text.split()})
    vocab = {token: i for i, token in enumerate(specials + [w for w in words if w not in specials])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    return T5ForConditionalGeneration(config), tokenizer


def _load(config: GlueRunConfig, train_texts: list[str]) -> tuple[nn.Module, Any]:
    if config.model == "tiny-random":
        return tiny_t5_and_tokenizer(train_texts, seed=config.seed)
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    return AutoModelForSeq2SeqLM.from_pretrained(config.model), AutoTokenizer.from_pretrained(config.model)


def _build_optimizer(config: GlueRunConfig, model: nn.Module) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, OPTIMIZERS[config.optimizer])
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.method == "baseline":
        return cls(model.parameters(), **kwargs)
    import mkopt

    return mkopt.MKOptimizer(cls, model, e=config.e, targets=config.targets, seed=config.seed,
                             probabilities=config.probabilities, sampler_compile=config.sampler_compile, **kwargs)  # fmt: skip


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Any, task: GlueTask, examples: list[dict], *, batch_size: int = 64,
             max_input_length: int = 256, max_target_length: int = 8) -> tuple[dict[str, float], list[str]]:  # fmt: skip
    """Greedy-decode ``examples`` and score them with the task's metrics; returns (metrics, decoded).

    Runs in ``eval()`` mode (MK: the mean kernels, computed once per batch under
    ``parametrize.cached()``) and restores the previous mode.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    decoded: list[str] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            inputs = tokenizer([to_text(task, ex)[0] for ex in chunk], max_length=max_input_length, truncation=True,
                               padding=True, return_tensors="pt").to(device)  # fmt: skip
            with parametrize.cached():
                out = model.generate(**inputs, max_new_tokens=max_target_length, do_sample=False, num_beams=1)
            decoded.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return task_metrics(task, [ex["label"] for ex in examples], decoded), decoded


def _batches(encoded: list[tuple[list[int], list[int]]], batch_size: int, seed: int, pad: int, skip: int = 0):
    """Endless shuffled batches (a new permutation each epoch), padded; labels padded with -100.

    ``skip``: start after that many batches (a resumed run sees the batches it would have seen).
    """
    rng = random.Random(seed)
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):  # full batches only
            if skip:
                skip -= 1
                continue
            rows = [encoded[i] for i in order[start : start + batch_size]]
            width = max(len(x) for x, _ in rows)
            target_width = max(len(y) for _, y in rows)
            ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in rows])
            labels = torch.tensor([y + [-100] * (target_width - len(y)) for _, y in rows])
            yield {"input_ids": ids, "attention_mask": (ids != pad).long(), "labels": labels}


def _score(metrics: dict[str, dict[str, float]]) -> float:
    """One number per evaluation (to pick the best step): mean over entries of their metrics' mean."""
    return sum(sum(m.values()) / len(m) for m in metrics.values()) / len(metrics)


def run_task(config: GlueRunConfig, task_name: str, out: Path) -> dict[str, Any]:
    """Fine-tune one task (one method, one seed) and write ``out/{train,eval}.csv`` and ``out/result.json``."""
    task = get_task(task_name)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    train_rows = load_split(task, "train", config.data, generated=config.generated_examples, seed=config.seed)
    eval_rows = {
        entry: load_split(task, split, config.data, generated=config.generated_examples, seed=config.seed)[: config.eval_max_examples]
        for entry, split in task.eval_splits
    }
    pairs = [to_text(task, row) for row in train_rows]
    model, tokenizer = _load(config, [text for pair in pairs for text in pair] + list(task.labels or []))
    device = _device(config.device)
    model.to(device).train()
    optimizer = _build_optimizer(config, model)  # after .to(device): MK's p lives with the weights
    warmup = max(config.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    encoded = [
        (tokenizer(x, max_length=config.max_input_length, truncation=True)["input_ids"],
         tokenizer(text_target=y, max_length=config.max_target_length, truncation=True)["input_ids"])
        for x, y in pairs
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    store = CheckpointStore(out / "checkpoints", keep=2) if config.checkpoint_every else None
    evaluations: list[tuple[int, dict[str, dict[str, float]]]] = []
    done, elapsed = 0, 0.0
    loaded = store.load_latest() if store is not None else None
    if loaded is not None:
        state, path = loaded
        if _comparable(state["extra"]["config"]) != _comparable(dataclasses.asdict(config)):
            raise ValueError(f"{path} was written by a different config: delete {out} or choose another out_dir")
        progress = restore_training_state(state, model, optimizer, scheduler=scheduler)
        done, elapsed = progress["step"], progress["seconds"]
        evaluations = [(step, metrics) for step, metrics in state["extra"]["evaluations"]]
    batches = _batches(encoded, min(config.batch_size, len(encoded)), config.seed, tokenizer.pad_token_id, skip=done)
    _truncate_csv(out / "train.csv", done)  # rows past the checkpoint were logged by the killed run: redone below
    _truncate_csv(out / "eval.csv", done)
    start = time.time() - elapsed
    bar = _progress_bar(config, task_name, done)
    with open(out / "train.csv", "a", newline="") as train_file, open(out / "eval.csv", "a", newline="") as eval_file:
        train_log, eval_log = csv.writer(train_file), csv.writer(eval_file)
        if done == 0:
            train_file.truncate(0)
            eval_file.truncate(0)
            train_log.writerow(["step", "loss", "lr", "seconds"])
            eval_log.writerow(["step", "entry", "metric", "value"])

        def evaluate_now(step: int) -> None:
            metrics = {
                entry: evaluate(model, tokenizer, task, rows, batch_size=config.eval_batch_size,
                                max_input_length=config.max_input_length, max_target_length=config.max_target_length)[0]
                for entry, rows in eval_rows.items()
            }  # fmt: skip
            for entry, values in metrics.items():
                for metric, value in values.items():
                    eval_log.writerow([step, entry, metric, f"{value:.6g}"])
            eval_file.flush()
            evaluations.append((step, metrics))
            if bar is not None:
                bar.set_postfix_str(f"eval@{step} {_score(metrics):.4g}", refresh=False)

        if config.eval_at_start and done == 0:
            evaluate_now(0)
        for step in range(done + 1, config.max_steps + 1):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            optimizer.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{task_name}: loss is {loss.item()} at step {step}; lower lr={config.lr}")
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            train_log.writerow([step, f"{loss.item():.6g}", f"{scheduler.get_last_lr()[0]:.6g}", f"{time.time() - start:.2f}"])
            if step % config.eval_every == 0 or step == config.max_steps:
                evaluate_now(step)
            if bar is not None:
                bar.update()
                bar.set_description_str(f"{config.label} {task_name} loss {loss.item():.3g}", refresh=False)
            if store is not None and step % config.checkpoint_every == 0 and step < config.max_steps:
                train_file.flush()
                eval_file.flush()  # the logs on disk reach at least the checkpoint's step
                extra = {"config": dataclasses.asdict(config), "evaluations": [[s, m] for s, m in evaluations]}
                progress = {"step": step, "seconds": time.time() - start}
                store.save(capture_training_state(model, optimizer, scheduler=scheduler, progress=progress, **extra), step)
    if bar is not None:
        bar.close()
    best_step, best = max(evaluations, key=lambda item: (_score(item[1]), -item[0]))
    final_step, final = evaluations[-1]
    result = {
        "task": task_name, "label": config.label, "seed": config.seed, "config": dataclasses.asdict(config),
        "best": {"step": best_step, "metrics": best}, "final": {"step": final_step, "metrics": final},
        "train_seconds": time.time() - start,
    }  # fmt: skip
    if config.save_model:
        import mkopt

        plain = mkopt.deploy(model.eval()) if mkopt.is_expanded(model) else model
        plain.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    # Atomic (temp file + fsync + rename): run() skips a task whose result.json exists, so a
    # half-written one from a killed run must never appear.
    write_json_atomic(out / "result.json", result)
    if store is not None:
        shutil.rmtree(store.directory, ignore_errors=True)  # the task is done: its e-times-larger checkpoints are not
    return result


def _truncate_csv(path: Path, last_step: int) -> None:
    """Keep the header and the rows up to ``last_step`` (a resumed task rewrites the rest)."""
    if last_step == 0 or not path.is_file():
        return
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    kept = rows[:1] + [row for row in rows[1:] if row and int(row[0]) <= last_step]
    text = io.StringIO()
    csv.writer(text).writerows(kept)
    atomic_write(path, lambda handle: handle.write(text.getvalue().encode("utf-8")))


def _progress_bar(config: GlueRunConfig, task_name: str, done: int):
    if not config.progress:
        return None
    from tqdm import tqdm

    index = config.tasks.index(task_name) + 1 if task_name in config.tasks else 0
    return tqdm(total=config.max_steps, initial=done, desc=f"{config.label} {task_name}", unit="step",
                position=0, leave=True, mininterval=5, postfix=f"task {index}/{len(config.tasks)}")  # fmt: skip


def run(config: GlueRunConfig) -> dict[str, dict[str, Any]]:
    """Every task of ``config`` in turn (one fresh pretrained model each); returns task -> result.

    Example (offline smoke run; a few seconds):
        >>> import tempfile
        >>> config = GlueRunConfig(method="mk", model="tiny-random", data="generated", tasks=["rte"], max_steps=2,
        ...     eval_every=2, generated_examples=8, batch_size=4, sampler_compile=False, out_dir=tempfile.mkdtemp())
        >>> sorted(run(config)["rte"]["final"]["metrics"]["rte"])
        ['accuracy']
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    from ..config import dump_config

    root = Path(config.out_dir) / config.label / f"seed{config.seed}"
    root.mkdir(parents=True, exist_ok=True)
    # Check every finished task against this config BEFORE recording it: a refused run must leave
    # the config.yaml of the run whose results are on disk, not its own.
    finished: dict[str, dict[str, Any]] = {}
    for name in config.tasks:
        done = root / name / "result.json"
        if done.exists():
            previous = json.loads(done.read_text())
            if _comparable(previous["config"]) != _comparable(dataclasses.asdict(config)):
                raise ValueError(f"{done} was written by a different config: delete {root / name} or choose another out_dir")
            finished[name] = previous
    text = dump_config(config)
    atomic_write(root / "config.yaml", lambda handle: handle.write(text.encode("utf-8")))
    results: dict[str, dict[str, Any]] = {}
    for name in config.tasks:
        results[name] = finished[name] if name in finished else run_task(config, name, root / name)
    return results


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config without the keys that do not change a task's results (task list, threads, output, reporting)."""
    ignored = ("tasks", "threads", "out_dir", "save_model", "report", "checkpoint_every", "progress")
    return {k: v for k, v in config.items() if k not in ignored}

