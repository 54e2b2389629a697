"""The ``mkopt`` command line."""

from __future__ import annotations

import argparse
import re
import sys

from .errors import exit_on_user_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mkopt", description="Simulated overparameterization with Majority Kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    from . import cli_recipes, demo
    from .experiments import table1

    for name, module in (("table1", table1), ("demo", demo)):
        doc = terminal_text(module.__doc__ or name)
        sub = commands.add_parser(name, help=doc.splitlines()[0], description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    recipe_help = {
        "ls": (cli_recipes.add_ls, "list the shipped recipes and their configs"),
        "cp": (cli_recipes.add_cp, "copy a recipe (script and configs) or one config into a folder, to edit"),
        "run": (cli_recipes.add_run, "run a recipe: mkopt run RECIPE --config CONFIG [key=value ...]"),
    }
    for name, (add, text) in recipe_help.items():
        add(commands.add_parser(name, help=text, description=text))
    args, extra = parser.parse_known_args(argv)
    if args.command == "run":  # key=value overrides may follow --config (argparse binds positionals before it)
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # bad data, config or names: one line saying what and how to fix, exit 1; bugs keep their traceback
    return exit_on_user_error(lambda: args.handler(args), f"mkopt {args.command}")


def terminal_text(docstring: str) -> str:
    """A module docstring as help text: reStructuredText's ``double backticks`` dropped.

    Example:
        >>> terminal_text("``--full`` runs the grid")
        '--full runs the grid'
    """
    return re.sub(r"``([^`]+)``", r"\1", docstring).strip()


if __name__ == "__main__":
    sys.exit(main())
