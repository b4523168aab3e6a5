from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.nn.dense.linear import Linear
from torch_geometric.utils import add_self_loops as add_self_loops_fn
from torch_geometric.utils import is_torch_sparse_tensor, remove_self_loops, to_edge_index
from torch_geometric.utils.sparse import set_sparse_value

from orgnn.nn import _checks
from orgnn.nn.functional import sparse_affinity_logits, sparse_confidence, sparse_edge_weights


class ORGNNConv(MessagePassing):
    r"""The outlier-removable graph convolution from the "Neighbourhood-guided Feature
    Reconstruction for Occluded Person Re-Identification" paper (OR-GNN, Eq. 4-6).

    Each node's confidence is the cosine between its feature and the mean of the nodes that
    send it messages (Eq. 4); each edge gets a learned affinity (Eq. 6); a node becomes the
    confidence- and affinity-weighted mean of its neighbours, transformed by
    :math:`\mathbf{W}` (Eq. 5):

    .. math::
        c_j &= \max\Big(0, \cos\big(\mathbf{x}_j,
            \tfrac{1}{|\mathcal{N}(j)|}\textstyle\sum_{l \in \mathcal{N}(j)} \mathbf{x}_l
            \big)\Big)

        a_{ij} &= \sigma\big(V \cdot ((\mathbf{x}_i - \mathbf{x}_j) \circ
            (\mathbf{x}_i - \mathbf{x}_j)) + b\big)

        \mathbf{x}^{\prime}_i &= \mathrm{ReLU}\Big(\mathbf{W}
            \frac{\sum_{j \in \mathcal{N}(i)} c_j a_{ij} \mathbf{x}_j}
                 {\sum_{j \in \mathcal{N}(i)} c_j a_{ij}}\Big)

    where :math:`\mathcal{N}(i)` are the nodes with an edge to :math:`i` (self-loops are
    left out of Eq. 4). Negative confidences are clamped to 0; a node without other senders
    has :math:`c_j = 1`; a zero denominator falls back to the plain mean; a node that
    receives no message outputs :math:`\mathrm{ReLU}(\mathbf{W}\mathbf{0} + \text{bias})`.
    The normalised weight :math:`c_j a_{ij} / \sum_j c_j a_{ij}` multiplies each message
    inside :meth:`message`, so PyG's explainability edge masks apply to it.

    Args:
        in_channels (int): Size of each input sample, or :obj:`-1` to derive it lazily.
        out_channels (int): Size of each output sample.
        bias (bool, optional): If set to :obj:`False`, :math:`\mathbf{W}` has no additive
            bias. (default: :obj:`True`)
        outlier_aware (bool, optional): If set to :obj:`False`, every :math:`c_j = 1`
            (the paper's "GNN without outlier module"). (default: :obj:`True`)
        add_self_loops (bool, optional): If set to :obj:`True`, each node also receives its
            own message (existing self-loops are replaced). (default: :obj:`False`)
        **kwargs (optional): Additional arguments of
            :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        - **input:**
          node features :math:`(|\mathcal{V}|, F_{in})`,
          edge indices :math:`(2, |\mathcal{E}|)` (or a sparse adjacency
          :math:`(|\mathcal{V}|, |\mathcal{V}|)` in PyG's transposed ``adj_t`` layout)
        - **output:** node features :math:`(|\mathcal{V}|, F_{out})` or
          :math:`((|\mathcal{V}|, F_{out}), ((2, |\mathcal{E}|), (|\mathcal{E}|)))`
          if :obj:`return_attention_weights=True`
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bias: bool = True,
        outlier_aware: bool = True,
        add_self_loops: bool = False,
        **kwargs,
    ) -> None:
        kwargs.setdefault("aggr", "add")
        super().__init__(node_dim=0, **kwargs)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.outlier_aware = outlier_aware
        self.add_self_loops = add_self_loops
        self.lin = Linear(in_channels, out_channels, bias=bias, weight_initializer="glorot",
                          bias_initializer="zeros")
        self.att = Linear(in_channels, 1, bias=True, weight_initializer="glorot",
                          bias_initializer="zeros")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.lin.reset_parameters()
        self.att.reset_parameters()

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        size: tuple[int, int] | None = None,
        return_attention_weights: bool | None = None,
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        r"""Runs the forward pass of the module.

        Args:
            x (torch.Tensor): The node features.
            edge_index (torch.Tensor): The edge indices (a ``(2, |E|)`` tensor, an
                :class:`torch_geometric.EdgeIndex`, or a torch sparse ``adj_t``).
            size ((int, int), optional): The shape of the adjacency matrix.
            return_attention_weights (bool, optional): If set to :obj:`True`, also return
                ``(edge_index, alpha)`` with the normalised edge weights.
        """
        sparse_input = is_torch_sparse_tensor(edge_index)
        adj_t = edge_index
        if sparse_input:
            (dst, src), _ = to_edge_index(edge_index)
            edge_index = torch.stack([src, dst], dim=0)
        num_nodes = x.size(0)
        if _checks.checks_enabled():
            _checks.check_features(x, self.in_channels, "ORGNNConv", rank=(2,))
            _checks.check_edge_index(edge_index, num_nodes, "ORGNNConv")
        if self.add_self_loops:
            edge_index, _ = remove_self_loops(edge_index)
            edge_index, _ = add_self_loops_fn(edge_index, num_nodes=num_nodes)

        # Two gathers of edge features in all: x_j (shared by Eq. 4, Eq. 6 and the messages)
        # and x_i (Eq. 6).
        src, dst = edge_index[0], edge_index[1]
        x_j = x.index_select(0, src)
        if self.outlier_aware:
            confidence = sparse_confidence(x, src, dst, x_src=x_j)
        else:
            confidence = x.new_ones(num_nodes)
        logits = sparse_affinity_logits(x.index_select(0, dst), x_j, self.att.weight.view(-1),
                                        self.att.bias)
        alpha = sparse_edge_weights(confidence.index_select(0, src), logits, dst, num_nodes)
        out = self.propagate(edge_index, source=x_j, alpha=alpha,
                             size=size if size is not None else (num_nodes, num_nodes))
        out = F.relu(self.lin(out))

        if return_attention_weights:
            if sparse_input and not self.add_self_loops:
                return out, (set_sparse_value(adj_t, alpha), alpha)
            return out, (edge_index, alpha)
        return out

    def message(self, source: Tensor, alpha: Tensor) -> Tensor:
        # ``source`` is x_j, gathered once in forward and passed edge-level.
        return alpha.unsqueeze(-1) * source

    def __repr__(self) -> str:
        extra = "" if self.outlier_aware else ", outlier_aware=False"
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}{extra})"
