"""Small file helpers shared by the image side: checked image reading, checkpoint writes.

Outputs go through the graph side's :func:`orgnn.io.atomic.atomic_write` (temporary sibling,
fsync, one rename, mode ``0o666 & ~umask``), so both sides write files the same way.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from orgnn.io.atomic import atomic_write

__all__ = ["BadImageError", "read_image", "atomic_torch_save", "mask_path_for"]

# the last line of a traceback formatted in a DataLoader worker: "...BadImageError: <message>"
_WORKER_LINE = re.compile(r"^(?:[\w.]+\.)?BadImageError: (.*)$", re.MULTILINE)
_MESSAGE = re.compile(r"^bad image (.+?): (.*)$", re.DOTALL)


class BadImageError(ValueError):
    """An image (or mask) file that cannot be decoded: unreadable, truncated or not an image.

    A DataLoader worker's error comes back to the main process as ``BadImageError(text)``,
    where ``text`` is torch's "Caught BadImageError in DataLoader worker process 0. Original
    Traceback ..." report; the original one-line message (and its path) is recovered from it,
    so the error reads the same with ``--workers 0`` and ``--workers 4``.
    """

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        if reason is None:  # one argument: a full message (re-raised from a worker)
            text = str(path)
            found = _WORKER_LINE.findall(text)
            message = found[-1].strip() if found else text
            parsed = _MESSAGE.match(message)
            self.path, self.reason = parsed.groups() if parsed else ("", message)
            super().__init__(message)
            return
        self.path, self.reason = os.fspath(path), reason
        super().__init__(f"bad image {self.path}: {reason}")


def read_image(path: str | os.PathLike, mode: str = "RGB"):
    """Decode an image completely (truncated files fail here, not later) and convert it.

    Raises:
        BadImageError: the file is missing, unreadable, truncated or not an image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated data, broken headers
        raise BadImageError(path, str(err) or type(err).__name__) from None


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`orgnn.io.atomic.atomic_write`: complete or absent."""
    import torch

    return atomic_write(path, lambda handle: torch.save(obj, handle))


def mask_path_for(image_path: str | os.PathLike, dataset_root: str | os.PathLike,
                  mask_root: str | os.PathLike) -> Path:
    """Where ``orgnn masks`` writes the mask of ``image_path``: the same relative path under
    ``mask_root``, with a ``.png`` suffix."""
    rel = Path(os.path.relpath(Path(image_path).resolve(), Path(dataset_root).resolve()))
    if rel.parts and rel.parts[0] == "..":
        raise ValueError(f"{image_path} is not inside the dataset folder {dataset_root}")
    return Path(mask_root) / rel.with_suffix(".png")
