"""orgnn: neighbourhood-guided feature reconstruction for occluded person Re-ID, on PyG.

The graph side (``orgnn.nn``, ``orgnn.retrieval.search``, ``orgnn.reconstruction.graphs``,
``orgnn.retrieval.metrics``, ``orgnn.reconstruction.pipeline``) needs only torch, PyG, numpy and
faiss. The image side lives in ``orgnn.reid`` and is the only part that imports torchvision.

The package is grouped by stage of the data flow (``docs/layout.md``): ``orgnn.io`` (part-feature
files) -> ``orgnn.retrieval`` (search, metrics) -> ``orgnn.reconstruction`` (-> ``orgnn.nn``)
-> ``orgnn.cli``. The flat layout's module paths still import, with a ``DeprecationWarning``
naming the new one, for one release (:mod:`orgnn._moved`).

The layers are imported on first use (``orgnn.ORGNNConv``), so that ``import orgnn`` and
``orgnn --help`` do not load torch and PyG.
"""
from __future__ import annotations

import importlib
from typing import Any

from orgnn import _moved

__version__ = "0.1.0"

__all__ = ["ORGNNConv", "DenseORGNNConv", "ORGNN", "__version__"]

_LAZY = {"ORGNNConv": "orgnn.nn", "DenseORGNNConv": "orgnn.nn", "ORGNN": "orgnn.nn"}

# the flat layout's module paths, deprecated, for one release
_moved.install()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'orgnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
