"""The ``mkopt`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mkopt", description="Simulated overparameterization with Majority Kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    from . import demo
    from .experiments import table1

    for name, module in (("table1", table1), ("demo", demo)):
        doc = module.__doc__ or name
        module.add_arguments(commands.add_parser(name, help=doc.splitlines()[0], description=doc))
    args = parser.parse_args(argv)
    return {"table1": table1, "demo": demo}[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
