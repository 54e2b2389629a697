"""The ``mkopt`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mkopt", description="Simulated overparameterization with Majority Kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    from . import demo

    demo.add_arguments(commands.add_parser("demo", help=demo.__doc__.splitlines()[0], description=demo.__doc__))
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
