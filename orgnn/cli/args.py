"""Argument types for the ``orgnn`` commands: ranges, input folders and output paths.

Each is an ``argparse`` ``type=``: it runs while the command line is parsed, so a bad value
is refused (exit status 2, ``orgnn: error: argument --epochs: ...``) before any data is
read or any output touched. Nothing here imports torch.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["int_range", "float_range", "input_dir", "input_file", "output_file",
           "output_dir", "choices_list", "device", "DEVICE_FORMS"]

#: Device strings the commands accept (what ``torch.device`` reads, plus ``auto``).
DEVICE_FORMS = "cpu, cuda, cuda:N, mps, xpu, xpu:N, auto"
_DEVICE = re.compile(r"(cpu|mps|auto|(cuda|xpu)(:\d+)?)")


def _bound_text(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An integer in ``[lo, hi]`` (either end may be ``None``: unbounded)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer "
                                             f"{_bound_text(lo, hi)}, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {_bound_text(lo, hi)}, "
                                             f"got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False) -> Callable[[str], float]:
    """A finite number in ``[lo, hi]`` (``lo_open``/``hi_open``: that end excluded)."""
    def parse(text: str) -> float:
        what = f"must be a number {_bound_text(lo, hi, lo_open, hi_open)}"
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
        bad = not math.isfinite(value)
        bad |= lo is not None and (value <= lo if lo_open else value < lo)
        bad |= hi is not None and (value >= hi if hi_open else value > hi)
        if bad:
            raise argparse.ArgumentTypeError(f"{what}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def choices_list(known: Sequence[str]) -> Callable[[str], str]:
    """A comma-separated subset of ``known`` (kept as the text; order is the user's)."""
    def parse(text: str) -> str:
        rows = [r.strip() for r in text.split(",") if r.strip()]
        unknown = [r for r in rows if r not in known]
        if not rows or unknown:
            raise argparse.ArgumentTypeError(f"unknown rows {unknown}; choose from "
                                             f"{', '.join(known)}")
        return ",".join(rows)

    parse.__name__ = "rows"
    return parse


def input_dir(text: str) -> str:
    """An existing folder."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return text


def input_file(text: str) -> str:
    """An existing, readable regular file."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: not readable")
    return text


def _check_parent_writable(path: Path, text: str) -> None:
    """The nearest existing ancestor must be a folder we may create entries in."""
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link
            raise argparse.ArgumentTypeError(f"{text}: {parent} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: folder {parent} is not writable")


def output_file(text: str) -> str:
    """A file to (re)write: not an existing folder, in a writable (or creatable) folder."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing folder; name a file")
    if path.exists() and not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a regular file")
    _check_parent_writable(path, text)
    return text


def output_dir(text: str) -> str:
    """A folder to (re)write as a whole: not an existing file, its parent writable."""
    path = Path(text)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file; name a folder")
    _check_parent_writable(path, text)
    return text


def device(text: str) -> str:
    """A torch device string: ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu[:N]`` or ``auto``
    (a GPU when there is one). Checked by its form only: whether the machine has that
    device is checked when the command runs."""
    value = text.strip().lower()
    if not _DEVICE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; accepted forms: "
                                         f"{DEVICE_FORMS}")
    return value
