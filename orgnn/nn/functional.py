r"""The OR-GNN update (Eq. 4-6) as plain tensor functions, shared by every layer.

Two renderings of one rule:

* the **dense** one works on padded batches ``(..., N, F)`` and touches the features only
  through matrix products: the Gram matrix :math:`G = XX^\top` gives every norm and every
  neighbour-sum dot product of Eq. 4, and :math:`P = (X \circ V) X^\top` gives Eq. 6 through

  .. math::
      V \cdot \big((\mathbf{x}_i - \mathbf{x}_j) \circ (\mathbf{x}_i - \mathbf{x}_j)\big)
      = s_i + s_j - 2 \langle V \circ \mathbf{x}_i, \mathbf{x}_j \rangle,
      \qquad s_i = P_{ii},

  so no ``B x N x N x F`` tensor is ever formed;
* the **sparse** one works on an ``edge_index`` (``src -> dst``) with scatter reductions.

Leading dimensions broadcast, which is how the per-part model runs all parts in one call.
"""
from __future__ import annotations

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
    \mathbf{T}\rangle + |\mathbf{x}_j|^2`: two numbers per node, both read off the Gram
    matrix :math:`G = XX^\top` (:math:`|\mathbf{x}_j|^2 = G_{jj}`, :math:`\langle
    \mathbf{x}_j, \mathbf{T}\rangle = (G\,\mathrm{valid})_j`). A node with no other valid
    node gets :math:`c_j = 1`.

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
) -> tuple[Tensor, Tensor]:
    r"""The normalised weighted sum of Eq. 5 (before :math:`\mathbf{W}` and ReLU) on padded
    complete graphs.

    .. math::
        \mathbf{h}_i = \frac{\sum_{j \ne i} c_j a_{ij} \mathbf{x}_j}{\sum_{j \ne i} c_j a_{ij}},
        \qquad a_{ij} = \sigma\big(V \cdot (\mathbf{d}_{ij} \circ \mathbf{d}_{ij}) + b\big)

    A zero denominator falls back to the plain mean over the neighbours; a node without any
    neighbour aggregates to zero.

    The features are touched by three batched matrix products and one elementwise pass
    (:math:`X \circ V`): :math:`P = (X \circ V) X^\top` for Eq. 6, :math:`G = XX^\top` for
    Eq. 4 and :math:`\alpha X` for Eq. 5; everything else works on ``(..., R, N)`` weights
    (about ten passes over them, each ``F / N`` times smaller than one over the features).

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
        gram = x @ x_t                                             # (..., N, N)
        sq_norm = gram.diagonal(dim1=-2, dim2=-1)                  # |x_j|^2
        dot_total = (gram @ valid.unsqueeze(-1)).squeeze(-1)       # <x_j, T>
        weight = affinity * dense_confidence(sq_norm, dot_total, valid).unsqueeze(-2)
    else:
        weight = affinity

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
    r"""Eq. 4 on a general graph: the cosine between :math:`\mathbf{x}_j` and the mean of the
    nodes that send messages to :math:`j` (self-loops excluded), clamped at 0; a node with no
    such sender gets 1.

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
