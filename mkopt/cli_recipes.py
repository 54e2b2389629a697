"""``mkopt ls``, ``mkopt cp`` and ``mkopt run``: the shipped recipes from the command line (see :mod:`mkopt.recipes`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_ls(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(handler=run_ls)


def add_cp(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", metavar="RECIPE|CONFIG", help="a recipe (its script and configs) or one config, e.g. t5_glue/mk")
    parser.add_argument("destination", metavar="DIR", type=Path, help="folder to copy into (created; files are never overwritten)")
    parser.set_defaults(handler=run_cp)


def add_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", metavar="RECIPE", help="a recipe name (mkopt ls)")
    parser.add_argument("--config", required=True, metavar="CONFIG", help="a shipped config (e.g. t5_glue/mk) or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (dotted keys for nested sections)")
    parser.set_defaults(handler=run_run)


def run_ls(args: argparse.Namespace) -> int:
    """Print every recipe with its summary and configs.

    Example:
        >>> _ = run_ls(argparse.Namespace())  # doctest: +ELLIPSIS
        RECIPE ...
        t5_glue ...
    """
    from . import recipes

    found = recipes.recipes()
    width = max(len(name) for name in [*found, "RECIPE"])
    print(f"{'RECIPE':<{width}}  CONFIGS")
    for name, recipe in found.items():
        print(f"{name:<{width}}  {', '.join(recipes.configs(name)) or '-'}")
        print(f"{'':<{width}}  {recipe.summary}")
    return 0


def run_cp(args: argparse.Namespace) -> int:
    from . import recipes

    for path in recipes.copy(args.what, args.destination):
        print(f"wrote {path}")
    return 0


def run_run(args: argparse.Namespace) -> int:
    from . import recipes

    result = recipes.run(args.recipe, args.config, list(args.overrides))
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
