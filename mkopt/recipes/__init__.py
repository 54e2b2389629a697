"""The recipes that ship with mkopt, torchtune style: list them, copy one to edit, run one with a config.

    mkopt ls                                          # recipes and their configs
    mkopt cp t5_glue ./my_recipe                      # the script and its configs, to edit
    mkopt cp t5_glue/mk ./my_recipe                   # one config
    mkopt run t5_glue --config t5_glue/mk seed=1      # a shipped config by name, or any YAML path

A recipe is a module here with a ``main(argv)`` that takes ``--config FILE`` and ``key=value``
overrides, loaded through :mod:`mkopt.config` (typed schema, unknown keys refused). Its configs are
``configs/<recipe>.yaml`` or ``configs/<recipe>/<name>.yaml``, named ``<recipe>`` or ``<recipe>/<name>``.
A copied recipe runs the same way: ``python my_recipe/t5_glue.py --config my_recipe/configs/t5_glue/mk.yaml``.

Example:
    >>> sorted(recipes())
    ['finetune_rotten_tomatoes', 'resnet50_imagenet', 't5_glue']
    >>> configs("t5_glue"), config_path("t5_glue/mk").name
    (['t5_glue/baseline', 't5_glue/mk'], 'mk.yaml')
"""

from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError

__all__ = ["Recipe", "recipes", "configs", "config_path", "copy", "run"]

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"


@dataclass(frozen=True)
class Recipe:
    name: str
    script: Path
    summary: str  # the first line of its docstring


def recipes() -> dict[str, Recipe]:
    """Every shipped recipe by name (the scripts of this package)."""
    found = {}
    for script in sorted(HERE.glob("*.py")):
        if script.name.startswith("_"):
            continue
        summary = _first_docstring_line(script)
        found[script.stem] = Recipe(script.stem, script, summary)
    return found


def configs(recipe: str | None = None) -> list[str]:
    """The shipped config names (``t5_glue/mk``), all or those of ``recipe``."""
    names = sorted(str(p.relative_to(CONFIGS).with_suffix("")) for p in CONFIGS.rglob("*.yaml"))
    if recipe is None:
        return names
    return [n for n in names if n == recipe or n.startswith(recipe + "/")]


def config_path(config: str) -> Path:
    """A shipped config by name (``t5_glue/mk``), or ``config`` itself when it is a YAML file path."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    shipped = CONFIGS / f"{config}.yaml"
    if shipped.is_file():
        return shipped
    raise UserInputError(f"config {config!r} is neither a file nor a shipped config; shipped: {', '.join(configs())}")


def _recipe(name: str) -> Recipe:
    found = recipes()
    if name not in found:
        raise UserInputError(f"recipe {name!r} is unknown; recipes: {', '.join(found)} (mkopt ls lists them with their configs)")
    return found[name]


def copy(what: str, destination: str | Path) -> list[Path]:
    """Copy recipe ``what`` (its script and configs) or config ``what`` into folder ``destination``.

    Existing files are never overwritten (an error names them). Returns the files written.
    """
    destination = Path(destination)
    if what in recipes():
        recipe = _recipe(what)
        pairs = [(recipe.script, destination / recipe.script.name)]
        pairs += [(CONFIGS / f"{c}.yaml", destination / "configs" / f"{c}.yaml") for c in configs(what)]
    elif (CONFIGS / f"{what}.yaml").is_file():
        pairs = [(CONFIGS / f"{what}.yaml", destination / f"{Path(what).name}.yaml")]
    else:
        raise UserInputError(f"{what!r} is neither a recipe nor a shipped config; recipes: {', '.join(recipes())}; "
                             f"configs: {', '.join(configs())}")  # fmt: skip
    existing = [str(target) for _, target in pairs if target.exists()]
    if existing:
        raise UserInputError(f"not overwriting {', '.join(existing)}: remove them or copy into another folder")
    for source, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return [target for _, target in pairs]


def run(name: str, config: str, overrides: list[str]) -> object:
    """Run recipe ``name`` in this process with ``config`` (a shipped name or a path) and ``key=value`` overrides."""
    _recipe(name)
    module = importlib.import_module(f"{__name__}.{name}")
    return module.main(["--config", str(config_path(config)), *overrides])


def _first_docstring_line(script: Path) -> str:
    import ast

    docstring = ast.get_docstring(ast.parse(script.read_text())) or ""
    return docstring.strip().splitlines()[0] if docstring.strip() else ""
