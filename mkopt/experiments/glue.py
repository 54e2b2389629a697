"""GLUE in T5's text-to-text format: tasks, inputs/targets, decoding, official metrics, GLUE average.

Pure Python (NumPy/SciPy only where needed): the training loop lives in
:mod:`mkopt.experiments.glue_finetune`. Formats follow T5 (Raffel et al., 2019; ``t5.data``):
``"<task> <field>: <text> <field>: <text>"`` with the fields in sorted order
(``"mnli hypothesis: ... premise: ..."``), class names as targets, STS-B scores rounded to the
nearest 0.2 and written with one decimal (``"3.8"``). Decoded outputs that are not a class name
(or, for STS-B, not a number) are *invalid*: T5 maps them to class -1 / score -1.0 and so do we;
an invalid prediction is wrong for accuracy, F1 and Matthews correlation.

Data: ``datasets.load_dataset("glue", task)`` when online (lazy import, ``source="hub"``), a folder
of JSON-lines files ``<root>/<task>/<split>.jsonl`` with GLUE's own field names
(``source="<folder>"``; export once with
``load_dataset("glue", "rte")["train"].to_json("glue/rte/train.jsonl")``), or small generated
examples for smoke tests (``source="generated"``; they carry a trivial signal, no meaning).

Example:
    >>> task = get_task("stsb")
    >>> to_text(task, {"sentence1": "A cat.", "sentence2": "A dog.", "label": 3.75, "idx": 0})
    ('stsb sentence1: A cat. sentence2: A dog.', '3.8')
    >>> task_metrics(task, [3.8, 1.0, 4.2], ["3.6", "1.4", "4.4"])["spearman"]
    100.0
    >>> task_metrics(task, [3.8, 1.0, 4.2], ["3.6", "1.4", "oops"])["spearman"]   # "oops" -> -1.0
    -50.0
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "GlueTask",
    "TASKS",
    "TABLE4_COLUMNS",
    "get_task",
    "to_text",
    "stsb_target",
    "parse_prediction",
    "accuracy",
    "binary_f1",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "task_metrics",
    "glue_average",
    "load_split",
    "generated_examples",
    "iter_eval_splits",
]


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task as T5 casts it: prefix, input fields, class names, metrics, validation splits.

    ``labels`` is ``None`` for the regression task (STS-B). ``eval_splits`` maps the name used in
    results (``"mnli_m"``) to the dataset split (``"validation_matched"``).
    """

    name: str
    fields: tuple[str, ...]
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    eval_splits: tuple[tuple[str, str], ...]

    @property
    def is_regression(self) -> bool:
        return self.labels is None


def _task(name: str, fields: tuple[str, ...], labels: tuple[str, ...] | None, metrics: tuple[str, ...], splits=None) -> GlueTask:
    return GlueTask(name, tuple(sorted(fields)), labels, metrics, splits or ((name, "validation"),))


TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        _task("cola", ("sentence",), ("unacceptable", "acceptable"), ("mcc",)),
        _task("sst2", ("sentence",), ("negative", "positive"), ("accuracy",)),
        _task("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy")),
        _task("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearman")),
        _task("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1")),
        _task("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
              (("mnli_m", "validation_matched"), ("mnli_mm", "validation_mismatched"))),  # fmt: skip
        _task("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
        _task("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
    )
}

# The paper's Table 4, left to right: (result entry, metric, column title).
TABLE4_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("cola", "mcc", "CoLA Matthews"),
    ("sst2", "accuracy", "SST-2 acc"),
    ("mrpc", "f1", "MRPC F1"),
    ("mrpc", "accuracy", "MRPC acc"),
    ("stsb", "pearson", "STS-B Pearson"),
    ("stsb", "spearman", "STS-B Spearman"),
    ("qqp", "accuracy", "QQP acc"),
    ("qqp", "f1", "QQP F1"),
    ("mnli_m", "accuracy", "MNLI-m"),
    ("mnli_mm", "accuracy", "MNLI-mm"),
    ("qnli", "accuracy", "QNLI"),
    ("rte", "accuracy", "RTE"),
)
GLUE_ENTRIES: tuple[str, ...] = tuple(dict.fromkeys(entry for entry, _, _ in TABLE4_COLUMNS))


def get_task(name: str) -> GlueTask:
    """The task called ``name`` (``"cola"``, ``"sst2"``, ..., ``"mnli"``); a clear error otherwise.

    Example:
        >>> get_task("mnli").eval_splits
        (('mnli_m', 'validation_matched'), ('mnli_mm', 'validation_mismatched'))
    """
    if name not in TASKS:
        hint = " (MNLI is one task, 'mnli', evaluated on both validation_matched and validation_mismatched)" if "mnli" in name else ""
        raise ValueError(f"unknown GLUE task {name!r}: use one of {sorted(TASKS)}{hint}; WNLI and AX are not part of Table 4")
    return TASKS[name]


def stsb_target(score: float) -> str:
    """STS-B's target string: the score rounded to the nearest 0.2, one decimal (T5's format).

    Ties round half to even, like T5's ``tf.round`` (2.5 -> "2.4").

    Example:
        >>> [stsb_target(s) for s in (0.0, 2.5, 3.71, 4.99, 5.0)]
        ['0.0', '2.4', '3.8', '5.0', '5.0']
    """
    return f"{round(float(score) * 5) / 5:.1f}"


def to_text(task: GlueTask, example: dict[str, Any]) -> tuple[str, str]:
    """``(input, target)`` strings for one GLUE example (a dict with the dataset's field names).

    Example:
        >>> to_text(get_task("mnli"), {"premise": "It rains.", "hypothesis": "It is wet.", "label": 0})
        ('mnli hypothesis: It is wet. premise: It rains.', 'entailment')
    """
    missing = [f for f in (*task.fields, "label") if f not in example]
    if missing:
        raise KeyError(f"{task.name} example lacks field(s) {missing}; it has {sorted(example)} (GLUE names: {list(task.fields)} + 'label')")
    text = " ".join([task.name] + [f"{field}: {example[field]}" for field in task.fields])
    label = example["label"]
    if task.is_regression:
        return text, stsb_target(label)
    assert task.labels is not None
    if not isinstance(label, int) or not -1 <= label < len(task.labels):
        raise ValueError(f"{task.name} label {label!r} is not a class index in 0..{len(task.labels) - 1} (or -1 for unlabelled)")
    return text, "<unk>" if label == -1 else task.labels[label]


def parse_prediction(task: GlueTask, text: str) -> float | int:
    """Decoded output -> class index, or score for STS-B; -1 / -1.0 when invalid (as T5 does).

    Example:
        >>> task = get_task("rte")
        >>> parse_prediction(task, " not_entailment"), parse_prediction(task, "maybe")
        (1, -1)
        >>> parse_prediction(get_task("stsb"), "3.8"), parse_prediction(get_task("stsb"), "x")
        (3.8, -1.0)
    """
    text = text.strip()
    if task.is_regression:
        try:
            value = float(text)
        except ValueError:
            return -1.0
        return value if math.isfinite(value) else -1.0
    assert task.labels is not None
    return task.labels.index(text) if text in task.labels else -1


def _pairs(targets: Sequence, predictions: Sequence) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
    if not targets:
        raise ValueError("no examples to score")


def accuracy(targets: Sequence[int], predictions: Sequence[int]) -> float:
    """Percent of exact matches (an invalid -1 is never a match).

    Example:
        >>> accuracy([0, 1, 1, 0], [0, 1, 0, -1])
        50.0
    """
    _pairs(targets, predictions)
    return 100.0 * sum(t == p for t, p in zip(targets, predictions)) / len(targets)


def _binary_counts(targets: Sequence[int], predictions: Sequence[int]) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) with class 1 positive; an invalid prediction counts as the wrong class."""
    _pairs(targets, predictions)
    tp = fp = fn = tn = 0
    for t, p in zip(targets, predictions):
        if t not in (0, 1):
            raise ValueError(f"binary target {t!r} is not 0 or 1")
        p = p if p in (0, 1) else 1 - t
        tp += t == 1 and p == 1
        fp += t == 0 and p == 1
        fn += t == 1 and p == 0
        tn += t == 0 and p == 0
    return tp, fp, fn, tn


def binary_f1(targets: Sequence[int], predictions: Sequence[int]) -> float:
    """F1 of class 1 in percent (MRPC, QQP); invalid predictions count as wrong (T5's ``f1_score_with_invalid``).

    Example:
        >>> binary_f1([1, 1, 0, 0], [1, 0, 1, 0])   # tp=1, fp=1, fn=1 -> 2/4
        50.0
    """
    tp, fp, fn, _ = _binary_counts(targets, predictions)
    return 0.0 if tp == 0 else 100.0 * 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(targets: Sequence[int], predictions: Sequence[int]) -> float:
    """Matthews correlation in percent (CoLA), multiclass over the labels seen, 0 when undefined.

    As T5 (``sklearn.metrics.matthews_corrcoef``): an invalid prediction (-1) is a class of its own,
    not "the wrong class", so with invalid outputs the binary formula gives a different number.
    Gorodkin's R_K statistic from the confusion matrix C (``s`` examples, ``c`` correct, ``t_k`` /
    ``p_k`` the number of examples whose target / prediction is ``k``)::

        (c*s - sum_k p_k*t_k) / sqrt((s^2 - sum_k p_k^2) * (s^2 - sum_k t_k^2))

    For two classes this is the usual (tp*tn - fp*fn) / sqrt(...).

    Example:
        >>> round(matthews_corrcoef([1, 1, 1, 0, 0], [1, 1, 0, 0, 1]), 4)   # (2*1 - 1*1) / sqrt(3*3*2*2)
        16.6667
        >>> round(matthews_corrcoef([1, 1, 0, 0], [1, -1, 0, 0]), 2)   # T5 / sklearn: 6 / sqrt(10*8)
        67.08
    """
    _pairs(targets, predictions)
    s = len(targets)
    c = sum(t == p for t, p in zip(targets, predictions))
    t_counts = Counter(targets)
    p_counts = Counter(predictions)
    covariance = c * s - sum(p_counts[k] * t_counts[k] for k in p_counts.keys() | t_counts.keys())
    variance_p = s * s - sum(n * n for n in p_counts.values())
    variance_t = s * s - sum(n * n for n in t_counts.values())
    if variance_p == 0 or variance_t == 0:
        return 0.0
    return 100.0 * covariance / math.sqrt(variance_p * variance_t)


def _correlation(kind: str, targets: Sequence[float], predictions: Sequence[float]) -> float:
    _pairs(targets, predictions)
    import scipy.stats  # lazy: only STS-B needs it

    if len(set(predictions)) < 2 or len(set(targets)) < 2:
        return 0.0  # undefined for a constant side; T5 reports 0 there too
    value = getattr(scipy.stats, kind)(targets, predictions)[0]
    return 0.0 if math.isnan(value) else 100.0 * float(value)


def pearson(targets: Sequence[float], predictions: Sequence[float]) -> float:
    """Pearson correlation in percent (``scipy.stats.pearsonr``); 0 for constant predictions.

    Example:
        >>> round(pearson([1.0, 2.0, 3.0], [1.0, 2.0, 4.0]), 2)
        98.2
    """
    return _correlation("pearsonr", targets, predictions)


def spearman(targets: Sequence[float], predictions: Sequence[float]) -> float:
    """Spearman rank correlation in percent (``scipy.stats.spearmanr``); 0 for constant predictions.

    Example:
        >>> spearman([1.0, 2.0, 3.0], [10.0, 20.0, 35.0])
        100.0
    """
    return _correlation("spearmanr", targets, predictions)


_METRICS = {"accuracy": accuracy, "f1": binary_f1, "mcc": matthews_corrcoef, "pearson": pearson, "spearman": spearman}


def task_metrics(task: GlueTask, targets: Sequence[float | int], decoded: Sequence[str]) -> dict[str, float]:
    """The task's official metrics (percent) for dataset labels ``targets`` and decoded strings.

    STS-B is scored against the dataset's unrounded scores, as GLUE does.

    Example:
        >>> task_metrics(get_task("mrpc"), [1, 0, 1, 1], ["equivalent", "not_equivalent", "??", "equivalent"])
        {'f1': 80.0, 'accuracy': 75.0}
    """
    predictions = [parse_prediction(task, text) for text in decoded]
    return {name: _METRICS[name](list(targets), predictions) for name in task.metrics}


def glue_average(results: dict[str, dict[str, float]]) -> float:
    """The GLUE average of Table 3/4: mean over the nine entries of Table 4 (CoLA, SST-2, MRPC, STS-B,
    QQP, MNLI-m, MNLI-mm, QNLI, RTE), a task with two metrics entering with their mean (as in T5 and
    the GLUE leaderboard). ``results`` maps entry (``"mnli_m"``) -> metric -> value; all nine needed.

    Example:
        >>> scores = {e: {"accuracy": 80.0} for e in ("sst2", "mnli_m", "mnli_mm", "qnli", "rte")}
        >>> scores.update(cola={"mcc": 35.0}, mrpc={"f1": 90.0, "accuracy": 86.0},
        ...               stsb={"pearson": 88.0, "spearman": 86.0}, qqp={"accuracy": 90.0, "f1": 86.0})
        >>> glue_average(scores)   # (5 * 80 + 35 + 88 + 87 + 88) / 9
        77.55555555555556
    """
    missing = [entry for entry in GLUE_ENTRIES if entry not in results]
    if missing:
        raise ValueError(f"the GLUE average needs all of {list(GLUE_ENTRIES)}; missing {missing} (run every task of Table 4)")
    per_entry = [sum(results[e].values()) / len(results[e]) for e in GLUE_ENTRIES]
    return sum(per_entry) / len(per_entry)


# -- data -------------------------------------------------------------------------------------


def load_split(task: GlueTask, split: str, source: str, *, generated: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """Examples of ``task``'s ``split`` (``"train"``, ``"validation"``, ``"validation_matched"``, ...).

    ``source``: ``"hub"`` (``datasets.load_dataset("glue", task)``, needs the network the first
    time), ``"generated"`` (``generated`` made-up examples, for smoke tests), or a folder holding
    ``<task>/<split>.jsonl``.

    Example:
        >>> rows = load_split(get_task("qnli"), "train", "generated", generated=4)
        >>> len(rows), sorted(rows[0])
        (4, ['idx', 'label', 'question', 'sentence'])
    """
    if source == "generated":
        return generated_examples(task, split, generated, seed=seed)
    if source == "hub":
        try:
            import datasets
        except ImportError as error:
            raise ImportError("data='hub' needs the 'datasets' package (pip install datasets), or use a folder of <task>/<split>.jsonl") from error
        return [dict(row) for row in datasets.load_dataset("glue", task.name, split=split)]
    path = Path(source) / task.name / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"GLUE data file {path} not found. data= takes 'hub', 'generated' or a folder laid out as "
            f"<folder>/<task>/<split>.jsonl (GLUE field names {list(task.fields)} + 'label'); export it once online with "
            f"datasets.load_dataset('glue', '{task.name}')['{split}'].to_json('{path}')"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


_WORDS = {
    "good": ["good", "great", "fine", "lovely", "fun"],
    "bad": ["bad", "awful", "dull", "poor", "boring"],
    "neutral": ["the", "a", "movie", "plot", "actor", "story", "film", "scene", "was", "very", "quite", "is"],
}


def _sentence(rng: random.Random, mood: str | None = None, length: int = 5) -> str:
    words = [rng.choice(_WORDS["neutral"]) for _ in range(length)]
    if mood is not None:
        words.insert(rng.randrange(len(words) + 1), rng.choice(_WORDS[mood]))
    return " ".join(words) + "."


def generated_examples(task: GlueTask, split: str, n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` made-up examples with ``task``'s GLUE field names and a trivial learnable signal.

    Single-sentence tasks: the label is the mood word's class. Pair tasks: the second text repeats
    the first for the "positive" relation (equivalent, duplicate, entailment), else is unrelated;
    STS-B scores are 5.0 for a repeat and lower otherwise. For tests and smoke runs only.

    Example:
        >>> generated_examples(get_task("sst2"), "train", 2)[0]["label"] in (0, 1)
        True
    """
    if n < 1:
        raise ValueError(f"generated examples per split must be >= 1, got {n}")
    rng = random.Random(f"{task.name}/{split}/{seed}")
    rows: list[dict[str, Any]] = []
    for idx in range(n):
        row: dict[str, Any] = {"idx": idx}
        if len(task.fields) == 1:
            label = rng.randrange(2)
            row[task.fields[0]] = _sentence(rng, "good" if label == 1 else "bad")
        else:
            first = _sentence(rng)
            related = rng.random() < 0.5
            second = first if related else _sentence(rng)
            a, b = _pair_fields(task)
            row[a], row[b] = first, second
            if task.is_regression:
                label = 5.0 if related else round(rng.uniform(0.0, 2.0), 2)
            else:
                related_label = _RELATED_LABEL[task.name]
                label = related_label if related else (rng.choice([1, 2]) if task.name == "mnli" else 1 - related_label)
        row["label"] = label
        rows.append(row)
    return rows


_RELATED_LABEL = {"mrpc": 1, "qqp": 1, "rte": 0, "qnli": 0, "mnli": 0}  # equivalent / duplicate / entailment


def _pair_fields(task: GlueTask) -> tuple[str, str]:
    """The (first, second) fields in reading order (premise before hypothesis, question before sentence)."""
    order = {"premise": 0, "hypothesis": 1, "question": 0, "sentence": 1, "question1": 0, "question2": 1, "sentence1": 0, "sentence2": 1}
    first, second = sorted(task.fields, key=order.__getitem__)
    return first, second


def iter_eval_splits(tasks: Iterable[GlueTask]) -> Iterable[tuple[GlueTask, str, str]]:
    """``(task, entry, split)`` for every validation split of ``tasks`` (MNLI yields two).

    Example:
        >>> [entry for _, entry, _ in iter_eval_splits([get_task("rte"), get_task("mnli")])]
        ['rte', 'mnli_m', 'mnli_mm']
    """
    for task in tasks:
        for entry, split in task.eval_splits:
            yield task, entry, split
