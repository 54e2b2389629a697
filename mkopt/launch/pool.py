"""``pool``: a local process pool (``concurrent.futures``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from .base import register_launcher

T = TypeVar("T")


@register_launcher("pool")
class LocalPoolLauncher:
    """On ``workers`` local processes (``fn`` must be picklable: a module-level function).

    Example:
        >>> sorted(LocalPoolLauncher(2).run(abs, [-1, 2]))
        [(-1, 1), (2, 2)]
    """

    def __init__(self, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        self.workers = workers

    def run(self, fn: Callable[[T], Any], items: Iterable[T]) -> Iterator[tuple[T, Any]]:
        with ProcessPoolExecutor(max_workers=self.workers) as pool:
            futures = {pool.submit(fn, item): item for item in items}
            for future in as_completed(futures):
                yield futures[future], future.result()
