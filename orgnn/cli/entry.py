"""The ``orgnn`` command line: thin wrappers that parse, call the library and print.

Each command group lives next to the code it drives and registers itself here through a
``register(subparsers)`` function, so this file stays a table of contents.

Exit status: 0 done; 2 refused (``orgnn: error: ...``; bad arguments are refused while
parsing, before any data is read or output touched); 1 out of memory; 130 interrupted by
``SIGINT`` (143 ``SIGTERM``), with a line saying which outputs, if any, were written (each
complete: see :mod:`orgnn.io.atomic`).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Sequence

from orgnn import __version__


class CommandError(Exception):
    """A user-facing failure: printed as ``orgnn: error: ...`` with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """``argparse`` with one error prefix for every command: ``orgnn: error: ...``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"orgnn: error: {message} (see `{self.prog} --help`)\n")


def quiet_third_party_warnings() -> None:
    """Hide the one deprecation warning that importing PyG triggers inside torch
    (``torch.jit.script is deprecated``): narrowly, by message, category and module."""
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                            category=FutureWarning, module=r"torch\.jit\._script")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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

    for name in ("orgnn.cli.commands", "orgnn.reid.commands", "orgnn.cli.figures"):
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as err:  # a command group not written yet
            if err.name != name:
                raise
    return modules


def _interrupted_message(signum: int | None = None, ended: bool = False) -> str:
    from orgnn.io.atomic import committed

    what = "interrupted" if signum in (None, signal.SIGINT) else \
        f"stopped by {signal.Signals(signum).name}"
    if ended:
        what += " after the command ended"
    if committed:
        return (f"orgnn: {what}; written before that, each complete: "
                f"{', '.join(committed)}; nothing else was changed.")
    return f"orgnn: {what}; no output was written or changed."


_ERRORS: tuple[type[BaseException], ...] = (CommandError, FileNotFoundError, ValueError,
                                             OSError)


def _main(argv: Sequence[str]) -> int:
    quiet_third_party_warnings()
    from orgnn.io import atomic as io_atomic

    io_atomic.committed.clear()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, a refused argument (already printed)
        return done.code if isinstance(done.code, int) else int(done.code is not None) * 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except _ERRORS as err:
        print(f"orgnn: error: {err}", file=sys.stderr)
        return 2
    except MemoryError as err:
        print(f"orgnn: error: out of memory ({err or 'MemoryError'}); try a smaller --k",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(_interrupted_message(_Signals.received), file=sys.stderr)
        return _Signals.code()
    return int(result or 0)


class _Signals:
    """The process entry's ``SIGINT``/``SIGTERM`` handler: the first signal raises
    ``KeyboardInterrupt`` where Python is, later ones are only noted (so clean-up and the
    final message cannot be interrupted in turn)."""

    received: int | None = None

    @classmethod
    def handle(cls, signum: int, frame) -> None:
        if cls.received is None:
            cls.received = signum
            raise KeyboardInterrupt

    @classmethod
    def code(cls) -> int:
        return 128 + (cls.received or signal.SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``orgnn`` command; returns its exit status.

    Called without ``argv`` (the ``orgnn`` program, ``python -m orgnn.cli``) it owns the
    process: it does not return but ends the process with :func:`os._exit` after flushing
    the standard streams, holding ``SIGINT``/``SIGTERM`` from the end of the command on, so
    a signal during interpreter shutdown cannot turn into exit status 0 or a crash: any
    signal received before the exit gives status 130 (143) and a line saying what was
    written.
    """
    if argv is not None:
        return _main(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _Signals.handle)
    try:
        code = _main(sys.argv[1:])
    except KeyboardInterrupt:  # outside the command's own handler (start-up, parsing)
        code = None
    except SystemExit as done:  # argparse: --help, --version, usage errors
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    late = held & signal.sigpending()
    if _Signals.received is None and late:
        _Signals.received = min(late)
    if _Signals.received is not None and code != _Signals.code():
        print(_interrupted_message(_Signals.received, ended=code is not None),
              file=sys.stderr)
        code = _Signals.code()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
