"""Large part-feature arrays without loading them: memory maps and row streaming.

A gallery of :math:`10^7` images with 6 parts x 256 dimensions is 31 GB in float16, more
than the memory of most machines. Three helpers keep such arrays on disk:

* :func:`map_npz_member` maps one array of an ``.npz`` archive read-only. ``np.load`` cannot
  memory-map an ``.npz``, but ``np.savez`` (what :func:`orgnn.io.features.save_part_features`
  uses) stores members *uncompressed*: the member's bytes are a plain ``.npy`` file at a fixed
  offset in the archive, so they can be mapped in place. Compressed members cannot; they are
  refused with a clear error (rewrite the archive with ``np.savez``).
* :func:`iter_rows` streams row chunks of an array as float32 copies; when the array is
  memory-mapped it hands each chunk's pages back to the page cache after use
  (``madvise(MADV_DONTNEED)``), so one pass over a 31 GB file keeps only one chunk resident in
  the process.
* :func:`take_rows` gathers scattered rows (neighbours, candidates, a training sample) from
  a map a few thousand at a time, without read-ahead, handing the pages back after each;
* :func:`open_npy` creates a ``.npy`` file of a given shape and maps it writable, for
  generating or writing large arrays chunk by chunk;
* :func:`memory_budget` is the working memory one chunk or batch of any stage may take
  (search candidates, scorer features, graph batches): every stage sizes its chunks from
  these bytes, never from counts, so any ``K`` fits. :func:`working_memory` sets it for a
  block (``orgnn reconstruct --memory-budget 2GiB``); the default is a quarter of the
  memory available when first asked, between 256 MiB and 1 GiB.

Reading a whole part-feature file this way, with its checks, is
:func:`orgnn.io.features.load_part_features_mapped`; this module knows nothing of the
file format (it imports nothing of ours).

The mapped pages live in the operating system's page cache: several processes (the ranks of a
``torchrun`` job) mapping one file share one copy.
"""
from __future__ import annotations

import mmap
import os
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = ["map_npz_member", "iter_rows", "take_rows", "release_rows", "open_npy",
           "is_mapped", "memory_budget", "working_memory", "parse_bytes", "rows_for"]

#: Rows per chunk of :func:`iter_rows` when not given: about 64 MiB of float32 per chunk.
CHUNK_BYTES = 64 * 1024 * 1024
#: Scattered rows :func:`take_rows` reads from a memory map before handing the pages back.
#: Small, because a kernel with large page-cache folios maps up to about 1.5 MiB of the file
#: per row touched (measured: 1024 rows left 1.5 GiB resident, 64 rows 145 MiB, and took
#: no longer).
TAKE_ROWS = 64
#: Bounds of the default working-memory budget (a quarter of the available memory).
MIN_BUDGET, MAX_BUDGET = 256 << 20, 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10 ** 3, "kib": 1 << 10, "m": 1 << 20,
          "mb": 10 ** 6, "mib": 1 << 20, "g": 1 << 30, "gb": 10 ** 9, "gib": 1 << 30,
          "t": 1 << 40, "tb": 10 ** 12, "tib": 1 << 40}
_budget: int | None = None


def parse_bytes(text: str | int) -> int:
    """Bytes from ``"2GiB"``, ``"512MiB"``, ``"1.5G"``, ``"3e9"`` or an int (``G`` means
    GiB; ``GB`` 10^9)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = match and match.group(2).lower()
        if not match or unit not in _UNITS:
            raise ValueError(f"not a size in bytes: {text!r} (e.g. 2GiB, 512MiB, 3e9)")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1 << 20:
        raise ValueError(f"a memory budget of {value} bytes is below 1 MiB")
    return value


def _available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * MAX_BUDGET


def memory_budget() -> int:
    """Bytes of working memory one chunk (or batch) of a stage may take: as set by
    :func:`working_memory`, else a quarter of the available memory, clamped to
    ``[256 MiB, 1 GiB]`` (decided once per process)."""
    global _budget
    if _budget is None:
        _budget = int(min(MAX_BUDGET, max(MIN_BUDGET, _available() // 4)))
    return _budget


@contextmanager
def working_memory(budget: int | str | None) -> Iterator[int]:
    """Set :func:`memory_budget` for a block (``None``: leave it as it is)."""
    global _budget
    before = _budget
    if budget is not None:
        _budget = parse_bytes(budget)
    try:
        yield memory_budget()
    finally:
        _budget = before


def rows_for(bytes_per_row: int | float, budget: int | None = None, at_most: int | None = None
             ) -> int:
    """Rows per chunk so that ``rows x bytes_per_row`` stays within ``budget`` (default
    :func:`memory_budget`); at least 1, at most ``at_most``."""
    rows = int((budget or memory_budget()) // max(1.0, float(bytes_per_row)))
    return max(1, rows if at_most is None else min(rows, at_most))


def map_npz_member(path: str | os.PathLike, key: str) -> np.memmap:
    """Map array ``key`` of the ``.npz`` archive ``path`` read-only, without reading it.

    Raises:
        ValueError: the member is compressed, or is not a plain (non-object) array.
        KeyError: the archive has no member ``key``.
    """
    path = Path(path)
    name = f"{key}.npy"
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{path}: member {name!r} is compressed and cannot be memory-"
                             f"mapped; write the archive with np.savez (not savez_compressed)")
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: member {name!r} has no local zip header")
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        fh.seek(start)
        version = np.lib.format.read_magic(fh)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(fh)
        if dtype.hasobject:
            raise ValueError(f"{path}: member {name!r} holds Python objects; refused")
        offset = fh.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                     order="F" if fortran else "C")


def open_npy(path: str | os.PathLike, shape: tuple[int, ...],
             dtype: np.dtype | str = np.float16) -> np.memmap:
    """Create ``path`` as an ``.npy`` file of ``shape`` and map it writable."""
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))


def is_mapped(x: np.ndarray) -> bool:
    """Whether ``x`` (or an array it views) is a memory map."""
    return _mmap_of(x) is not None


def _mmap_of(x: np.ndarray) -> mmap.mmap | None:
    obj = x
    while obj is not None:
        if isinstance(obj, mmap.mmap):
            return obj
        mm = getattr(obj, "_mmap", None)
        if isinstance(mm, mmap.mmap):
            return mm
        obj = getattr(obj, "base", None)
    return None


def release_rows(x: np.ndarray, start: int, stop: int) -> None:
    """Drop rows ``start:stop`` of a memory-mapped ``x`` from this process' resident set
    (the file's pages stay in the page cache); a no-op for ordinary arrays."""
    mm = _mmap_of(x)
    if mm is None or stop <= start or not x.flags.c_contiguous or not hasattr(mm, "madvise"):
        return
    try:
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    except (TypeError, ValueError):
        return
    row = x.strides[0]
    lo = x.ctypes.data - base + start * row
    hi = x.ctypes.data - base + stop * row
    page = mmap.PAGESIZE
    lo, hi = (lo // page) * page, min(len(mm), -(-hi // page) * page)
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _advise(x: np.ndarray, advice: int) -> None:
    mm = _mmap_of(x)
    if mm is not None and hasattr(mm, "madvise"):
        mm.madvise(advice)


def take_rows(x: np.ndarray, index: np.ndarray, rows: int = TAKE_ROWS,
              parts: np.ndarray | None = None) -> np.ndarray:
    """``x[index]`` for an integer ``index`` of any shape; with ``parts`` (integers along
    axis 1) only those: ``x[index][:, ..., parts]``, gathered without copying the rest of
    each row. From a memory map the rows are read ``rows`` at a time without read-ahead
    (``MADV_RANDOM``), and each batch's pages are handed back before the next: scattered
    rows of a 30 GB file would otherwise leave every page the kernel read around them in the
    process' resident set."""
    index = np.asarray(index)
    if parts is not None:
        parts = np.asarray(parts)
    if _mmap_of(x) is None:
        return np.asarray(x[index] if parts is None else x[index[..., None], parts])
    flat = index.reshape(-1)
    tail = x.shape[1:] if parts is None else (parts.size,) + x.shape[2:]
    out = np.empty((flat.size,) + tail, dtype=x.dtype)
    _advise(x, mmap.MADV_RANDOM)
    try:
        for start in range(0, flat.size, rows):
            sub = flat[start:start + rows]
            out[start:start + rows] = x[sub] if parts is None else x[sub[:, None], parts]
            release_rows(x, 0, x.shape[0])
    finally:
        _advise(x, mmap.MADV_NORMAL)
    return out.reshape(index.shape + tail)


def chunk_rows(x: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one float32 chunk of ``x`` is about ``chunk_bytes``."""
    per_row = 4 * int(np.prod(x.shape[1:], dtype=np.int64)) or 1
    return max(1, chunk_bytes // per_row)


def iter_rows(x: np.ndarray, rows: int | None = None,
              dtype: np.dtype | type = np.float32) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, chunk)`` over ``x`` in row chunks converted to ``dtype`` (a copy); a mapped
    ``x`` gives each chunk's pages back after use."""
    rows = rows or chunk_rows(x)
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        chunk = np.array(x[start:stop], dtype=dtype)
        release_rows(x, start, stop)
        yield start, chunk


def __getattr__(name: str):
    """``load_part_features_mapped`` lived here until the file format moved to one module;
    a deprecated forward for one release (by name: this module imports nothing of ours)."""
    if name == "load_part_features_mapped":
        import importlib
        import warnings

        warnings.warn("orgnn.storage.load_part_features_mapped is deprecated: use "
                      "orgnn.io.features.load_part_features_mapped", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module("orgnn.io.features").load_part_features_mapped
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
