"""mkopt's one config system: typed schemas (dataclasses, nested), a YAML file, ``key=value`` overrides.

Every recipe, ``mkopt run`` and the cluster profiles of :mod:`mkopt.launch` load their settings
through :func:`load_config`, built on OmegaConf structured configs (what Hydra and torchtune users
already write): a dataclass is the schema, sections are nested dataclasses, overrides are dotted
(``optim.lr=0.1``). Unknown keys are refused, values are checked against the field's type, and
every error is a :class:`mkopt.errors.ConfigError` naming the file (or the override), the key and
what was expected. Override values are parsed as YAML (``tasks=[rte,sst2]``, ``lr=3e-4``,
``targets=null``), with exponent floats such as ``1e-1`` read as numbers.

Example:
    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Config:
    ...     lr: float = 0.1
    ...     tasks: list[str] = field(default_factory=list)
    >>> load_config(Config, None, ["lr=3e-4", "tasks=[rte, sst2]"])
    Config(lr=0.0003, tasks=['rte', 'sst2'])
    >>> load_config(Config, None, ["lr=fast"])
    Traceback (most recent call last):
    ...
    mkopt.errors.ConfigError: override 'lr=fast': lr expects float: Value 'fast' of type 'str' could not be converted to Float
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

from .errors import ConfigError

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
            raise ConfigError(f"override {item!r} is not key=value (e.g. max_steps=100)")
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


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    aliases: dict[str, str] | None = None,
    values: dict[str, Any] | None = None,
    source: str = "settings",
) -> T:
    """An instance of dataclass ``schema`` from the YAML file ``path`` (optional), then ``overrides``.

    Layers apply in order (the schema's defaults, the file, ``values``, the overrides); each is
    checked as it is merged, so an error names its source. A single value given for a list key becomes a
    one-element list (``tasks=rte``). ``aliases`` maps other accepted names onto the schema's
    keys (e.g. submitit's ``timeout_min`` -> ``time_min``). ``values``: a mapping applied between
    the file and the overrides, named ``source`` in errors (settings given as keyword arguments).
    The dataclass's ``__post_init__`` runs last; a ``ValueError`` it raises is reported as a
    :class:`ConfigError` naming where the config came from.
    """
    from omegaconf import ListConfig, OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    try:
        config = OmegaConf.structured(schema)
    except OmegaConfBaseException as error:  # a schema bug, not the user's: say which field
        raise TypeError(f"{schema.__name__} is not a valid config schema: {str(error).splitlines()[0]}") from None
    layers: list[tuple[str, dict[str, Any], dict[str, str]]] = []
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {file} not found")
        layers.append((str(file), _read_yaml(file), {}))
    if values:
        layers.append((source, dict(values), {}))
    if overrides:
        origin = {item.partition("=")[0].strip(): item for item in overrides}
        layers.append(("override", _nest(parse_overrides(overrides)), origin))
    where = "defaults"
    try:
        for where, layer, origin in layers:
            layer = _apply_aliases(layer, aliases or {})
            for key, value in _flatten(layer).items():
                node = OmegaConf.select(config, key, default=None, throw_on_missing=False)
                if isinstance(node, ListConfig) and value is not None and not isinstance(value, list):
                    layer = _set(layer, key, [value])  # tasks=rte: a one-element list
            try:
                config = OmegaConf.merge(config, layer)
            except ConfigKeyError as error:
                key = _full_key(error)
                raise ConfigError(f"{_describe(where, origin, key)}: unknown key {key!r}; valid keys here: {_keys_beside(config, key)}") from None
            except TypeError:  # OmegaConf: "Cannot merge incompatible container types" (a list for a mapping, ...)
                key = next((k for k, v in _flatten(layer).items() if _container_mismatch(config, k, v)), "?")
                raise ConfigError(f"{_describe(where, origin, key)}: {key} expects {_expected_type(schema, key)}, "
                                  f"got {type(_flatten(layer).get(key)).__name__}") from None  # fmt: skip
            except ValidationError as error:
                key = _full_key(error)
                if key == "?":  # a value where a section belongs: OmegaConf names neither key nor section
                    key = next((k for k, v in layer.items() if not isinstance(v, dict) and _is_section(schema, k)), "?")
                    raise ConfigError(f"{_describe(where, origin, key)}: {key} is a section ({_expected_type(schema, key)}), "
                                      f"not a value: write its keys under it, e.g. {key}.<key>=...") from None  # fmt: skip
                message = str(error.msg or error).splitlines()[0]
                raise ConfigError(f"{_describe(where, origin, key)}: {key} expects {_expected_type(schema, key)}: {message}") from None
        return OmegaConf.to_object(config)  # type: ignore[return-value]
    except ConfigError:
        raise
    except OmegaConfBaseException as error:
        raise ConfigError(f"{where}: {str(error).splitlines()[0]}") from None
    except ValueError as error:  # the schema's own checks (__post_init__)
        raise ConfigError(f"{path if path is not None else source}: {error}") from None


def _container_mismatch(config: Any, key: str, value: Any) -> bool:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    node = OmegaConf.select(config, key, default=None, throw_on_missing=False)
    return (isinstance(node, DictConfig) and isinstance(value, list)) or (isinstance(node, ListConfig) and isinstance(value, dict))


def _is_section(schema: type, key: str) -> bool:
    hint = typing.get_type_hints(schema).get(key) if dataclasses.is_dataclass(schema) else None
    return dataclasses.is_dataclass(hint)


def _full_key(error: Any) -> str:
    key = str(error.full_key or "")
    if not key:  # OmegaConf names an unknown key only in its message: "Key 'x' not in 'Schema'"
        found = re.search(r"Key '([^']+)'", str(error))
        key = found[1] if found else "?"
    return key


def _describe(source: str, origin: dict[str, str], key: str) -> str:
    """``override 'optim.lr=fast'`` for a key set on the command line, else the file's path."""
    bare = key.split("[")[0]
    return f"override {origin[bare]!r}" if bare in origin else source


def _read_yaml(file: Path) -> dict[str, Any]:
    """The mapping in ``file``; a parse error names the file and the line."""
    import yaml

    try:
        loaded = yaml.load(file.read_text(), Loader=_loader())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{file} is not valid YAML{where}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{file} must hold a mapping of key: value pairs, not {type(loaded).__name__}")
    return loaded


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        nested = _set(nested, key, value)
    return nested


def _set(tree: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key!r}: {part!r} holds a value, not a section")
    node[parts[-1]] = value
    return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _apply_aliases(values: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    for alias, key in aliases.items():
        if alias in values:
            if key in values:
                raise ConfigError(f"{alias!r} and {key!r} are the same setting: give one of them")
            values = {**values, key: values[alias]}
            del values[alias]
    return values


def _keys_beside(config: Any, key: str) -> list[str]:
    from omegaconf import DictConfig

    node = config
    for part in key.split(".")[:-1]:
        if isinstance(node, DictConfig) and part in node and isinstance(node[part], DictConfig):
            node = node[part]
        else:
            break
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []


def _expected_type(schema: type, key: str) -> str:
    """The annotation of ``key`` (``optim.lr``, ``milestones[0]``) in ``schema``, as text."""
    hint: Any = schema
    for part in key.split("."):
        name = part.split("[")[0]
        if not dataclasses.is_dataclass(hint):
            break
        hint = typing.get_type_hints(hint).get(name, Any)
    text = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
    return text or str(hint).replace("typing.", "")


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
