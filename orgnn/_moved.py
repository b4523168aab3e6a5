"""The module paths of the flat layout (``orgnn.metrics``, ``orgnn.search``, ...), kept
importing for one release with a :class:`DeprecationWarning` that names the new home.

No file stays at an old path: a finder at the front of :data:`sys.meta_path` answers only
the names in :data:`MOVED` (before any other finder, so a stale copy of the old layout on the
path, an older editable install say, is never picked up) and hands back the module at the new
path itself, so ``import orgnn.metrics``, ``from orgnn.metrics import evaluate`` and
``from orgnn import metrics`` give the very object ``orgnn.retrieval.metrics`` is (a
monkeypatch through either name is seen through both). The warning is raised once per
process and old name, at the line that imports it. Delete this module, and its one line in
``orgnn/__init__.py``, in the release after.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from types import ModuleType

#: old module path -> new module path
MOVED = {
    "orgnn.features": "orgnn.io.features",
    "orgnn.storage": "orgnn.io.storage",
    "orgnn.io_atomic": "orgnn.io.atomic",
    "orgnn.search": "orgnn.retrieval.search",
    "orgnn.metrics": "orgnn.retrieval.metrics",
    "orgnn.query_expansion": "orgnn.retrieval.query_expansion",
    "orgnn.outliers": "orgnn.reconstruction.outliers",
    "orgnn.calibration": "orgnn.reconstruction.calibration",
    "orgnn.validation": "orgnn.reconstruction.validation",
    "orgnn.graphs": "orgnn.reconstruction.graphs",
    "orgnn.training": "orgnn.reconstruction.training",
    "orgnn.pipeline": "orgnn.reconstruction.pipeline",
    "orgnn.cli_args": "orgnn.cli.args",
    "orgnn.commands": "orgnn.cli.commands",
    "orgnn.viz_commands": "orgnn.cli.figures",
}

_IMPORTLIB = os.path.dirname(importlib.__file__)


def _importer_stacklevel() -> int:
    """``stacklevel`` for a warning raised in :meth:`_Alias.create_module` that points at the
    importing line: :func:`warnings.warn` skips the import system's ``_bootstrap`` frames by
    itself; ``importlib.import_module``'s own frame is counted here and stepped over."""
    level, frame = 2, sys._getframe(2)  # 0: this function, 1: create_module
    while frame is not None:
        name = frame.f_code.co_filename
        if not ("importlib" in name and "_bootstrap" in name):
            if not name.startswith(_IMPORTLIB):
                return level
            level += 1
        frame = frame.f_back
    return level


class _Alias(importlib.abc.Loader):
    """Loads an old name as the module at its new path (imported, not copied)."""

    def __init__(self, new: str) -> None:
        self.new = new
        self.spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} is deprecated and will be removed in the next release; "
                      f"import {self.new} instead", DeprecationWarning,
                      stacklevel=_importer_stacklevel())
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system stamped the alias's spec on the module: give it its own back
        module.__spec__ = self.spec


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old names of :data:`MOVED` (and nothing else)."""

    def find_spec(self, fullname: str, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put the finder first on :data:`sys.meta_path` (once)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
