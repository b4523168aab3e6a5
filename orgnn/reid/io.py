"""Small file helpers shared by the image side: checked image reading and atomic writes."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["BadImageError", "read_image", "atomic_write", "atomic_torch_save", "mask_path_for"]


class BadImageError(ValueError):
    """An image (or mask) file that cannot be decoded: unreadable, truncated or not an image."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        if reason is None:  # re-raised from a DataLoader worker with the full message
            self.path, self.reason = "", ""
            super().__init__(str(path))
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


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then ``os.replace`` it, so
    that ``path`` is either absent or complete, never partial (interrupts, crashes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def mask_path_for(image_path: str | os.PathLike, dataset_root: str | os.PathLike,
                  mask_root: str | os.PathLike) -> Path:
    """Where ``orgnn masks`` writes the mask of ``image_path``: the same relative path under
    ``mask_root``, with a ``.png`` suffix."""
    rel = Path(os.path.relpath(Path(image_path).resolve(), Path(dataset_root).resolve()))
    if rel.parts and rel.parts[0] == "..":
        raise ValueError(f"{image_path} is not inside the dataset folder {dataset_root}")
    return Path(mask_root) / rel.with_suffix(".png")
