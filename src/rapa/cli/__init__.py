"""The ``rapa`` command line: one module per subcommand, registered here.

Each subcommand module defines ``register(subparsers)`` which adds its parser and
sets ``func`` (a callable taking the parsed ``argparse.Namespace``). Errors a user can
fix raise :class:`rapa.errors.RapaError` and are printed as one line, without traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from rapa.errors import RapaError

# subcommand modules, in the order `rapa --help` lists them
COMMANDS: tuple[str, ...] = (
    "demo",
    "train",
    "eval",
    "bench",
    "similarity",
    "reduce",
    "attack",
    "theory",
    "speedup",
    "sweep",
    "report",
    "reproduce",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="rapa",
        description="RAPA-ConvNets: replicated kernel matrices for analog arrays.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"rapa.cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand not written yet
            if exc.name == f"rapa.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rapa`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except RapaError as exc:
        print(f"rapa {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rapa {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
