"""Outputs that are never half-written: single files, file sets and whole folders.

Every file is written to a temporary sibling (same folder, so the same file system), flushed
to disk and made visible with one :func:`os.replace`. Several outputs that belong together
are committed as a *set*:

* a **folder** (``orgnn reconstruct --out DIR``) is built completely as a hidden sibling
  ``.DIR.orgnn-new-<pid>-<random>`` and then swapped with ``DIR``. On Linux the swap is one
  ``renameat2(RENAME_EXCHANGE)`` call, so at every instant ``DIR`` is either the complete old
  folder or the complete new one. Where that call is missing (other systems, some file
  systems) the swap is two renames, ``DIR -> .DIR.orgnn-old`` then the new folder ``-> DIR``;
  should the process die between them (only ``SIGKILL`` or a power cut can: signals are held
  back, see below), the next write to ``DIR`` first renames the complete old folder back.
  Entries of an existing ``DIR`` that the command does not write (``DIR/train.npz`` ...) are
  carried into the new folder as hard links (copies across devices).
* **files in different places** that belong together (``plot-cmc``'s PNG and JSON) are
  written to temporary siblings first and renamed in a fixed order, data first and the JSON
  description last, so a reader never sees a new JSON beside an old figure; the JSON also
  records the figure's SHA-256, so the only other mixture (a new figure beside the old
  JSON, possible only if the process is killed with ``SIGKILL`` between the two renames)
  is detectable.

The renames of a set run inside :func:`signals_held`: a ``SIGINT``/``SIGTERM`` that arrives
then is delivered right after the set is complete. :data:`committed` lists what this process
has made visible, so an interrupted command can say exactly what it wrote.

New files get mode ``0o666 & ~umask`` and new folders ``0o777 & ~umask`` (a replaced folder
keeps its mode), like any file a plain ``open()`` creates.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_json_atomic", "file_mode", "dir_mode",
           "signals_held", "committed", "FileSet", "replace_dir", "sha256_file", "pid_alive"]

#: Paths this process has made visible (each complete), in commit order.
committed: list[str] = []

_HELD_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None),
                                  getattr(signal, "SIGTERM", None)) if s is not None)
_NEW_TAG, _OLD_TAG = ".orgnn-new-", ".orgnn-old"


# --------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------
def _umask() -> int:
    try:  # Linux >= 4.7: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode ``os.mkdir`` would give a new folder: ``0o777 & ~umask``."""
    return 0o777 & ~_umask()


# --------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------
def pause_for_tests(step: str) -> None:
    """Sleep ``$ORGNN_TEST_WRITE_PAUSE`` seconds at each step of a write (tests only: it
    widens the write phase so that an interruption test can land inside it)."""
    pause = os.environ.get("ORGNN_TEST_WRITE_PAUSE")
    if pause:
        time.sleep(float(pause))


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold ``SIGINT``/``SIGTERM`` back for the duration of the block, then deliver them.

    The Python-level handlers are swapped for one that only records the signal (so a
    ``KeyboardInterrupt`` cannot be raised between two renames of a set, even for a signal
    that the C-level handler caught just before the block); afterwards the original handler
    is called once per recorded signal. Outside the main thread this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def record(signum: int, frame: Any) -> None:
        pending.append(signum)

    previous: dict[int, Any] = {}
    try:
        for sig in _HELD_SIGNALS:
            previous[sig] = signal.signal(sig, record)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            handler = previous.get(sig)
            if callable(handler):
                handler(sig, None)
            elif handler != signal.SIG_IGN:
                signal.raise_signal(sig)


# --------------------------------------------------------------------------------------
# Single files
# --------------------------------------------------------------------------------------
def _temp_sibling(path: Path, suffix: str = ".tmp") -> Path:
    return path.with_name(f".{path.name}{_NEW_TAG}{os.getpid()}-{secrets.token_hex(4)}"
                          f"{suffix}")


def _write_temp(path: Path, write: Callable[[IO[bytes]], None], suffix: str = ".tmp") -> Path:
    """Write a complete, synced temporary sibling of ``path`` with ``write`` and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, suffix)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(binary_handle)`` into a temporary sibling, then one
    rename: readers see the old file or the complete new one, never a part."""
    path = Path(path)
    return FileSet().add(path, write).commit()[0]


def _json_bytes(payload: Any) -> bytes:
    return (json.dumps(payload, indent=2) + "\n").encode()


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """Write JSON through a temporary file and a rename: never a half-written file."""
    data = _json_bytes(payload)
    return atomic_write(path, lambda handle: handle.write(data))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FileSet:
    """Files that become visible together, in the order added (add the description last).

    ``add`` writes each member to a temporary sibling at once; ``commit`` renames them all
    inside :func:`signals_held`. Leaving a ``with FileSet() as s:`` block without a commit
    (an error, an interruption) removes the temporary files and touches no output.
    """

    def __init__(self) -> None:
        self._members: list[tuple[Path, Path]] = []

    def add(self, path: str | os.PathLike, write: Callable[[IO[bytes]], None] | None = None,
            *, temp: str | os.PathLike | None = None) -> FileSet:
        """Stage ``path``: written by ``write`` now, or already written at ``temp`` (a path
        from :meth:`temp_path`)."""
        path = Path(path)
        if temp is None:
            temp = _write_temp(path, write)
        self._members.append((Path(temp), path))
        pause_for_tests(f"staged {path}")
        return self

    def add_json(self, path: str | os.PathLike, payload: Any) -> FileSet:
        data = _json_bytes(payload)
        return self.add(path, lambda handle: handle.write(data))

    @staticmethod
    def temp_path(path: str | os.PathLike, suffix: str = "") -> Path:
        """A fresh temporary sibling of ``path`` for a writer that wants a file name."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return _temp_sibling(path, suffix or path.suffix or ".tmp")

    def commit(self) -> list[Path]:
        with signals_held():
            for temp, final in self._members:
                os.replace(temp, final)
                committed.append(str(final))
                pause_for_tests(f"committed {final}")
            done = [final for _, final in self._members]
            self._members = []
        return done

    def discard(self) -> None:
        for temp, _ in self._members:
            temp.unlink(missing_ok=True)
        self._members = []

    def __enter__(self) -> FileSet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.discard()


# --------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {b} with its new version: {os.strerror(err)}", str(b))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (this process counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dir(path: str | os.PathLike) -> None:
    """Finish or undo a folder swap that a killed process left halfway (see module doc),
    and remove the temporary folders of processes that no longer run."""
    path = Path(path)
    backup = path.with_name(f".{path.name}{_OLD_TAG}")
    if backup.is_dir() and not path.exists() and not path.is_symlink():
        os.rename(backup, path)  # the complete old set comes back
    elif backup.is_dir():
        shutil.rmtree(backup, ignore_errors=True)  # the new set is in place
    pattern = re.compile(re.escape(f".{path.name}{_NEW_TAG}") + r"(\d+)-[0-9a-f]+$")
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            match = pattern.match(entry.name)
            if match and entry.is_dir() and not pid_alive(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) the entries of ``old`` that ``new`` does not have."""
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or target.is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))


def replace_dir(path: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """Make folder ``path`` the output of ``build(temp_folder)`` in one swap.

    ``build`` fills a hidden sibling folder; an exception or interruption there removes it
    and leaves ``path`` as it was. Then the entries of the old ``path`` that ``build`` did not
    write are carried over, and the folders are swapped (see the module doc). A symbolic
    link ``path`` is followed: the folder it points to is replaced.
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(path))
    new = path.with_name(f".{path.name}{_NEW_TAG}{os.getpid()}-{secrets.token_hex(4)}")
    new.mkdir()
    try:
        build(new)
        old_mode = stat.S_IMODE(path.stat().st_mode) if path.is_dir() else dir_mode()
        os.chmod(new, old_mode)
        if path.is_dir():
            _carry_over(path, new)
        pause_for_tests(f"built {path}")
        with signals_held():
            if not path.exists():
                os.rename(new, path)
            elif _exchange(new, path):
                pause_for_tests(f"swapped {path}")
            else:
                backup = path.with_name(f".{path.name}{_OLD_TAG}")
                os.rename(path, backup)
                pause_for_tests(f"moved the old {path} aside")
                os.rename(new, path)
                os.rename(backup, new)
            committed.append(str(path))
            shutil.rmtree(new, ignore_errors=True)  # now the old set
    except BaseException:
        with signals_held():
            backup = path.with_name(f".{path.name}{_OLD_TAG}")
            if backup.is_dir() and not path.exists():
                os.rename(backup, path)  # a failed two-rename swap: the old set stays
            if new.exists():
                shutil.rmtree(new, ignore_errors=True)
        raise
    return path
