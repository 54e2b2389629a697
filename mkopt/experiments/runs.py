"""One run of a sweep: its specification, a stable id, and an atomically written result file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write
from ..errors import DataError
from ..provenance import commit_of_tree  # noqa: F401  (re-exported: the sweep and report record it)
from .datasets import BUILTIN, label


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` so that readers see the old file or the whole new one.

    A thin wrapper over :func:`mkopt.checkpoint.atomic_write` (the one atomic writer): a temp file
    in the same folder is fsynced and then ``os.replace``d, so a killed writer leaves a ``.tmp-*``
    file, never a half-written result. Missing parent folders are created.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "r.json"
        >>> write_json_atomic(path, {"accuracy": 0.5}); json.loads(path.read_text())
        {'accuracy': 0.5}
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=1)  # serialize first: an unserializable payload leaves no temp file
    atomic_write(path, lambda out: out.write(text.encode("utf-8")))


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one training run (and so its result file)."""

    method: str
    arch: str
    optimizer: str  # "adam" | "sgd"
    lr: float
    seed: int
    epochs: int
    dataset: str = "fashion-mnist"
    batch: int = 256
    e: int = 3
    options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)  # method-specific, sorted

    @property
    def run_id(self) -> str:
        extra = "".join(f"-{k}{v}" for k, v in self.options)
        return f"{label(self.dataset)}/{self.method}/{self.arch}-{self.optimizer}-lr{self.lr:.6g}-s{self.seed}-ep{self.epochs}-e{self.e}-b{self.batch}{extra}"

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)


class StaleResultError(DataError):
    """A result file on disk was made from other data or other settings than the run asked for."""


class ResultStore:
    """``root/<run_id>.json`` per finished run; writes are atomic (temp file + ``os.replace``).

    A finished run is reused only if it was made from the same data and settings: ``fingerprints``
    maps a data set name to the hash of its content (:func:`mkopt.experiments.datasets.fingerprint`),
    recorded with every result as ``data_sha256``. A result file whose recorded spec or data hash
    differs from the one asked for raises :class:`StaleResultError` instead of handing back a stale
    number. Results recorded before hashes existed are accepted for the built-in data sets only.

    Example:
        >>> import tempfile
        >>> store = ResultStore(tempfile.mkdtemp())
        >>> spec = RunSpec("baseline", "A1", "adam", 0.001, 0, 1)
        >>> store.done(spec), store.write(spec, {"test_accuracy": 0.5}), store.done(spec)
        (False, None, True)
    """

    def __init__(self, root: str | os.PathLike, fingerprints: Mapping[str, str] | None = None) -> None:
        self.root = Path(root)
        self.fingerprints = dict(fingerprints or {})

    def path(self, spec: RunSpec) -> Path:
        return self.root / f"{spec.run_id}.json"

    def done(self, spec: RunSpec) -> bool:
        """Whether ``spec`` finished; raises :class:`StaleResultError` if its file holds another run."""
        path = self.path(spec)
        if not path.is_file():
            return False
        record = json.loads(path.read_text())
        recorded = _spec_from(record["spec"])
        if recorded != spec:
            raise StaleResultError(
                f"{path} holds the result of {recorded}, not of {spec} (same file name, other settings): move or "
                f"delete it, or pass another --runs folder"
            )
        expected = self.fingerprints.get(spec.dataset)
        found = record["result"].get("data_sha256")
        if expected is not None and found != expected and not (found is None and spec.dataset in BUILTIN):
            raise StaleResultError(
                f"{path} was made from other data (sha256 {found or 'not recorded'}) than {spec.dataset} holds now "
                f"({expected}): its number would be stale. Pass another --runs folder for this data, or delete "
                f"{self.root} to recompute"
            )
        return True

    def write(self, spec: RunSpec, result: dict[str, Any]) -> None:
        expected = self.fingerprints.get(spec.dataset)
        found = result.setdefault("data_sha256", expected)
        if expected is not None and found != expected:
            raise DataError(
                f"{spec.dataset} changed while the sweep ran (its run {spec.run_id} trained on data with sha256 "
                f"{found}, the sweep started with {expected}): rerun the sweep on data that stays put"
            )
        path = self.path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"spec": asdict(spec), "result": result}
        write_json_atomic(path, payload)

    def read(self, spec: RunSpec) -> dict[str, Any]:
        return json.loads(self.path(spec).read_text())["result"]

    def all(self) -> list[tuple[RunSpec, dict[str, Any]]]:
        found = []
        for path in sorted(self.root.rglob("*.json")):
            if path.name.startswith(".tmp-"):
                continue
            record = json.loads(path.read_text())
            found.append((_spec_from(record["spec"]), record["result"]))
        return found


def _spec_from(recorded: dict[str, Any]) -> RunSpec:
    """The :class:`RunSpec` of a result file's ``spec`` entry (JSON turns tuples into lists)."""
    options = tuple(tuple(kv) for kv in recorded.get("options", ()))
    return RunSpec(**{**recorded, "options": options})
