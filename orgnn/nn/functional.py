r"""The OR-GNN update (Eq. 4-6) as plain tensor functions, shared by every layer.

Two renderings of one rule:

* the **dense** one works on padded batches ``(..., N, F)`` and touches the features only
  through matrix products: :math:`X\mathbf{T}` (:math:`\mathbf{T}` the sum of the valid
  nodes) gives every neighbour-sum dot product of Eq. 4, and :math:`P = (X \circ V) X^\top`
  gives Eq. 6 through

  .. math::
      V \cdot \big((\mathbf{x}_i - \mathbf{x}_j) \circ (\mathbf{x}_i - \mathbf{x}_j)\big)
      = s_i + s_j - 2 \langle V \circ \mathbf{x}_i, \mathbf{x}_j \rangle,
      \qquad s_i = P_{ii},

  so no ``B x N x N x F`` tensor is ever formed;
* the **sparse** one works on an ``edge_index`` (``src -> dst``) with scatter reductions.

Leading dimensions broadcast, which is how the per-part model runs all parts in one call.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch_geometric.utils import scatter

# Squared norms below this count as zero (cosine 0, not NaN).
_EPS = 1e-12
# A sum of confidence x relative-affinity weights below this counts as zero (plain mean).
_MIN_DENOM = 1e-12


def _exp_shifted(log_a: Tensor, row_max: Tensor) -> Tensor:
    r""":math:`\exp(\log a - \max)`: each row's affinities relative to its largest one.

    Eq. 5 divides by the sum of the weights, so scaling a row by a constant changes nothing;
    in this form the largest affinity of a row is exactly 1 and the row cannot underflow to 0
    (or to denormals, whose reciprocal overflows) however large :math:`|V \cdot d^2|` grows.
    ``row_max`` (broadcast to ``log_a``) must be detached: the shift cancels in the fraction.
    Rows without edges (max :math:`-\infty`) are left unshifted.
    """
    return torch.exp(log_a - torch.where(torch.isfinite(row_max), row_max, 0.0))


def _safe_cosine(dot: Tensor, sq_norm_a: Tensor, sq_norm_b: Tensor) -> Tensor:
    # Clamp before the square root: its gradient at 0 is infinite (NaN once masked).
    denom = (sq_norm_a.clamp_min(0) * sq_norm_b.clamp_min(0)).clamp_min(_EPS * _EPS).sqrt()
    return dot / denom


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# --------------------------------------------------------------------------------------
# Dense rendering
# --------------------------------------------------------------------------------------
def dense_confidence(sq_norm: Tensor, dot_total: Tensor, valid: Tensor) -> Tensor:
    r"""Eq. 4 on padded complete graphs, from two per-node scalars.

    .. math::
        c_j = \max\Big(0, \cos\big(\mathbf{x}_j, \textstyle\sum_{l \ne j} \mathbf{x}_l\big)\Big)

    (the cosine to the mean equals the cosine to the sum). With :math:`\mathbf{T} =
    \sum_l \mathbf{x}_l` over the valid nodes, :math:`\langle \mathbf{x}_j, \mathbf{T} -
    \mathbf{x}_j\rangle = \langle \mathbf{x}_j, \mathbf{T}\rangle - |\mathbf{x}_j|^2` and
    :math:`|\mathbf{T} - \mathbf{x}_j|^2 = |\mathbf{T}|^2 - 2\langle \mathbf{x}_j,
    \mathbf{T}\rangle + |\mathbf{x}_j|^2`: two numbers per node, :math:`O(NF)` for a
    graph (:math:`X\mathbf{T}` and the row norms; no :math:`N \times N` Gram matrix). A node
    with no other valid node gets :math:`c_j = 1`.

    Args:
        sq_norm: ``(..., N)`` squared norms :math:`|\mathbf{x}_j|^2`.
        dot_total: ``(..., N)`` dot products :math:`\langle \mathbf{x}_j, \mathbf{T}\rangle`.
        valid: ``(..., N)`` float 0/1 node mask.

    Returns:
        ``(..., N)`` confidences in :math:`[0, 1]` (0 on padded nodes).
    """
    sq_total = (dot_total * valid).sum(-1, keepdim=True)          # |T|^2
    dot_others = dot_total - sq_norm                              # <x_j, T - x_j>
    sq_others = (sq_total - dot_total) - dot_others               # |T - x_j|^2
    cos = _safe_cosine(dot_others, sq_norm, sq_others).clamp_min(0)
    has_others = valid.sum(-1, keepdim=True) > valid              # another valid node exists
    return torch.where(has_others, cos, 1.0) * valid


def dense_orgnn_aggregate(
    x: Tensor,
    valid: Tensor,
    att_weight: Tensor,
    att_bias: Tensor,
    outlier_aware: bool = True,
    add_self_loops: bool = False,
    rows: int | None = None,
    node_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The normalised weighted sum of Eq. 5 (before :math:`\mathbf{W}` and ReLU) on padded
    complete graphs.

    .. math::
        \mathbf{h}_i = \frac{\sum_{j \ne i} c_j a_{ij} \mathbf{x}_j}{\sum_{j \ne i} c_j a_{ij}},
        \qquad a_{ij} = \sigma\big(V \cdot (\mathbf{d}_{ij} \circ \mathbf{d}_{ij}) + b\big)

    A zero denominator falls back to the plain mean over the neighbours; a node without any
    neighbour aggregates to zero.

    The features are touched by two batched :math:`N \times N` matrix products and one
    elementwise pass (:math:`X \circ V`): :math:`P = (X \circ V) X^\top` for Eq. 6 and
    :math:`\alpha X` for Eq. 5; Eq. 4 needs only :math:`|\mathbf{x}_j|^2` and
    :math:`\langle \mathbf{x}_j, \mathbf{T}\rangle` (:math:`O(NF)`, no Gram matrix);
    everything else works on ``(..., R, N)`` weights (about ten passes over them, each
    ``F / N`` times smaller than one over the features).

    Args:
        x: ``(..., N, F)`` node features.
        valid: ``(..., N)`` bool or 0/1 mask of real (non-padded) nodes.
        att_weight: :math:`V`, broadcastable to ``(..., N, F)`` (e.g. ``(F,)``, or
            ``(M, 1, F)`` for ``M`` grouped parts).
        att_bias: :math:`b`, broadcastable to ``(..., R, N)``.
        outlier_aware: use Eq. 4's confidence; ``False`` sets :math:`c = 1`.
        add_self_loops: let each node also receive its own message.
        rows: compute the output only for the first ``rows`` nodes (``R = rows``; the
            OR-GNN read-out needs only the target, row 0). ``None`` means all ``N``.
        node_weight: ``(..., N)`` non-negative prior :math:`w_j` of each sender (e.g. a learned
            "same identity as the target" probability); it multiplies :math:`c_j a_{ij}`.
            ``None`` means :math:`w = 1`.

    Returns:
        ``(h, alpha)``: ``(..., R, F)`` aggregated features and ``(..., R, N)`` edge weights.
    """
    valid = valid.to(x.dtype)
    num_nodes = x.size(-2)
    r = num_nodes if rows is None else rows
    x_t = x.transpose(-1, -2)

    # Eq. 6 through the identity: logits_ij = s_i + s_j - 2 <V o x_i, x_j> + b.
    if r == num_nodes:
        vx = x * att_weight
        cross = vx @ x_t                                           # (..., N, N)
        s = cross.diagonal(dim1=-2, dim2=-1)
    else:  # s needs every node's (x o V) . x: one batched dot product, no (x o V) o x
        vx = x * att_weight
        cross = vx[..., :r, :] @ x_t                               # (..., R, N)
        s = torch.einsum("...f,...f->...", vx, x)                   # batched dots, no product
    logits = s[..., :r].unsqueeze(-1) + (s.unsqueeze(-2) + att_bias)
    logits = logits.add_(cross, alpha=-2)

    # Which (i, j) pairs carry a message: both valid, and j != i unless self-loops.
    valid_rows = valid[..., :r]
    edge = valid_rows.unsqueeze(-1) * valid.unsqueeze(-2)
    if not add_self_loops:
        edge = edge.masked_fill(torch.eye(r, num_nodes, dtype=torch.bool, device=x.device), 0)
    # a_ij / max_j a_ij over the edges, from log-sigmoids (see _exp_shifted).
    log_a = torch.nn.functional.logsigmoid(logits).masked_fill(edge == 0, float("-inf"))
    affinity = _exp_shifted(log_a, log_a.detach().amax(-1, keepdim=True))
    if outlier_aware:
        # Eq. 4 needs two numbers per node, O(NF): no Gram matrix.
        sq_norm = torch.einsum("...nf,...nf->...n", x, x)          # |x_j|^2
        total = (valid.unsqueeze(-2) @ x).transpose(-1, -2)        # T = sum_l x_l  (..., F, 1)
        dot_total = (x @ total).squeeze(-1)                       # <x_j, T>
        weight = affinity * dense_confidence(sq_norm, dot_total, valid).unsqueeze(-2)
    else:
        weight = affinity
    if node_weight is not None:
        weight = weight * node_weight.to(weight.dtype).unsqueeze(-2)

    # Normalise; a (numerically) zero denominator falls back to the plain mean over the edges.
    denom = weight.sum(-1, keepdim=True)
    has_weight = denom > _MIN_DENOM
    num_valid = valid.sum(-1, keepdim=True)
    degree = valid_rows * (num_valid if add_self_loops else num_valid - 1)   # (..., R)
    fallback = (~has_weight) / degree.unsqueeze(-1).clamp_min(1)
    alpha = torch.addcmul(weight * (has_weight / torch.where(has_weight, denom, 1)), edge,
                          fallback)
    reusable = vx.shape == x.shape and vx.dtype == x.dtype
    if r == num_nodes and reusable and not torch.compiler.is_compiling() and \
            not _needs_grad(x, att_weight, att_bias):
        # Inference: X o V is dead by now, and its buffer is the size of the output; reusing
        # it spares a fresh allocation (page faults) as large as the features.
        return torch.matmul(alpha, x, out=vx), alpha
    return alpha @ x, alpha


# --------------------------------------------------------------------------------------
# Sparse rendering
# --------------------------------------------------------------------------------------
def _expand_like(edge_values: Tensor, x: Tensor) -> Tensor:
    """View an ``(E,)`` tensor so it broadcasts against ``(E, ...)`` of ``x``'s rank."""
    return edge_values.view(-1, *([1] * (x.dim() - 1)))


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products over the last axis as batched matrix products (no ``a * b``)."""
    return torch.einsum("...f,...f->...", a, b)


def sparse_confidence(x: Tensor, src: Tensor, dst: Tensor,
                      x_src: Tensor | None = None) -> Tensor:
    r"""Eq. 4 per node: the cosine between :math:`\mathbf{x}_j` and the mean of the nodes
    that send messages to :math:`j` (self-loops excluded), clamped at 0; a node with no
    such sender gets 1.

    On a complete graph (the OR-GNN neighbourhoods, where the per-part model uses it) this is
    the paper's :math:`c_j` and equals the per-edge :func:`sparse_edge_confidence` of every
    edge leaving :math:`j`. On other graphs the layers use the per-edge definition, which
    compares a sender with the receiver's neighbourhood rather than with its own.

    The neighbour sum is the sum over all incoming edges minus the self-loops' share,
    :math:`\sum_{l \to j,\, l \ne j} \mathbf{x}_l = \sum_{l \to j} \mathbf{x}_l -
    n^{\circ}_j \mathbf{x}_j` (:math:`n^{\circ}_j` self-loops at :math:`j`), so no per-edge
    feature tensor is masked.

    Args:
        x: ``(|V|, ..., F)`` node features.
        src, dst: ``(|E|,)`` edge endpoints (messages flow ``src -> dst``).
        x_src: ``x[src]`` when the caller has gathered it already (saves one gather).

    Returns:
        ``(|V|, ...)`` confidences.
    """
    num_nodes = x.size(0)
    is_self = (src == dst).to(x.dtype)
    if x_src is None:
        x_src = x.index_select(0, src)
    nbr_sum = scatter(x_src, dst, dim=0, dim_size=num_nodes, reduce="sum")
    self_count = scatter(is_self, dst, dim=0, dim_size=num_nodes, reduce="sum")
    nbr_sum = torch.addcmul(nbr_sum, _expand_like(self_count, x), x, value=-1)
    nbr_count = scatter(1 - is_self, dst, dim=0, dim_size=num_nodes, reduce="sum")
    cos = _safe_cosine(_dot(x, nbr_sum), _dot(x, x), _dot(nbr_sum, nbr_sum))
    has_others = _expand_like(nbr_count, cos) > 0
    return torch.where(has_others, cos.clamp_min(0), torch.ones_like(cos))


def sparse_affinity(x_i: Tensor, x_j: Tensor, att_weight: Tensor, att_bias: Tensor) -> Tensor:
    r"""Eq. 6 per edge: :math:`\sigma(V \cdot ((\mathbf{x}_i - \mathbf{x}_j)^{\circ 2}) + b)`.
    (:func:`sparse_edge_weights` takes the logits, :func:`sparse_affinity_logits`.)

    One ``(|E|, ..., F)`` temporary (the difference, squared in place when no gradient is
    needed); the product with :math:`V` is a matrix-vector product for a single part.

    Args:
        x_i, x_j: ``(|E|, ..., F)`` target and source features of each edge.
        att_weight: :math:`V`, broadcastable to ``(|E|, ..., F)``.
        att_bias: :math:`b`, broadcastable to ``(|E|, ...)``.
    """
    return torch.sigmoid(sparse_affinity_logits(x_i, x_j, att_weight, att_bias))


def sparse_affinity_logits(x_i: Tensor, x_j: Tensor, att_weight: Tensor,
                           att_bias: Tensor) -> Tensor:
    r"""The logits of Eq. 6 per edge, :math:`V \cdot ((\mathbf{x}_i - \mathbf{x}_j)^{\circ 2})
    + b`, with the arguments of :func:`sparse_affinity`."""
    diff = x_i - x_j
    inplace = not _needs_grad(x_i, x_j, att_weight)
    sq = diff.mul_(diff) if inplace else diff * diff
    if att_weight.dim() == 1:
        logits = sq @ att_weight
    else:
        logits = (sq.mul_(att_weight) if inplace else sq * att_weight).sum(-1)
    return logits + att_bias


def sparse_edge_weights(confidence_src: Tensor, logits: Tensor, dst: Tensor,
                        num_nodes: int) -> Tensor:
    r"""The normalised weights of Eq. 5 per edge, :math:`c_j a_{ij} / \sum_{j'} c_{j'}
    a_{ij'}`, from the confidences of the edges' sources and the affinity logits
    (:func:`sparse_affinity_logits`). The affinities enter relative to each target's largest
    one, as in the dense rendering, so the weights stay finite for any logits.

    Args:
        confidence_src: ``(|E|, ...)`` :math:`c_j` of each edge's source.
        logits: ``(|E|, ...)`` affinity logits.
        dst: ``(|E|,)`` target node of each edge.
        num_nodes: number of target nodes.
    """
    log_a = torch.nn.functional.logsigmoid(logits)
    row_max = scatter(log_a.detach(), dst, dim=0, dim_size=num_nodes, reduce="max")
    affinity = _exp_shifted(log_a, row_max.index_select(0, dst))
    return sparse_normalise(confidence_src * affinity, dst, num_nodes)


def sparse_normalise(weight: Tensor, dst: Tensor, num_nodes: int) -> Tensor:
    r"""Normalise edge weights per target node (the fraction in Eq. 5); a target whose weights
    sum to (numerically) zero gets the plain mean over its incoming edges.

    Args:
        weight: ``(|E|, ...)`` non-negative :math:`c_j a_{ij}`.
        dst: ``(|E|,)`` target node of each edge.
        num_nodes: number of target nodes.
    """
    denom = scatter(weight, dst, dim=0, dim_size=num_nodes, reduce="sum").index_select(0, dst)
    ones = torch.ones_like(weight)
    degree = scatter(ones, dst, dim=0, dim_size=num_nodes, reduce="sum").index_select(0, dst)
    has_weight = denom > _MIN_DENOM
    safe = torch.where(has_weight, denom, ones)
    return torch.where(has_weight, weight / safe, ones / degree)


# --------------------------------------------------------------------------------------
# General and bipartite graphs: Eq. 4 per edge
# --------------------------------------------------------------------------------------


def edge_confidence(dot: Tensor, sq_src: Tensor, sq_sum: Tensor, has_others: Tensor) -> Tensor:
    r"""Eq. 4 per edge :math:`j \to i` of a general (or bipartite) graph, from three scalars.

    .. math::
        c_{ij} = \max\Big(0, \cos\big(\mathbf{x}_j, \mathbf{S}_i - \mathbf{x}_j\big)\Big),
        \qquad \mathbf{S}_i = \mathbf{x}_i + \textstyle\sum_{l \in \mathcal{N}(i)
            \setminus \{i\}} \mathbf{x}_l,

    the cosine between a sender and the sum (equivalently the mean) of the other members of
    the receiver's closed neighbourhood: the receiver itself and its other senders. On a
    complete graph :math:`\mathbf{S}_i` is the sum over all nodes for every :math:`i`, so
    :math:`c_{ij}` is the paper's :math:`c_j`. With :math:`\langle \mathbf{x}_j,
    \mathbf{S}_i\rangle`, :math:`|\mathbf{x}_j|^2` and :math:`|\mathbf{S}_i|^2` known,
    :math:`\langle \mathbf{x}_j, \mathbf{S}_i - \mathbf{x}_j\rangle = \langle \mathbf{x}_j,
    \mathbf{S}_i\rangle - |\mathbf{x}_j|^2` and :math:`|\mathbf{S}_i - \mathbf{x}_j|^2 =
    |\mathbf{S}_i|^2 - 2\langle \mathbf{x}_j, \mathbf{S}_i\rangle + |\mathbf{x}_j|^2`.

    Args:
        dot: :math:`\langle \mathbf{x}_j, \mathbf{S}_i\rangle` per edge.
        sq_src: :math:`|\mathbf{x}_j|^2` per edge (broadcastable to ``dot``).
        sq_sum: :math:`|\mathbf{S}_i|^2` per edge (broadcastable to ``dot``).
        has_others: bool, :obj:`False` where :math:`\mathcal{N}(i) \cup \{i\} \setminus
            \{j\}` is empty (a self-loop at a node without other senders): there
            :math:`c_{ij} = 1`.

    Returns:
        Confidences in :math:`[0, 1]`, shaped like ``dot``.
    """
    dot_others = dot - sq_src                                     # <x_j, S_i - x_j>
    sq_others = (sq_sum - dot) - dot_others                       # |S_i - x_j|^2
    cos = _safe_cosine(dot_others, sq_src, sq_others).clamp_min(0)
    return torch.where(has_others, cos, torch.ones_like(cos))


def closed_neighbour_sum(x_dst: Tensor, nbr_sum: Tensor, self_count: Tensor | None) -> Tensor:
    r""":math:`\mathbf{S}_i = \mathbf{x}_i + \sum_{l \to i,\, l \ne i} \mathbf{x}_l` from the
    sum over all incoming edges, :math:`\mathbf{S}_i = \sum_{l \to i} \mathbf{x}_l +
    (1 - n^{\circ}_i)\,\mathbf{x}_i` (:math:`n^{\circ}_i` self-loops at :math:`i`;
    ``self_count=None`` for a bipartite graph, which has none).

    Args:
        x_dst: ``(N_dst, ..., F)`` receiver features.
        nbr_sum: ``(N_dst, ..., F)`` sums of the incoming messages' features.
        self_count: ``(N_dst,)`` self-loops per receiver, or :obj:`None`.
    """
    if self_count is None:
        return nbr_sum + x_dst
    return torch.addcmul(nbr_sum, _expand_like(1 - self_count, x_dst), x_dst)


def sparse_edge_confidence(x_src: Tensor, x_dst: Tensor, src: Tensor, dst: Tensor,
                           bipartite: bool = False) -> Tensor:
    r"""Eq. 4 per edge on an ``edge_index``, as :class:`~orgnn.ORGNNConv` defines it on
    general graphs: :math:`c_{ij} = \max(0, \cos(\mathbf{x}_j, \mathbf{S}_i -
    \mathbf{x}_j))` with :math:`\mathbf{S}_i` the sum over the receiver's closed
    neighbourhood (see :func:`edge_confidence`).

    Args:
        x_src: ``(N_src, F)`` sender features.
        x_dst: ``(N_dst, F)`` receiver features (``x_src`` itself for one node set).
        src, dst: ``(|E|,)`` edge endpoints (messages flow ``src -> dst``).
        bipartite: senders and receivers are distinct nodes (no edge is a self-loop).

    Returns:
        ``(|E|,)`` confidences in :math:`[0, 1]`.
    """
    num_dst = x_dst.size(0)
    x_j = x_src.index_select(0, src)
    nbr_sum = scatter(x_j, dst, dim=0, dim_size=num_dst, reduce="sum")
    degree = scatter(x_j.new_ones(dst.shape), dst, dim=0, dim_size=num_dst, reduce="sum")
    if bipartite:
        self_count, others = None, degree
    else:
        self_count = scatter((src == dst).to(x_j.dtype), dst, dim=0, dim_size=num_dst,
                             reduce="sum")
        others = degree - self_count
    s_sum = closed_neighbour_sum(x_dst, nbr_sum, self_count)
    return edge_confidence(_dot(x_j, s_sum.index_select(0, dst)), _dot(x_j, x_j),
                           _dot(s_sum, s_sum).index_select(0, dst),
                           others.index_select(0, dst) > 0)


def sparse_orgnn_weights(
    x_src: Tensor,
    x_dst: Tensor,
    src: Tensor,
    dst: Tensor,
    att_weight: Tensor,
    att_bias: Tensor,
    outlier_aware: bool = True,
    bipartite: bool = False,
    x_j: Tensor | None = None,
) -> Tensor:
    r"""The normalised weights :math:`c_{ij} a_{ij} / \sum_{j'} c_{ij'} a_{ij'}` of Eq. 5 on
    an ``edge_index``, with Eq. 4 per edge (:func:`edge_confidence`) and Eq. 6 through
    :math:`V \cdot (\mathbf{x}_i - \mathbf{x}_j)^{\circ 2} = s_i + s_j - 2\langle V \circ
    \mathbf{x}_i, \mathbf{x}_j\rangle` (:math:`s_i = V \cdot \mathbf{x}_i^{\circ 2}`).

    Edge features are gathered and scattered (one ``(|E|, F)`` gather of the sources, one
    ``(|E|, 2F)`` gather of :math:`[\mathbf{S}_i, V \circ \mathbf{x}_i]`, one scatter for
    :math:`\mathbf{S}`); the layer uses this rendering when its messages must go through
    :meth:`~torch_geometric.nn.conv.MessagePassing.message` (explainers, hooks,
    ``torch.compile``) and :func:`csr_orgnn_weights` otherwise.

    Args:
        x_src: ``(N_src, F)`` sender features.
        x_dst: ``(N_dst, F)`` receiver features (``x_src`` itself for one node set).
        src, dst: ``(|E|,)`` edge endpoints (messages flow ``src -> dst``).
        att_weight: :math:`V`, ``(F,)``.
        att_bias: :math:`b`, a one-element tensor.
        outlier_aware: use Eq. 4; :obj:`False` sets :math:`c = 1`.
        bipartite: senders and receivers are distinct nodes (no edge is a self-loop).
        x_j: ``x_src[src]`` when the caller has gathered it already.

    Returns:
        ``(|E|,)`` edge weights, summing to 1 over each receiver's incoming edges.
    """
    num_dst = x_dst.size(0)
    if x_j is None:
        x_j = x_src.index_select(0, src)
    vx_dst = x_dst * att_weight
    s_src = _dot(x_src * att_weight, x_src) if bipartite else _dot(vx_dst, x_dst)
    s_dst = _dot(vx_dst, x_dst)
    if outlier_aware:
        nbr_sum = scatter(x_j, dst, dim=0, dim_size=num_dst, reduce="sum")
        ones = x_j.new_ones(dst.shape)
        degree = scatter(ones, dst, dim=0, dim_size=num_dst, reduce="sum")
        if bipartite:
            self_count = None
            others = degree
        else:
            self_count = scatter((src == dst).to(x_j.dtype), dst, dim=0, dim_size=num_dst,
                                 reduce="sum")
            others = degree - self_count
        s_sum = closed_neighbour_sum(x_dst, nbr_sum, self_count)
        q_i = torch.stack([vx_dst, s_sum], dim=-2).index_select(0, dst)   # (E, 2, F)
        dots = (q_i @ x_j.unsqueeze(-1)).squeeze(-1)                      # (E, 2)
        cross, dot_sum = dots[:, 0], dots[:, 1]
        confidence = edge_confidence(dot_sum, _dot(x_j, x_j), _dot(s_sum, s_sum)[dst],
                                     others.index_select(0, dst) > 0)
    else:
        cross = _dot(vx_dst.index_select(0, dst), x_j)
        confidence = x_j.new_ones(dst.shape)
    logits = s_dst.index_select(0, dst) + s_src.index_select(0, src) - 2 * cross + att_bias
    return sparse_edge_weights(confidence, logits, dst, num_dst)


def _vecdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products of node-level ``(N, F)`` tensors, as a batched matrix product:
    no ``(N, F)`` temporary (a fresh one costs its page faults, about as much as the
    product)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).view(a.shape[:-1])


def csr_spmm(adj: Tensor, x: Tensor) -> Tensor:
    r"""``adj @ x`` for a CSR ``adj``. On CPU through :func:`torch.addmm` with a broadcast
    zero input (``beta=0``): :func:`torch.sparse.mm` fills and copies a result as large as
    the output on top (about 3x the time here)."""
    if x.device.type == "cpu":
        zero = x.new_zeros(1, x.size(-1)).expand(adj.size(0), x.size(-1))
        return torch.addmm(zero, adj, x, beta=0)
    return torch.sparse.mm(adj, x)


def csr_tensor(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """``torch.sparse_csr_tensor`` without torch's "Sparse CSR tensor support is in beta
    state" warning: the CSR rendering uses its settled core (construction, mm,
    sampled_addmm), and a user who never asked for CSR should not see it. Only that
    warning, only here: the filter is local to this call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class CSRPattern:
    r"""A fixed sparsity pattern in CSR form (rows are receivers, senders ascending within a
    row) and the two products the CSR rendering needs, differentiable in their dense
    arguments and edge values: :meth:`spmm` (``A(values) @ x``) and :meth:`sddmm` (per-edge
    dot products :math:`\langle \mathbf{a}_i, \mathbf{b}_j\rangle`). Their backward passes
    are the same two products, one of them on the transposed pattern (built on first use),
    so no dense ``rows x cols`` tensor appears (torch's own CSR backward forms one).

    Args:
        crow: ``(rows + 1,)`` row pointers.
        col: ``(|E|,)`` column (sender) of each entry.
        num_cols: number of columns.
        row: ``(|E|,)`` row of each entry, if known.
    """

    def __init__(self, crow: Tensor, col: Tensor, num_cols: int,
                 row: Tensor | None = None) -> None:
        self.crow, self.col = crow, col
        self.num_rows, self.num_cols = crow.numel() - 1, num_cols
        self._row = row
        self._transposed: tuple[CSRPattern, Tensor | None] | None = None

    @property
    def row(self) -> Tensor:
        if self._row is None:
            self._row = torch.repeat_interleave(
                torch.arange(self.num_rows, device=self.crow.device), self.crow.diff(),
                output_size=self.col.numel())
        return self._row

    def matrix(self, values: Tensor) -> Tensor:
        """The sparse CSR matrix with ``values`` (in this pattern's order)."""
        return csr_tensor(self.crow, self.col, values, (self.num_rows, self.num_cols))

    def transposed(self) -> tuple[CSRPattern, Tensor | None]:
        """The transposed pattern and the permutation taking this pattern's entry order to
        its order (:obj:`None`: the same order)."""
        if self._transposed is None:
            row, col = self.row, self.col
            key = col * self.num_rows + row
            perm = None
            if key.numel() > 1 and not bool((key[1:] >= key[:-1]).all()):
                perm = torch.sort(key, stable=True)[1]
                row, col = row.index_select(0, perm), col.index_select(0, perm)
            crow = torch.zeros(self.num_cols + 1, dtype=col.dtype, device=col.device)
            torch.cumsum(torch.bincount(col, minlength=self.num_cols), 0, out=crow[1:])
            self._transposed = (CSRPattern(crow, row, self.num_rows, row=col), perm)
        return self._transposed

    def spmm(self, values: Tensor, x: Tensor) -> Tensor:
        """``A(values) @ x``: ``(rows, F)``."""
        return _CSRSpMM.apply(values, x, self)

    def sddmm(self, a: Tensor, b: Tensor) -> Tensor:
        r"""``(|E|,)`` dot products :math:`\langle \mathbf{a}_{row}, \mathbf{b}_{col}\rangle`
        for ``a`` ``(rows, F)`` and ``b`` ``(cols, F)``."""
        return _CSRSDDMM.apply(a, b, self)

    # the products without autograd
    def _spmm(self, values: Tensor, x: Tensor) -> Tensor:
        return csr_spmm(self.matrix(values), x)

    def _sddmm(self, a: Tensor, b: Tensor) -> Tensor:
        mask = self.matrix(a.new_zeros(self.col.shape))
        return torch.sparse.sampled_addmm(mask, a, b.t(), beta=0.0).values()

    def _spmm_t(self, values: Tensor, x: Tensor) -> Tensor:
        pattern_t, perm = self.transposed()
        return pattern_t._spmm(values if perm is None else values.index_select(0, perm), x)


class _CSRSpMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, x: Tensor, pattern: CSRPattern) -> Tensor:
        ctx.save_for_backward(values, x)
        ctx.pattern = pattern
        return pattern._spmm(values, x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        values, x = ctx.saved_tensors
        pattern = ctx.pattern
        grad_out = grad_out.contiguous()
        grad_values = pattern._sddmm(grad_out, x) if ctx.needs_input_grad[0] else None
        grad_x = pattern._spmm_t(values, grad_out) if ctx.needs_input_grad[1] else None
        return grad_values, grad_x, None


class _CSRSDDMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, pattern: CSRPattern) -> Tensor:
        ctx.save_for_backward(a, b)
        ctx.pattern = pattern
        return pattern._sddmm(a, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values: Tensor):
        a, b = ctx.saved_tensors
        pattern = ctx.pattern
        grad_values = grad_values.contiguous()
        grad_a = pattern._spmm(grad_values, b) if ctx.needs_input_grad[0] else None
        grad_b = pattern._spmm_t(grad_values, a) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None


def csr_orgnn_weights(
    x_src: Tensor,
    x_dst: Tensor,
    pattern: CSRPattern,
    att_weight: Tensor,
    att_bias: Tensor,
    outlier_aware: bool = True,
    bipartite: bool = False,
) -> Tensor:
    r""":func:`sparse_orgnn_weights` on a CSR pattern (rows are receivers), without any
    ``(|E|, F)`` tensor: :math:`\mathbf{S}` is one sparse-dense product, the per-edge dot
    products :math:`\langle \mathbf{S}_i, \mathbf{x}_j\rangle` and :math:`\langle V \circ
    \mathbf{x}_i, \mathbf{x}_j\rangle` are sampled dense-dense products (both
    differentiable, see :class:`CSRPattern`), everything else is per node or per edge scalar.

    Args:
        x_src, x_dst, att_weight, att_bias, outlier_aware, bipartite: as in
            :func:`sparse_orgnn_weights`.
        pattern: the edges as a :class:`CSRPattern` (``N_dst`` rows, ``N_src`` columns).

    Returns:
        ``(|E|,)`` edge weights in the pattern's order.
    """
    num_dst = x_dst.size(0)
    col, row = pattern.col, pattern.row
    vx_dst = x_dst * att_weight
    s_src = _vecdot(x_src * att_weight, x_src) if bipartite else _vecdot(vx_dst, x_dst)
    s_dst = _vecdot(vx_dst, x_dst)
    cross = pattern.sddmm(vx_dst, x_src)
    if outlier_aware:
        degree = pattern.crow.diff().to(x_src.dtype)
        if bipartite:
            others = degree
            values = x_src.new_ones(col.shape)
        else:
            is_self = (col == row).to(x_src.dtype)
            others = degree - scatter(is_self, row, dim=0, dim_size=num_dst, reduce="sum")
            values = 1 - is_self
        # Self-loops left out of the sum and x_i added once: S_i = x_i + sum_{l != i} x_l.
        s_sum = pattern.spmm(values, x_src) + x_dst
        dot_sum = pattern.sddmm(s_sum, x_src)
        confidence = edge_confidence(dot_sum, _vecdot(x_src, x_src).index_select(0, col),
                                     _vecdot(s_sum, s_sum).index_select(0, row),
                                     others.index_select(0, row) > 0)
    else:
        confidence = x_src.new_ones(col.shape)
    logits = s_dst.index_select(0, row) + s_src.index_select(0, col) - 2 * cross + att_bias
    return sparse_edge_weights(confidence, logits, row, num_dst)


def dense_adj_orgnn_aggregate(
    x: Tensor,
    adj: Tensor,
    valid: Tensor,
    att_weight: Tensor,
    att_bias: Tensor,
    outlier_aware: bool = True,
    add_self_loops: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""The normalised weighted sum of Eq. 5 (before :math:`\mathbf{W}` and the activation)
    on padded batches of general graphs given by a dense adjacency, with Eq. 4 per edge as in
    :func:`edge_confidence`:

    .. math::
        \mathbf{h}_i = \frac{\sum_{j \in \mathcal{N}(i)} c_{ij} a_{ij} \mathbf{x}_j}
                            {\sum_{j \in \mathcal{N}(i)} c_{ij} a_{ij}},
        \qquad \mathbf{S}_i = \mathbf{x}_i + \textstyle\sum_{l \in \mathcal{N}(i)
            \setminus \{i\}} \mathbf{x}_l.

    Five batched matrix products, none ``B x N x N x F``: :math:`(X \circ V) X^\top` (Eq. 6),
    :math:`\mathbf{S} = X + A^{\circ} X` (:math:`A^{\circ}` the adjacency without its
    diagonal), :math:`\mathbf{S} X^\top` (Eq. 4's dot products) and :math:`\alpha X`.
    On a complete graph this equals :func:`dense_orgnn_aggregate`, which needs fewer
    products (:math:`\mathbf{S}_i` is the same for every :math:`i` there).

    Args:
        x: ``(..., N, F)`` node features.
        adj: ``(..., N, N)`` adjacency (broadcastable to ``x``'s leading dimensions):
            ``adj[..., i, j] != 0`` when node :math:`j` sends a message to node :math:`i`
            (PyG's transposed ``adj_t`` orientation, and the layout of the returned weights).
            Values other than zero only mark edges; the diagonal holds self-loops.
        valid: ``(..., N)`` bool or 0/1 mask of real (non-padded) nodes; edges from or to
            padded nodes are dropped.
        att_weight: :math:`V`, broadcastable to ``(..., N, F)``.
        att_bias: :math:`b`, broadcastable to ``(..., N, N)``.
        outlier_aware: use Eq. 4's confidence; ``False`` sets :math:`c = 1`.
        add_self_loops: give every valid node a self-loop (the diagonal of ``adj`` is
            replaced).

    Returns:
        ``(h, alpha)``: ``(..., N, F)`` aggregated features (zero for a node without
        incoming edges) and ``(..., N, N)`` edge weights (row :math:`i` holds node
        :math:`i`'s incoming ones).
    """
    valid = valid.to(torch.bool)
    num_nodes = x.size(-2)
    eye = torch.eye(num_nodes, dtype=torch.bool, device=x.device)
    edge = (adj != 0) & valid.unsqueeze(-1) & valid.unsqueeze(-2)
    if add_self_loops:
        edge = torch.where(eye, valid.unsqueeze(-1), edge)
    x_t = x.transpose(-1, -2)

    # Eq. 6 through the identity: logits_ij = s_i + s_j - 2 <V o x_i, x_j> + b.
    vx = x * att_weight
    cross = vx @ x_t
    s = cross.diagonal(dim1=-2, dim2=-1)
    logits = (s.unsqueeze(-1) + (s.unsqueeze(-2) + att_bias)).add_(cross, alpha=-2)
    log_a = torch.nn.functional.logsigmoid(logits).masked_fill(~edge, float("-inf"))
    weight = _exp_shifted(log_a, log_a.detach().amax(-1, keepdim=True))
    if outlier_aware:
        off = edge & ~eye
        off_f = off.to(x.dtype)
        s_sum = x + off_f @ x                                         # S_i
        dot_sum = s_sum @ x_t                                         # <S_i, x_j>
        confidence = edge_confidence(dot_sum, _dot(x, x).unsqueeze(-2),
                                     _dot(s_sum, s_sum).unsqueeze(-1),
                                     off.any(-1, keepdim=True))
        # where, not a product: a padded node's (finite but arbitrary) features may give a
        # non-finite cosine in a column that carries no edge.
        weight = weight * torch.where(edge, confidence, 0.0)

    # Normalise; a (numerically) zero denominator falls back to the plain mean over the edges.
    denom = weight.sum(-1, keepdim=True)
    has_weight = denom > _MIN_DENOM
    edge_f = edge.to(x.dtype)
    fallback = (~has_weight) / edge_f.sum(-1, keepdim=True).clamp_min(1)
    alpha = torch.addcmul(weight * (has_weight / torch.where(has_weight, denom, 1)), edge_f,
                          fallback)
    return alpha @ x, alpha
