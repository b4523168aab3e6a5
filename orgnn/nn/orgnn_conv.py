from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch_geometric import EdgeIndex
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.nn.dense.linear import Linear
from torch_geometric.nn.resolver import activation_resolver
from torch_geometric.utils import is_torch_sparse_tensor, to_edge_index
from torch_geometric.utils.sparse import (
    set_sparse_value,
    to_torch_coo_tensor,
    to_torch_csc_tensor,
    to_torch_csr_tensor,
)

from orgnn.nn import _checks
from orgnn.nn.functional import CSRPattern, csr_orgnn_weights, sparse_orgnn_weights

# Dtypes for which torch offers the sparse-dense products of the CSR rendering on CPU.
_CSR_DTYPES = (torch.float32, torch.float64)


class ORGNNConv(MessagePassing):
    r"""The outlier-removable graph convolution from the "Neighbourhood-guided Feature
    Reconstruction for Occluded Person Re-Identification" paper (OR-GNN, Eq. 4-6).

    Each edge :math:`j \to i` gets the sender's confidence :math:`c_{ij}` (Eq. 4) and a
    learned affinity :math:`a_{ij}` (Eq. 6); a node becomes the confidence- and
    affinity-weighted mean of its neighbours, transformed by :math:`\mathbf{W}` (Eq. 5):

    .. math::
        \mathbf{S}_i &= \mathbf{x}_i + \textstyle\sum_{l \in \mathcal{N}(i) \setminus \{i\}}
            \mathbf{x}_l

        c_{ij} &= \max\big(0, \cos(\mathbf{x}_j, \mathbf{S}_i - \mathbf{x}_j)\big)

        a_{ij} &= \sigma\big(V \cdot ((\mathbf{x}_i - \mathbf{x}_j) \circ
            (\mathbf{x}_i - \mathbf{x}_j)) + b\big)

        \mathbf{x}^{\prime}_i &= \phi\Big(\mathbf{W}
            \frac{\sum_{j \in \mathcal{N}(i)} c_{ij} a_{ij} \mathbf{x}_j}
                 {\sum_{j \in \mathcal{N}(i)} c_{ij} a_{ij}}\Big)

    where :math:`\mathcal{N}(i)` are the senders of :math:`i` and :math:`\phi` is ``act``
    (the paper's ReLU by default). Eq. 4 compares a sender with the other members of the
    receiver's closed neighbourhood :math:`\{i\} \cup \mathcal{N}(i)` (their sum points where
    their mean does). On a complete graph :math:`\mathbf{S}_i` is the sum of all nodes, so
    :math:`c_{ij} = \cos(\mathbf{x}_j, \frac{1}{n-1}\sum_{l \ne j} \mathbf{x}_l)` is the
    paper's Eq. 4; on a bipartite graph of :math:`K` senders into one receiver it is the
    receiver's row of the complete graph over those :math:`K + 1` nodes (the OR-GNN read-out).

    With a pair ``(x_src, x_dst)`` of *different* tensors the two node sets are distinct
    (a bipartite graph: no edge is a self-loop); a single ``x`` (or the same tensor twice)
    is one node set, where an edge :math:`i \to i` is a self-loop. Negative cosines are
    clamped to 0; a self-loop at a node without other senders has :math:`c_{ii} = 1`; a zero
    denominator falls back to the plain mean; a node that receives no message outputs
    :math:`\phi(\mathbf{W}\mathbf{0} + \text{bias})`.

    The weights are computed without any :math:`|\mathcal{E}| \times F` tensor (sampled
    dense-dense products on a CSR adjacency, differentiable through the same products) and
    the messages aggregated by one sparse-dense product through
    :meth:`message_and_aggregate`. When the messages must be visible (an explainer's edge
    mask, message hooks), under ``torch.compile``, on the ``meta`` device or for dtypes
    other than float32/float64,
    they are gathered per edge and go through :meth:`message`, where the normalised weight
    :math:`c_{ij} a_{ij} / \sum_j c_{ij} a_{ij}` multiplies each one (so PyG's
    explainability edge masks apply to it). Both renderings compute the same function.

    **Source and target widths.** Both equations compare a receiver with its senders in one
    space: Eq. 6 subtracts them (:math:`\mathbf{x}_i - \mathbf{x}_j`) and Eq. 4 sums them
    (:math:`\mathbf{S}_i = \mathbf{x}_i + \sum_l \mathbf{x}_l`, then the cosine of
    :math:`\mathbf{x}_j` with :math:`\mathbf{S}_i - \mathbf{x}_j`). With senders of
    :math:`F_s` and receivers of :math:`F_t \ne F_s` features neither is defined, and a
    learned projection of one side would be a new layer, not the paper's. So
    ``in_channels`` may be a pair ``(in_src, in_dst)`` as in
    :class:`~torch_geometric.nn.conv.GATConv` (``(-1, -1)`` lazy, or one side lazy), but the
    two widths must be equal; project the receivers first (e.g. a
    :class:`~torch_geometric.nn.dense.linear.Linear`) when yours differ.

    Args:
        in_channels (int or tuple): Size of each input sample, or :obj:`-1` to derive it
            lazily; a pair ``(in_src, in_dst)`` for bipartite inputs, either side :obj:`-1`.
            The two sizes must be equal (see above).
        out_channels (int): Size of each output sample.
        bias (bool, optional): If set to :obj:`False`, :math:`\mathbf{W}` has no additive
            bias. (default: :obj:`True`)
        outlier_aware (bool, optional): If set to :obj:`False`, every :math:`c_{ij} = 1`
            (the paper's "GNN without outlier module"). (default: :obj:`True`)
        add_self_loops (bool, optional): If set to :obj:`True`, each node also receives its
            own message (existing self-loops are replaced); needs one node set.
            (default: :obj:`False`)
        act (str or Callable, optional): The non-linearity :math:`\phi`, as a name, a
            module or :obj:`None` for the pre-activation output (PyG's
            :func:`~torch_geometric.nn.resolver.activation_resolver`).
            (default: :obj:`"relu"`, the paper's)
        act_kwargs (Dict[str, Any], optional): Arguments of ``act``. (default: :obj:`None`)
        **kwargs (optional): Additional arguments of
            :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        - **input:**
          node features :math:`(|\mathcal{V}|, F_{in})` or
          :math:`((|\mathcal{V_s}|, F_{in}), (|\mathcal{V_t}|, F_{in}))`
          if bipartite,
          edge indices :math:`(2, |\mathcal{E}|)` (a tensor or an
          :class:`~torch_geometric.EdgeIndex`), or a torch sparse adjacency
          :math:`(|\mathcal{V_t}|, |\mathcal{V_s}|)` in PyG's transposed ``adj_t`` layout
        - **output:** node features :math:`(|\mathcal{V}|, F_{out})` or
          :math:`(|\mathcal{V}_t|, F_{out})` if bipartite, and with
          :obj:`return_attention_weights=True` also ``(edge_index, alpha)`` with
          ``alpha`` :math:`(|\mathcal{E}|,)`, or the sparse adjacency holding ``alpha`` when
          the input was one
    """

    SUPPORTS_FUSED_EDGE_INDEX = False

    def __init__(
        self,
        in_channels: int | tuple[int, int],
        out_channels: int,
        bias: bool = True,
        outlier_aware: bool = True,
        add_self_loops: bool = False,
        act: str | Any | None = "relu",
        act_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("aggr", "add")
        super().__init__(node_dim=0, **kwargs)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.outlier_aware = outlier_aware
        self.add_self_loops = add_self_loops
        self.act = activation_resolver(act, **(act_kwargs or {})) if act is not None else None
        width = input_width(in_channels, "ORGNNConv")
        self.lin = Linear(width, out_channels, bias=bias, weight_initializer="glorot",
                          bias_initializer="zeros")
        self.att = Linear(width, 1, bias=True, weight_initializer="glorot",
                          bias_initializer="zeros")
        self._pattern: CSRPattern | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.lin.reset_parameters()
        self.att.reset_parameters()

    def forward(
        self,
        x: Tensor | tuple[Tensor, Tensor],
        edge_index: Tensor,
        size: tuple[int, int] | None = None,
        return_attention_weights: bool | None = None,
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        r"""Runs the forward pass of the module.

        Args:
            x (torch.Tensor or (torch.Tensor, torch.Tensor)): The node features, or the
                source and target node features of a bipartite graph.
            edge_index (torch.Tensor): The edge indices (a ``(2, |E|)`` tensor, an
                :class:`torch_geometric.EdgeIndex`, or a torch sparse ``adj_t`` in COO, CSR
                or CSC layout).
            size ((int, int), optional): The shape ``(|V_s|, |V_t|)`` of the adjacency
                matrix; it must agree with ``x``.
            return_attention_weights (bool, optional): If set to :obj:`True`, also return
                ``(edge_index, alpha)`` with the normalised edge weights (the sparse
                adjacency with values ``alpha`` if ``edge_index`` was sparse; self-loops
                added by ``add_self_loops`` included).
        """
        name = "ORGNNConv"
        x_src, x_dst, bipartite = self._split_input(x)
        num_src, num_dst = x_src.size(0), x_dst.size(0)
        if _checks.checks_enabled():
            _checks.check_features(x_src, self.att.in_channels, name, rank=(2,))
            if bipartite:
                _checks.check_features(x_dst, self.att.in_channels, name, rank=(2,))
        if bipartite and x_src.size(-1) != x_dst.size(-1):
            raise ValueError(f"{name}: source and target features must have the same size "
                             f"(Eq. 6 subtracts them, Eq. 4 sums them), got "
                             f"{x_src.size(-1)} and {x_dst.size(-1)}; project one side "
                             f"first")
        if size is not None and (int(size[0]), int(size[1])) != (num_src, num_dst):
            raise ValueError(f"{name}: size {tuple(size)} does not match x "
                             f"({num_src} source and {num_dst} target nodes)")
        if self.add_self_loops and bipartite:
            raise ValueError(f"{name}: add_self_loops=True needs one node set (a single x "
                             f"or the same tensor twice), got a bipartite pair")
        if isinstance(self.att.weight, torch.nn.parameter.UninitializedParameter):
            self.att.initialize_parameters(None, (x_src,))

        graph = _Graph.from_input(edge_index, num_src, num_dst, self.add_self_loops, name,
                                  bipartite)
        att_weight, att_bias = self.att.weight.view(-1), self.att.bias
        if self._use_csr(x_src):
            crow, col, row, perm = graph.csr()
            pattern = CSRPattern(crow, col, num_src, row=row)
            alpha_csr = csr_orgnn_weights(x_src, x_dst, pattern, att_weight, att_bias,
                                          self.outlier_aware, bipartite)
            # PyG dispatches a sparse adjacency to message_and_aggregate, which multiplies by
            # the weights through ``pattern`` (its transpose is shared with Eq. 4/6's backward).
            self._pattern = pattern
            try:
                out = self.propagate(pattern.matrix(alpha_csr.detach()), source=x_src,
                                     alpha=alpha_csr)
            finally:
                self._pattern = None
            alpha = None
            if return_attention_weights:
                alpha = alpha_csr if perm is None else alpha_csr.new_empty(
                    alpha_csr.shape).index_copy_(0, perm, alpha_csr)
        else:
            src, dst = graph.src, graph.dst
            x_j = x_src.index_select(0, src)
            alpha = sparse_orgnn_weights(x_src, x_dst, src, dst, att_weight, att_bias,
                                         self.outlier_aware, bipartite, x_j=x_j)
            out = self.propagate(graph.edge_index, source=x_j, alpha=alpha,
                                 size=(num_src, num_dst))
        out = self.lin(out)
        if isinstance(self.act, torch.nn.ReLU):
            # In place: the linear layer's backward does not need its output.
            out = torch.nn.functional.relu(out, inplace=True)
        elif self.act is not None:
            out = self.act(out)
        if return_attention_weights:
            return out, graph.with_values(alpha)
        return out

    # ----------------------------------------------------------------------------------
    @staticmethod
    def _split_input(x: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, bool]:
        if isinstance(x, Tensor):
            return x, x, False
        if not isinstance(x, (tuple, list)) or len(x) != 2:
            raise TypeError("ORGNNConv: x must be a tensor or a pair (x_src, x_dst) of "
                            f"tensors, got {type(x).__name__}")
        x_src, x_dst = x
        if x_dst is None:
            raise ValueError("ORGNNConv: the target features x_dst are needed (Eq. 6 "
                             "compares each receiver with its senders), got None")
        return x_src, x_dst, x_dst is not x_src

    def _use_csr(self, x: Tensor) -> bool:
        """The CSR rendering, unless messages must go through :meth:`message`."""
        return not (self.explain or torch.compiler.is_compiling() or torch.jit.is_scripting()
                    or x.dtype not in _CSR_DTYPES or x.layout != torch.strided
                    or not _checks.has_values(x) or self._message_forward_pre_hooks
                    or self._message_forward_hooks)

    def message(self, source: Tensor, alpha: Tensor) -> Tensor:
        # ``source`` is x_j, gathered once in forward (shared with Eq. 4 and 6), edge-level.
        return alpha.unsqueeze(-1) * source

    def message_and_aggregate(self, adj_t: Tensor, source: Tensor, alpha: Tensor) -> Tensor:
        # ``source`` holds the senders' node features and ``alpha`` the normalised weights in
        # ``adj_t``'s CSR order: Eq. 5's sum is one sparse-dense product.
        pattern = self._pattern
        if pattern is None:
            pattern = CSRPattern(adj_t.crow_indices(), adj_t.col_indices(), adj_t.size(1))
        return pattern.spmm(alpha, source)

    def __repr__(self) -> str:
        extra = "" if self.outlier_aware else ", outlier_aware=False"
        if not isinstance(self.act, torch.nn.ReLU):
            extra += f", act={self.act}"
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}{extra})"


def input_width(in_channels: int | tuple[int, int], name: str) -> int:
    """The one input width of ``in_channels`` (an int, or a GATConv-style pair
    ``(in_src, in_dst)`` whose known sides must agree); :obj:`-1`: lazy."""
    if isinstance(in_channels, (tuple, list)):
        if len(in_channels) != 2 or not all(isinstance(c, int) for c in in_channels):
            raise TypeError(f"{name}: in_channels must be an int or a pair (in_src, in_dst) "
                            f"of ints, got {in_channels!r}")
        known = {c for c in in_channels if c > 0}
        if len(known) > 1:
            raise ValueError(f"{name}: in_channels {tuple(in_channels)}: senders and "
                             f"receivers must have the same width (Eq. 6 subtracts them, "
                             f"Eq. 4 sums them); project one side to the other's width "
                             f"first")
        return known.pop() if known else -1
    if not isinstance(in_channels, int):
        raise TypeError(f"{name}: in_channels must be an int or a pair (in_src, in_dst), "
                        f"got {type(in_channels).__name__}")
    return in_channels


class _Graph:
    """The edges of one forward call in the form the input came in, and as CSR over the
    receivers when asked (sorted once, and only when not in that order already, as a CSR
    ``adj_t`` usually is)."""

    def __init__(self, src: Tensor, dst: Tensor, num_src: int, num_dst: int,
                 original: Tensor, kind: str, crow: Tensor | None = None) -> None:
        self.src, self.dst = src, dst
        self.num_src, self.num_dst = num_src, num_dst
        self.original, self.kind = original, kind
        self._crow = crow
        self.loops_added = False

    @property
    def edge_index(self) -> Tensor:
        return torch.stack([self.src, self.dst], dim=0)

    @classmethod
    def from_input(cls, edge_index: Tensor, num_src: int, num_dst: int, add_self_loops: bool,
                   name: str, bipartite: bool) -> _Graph:
        if is_torch_sparse_tensor(edge_index):
            if tuple(edge_index.shape) != (num_dst, num_src):
                raise ValueError(f"{name}: the sparse adj_t has shape "
                                 f"{tuple(edge_index.shape)}, but x has {num_dst} target and "
                                 f"{num_src} source nodes (expected ({num_dst}, {num_src}))")
            if edge_index.layout == torch.sparse_csr:
                crow = edge_index.crow_indices().long()
                dst = torch.repeat_interleave(torch.arange(num_dst, device=crow.device),
                                              crow[1:] - crow[:-1],
                                              output_size=edge_index._nnz())
                graph = cls(edge_index.col_indices().long(), dst, num_src, num_dst,
                            edge_index, "sparse", crow=crow)
            else:
                (dst, src), _ = to_edge_index(edge_index)
                graph = cls(src.long(), dst.long(), num_src, num_dst, edge_index, "sparse")
        else:
            if _checks.checks_enabled():
                _checks.check_edge_index(edge_index, (num_src, num_dst) if bipartite
                                         else num_src, name)
            original = edge_index
            if isinstance(edge_index, EdgeIndex):
                edge_index = edge_index.as_tensor()
            edge_index = edge_index.long()   # int32 indices too (CSR keys need the range)
            graph = cls(edge_index[0], edge_index[1], num_src, num_dst, original, "edge_index")
        if add_self_loops:
            graph._replace_self_loops()
        return graph

    def _replace_self_loops(self) -> None:
        keep = self.src != self.dst
        loop = torch.arange(self.num_dst, device=self.src.device, dtype=self.src.dtype)
        self.src = torch.cat([self.src[keep], loop])
        self.dst = torch.cat([self.dst[keep], loop])
        self._crow, self.loops_added = None, True

    def csr(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(crow, col, row, perm)``: CSR over the receivers, senders ascending within each
        row (torch's sparse backward relies on that order); ``perm`` maps CSR positions to
        edge positions (:obj:`None` when the edges are in that order already)."""
        src, dst = self.src, self.dst
        key = dst * self.num_src + src
        perm = None
        if key.numel() > 1 and not bool((key[1:] >= key[:-1]).all()):
            perm = torch.sort(key, stable=True)[1]
            src, dst = src.index_select(0, perm), dst.index_select(0, perm)
        crow = self._crow if perm is None else None
        if crow is None:
            counts = torch.bincount(dst, minlength=self.num_dst)
            crow = torch.zeros(self.num_dst + 1, dtype=src.dtype, device=src.device)
            torch.cumsum(counts, 0, out=crow[1:])
        return crow, src, dst, perm

    def with_values(self, alpha: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """The adjacency in the input's form with the edge weights ``alpha`` (edge order)."""
        if self.kind == "edge_index":
            return (self.edge_index if self.loops_added else self.original), alpha
        if not self.loops_added:
            return set_sparse_value(self.original, alpha), alpha
        # Self-loops were added: a new sparse adjacency of the input's layout.
        adj_index = torch.stack([self.dst, self.src], dim=0)
        size = (self.num_dst, self.num_src)
        convert = {torch.sparse_coo: to_torch_coo_tensor, torch.sparse_csr: to_torch_csr_tensor,
                   torch.sparse_csc: to_torch_csc_tensor}[self.original.layout]
        return convert(adj_index, alpha, size), alpha
