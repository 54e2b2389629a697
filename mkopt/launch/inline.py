"""``inline``: sequentially, in this process (the default for one worker; simplest to debug)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from .base import register_launcher

T = TypeVar("T")


@register_launcher("inline")
class InlineLauncher:
    """Runs every item in this process, in order.

    Example:
        >>> list(InlineLauncher().run(lambda x: x * 2, [1, 2]))
        [(1, 2), (2, 4)]
    """

    def run(self, fn: Callable[[T], Any], items: Iterable[T]) -> Iterator[tuple[T, Any]]:
        for item in items:
            yield item, fn(item)
