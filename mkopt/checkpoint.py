"""Preemption-safe checkpoints: atomic writes, a verified manifest, fallback to the previous good file.

Layout of a :class:`CheckpointStore` directory::

    ckpt-0000001200.pt   the newest checkpoint (optimizer step 1200)
    ckpt-0000000900.pt   the previous good one (``keep=2``)
    latest.json          manifest, newest first: file, step, bytes and SHA-256 of each kept checkpoint

Every file is written to a temporary file in the same directory, flushed, ``fsync``-ed and then
renamed over its final name (``os.replace`` is atomic on POSIX); the directory is ``fsync``-ed
after the rename. The manifest is rewritten (atomically too) only after the checkpoint it names is
complete, so a signal or a crash at any instant (SIGTERM, SIGUSR2, SIGKILL, a full disk) leaves
either the old or the new ``latest.json``, each naming only complete files; a killed writer leaves
at most a ``.tmp-*`` file, removed by the next store opened on the directory.

:meth:`CheckpointStore.load_latest` verifies size and SHA-256 against the manifest (``torch.load``
does not notice flipped bits) and that the file unpickles; a corrupt or truncated checkpoint gives a
:class:`CheckpointCorruptWarning` naming the file and the reason, and the previous good checkpoint
is used. If every checkpoint is bad, :class:`CheckpointError` lists them all.

:func:`capture_training_state` / :func:`restore_training_state` bundle what a resumed run needs:
model, optimizer (an :class:`mkopt.MKOptimizer` includes its step, hence the ``p`` stream), LR
scheduler, ``GradScaler``, progress counters and the global RNG state. The data order is not saved:
recipes derive it from ``(seed, epoch)`` (see :mod:`mkopt.resumable`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

MANIFEST = "latest.json"
_FORMAT = "mkopt-checkpoints"
_CHECKPOINT = re.compile(r"^ckpt-(\d+)\.pt$")
_TEMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """No usable checkpoint, although checkpoint files exist (each one's problem is in the message)."""


class CheckpointCorruptWarning(UserWarning):
    """A checkpoint could not be used (truncated, corrupt, or failing its checksum); an older one is tried."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One manifest entry."""

    file: str
    step: int
    bytes: int
    sha256: str


class _HashingWriter:
    """File wrapper that hashes and counts what ``torch.save`` writes (one pass over the bytes)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Run ``write(handle)`` on a temporary file beside ``path``, fsync it, and rename it to ``path``.

    Readers see the old file or the complete new one, never a partial file; on any exception
    (including ``KeyboardInterrupt``/``SystemExit`` raised by a signal handler) the temporary file is
    removed and ``path`` is untouched.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
        >>> atomic_write(target, lambda f: f.write(b"done"))
        >>> target.read_text()
        'done'
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX, suffix=path.suffix)
    try:
        with os.fdopen(handle, "wb") as out:
            # mkstemp creates the file with mode 0600; give it the mode open() would (0666 minus the
            # umask), so checkpoints and results on a shared cluster stay group-readable.
            os.chmod(temporary, 0o666 & ~_current_umask())
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (the only portable way to read it)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | os.PathLike) -> CheckpointInfo:
    """``torch.save(obj)`` to ``path`` atomically; returns the file's size and SHA-256.

    Example:
        >>> import tempfile, pathlib
        >>> info = atomic_save({"w": torch.ones(2)}, pathlib.Path(tempfile.mkdtemp()) / "x.pt")
        >>> info.file, len(info.sha256)
        ('x.pt', 64)
    """
    path = Path(path)
    writer: list[_HashingWriter] = []

    def write(handle: IO[bytes]) -> None:
        writer.append(_HashingWriter(handle))
        torch.save(obj, writer[0])  # type: ignore[arg-type]

    atomic_write(path, write)
    match = _CHECKPOINT.match(path.name)
    return CheckpointInfo(path.name, int(match[1]) if match else -1, writer[0].size, writer[0].digest.hexdigest())


class CheckpointStore:
    """A directory of atomically written checkpoints with a verified ``latest.json`` manifest.

    Only one process (rank 0) should :meth:`save` into a directory; every rank may load.

    Example:
        >>> import tempfile
        >>> store = CheckpointStore(tempfile.mkdtemp(), keep=2)
        >>> for step in (10, 20, 30):
        ...     _ = store.save({"step": step}, step)
        >>> [p.name for p in store.checkpoints()]
        ['ckpt-0000000030.pt', 'ckpt-0000000020.pt']
        >>> state, path = store.load_latest()
        >>> state["step"], path.name
        (30, 'ckpt-0000000030.pt')
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r}: keep at least 1 checkpoint (2 keeps a fallback if the newest is damaged)")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        if not os.access(self.directory, os.W_OK):
            raise PermissionError(f"checkpoint directory {self.directory} is not writable")

    def path(self, step: int) -> Path:
        """Where the checkpoint of optimizer step ``step`` is written."""
        return self.directory / f"ckpt-{step:010d}.pt"

    def save(self, state: Any, step: int) -> Path:
        """Write ``state`` as the checkpoint of ``step``, then the manifest; prune beyond ``keep``."""
        for stale in self.directory.glob(_TEMP_PREFIX + "*"):
            stale.unlink(missing_ok=True)  # left by a writer that was killed (one writer per directory)
        info = atomic_save(state, self.path(step))
        # Keep only older entries that still look usable. After a fallback (the newest checkpoint was
        # corrupt and the run resumed from an older one), the manifest still lists the corrupt newer
        # step first: without this filter it would stay "newest" and the good checkpoint this run
        # resumed from would be pruned. Entries at or beyond ``step`` belong to the abandoned
        # timeline; a missing file or a size that differs from the recorded one is unusable (the cheap
        # check; the SHA-256 is verified on load).
        entries = [info] + [
            e for e in self._manifest_entries(warn=False) if e.step < step and self._looks_usable(e)
        ]
        entries = entries[: self.keep]
        manifest = {"format": _FORMAT, "version": 1, "checkpoints": [e.__dict__ for e in entries]}
        atomic_write(self.directory / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        kept = {e.file for e in entries}
        for path in self._files():
            if path.name not in kept:
                path.unlink(missing_ok=True)
        return self.path(step)

    def checkpoints(self) -> list[Path]:
        """Checkpoint files in the order :meth:`load_latest` tries them: manifest order, then any others, newest first."""
        listed = [self.directory / e.file for e in self._manifest_entries(warn=False)]
        others = [p for p in self._files() if p not in listed]
        return [p for p in listed if p.exists()] + others

    def load_latest(self, map_location: Any = "cpu") -> tuple[Any, Path] | None:
        """``(state, path)`` of the newest checkpoint that verifies and loads; ``None`` if there is none.

        A bad file warns (:class:`CheckpointCorruptWarning`, naming it) and the next one is tried.
        """
        entries = {e.file: e for e in self._manifest_entries(warn=True)}
        problems: list[str] = []
        candidates = self.checkpoints()
        for index, path in enumerate(candidates):
            try:
                state = _verified_load(path, entries.get(path.name), map_location)
            except _Unusable as error:
                problems.append(f"{path}: {error}")
                then = f"falling back to {candidates[index + 1]}" if index + 1 < len(candidates) else "no older checkpoint left"
                warnings.warn(f"checkpoint {path} is unusable ({error}); {then}", CheckpointCorruptWarning, stacklevel=2)
                continue
            return state, path
        for entry in entries.values():
            if not (self.directory / entry.file).exists():
                problems.append(f"{self.directory / entry.file}: listed in {MANIFEST} but missing")
        if problems:
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}:\n  " + "\n  ".join(problems)
                + "\nremove the directory (or point the run at a new one) to start from scratch"
            )
        return None

    def _looks_usable(self, entry: CheckpointInfo) -> bool:
        try:
            return (self.directory / entry.file).stat().st_size == entry.bytes
        except OSError:
            return False

    def _files(self) -> list[Path]:
        found = [(int(m[1]), p) for p in self.directory.iterdir() if (m := _CHECKPOINT.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def _manifest_entries(self, warn: bool) -> list[CheckpointInfo]:
        path = self.directory / MANIFEST
        if not path.exists():
            return []
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("format") != _FORMAT:
                raise ValueError(f"format {manifest.get('format')!r} is not {_FORMAT!r}")
            return [CheckpointInfo(**entry) for entry in manifest["checkpoints"]]
        except (ValueError, KeyError, TypeError) as error:
            if warn:
                warnings.warn(
                    f"checkpoint manifest {path} is unreadable ({error}); trying the checkpoint files newest first, "
                    "without checksums",
                    CheckpointCorruptWarning,
                    stacklevel=3,
                )
            return []


class _Unusable(Exception):
    pass


def _verified_load(path: Path, entry: CheckpointInfo | None, map_location: Any) -> Any:
    if entry is not None:
        size = path.stat().st_size
        if size != entry.bytes:
            raise _Unusable(f"{size} bytes on disk, {entry.bytes} written: truncated or overwritten")
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
        if digest.hexdigest() != entry.sha256:
            raise _Unusable("SHA-256 differs from the one recorded when it was written: the file is corrupt")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch reports truncation as e.g. "OSError: [Errno 22] Invalid argument"
        raise _Unusable(f"torch.load failed: {type(error).__name__}: {error}") from error


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself is still atomic
    finally:
        os.close(fd)


def capture_training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    progress: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Everything a resumed run needs, as one ``torch.save``-able dict (loads with ``weights_only=True``).

    ``model`` is the bare module (unwrap DDP first); ``progress`` holds counters (epoch, step, ...);
    ``extra`` entries (config, history, ...) are stored as given.

    Example:
        >>> import mkopt
        >>> model = nn.Linear(3, 2)
        >>> opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1, sampler_compile=False)
        >>> state = capture_training_state(model, opt, progress={"step": 0})
        >>> sorted(state)
        ['extra', 'model', 'optimizer', 'progress', 'rng', 'scaler', 'scheduler']
    """
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "progress": dict(progress or {}),
        "rng": rng,
        "extra": extra,
    }


def restore_training_state(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """Load a :func:`capture_training_state` dict into freshly built objects; returns its ``progress``.

    Build them exactly as the saved run did (an MK model: ``MKOptimizer`` first, so the model is
    expanded), then call this. A scheduler or scaler present on one side only is an error.

    Example:
        >>> import mkopt
        >>> a = nn.Linear(3, 2); opt_a = mkopt.MKOptimizer(torch.optim.SGD, a, e=3, lr=0.1, sampler_compile=False)
        >>> state = capture_training_state(a, opt_a, progress={"step": 5})
        >>> b = nn.Linear(3, 2); opt_b = mkopt.MKOptimizer(torch.optim.SGD, b, e=3, lr=0.1, sampler_compile=False)
        >>> restore_training_state(state, b, opt_b)["step"], torch.equal(a.weight, b.weight)
        (5, True)
    """
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if (state.get(name) is None) != (obj is None):
            saved = "has" if state.get(name) is not None else "has no"
            raise ValueError(f"the checkpoint {saved} {name} state but {name}={obj!r} was passed: build the run as it was saved")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return dict(state["progress"])

