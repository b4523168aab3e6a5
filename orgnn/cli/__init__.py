"""The ``orgnn`` command line: :func:`main` is the program (:mod:`orgnn.cli.entry`);
:mod:`orgnn.cli.args` checks arguments while parsing; :mod:`orgnn.cli.commands` and
:mod:`orgnn.cli.figures` are the graph-side commands (the image-side ones are in
:mod:`orgnn.reid.commands`). Nothing below the command line imports it.
"""
from orgnn.cli.entry import CommandError, build_parser, main, quiet_third_party_warnings

__all__ = ["main", "build_parser", "CommandError", "quiet_third_party_warnings"]
