"""The PyG side: the OR-GNN layer (sparse and dense) and the per-part model."""
from orgnn.nn.dense_orgnn_conv import DenseORGNNConv
from orgnn.nn.model import ORGNN, PartwiseORGNNConv
from orgnn.nn.orgnn_conv import ORGNNConv

__all__ = ["ORGNNConv", "DenseORGNNConv", "ORGNN", "PartwiseORGNNConv"]
