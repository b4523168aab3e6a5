"""The ``orgnn`` command line: thin wrappers that parse, call the library and print.

Each command group lives next to the code it drives and registers itself here through a
``register(subparsers)`` function, so this file stays a table of contents.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orgnn import __version__


class CommandError(Exception):
    """A user-facing failure: printed as ``orgnn: error: ...`` with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orgnn",
        description="Neighbourhood-guided feature reconstruction for occluded person Re-ID.",
    )
    parser.add_argument("--version", action="version", version=f"orgnn {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        module.register(subparsers)
    return parser


def _command_modules() -> list:
    modules = []
    import importlib

    for name in ("orgnn.commands", "orgnn.reid.commands", "orgnn.viz_commands"):
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as err:  # a command group not written yet
            if err.name != name:
                raise
    return modules


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except (CommandError, FileNotFoundError, ValueError) as err:
        print(f"orgnn: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("orgnn: interrupted; outputs already written are complete, none is partial.",
              file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
