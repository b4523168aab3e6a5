from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn.dense.linear import Linear
from torch_geometric.nn.resolver import activation_resolver

from orgnn.nn import _checks
from orgnn.nn.functional import dense_adj_orgnn_aggregate, dense_orgnn_aggregate


class DenseORGNNConv(torch.nn.Module):
    r"""The dense twin of :class:`orgnn.ORGNNConv` on padded batches: general graphs given
    by a dense adjacency, or (``adj=None``) complete graphs, where every valid node of a
    graph sends a message to every other valid node of that graph.

    .. math::
        \mathbf{x}^{\prime}_i = \phi\Big(\mathbf{W}
            \frac{\sum_{j \in \mathcal{N}(i)} c_{ij} a_{ij} \mathbf{x}_j}
                 {\sum_{j \in \mathcal{N}(i)} c_{ij} a_{ij}}\Big)

    with :math:`c_{ij}` (Eq. 4, the cosine between :math:`\mathbf{x}_j` and the other members
    of :math:`i`'s closed neighbourhood) and :math:`a_{ij}` (Eq. 6) as in
    :class:`ORGNNConv`, so both layers give the same output on the same edges. The
    affinities come from one batched matrix product through

    .. math::
        V \cdot (\mathbf{d}_{ij} \circ \mathbf{d}_{ij})
        = s_i + s_j - 2 \langle V \circ \mathbf{x}_i, \mathbf{x}_j \rangle,
        \qquad s_i = (\mathbf{x}_i \circ \mathbf{x}_i) \cdot V,

    and the confidences from matrix products too, so no :math:`B \times N \times N \times F`
    tensor is formed. Without ``adj`` (complete graphs, the OR-GNN neighbourhoods) the
    closed neighbourhood is the whole graph and Eq. 4 reduces to the paper's per-node
    :math:`c_j`, from each node's norm and its dot product with the nodes' sum
    (:func:`~orgnn.nn.functional.dense_orgnn_aggregate`);
    with ``adj`` it is computed per edge
    (:func:`~orgnn.nn.functional.dense_adj_orgnn_aggregate`, two more products).
    Parameter names equal :class:`ORGNNConv`'s, so either layer's ``state_dict`` loads into
    the other.

    Args:
        in_channels (int): Size of each input sample, or :obj:`-1` to derive it lazily.
        out_channels (int): Size of each output sample.
        bias (bool, optional): If set to :obj:`False`, :math:`\mathbf{W}` has no additive
            bias. (default: :obj:`True`)
        outlier_aware (bool, optional): If set to :obj:`False`, every :math:`c_{ij} = 1`.
            (default: :obj:`True`)
        add_self_loops (bool, optional): If set to :obj:`True`, each node also receives its
            own message. (default: :obj:`False`)
        act (str or Callable, optional): The non-linearity :math:`\phi`, as a name, a
            module or :obj:`None` for the pre-activation output. (default: :obj:`"relu"`,
            the paper's)
        act_kwargs (Dict[str, Any], optional): Arguments of ``act``. (default: :obj:`None`)

    As in :class:`~torch_geometric.nn.dense.DenseGATConv`, ``adj`` is a pattern: any
    non-zero entry is an edge, whatever its value (weighted adjacencies such as
    ``to_dense_adj(edge_index, edge_attr=w)`` are accepted). Its values are not used as
    weights, as :class:`ORGNNConv` ignores the values of a sparse adjacency: the OR-GNN
    weighs each edge by its own :math:`c_{ij} a_{ij}`, so both layers agree on the same
    pattern. Also as in PyG's dense layers, an unbatched :math:`(N, F_{in})` input is one
    graph and comes back with its batch dimension, :math:`(1, N, F_{out})`.

    Shapes:
        - **input:** node features :math:`(B, N, F_{in})` (or :math:`(N, F_{in})`: one
          graph), adjacency :math:`(B, N, N)` or :math:`(N, N)` (optional; non-zero = edge),
          mask :math:`(B, N)` or :math:`(N,)`, bool or 0/1, :obj:`True` for real nodes
          (optional)
        - **output:** node features :math:`(B, N, F_{out})` (:math:`(1, N, F_{out})` for an
          unbatched input), zero on padded nodes, and with
          :obj:`return_attention_weights=True` also the :math:`(B, N, N)` edge weights
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bias: bool = True,
        outlier_aware: bool = True,
        add_self_loops: bool = False,
        act: str | Any | None = "relu",
        act_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.outlier_aware = outlier_aware
        self.add_self_loops = add_self_loops
        self.act = activation_resolver(act, **(act_kwargs or {})) if act is not None else None
        self.lin = Linear(in_channels, out_channels, bias=bias, weight_initializer="glorot",
                          bias_initializer="zeros")
        self.att = Linear(in_channels, 1, bias=True, weight_initializer="glorot",
                          bias_initializer="zeros")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.lin.reset_parameters()
        self.att.reset_parameters()

    def forward(
        self,
        x: Tensor,
        adj: Tensor | None = None,
        mask: Tensor | None = None,
        return_attention_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        r"""Runs the forward pass of the module.

        Args:
            x (torch.Tensor): Node features :math:`(B, N, F)`; a 2-D input is one graph
                (the output is then :math:`(1, N, F_{out})`, as in PyG's dense layers).
            adj (torch.Tensor, optional): Adjacency :math:`(B, N, N)`, or :math:`(N, N)`
                shared by the batch: ``adj[b, i, j]`` non-zero (any value) when node
                :math:`j` sends a message to node :math:`i` (for undirected graphs simply
                the adjacency; for directed ones PyG's ``adj_t`` orientation, e.g.
                ``to_dense_adj(edge_index.flip(0))``); the diagonal holds self-loops.
                :obj:`None` (default) means complete graphs without self-loops, computed
                by a faster route.
            mask (torch.Tensor, optional): :math:`(B, N)` or :math:`(N,)`, bool or 0/1,
                :obj:`True` for real nodes; padded nodes send and receive nothing.
            return_attention_weights (bool, optional): Also return the :math:`(B, N, N)`
                normalised edge weights (row :math:`i` holds node :math:`i`'s incoming ones).
        """
        name = "DenseORGNNConv"
        checks = _checks.checks_enabled()
        if checks:
            _checks.check_features(x, self.in_channels, name, rank=(2, 3))
        if x.dim() == 2:  # one graph: (1, N, F) out, as PyG's dense layers
            x = x.unsqueeze(0)
        batch_size, num_nodes, _ = x.shape
        if adj is not None:
            if checks:
                self._check_adj(adj, batch_size, num_nodes)
            if adj.dim() == 2:
                adj = adj.unsqueeze(0)
        padded = mask is not None
        if mask is None:
            mask = torch.ones(1, num_nodes, dtype=torch.bool, device=x.device)
        else:
            if checks:
                _checks.check_mask(mask, ((batch_size, num_nodes), (num_nodes,)), name)
            mask = mask.view(-1, num_nodes)
        if mask.dtype != torch.bool:
            mask = mask != 0
        mask = mask.expand(batch_size, num_nodes)
        if isinstance(self.att.weight, torch.nn.parameter.UninitializedParameter):
            self.att.initialize_parameters(None, (x,))

        att_weight, att_bias = self.att.weight.view(-1), self.att.bias
        if num_nodes == 0:  # graphs without nodes: nothing to aggregate (and no row maxima)
            h, alpha = x.new_zeros(x.shape), x.new_zeros(batch_size, 0, 0)
        elif adj is None:
            h, alpha = dense_orgnn_aggregate(
                x, mask, att_weight, att_bias, outlier_aware=self.outlier_aware,
                add_self_loops=self.add_self_loops)
        else:
            h, alpha = dense_adj_orgnn_aggregate(
                x, adj, mask, att_weight, att_bias, outlier_aware=self.outlier_aware,
                add_self_loops=self.add_self_loops)
        out = self.lin(h)
        if isinstance(self.act, torch.nn.ReLU):
            # In place where autograd allows: the linear layer's backward does not need it.
            out = F.relu(out, inplace=True)
        elif self.act is not None:
            out = self.act(out)
        if padded:  # zero the padded rows (without a mask there are none)
            keep = mask.unsqueeze(-1).to(out.dtype)
            out = out * keep if torch.is_grad_enabled() else out.mul_(keep)
        return (out, alpha) if return_attention_weights else out

    @staticmethod
    def _check_adj(adj: Tensor, batch_size: int, num_nodes: int) -> None:
        name = "DenseORGNNConv"
        if not isinstance(adj, Tensor):
            raise TypeError(f"{name}: adj must be a torch.Tensor, got {type(adj).__name__}")
        shapes = ((batch_size, num_nodes, num_nodes), (1, num_nodes, num_nodes),
                  (num_nodes, num_nodes))
        if tuple(adj.shape) not in shapes:
            hint = (" (a node mask goes in mask=: forward(x, adj=None, mask=None))"
                    if tuple(adj.shape) in ((batch_size, num_nodes), (num_nodes,)) else "")
            raise ValueError(f"{name}: adj must have shape {shapes[0]} or {shapes[2]} to "
                             f"match x, got {tuple(adj.shape)}{hint}")
        if adj.is_sparse or adj.layout != torch.strided:
            raise TypeError(f"{name}: adj must be a dense tensor (use ORGNNConv for sparse "
                            f"adjacencies), got layout {adj.layout}")
        _checks.check_finite(adj, name, "adj")  # any other value: non-zero = edge

    def __repr__(self) -> str:
        extra = "" if self.outlier_aware else ", outlier_aware=False"
        if not isinstance(self.act, torch.nn.ReLU):
            extra += f", act={self.act}"
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}{extra})"
