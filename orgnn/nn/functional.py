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


def _safe_cosine(dot: Tensor, sq_norm_a: Tensor, sq_norm_b: Tensor) -> Tensor:
    # Clamp before the square root: its gradient at 0 is infinite (NaN once masked).
    denom = (sq_norm_a.clamp_min(0) * sq_norm_b.clamp_min(0)).clamp_min(_EPS * _EPS).sqrt()
    return dot / denom


# --------------------------------------------------------------------------------------
# Dense rendering
# --------------------------------------------------------------------------------------
def dense_confidence(gram: Tensor, valid: Tensor) -> Tensor:
    r"""Eq. 4 on padded complete graphs, from the Gram matrix alone.

    .. math::
        c_j = \max\Big(0, \cos\big(\mathbf{x}_j, \textstyle\sum_{l \ne j} \mathbf{x}_l\big)\Big)

    (the cosine to the mean equals the cosine to the sum). A node with no other valid node
    gets :math:`c_j = 1`.

    Args:
        gram: ``(..., N, N)`` Gram matrix :math:`XX^\top`.
        valid: ``(..., N)`` float 0/1 node mask.

    Returns:
        ``(..., N)`` confidences in :math:`[0, 1]` (0 on padded nodes).
    """
    sq_norm = gram.diagonal(dim1=-2, dim2=-1)                    # |x_j|^2
    dot_total = (gram @ valid.unsqueeze(-1)).squeeze(-1)          # <x_j, T>, T = sum of valid x
    sq_total = (dot_total * valid).sum(-1, keepdim=True)          # |T|^2
    dot_others = dot_total - sq_norm                              # <x_j, T - x_j>
    sq_others = sq_total - 2 * dot_total + sq_norm                # |T - x_j|^2
    cos = _safe_cosine(dot_others, sq_norm, sq_others).clamp_min(0)
    has_others = (valid.sum(-1, keepdim=True) - valid) > 0
    return torch.where(has_others, cos, torch.ones_like(cos)) * valid


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
    x_rows = x[..., :r, :]

    # Eq. 6 through the identity: logits_ij = s_i + s_j - 2 <V o x_i, x_j> + b.
    vx_rows = x_rows * att_weight
    cross = vx_rows @ x_t                                          # (..., R, N)
    if r == num_nodes:
        s = cross.diagonal(dim1=-2, dim2=-1)
        s_rows = s
    else:
        s = ((x * att_weight) * x).sum(-1)                         # cheap: R << N only here
        s_rows = s[..., :r]
    logits = s_rows.unsqueeze(-1) + s.unsqueeze(-2) - 2 * cross + att_bias
    affinity = torch.sigmoid(logits)

    # Which (i, j) pairs carry a message: both valid, and j != i unless self-loops.
    edge = valid[..., :r].unsqueeze(-1) * valid.unsqueeze(-2)
    if not add_self_loops:
        eye = torch.eye(r, num_nodes, dtype=x.dtype, device=x.device)
        edge = edge * (1 - eye)

    weight = affinity * edge
    if outlier_aware:
        gram = x @ x_t
        weight = weight * dense_confidence(gram, valid).unsqueeze(-2)

    denom = weight.sum(-1, keepdim=True)
    degree = edge.sum(-1, keepdim=True)
    uniform = edge / degree.clamp_min(1)
    alpha = torch.where(denom > 0, weight / torch.where(denom > 0, denom, 1), uniform)
    return alpha @ x, alpha


# --------------------------------------------------------------------------------------
# Sparse rendering
# --------------------------------------------------------------------------------------
def _expand_like(edge_values: Tensor, x: Tensor) -> Tensor:
    """View an ``(E,)`` tensor so it broadcasts against ``(E, ...)`` of ``x``'s rank."""
    return edge_values.view(-1, *([1] * (x.dim() - 1)))


def sparse_confidence(x: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    r"""Eq. 4 on a general graph: the cosine between :math:`\mathbf{x}_j` and the mean of the
    nodes that send messages to :math:`j` (self-loops excluded), clamped at 0; a node with no
    such sender gets 1.

    Args:
        x: ``(|V|, ..., F)`` node features.
        src, dst: ``(|E|,)`` edge endpoints (messages flow ``src -> dst``).

    Returns:
        ``(|V|, ...)`` confidences.
    """
    num_nodes = x.size(0)
    not_self = (src != dst).to(x.dtype)
    x_src = x.index_select(0, src)
    nbr_sum = scatter(x_src * _expand_like(not_self, x), dst, dim=0, dim_size=num_nodes,
                      reduce="sum")
    nbr_count = scatter(not_self, dst, dim=0, dim_size=num_nodes, reduce="sum")
    cos = _safe_cosine((x * nbr_sum).sum(-1), (x * x).sum(-1), (nbr_sum * nbr_sum).sum(-1))
    has_others = _expand_like(nbr_count, cos) > 0
    return torch.where(has_others, cos.clamp_min(0), torch.ones_like(cos))


def sparse_affinity(x_i: Tensor, x_j: Tensor, att_weight: Tensor, att_bias: Tensor) -> Tensor:
    r"""Eq. 6 per edge: :math:`\sigma(V \cdot ((\mathbf{x}_i - \mathbf{x}_j)^{\circ 2}) + b)`.

    Args:
        x_i, x_j: ``(|E|, ..., F)`` target and source features of each edge.
        att_weight: :math:`V`, broadcastable to ``(|E|, ..., F)``.
        att_bias: :math:`b`, broadcastable to ``(|E|, ...)``.
    """
    diff = x_i - x_j
    return torch.sigmoid((diff * diff * att_weight).sum(-1) + att_bias)


def sparse_normalise(weight: Tensor, dst: Tensor, num_nodes: int) -> Tensor:
    r"""Normalise edge weights per target node (the fraction in Eq. 5); a target whose weights
    sum to zero gets the plain mean over its incoming edges.

    Args:
        weight: ``(|E|, ...)`` non-negative :math:`c_j a_{ij}`.
        dst: ``(|E|,)`` target node of each edge.
        num_nodes: number of target nodes.
    """
    denom = scatter(weight, dst, dim=0, dim_size=num_nodes, reduce="sum").index_select(0, dst)
    ones = torch.ones_like(weight)
    degree = scatter(ones, dst, dim=0, dim_size=num_nodes, reduce="sum").index_select(0, dst)
    safe = torch.where(denom > 0, denom, ones)
    return torch.where(denom > 0, weight / safe, ones / degree)
