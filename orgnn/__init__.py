"""orgnn: neighbourhood-guided feature reconstruction for occluded person Re-ID, on PyG.

The graph side (``orgnn.nn``, ``orgnn.search``, ``orgnn.graphs``, ``orgnn.metrics``,
``orgnn.pipeline``) needs only torch, PyG, numpy and faiss. The image side lives in
``orgnn.reid`` and is the only part that imports torchvision.
"""
from orgnn.nn import ORGNN, DenseORGNNConv, ORGNNConv

__version__ = "0.1.0"

__all__ = ["ORGNNConv", "DenseORGNNConv", "ORGNN", "__version__"]
