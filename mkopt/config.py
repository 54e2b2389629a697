"""Recipe configs: a YAML file of flat ``key: value`` pairs plus ``key=value`` command-line overrides.

Each override's value is parsed as YAML (``tasks=[rte,sst2]``, ``lr=3e-4``, ``targets=null``), and
coerced to the dataclass field's type where that is unambiguous (``3e-4`` is a string to YAML 1.1).
Unknown keys are errors that list the valid ones.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Config:
    ...     lr: float = 0.1
    ...     tasks: list = None
    >>> load_config(Config, None, ["lr=3e-4", "tasks=[rte, sst2]"])
    Config(lr=0.0003, tasks=['rte', 'sst2'])
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["load_config", "parse_overrides", "dump_config"]


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a=1", "b=[x, y]"]`` -> ``{"a": 1, "b": ["x", "y"]}`` (values parsed as YAML).

    The one override parser of mkopt (recipe configs, ``mkopt.launch``'s ``--cluster``, the
    ResNet-50 recipe). Keys are returned as given, so dotted keys (``schedule.gamma``) are left for
    the caller to walk. Unquoted numbers in exponent notation are floats (``1e-1`` -> ``0.1``;
    YAML 1.1 alone reads them as the string ``'1e-1'``), also inside lists; a quoted ``'1e-1'``
    stays a string. An empty value is ``None``.

    Example:
        >>> parse_overrides(["e=3", "method=mk", "eval_max_examples=null"])
        {'e': 3, 'method': 'mk', 'eval_max_examples': None}
        >>> parse_overrides(["schedule.gamma=1e-1", "lrs=[2e-5, 1E+2]", "name='1e-1'"])
        {'schedule.gamma': 0.1, 'lrs': [2e-05, 100.0], 'name': '1e-1'}
        >>> parse_overrides(["partition=gpu", "account=null", 'setup=["module load cuda"]'])
        {'partition': 'gpu', 'account': None, 'setup': ['module load cuda']}
    """
    import yaml

    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not key=value (e.g. max_steps=100)")
        parsed[key.strip()] = yaml.load(value, Loader=_loader()) if value.strip() else None  # a SafeLoader subclass
    return parsed


@functools.lru_cache(maxsize=1)
def _loader() -> type:
    """``yaml.SafeLoader`` that also resolves YAML 1.2 floats such as ``1e-1`` / ``2E+5`` (no dot, no
    exponent sign needed), which YAML 1.1 leaves as strings."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # add_implicit_resolver copies the parent's resolver table first: SafeLoader is not changed.
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+.0123456789"),
    )
    return Loader


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Build dataclass ``cls`` from the YAML file ``path`` (optional) updated by ``overrides``."""
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file {file} not found")
        loaded = yaml.safe_load(file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{file} must hold a mapping of key: value pairs, not {type(loaded).__name__}")
        values.update(loaded)
    values.update(parse_overrides(overrides))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for {cls.__name__}; valid keys: {names}")
    return cls(**{key: _coerce(key, value, hints[key]) for key, value in values.items()})


def _coerce(key: str, value: Any, hint: Any) -> Any:
    if hint is Any:
        return value
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None or any(isinstance(value, o) for o in options if isinstance(o, type) and o is not float):
        return value
    if float in options and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"config key {key!r} needs a number, got {value!r}") from None
    return value


def dump_config(config: Any) -> str:
    """The dataclass ``config`` as YAML (what a run records next to its results).

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class C:
        ...     e: int = 3
        >>> dump_config(C())
        'e: 3\\n'
    """
    import yaml

    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
