"""The ``mkopt`` command line."""

from __future__ import annotations

import argparse
import re
import sys

from .errors import exit_on_user_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mkopt", description="Simulated overparameterization with Majority Kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    from . import demo
    from .experiments import table1

    for name, module in (("table1", table1), ("demo", demo)):
        doc = terminal_text(module.__doc__ or name)
        module.add_arguments(commands.add_parser(name, help=doc.splitlines()[0], description=doc,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))  # fmt: skip
    args = parser.parse_args(argv)
    # bad data, config or names: one line saying what and how to fix, exit 1; bugs keep their traceback
    return exit_on_user_error(lambda: {"table1": table1, "demo": demo}[args.command].run(args), f"mkopt {args.command}")


def terminal_text(docstring: str) -> str:
    """A module docstring as help text: reStructuredText's ``double backticks`` dropped.

    Example:
        >>> terminal_text("``--full`` runs the grid")
        '--full runs the grid'
    """
    return re.sub(r"``([^`]+)``", r"\1", docstring).strip()


if __name__ == "__main__":
    sys.exit(main())
