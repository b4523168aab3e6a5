"""Part-feature files: the interface between images and graphs (SPEC §7).

One ``.npz`` archive per split (``train.npz``, ``query.npz``, ``gallery.npz``) in a directory.
Each archive holds

====================  ==========================  ==========================================
key                   dtype                       shape / meaning
====================  ==========================  ==========================================
``features``          float32 or float16          (N, M, D) part features
``visibility``        float32, values in [0, 1]   (N, M); a part is visible when >= 0.5
``pids``              int64                       (N,) identity labels
``camids``            int64                       (N,) camera labels
``paths``             str (optional)              (N,) image paths
``clean_features``    like ``features`` (opt.)    (N, M, D) the same images without occluder
====================  ==========================  ==========================================

Files that break these rules are refused with a :class:`PartFeatureError` whose message names
the file, the key and the problem. Archives are read with ``allow_pickle=False``. Integer
labels stored with another integer width (or as integer-valued floats) are converted to
int64; visibility stored as bool, integer or another float width is converted to float32.
Unknown extra keys are ignored.

Writing is atomic: the archive is written to a temporary file in the target directory, flushed
and moved over the target with :func:`os.replace`, so a failure never leaves a partial file.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from orgnn.io import storage

__all__ = [
    "VISIBLE_THRESHOLD",
    "SPLITS",
    "PartFeatureError",
    "PartFeatures",
    "load_part_features",
    "load_part_features_mapped",
    "save_part_features",
    "load_split_dir",
    "save_split_dir",
]

VISIBLE_THRESHOLD = 0.5
SPLITS = ("train", "query", "gallery")
#: :func:`load_split_dir` (``mapped=None``) memory-maps the features of archives this large.
MAP_FILE_BYTES = 1 << 30

_REQUIRED = ("features", "visibility", "pids", "camids")
_OPTIONAL = ("paths", "clean_features")
_FILE_KEY = "<file>"


class PartFeatureError(ValueError):
    """A part-feature file or object breaks SPEC §7; the message names file, key and problem."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = str(source)
        self.key = key
        self.problem = problem
        super().__init__(f"{self.source}: key {key!r}: {problem}")


@dataclass(eq=False)
class PartFeatures:
    """Part features of one split: N images, M parts, D dimensions per part."""

    features: np.ndarray
    visibility: np.ndarray
    pids: np.ndarray
    camids: np.ndarray
    paths: np.ndarray | None = None
    clean_features: np.ndarray | None = None

    @property
    def num_images(self) -> int:
        """N, the number of images."""
        return int(self.features.shape[0])

    @property
    def num_parts(self) -> int:
        """M, the number of parts per image."""
        return int(self.features.shape[1])

    @property
    def dim(self) -> int:
        """D, the dimension of one part feature."""
        return int(self.features.shape[2])

    @property
    def visible(self) -> np.ndarray:
        """(N, M) bool: the parts whose visibility is at least :data:`VISIBLE_THRESHOLD`."""
        return np.asarray(self.visibility) >= VISIBLE_THRESHOLD

    def __len__(self) -> int:
        return self.num_images

    def subset(self, index: Any) -> PartFeatures:
        """The images selected by ``index`` (int, slice, integer array or boolean mask)."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        elif not isinstance(index, slice):
            index = np.asarray(index)
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = None if value is None else np.asarray(value)[index]
        return PartFeatures(**values)

    def validate(self, source: str = "<memory>") -> None:
        """Raise :class:`PartFeatureError` when this object breaks SPEC §7."""
        _normalise(self.as_dict(), source)

    def as_dict(self) -> dict[str, np.ndarray]:
        """The arrays under their file keys; optional arrays that are ``None`` are left out."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out


# --------------------------------------------------------------------------- validation
def _first_index(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _as_rank(arr: Any, layout: str, key: str, source: str) -> np.ndarray:
    """``arr`` as an array of the rank of ``layout`` (e.g. ``"(N, M)"``), else refused."""
    arr = np.asarray(arr)
    ndim = len([dim for dim in layout.strip("()").split(",") if dim.strip()])
    if arr.ndim != ndim:
        dims = "1 dim" if ndim == 1 else f"{ndim} dims"
        raise PartFeatureError(source, key, f"wrong rank: expected {dims} {layout}, got "
                                            f"{arr.ndim} dims with shape {arr.shape}")
    return arr


def _refuse_any(bad: np.ndarray, what: str, key: str, source: str, hint: str = "") -> None:
    """Refuse the array if any entry of ``bad`` is set: how many, and the first one."""
    count = int(np.count_nonzero(bad))
    if count:
        raise PartFeatureError(source, key, f"{what}: {count} of {bad.size}, first at index "
                                            f"{_first_index(bad)}{hint}")


def _check_features(arr: Any, key: str, source: str) -> np.ndarray:
    arr = _as_rank(arr, "(N, M, D)", key, source)
    if arr.dtype not in (np.float32, np.float16):
        raise PartFeatureError(source, key, f"wrong dtype {arr.dtype}: expected float32 "
                                            f"or float16")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise PartFeatureError(source, key, f"empty part axis: shape {arr.shape} has M or D 0")
    _refuse_nonfinite(arr, key, source)
    return arr


def _refuse_nonfinite(arr: np.ndarray, key: str, source: str) -> None:
    """:func:`_refuse_any` for NaN/inf, one row chunk at a time (a memory-mapped array of
    millions of images is read once, never copied whole)."""
    rows = storage.chunk_rows(arr)
    count, first = 0, None
    for start in range(0, arr.shape[0], rows):
        bad = ~np.isfinite(arr[start:start + rows])
        storage.release_rows(arr, start, start + rows)
        found = int(np.count_nonzero(bad))
        if found and first is None:
            index = _first_index(bad)
            first = (index[0] + start,) + index[1:]
        count += found
    if count:
        raise PartFeatureError(source, key, f"non-finite values (NaN/inf): {count} of "
                                            f"{arr.size}, first at index {first}")


def _check_labels(arr: Any, key: str, source: str) -> np.ndarray:
    arr = _as_rank(arr, "(N,)", key, source)
    if arr.dtype.kind in "iu":
        if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise PartFeatureError(source, key, "values overflow int64")
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f":
        _refuse_any(~np.isfinite(arr) | (arr != np.round(arr)),
                    f"wrong dtype {arr.dtype} with non-integer values", key, source,
                    "; expected int64")
        return arr.astype(np.int64)
    raise PartFeatureError(source, key, f"wrong dtype {arr.dtype}: expected int64")


def _check_visibility(arr: Any, key: str, source: str) -> np.ndarray:
    arr = _as_rank(arr, "(N, M)", key, source)
    if arr.dtype.kind not in "fiub":
        raise PartFeatureError(source, key, f"wrong dtype {arr.dtype}: expected float32")
    arr = arr.astype(np.float32, copy=False)
    _refuse_any(~((arr >= 0.0) & (arr <= 1.0)), "values outside [0, 1] (or NaN)", key, source)
    return arr


def _check_paths(arr: Any, key: str, source: str) -> np.ndarray:
    arr = _as_rank(arr, "(N,)", key, source)
    if arr.dtype.kind == "S":
        try:
            arr = np.char.decode(arr, "utf-8")
        except UnicodeDecodeError as err:
            raise PartFeatureError(source, key, f"bytes that are not UTF-8: {err}") from None
    elif arr.dtype.kind == "O" and all(isinstance(p, str) for p in arr.tolist()):
        arr = arr.astype(str)
    elif arr.dtype.kind != "U":
        raise PartFeatureError(source, key, f"wrong dtype {arr.dtype}: expected str")
    return arr


def _normalise(arrays: Mapping[str, Any], source: str) -> PartFeatures:
    """Check ``arrays`` against SPEC §7 and return them as a normalised :class:`PartFeatures`."""
    source = str(source)
    for key in _REQUIRED:
        if key not in arrays or arrays[key] is None:
            raise PartFeatureError(source, key, "missing key (required: "
                                                f"{', '.join(_REQUIRED)})")
    out: dict[str, np.ndarray | None] = {
        "features": _check_features(arrays["features"], "features", source),
        "visibility": _check_visibility(arrays["visibility"], "visibility", source),
        "pids": _check_labels(arrays["pids"], "pids", source),
        "camids": _check_labels(arrays["camids"], "camids", source),
        "paths": None,
        "clean_features": None,
    }
    if arrays.get("paths") is not None:
        out["paths"] = _check_paths(arrays["paths"], "paths", source)
    if arrays.get("clean_features") is not None:
        out["clean_features"] = _check_features(arrays["clean_features"], "clean_features",
                                                source)
    feats = out["features"]
    n = feats.shape[0]
    if n == 0:
        raise PartFeatureError(source, "features", "empty split (N == 0)")
    for key, arr in out.items():
        if arr is not None and arr.shape[0] != n:
            raise PartFeatureError(source, key, f"N mismatch: {arr.shape[0]} rows but "
                                                f"'features' has {n}")
    if out["visibility"].shape[1] != feats.shape[1]:
        raise PartFeatureError(source, "visibility", f"M mismatch: {out['visibility'].shape[1]}"
                                                     f" parts but 'features' has "
                                                     f"{feats.shape[1]}")
    clean = out["clean_features"]
    if clean is not None and clean.shape != feats.shape:
        raise PartFeatureError(source, "clean_features", f"shape mismatch: {clean.shape} but "
                                                         f"'features' has {feats.shape}")
    return PartFeatures(**out)


def _check_compatible(splits: Mapping[str, PartFeatures], sources: Mapping[str, str]) -> None:
    """Raise when M or D differ between splits; the message names both files."""
    items = list(splits.items())
    if not items:
        return
    first_name, first = items[0]
    for name, pf in items[1:]:
        for axis, label in ((1, "M (parts)"), (2, "D (dim)")):
            a, b = first.features.shape[axis], pf.features.shape[axis]
            if a != b:
                raise PartFeatureError(
                    sources[name], "features",
                    f"{label} differs between splits: {b} here but {a} in "
                    f"{sources[first_name]}")


# --------------------------------------------------------------------------- file I/O
def _npz_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def _resolve_load_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists() and path.suffix != ".npz" and _npz_path(path).exists():
        return _npz_path(path)
    return path


_READ_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, KeyError,
                NotImplementedError, RuntimeError)


def load_part_features(path: str | os.PathLike) -> PartFeatures:
    """Read and validate one split archive; raises :class:`PartFeatureError` on a bad file."""
    path = _resolve_load_path(path)
    source = str(path)
    if not path.exists():
        raise PartFeatureError(source, _FILE_KEY, "file not found")
    if not path.is_file():
        raise PartFeatureError(source, _FILE_KEY, "not a regular file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as err:
        raise PartFeatureError(source, _FILE_KEY, f"unreadable file: {err}") from None
    if magic[:2] != b"PK":
        raise PartFeatureError(source, _FILE_KEY, "not an .npz archive (no zip signature; "
                                                  "empty, corrupted or another format)")
    arrays: dict[str, np.ndarray] = {}
    key = _FILE_KEY
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            for key in (*_REQUIRED, *_OPTIONAL):
                if key in names:
                    arrays[key] = archive[key]
    except ValueError as err:
        if "pickle" in str(err).lower() or "object arrays" in str(err).lower():
            raise PartFeatureError(source, key, "object (pickled) array; refused with "
                                                "allow_pickle=False (store str as a unicode "
                                                "array)") from None
        raise PartFeatureError(source, key, f"corrupted or truncated archive: {err}") from None
    except _READ_ERRORS as err:
        raise PartFeatureError(source, key, f"corrupted or truncated archive "
                                            f"({type(err).__name__}: {err})") from None
    return _normalise(arrays, source)


def load_part_features_mapped(path: str | os.PathLike) -> PartFeatures:
    """:func:`load_part_features` with ``features`` (and ``clean_features``) memory-mapped
    from the archive instead of read (:func:`orgnn.io.storage.map_npz_member`): the same
    checks (SPEC §7), the finiteness one row chunk at a time, so a 30 GB gallery file costs a
    few MiB of memory. The small arrays (visibility, labels, paths) are read as usual."""
    path = _resolve_load_path(path)
    source = str(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            small = {key: archive[key] for key in ("visibility", "pids", "camids", "paths")
                     if key in names}
        mapped = {key: storage.map_npz_member(path, key) for key in ("features", "clean_features")
                  if key in names}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise PartFeatureError(source, "<file>", f"cannot be mapped: {err}") from None
    for key in ("features", "visibility", "pids", "camids"):
        if key not in {**small, **mapped}:
            raise PartFeatureError(source, key, "missing key (required: features, "
                                                "visibility, pids, camids)")
    for key, arr in mapped.items():  # rank, dtype, finiteness (a row chunk at a time)
        _check_features(arr, key, source)
    # the small arrays (and the shapes) through the ordinary checks, on one row of features
    probe = _normalise({**small, "features": np.asarray(mapped["features"][:1]),
                        **{k: v[:1] for k, v in small.items()}}, source)
    n = mapped["features"].shape[0]
    for key, arr in {**small, **mapped}.items():
        if arr.shape[0] != n:
            raise PartFeatureError(source, key, f"N mismatch: {arr.shape[0]} rows but "
                                                f"'features' has {n}")
    full = {k: _check_labels(v, k, source) if k in ("pids", "camids") else v
            for k, v in small.items()}
    full["visibility"] = _check_visibility(full["visibility"], "visibility", source)
    if "paths" in full:
        full["paths"] = _check_paths(full["paths"], "paths", source)
    clean = mapped.get("clean_features")
    if clean is not None and clean.shape != mapped["features"].shape:
        raise PartFeatureError(source, "clean_features", f"shape mismatch: {clean.shape} "
                                                         f"but 'features' has "
                                                         f"{mapped['features'].shape}")
    if full["visibility"].shape[1] != probe.num_parts:
        raise PartFeatureError(source, "visibility", "M mismatch with 'features'")
    return PartFeatures(features=mapped["features"], clean_features=mapped.get(
        "clean_features"), **full)


def save_part_features(path: str | os.PathLike, pf: PartFeatures) -> None:
    """Validate ``pf`` and write it atomically to ``path`` (``.npz`` is appended if missing)."""
    path = _npz_path(path)
    clean = _normalise(pf.as_dict(), str(path))
    _atomic_savez(path, clean.as_dict())


def _write_npz(fh: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """What ``np.savez`` writes (stored members, ``.npy`` inside), but a memory-mapped array
    is streamed a row chunk at a time, each chunk's pages handed back after it is written
    (:func:`orgnn.io.storage.release_rows`): writing a mapped 3 GB result does not leave
    3 GB in the resident set."""
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            arr = np.asanyarray(value)
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                if not storage.is_mapped(arr) or arr.ndim == 0:
                    np.lib.format.write_array(member, arr, allow_pickle=False)
                    continue
                arr = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
                np.lib.format.write_array_header_1_0(  # np.savez's header for these
                    member, np.lib.format.header_data_from_array_1_0(arr))
                rows = storage.chunk_rows(arr)
                for start in range(0, arr.shape[0], rows):
                    member.write(np.ascontiguousarray(arr[start:start + rows]).tobytes())
                    storage.release_rows(arr, start, start + rows)


def _atomic_savez(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_npz(fh, arrays)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def load_split_dir(directory: str | os.PathLike, splits: Iterable[str] = SPLITS,
                   mapped: bool | None = False) -> dict[str, PartFeatures]:
    """Load ``directory/{split}.npz`` for each split; M and D must agree across splits.

    ``mapped``: ``True`` memory-maps each split's ``features`` (and ``clean_features``) in
    place instead of reading them (:func:`load_part_features_mapped`; the
    archive must be uncompressed, as :func:`save_part_features` writes it); ``None`` does so
    for uncompressed archives of at least :data:`MAP_FILE_BYTES`; ``False`` reads them."""
    directory = Path(directory)
    out: dict[str, PartFeatures] = {}
    sources: dict[str, str] = {}
    for split in splits:
        path = directory / f"{split}.npz"
        sources[split] = str(path)
        use_map = _mappable(path) if mapped is None else mapped
        out[split] = load_part_features_mapped(path) if use_map else load_part_features(path)
    _check_compatible(out, sources)
    return out


def _mappable(path: Path) -> bool:
    """Whether ``path`` is large enough to map and its features are stored uncompressed."""
    try:
        if path.stat().st_size < MAP_FILE_BYTES:
            return False
        with zipfile.ZipFile(path) as archive:
            return archive.getinfo("features.npy").compress_type == zipfile.ZIP_STORED
    except (OSError, KeyError, zipfile.BadZipFile):
        return False  # the ordinary reader reports what is wrong


def save_split_dir(directory: str | os.PathLike, splits: Mapping[str, PartFeatures]) -> None:
    """Validate every split (and their agreement) first, then write ``directory/{split}.npz``."""
    directory = Path(directory)
    checked: dict[str, PartFeatures] = {}
    sources: dict[str, str] = {}
    for split, pf in splits.items():
        sources[split] = str(directory / f"{split}.npz")
        checked[split] = _normalise(pf.as_dict(), sources[split])
    _check_compatible(checked, sources)
    for split, pf in checked.items():
        _atomic_savez(directory / f"{split}.npz", pf.as_dict())
