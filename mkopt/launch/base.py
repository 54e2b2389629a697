"""One interface to run many independent jobs: in-process, or on a local process pool.

:mod:`mkopt.launch` adds submitit's local executor and SLURM job arrays behind the same ``Launcher``
protocol, and ``make_launcher(kind, ...)`` to pick one by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Launcher(Protocol):
    """Runs ``fn(item)`` for every item; yields ``(item, result)`` as runs finish (any order)."""

    def run(self, fn: Callable[[T], Any], items: Iterable[T]) -> Iterator[tuple[T, Any]]: ...


class InlineLauncher:
    """Sequentially, in this process (the default; simplest to debug).

    Example:
        >>> list(InlineLauncher().run(lambda x: x * 2, [1, 2]))
        [(1, 2), (2, 4)]
    """

    def run(self, fn: Callable[[T], Any], items: Iterable[T]) -> Iterator[tuple[T, Any]]:
        for item in items:
            yield item, fn(item)


class LocalPoolLauncher:
    """On ``workers`` local processes (``fn`` must be picklable: a module-level function)."""

    def __init__(self, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        self.workers = workers

    def run(self, fn: Callable[[T], Any], items: Iterable[T]) -> Iterator[tuple[T, Any]]:
        with ProcessPoolExecutor(max_workers=self.workers) as pool:
            futures = {pool.submit(fn, item): item for item in items}
            for future in as_completed(futures):
                yield futures[future], future.result()
