"""The one launcher interface, and the registry that finds a launcher by name.

A launcher runs ``fn(item)`` for many items and yields ``(item, result)`` as runs finish. Each kind
lives in its own module of :mod:`mkopt.launch` (``inline``, ``pool``, ``local``, ``slurm``) and
registers its class under its name with :func:`register_launcher`; :func:`launcher_class` imports
``mkopt.launch.<name>`` on first use (as submitit finds its executors by name), so a new kind is a new
module, not another branch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
C = TypeVar("C", bound=type)

__all__ = ["Launcher", "register_launcher", "launcher_class", "LAUNCHERS"]

LAUNCHERS = ("inline", "pool", "local", "slurm")  # the kinds mkopt ships, in the order --help lists them
_REGISTRY: dict[str, type] = {}


class Launcher(Protocol):
    """Runs ``fn(item)`` for every item; yields ``(item, result)`` as runs finish (any order)."""

    def run(self, fn: Callable[[T], Any], items: Iterable[T]) -> Iterator[tuple[T, Any]]: ...


def register_launcher(name: str) -> Callable[[C], C]:
    """Class decorator: make ``cls`` the launcher called ``name`` (its ``kind``).

    Example:
        >>> @register_launcher("echo")
        ... class Echo:
        ...     def run(self, fn, items):
        ...         return ((item, item) for item in items)
        >>> launcher_class("echo") is Echo, Echo.kind
        (True, 'echo')
    """

    def decorate(cls: C) -> C:
        _REGISTRY[name] = cls
        cls.kind = name  # type: ignore[attr-defined]
        return cls

    return decorate


def launcher_class(name: str) -> type | None:
    """The launcher class registered as ``name``, importing ``mkopt.launch.<name>`` if needed; None if unknown.

    Example:
        >>> launcher_class("inline").__name__, launcher_class("cloud")
        ('InlineLauncher', None)
    """
    if name not in _REGISTRY and name.isidentifier():
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__package__}.{name}":
                raise  # the launcher's module exists but its own import failed: a real error
    return _REGISTRY.get(name)
