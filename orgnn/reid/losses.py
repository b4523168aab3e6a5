"""FEN and OAN losses: Eq. 1 (ID cross-entropy + batch-hard triplet per part) and Eq. 2 (BCE)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pairwise_euclidean", "batch_hard_triplet_loss", "fen_loss", "oan_loss"]


def pairwise_euclidean(x: Tensor) -> Tensor:
    """Euclidean distances ``(..., B, B)`` between the rows of ``x`` ``(..., B, D)``.

    Computed from the differences (no ``|a|² + |b|² − 2ab`` cancellation; a PK batch is small);
    squared distances are clamped at 1e-12 before the square root, so the gradient stays finite
    on the diagonal.
    """
    diff = x[..., :, None, :] - x[..., None, :, :]
    return (diff * diff).sum(-1).clamp(min=1e-12).sqrt()


def batch_hard_triplet_loss(features: Tensor, targets: Tensor, margin: float = 0.3) -> Tensor:
    r"""Batch-hard triplet loss (Hermans et al., 2017) with Euclidean distances.

    For every anchor :math:`a`: :math:`\max(0, \max_{p: y_p = y_a} d(a, p) -
    \min_{n: y_n \ne y_a} d(a, n) + m)`, averaged over anchors. Anchors without a negative in the
    batch contribute 0. With ``features`` of shape ``(B, M, D)`` the loss is computed per part
    (distances per part) and averaged over parts.

    Args:
        features: ``(B, D)`` or ``(B, M, D)``.
        targets: ``(B,)`` identity labels.
        margin (float): default 0.3 (SPEC §2).
    """
    if features.dim() == 2:
        features = features[:, None]
    x = features.transpose(0, 1).float()  # (M, B, D)
    dist = pairwise_euclidean(x)  # (M, B, B)
    same = targets[:, None] == targets[None, :]
    hardest_pos = dist.masked_fill(~same, float("-inf")).amax(-1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(-1)
    loss = F.relu(hardest_pos - hardest_neg + margin)
    loss = torch.where(torch.isinf(hardest_neg), torch.zeros_like(loss), loss)
    return loss.mean()


def fen_loss(logits: Tensor, features: Tensor, targets: Tensor, margin: float = 0.3,
             label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    r"""Eq. 1: :math:`\frac{1}{M}\sum_{k=1}^{M}\big(\mathrm{CE}_k + \mathrm{Triplet}_k\big)`.

    Args:
        logits: ``(B, M, C)``; features: ``(B, M, D)``; targets: ``(B,)`` labels in ``[0, C)``.

    Returns:
        the loss and its parts ``{"ce": ..., "triplet": ...}`` as floats, for logging.
    """
    b, m, c = logits.shape
    ce = F.cross_entropy(logits.reshape(b * m, c).float(), targets.repeat_interleave(m),
                         label_smoothing=label_smoothing)
    tri = batch_hard_triplet_loss(features, targets, margin)
    return ce + tri, {"ce": float(ce.detach()), "triplet": float(tri.detach())}


def oan_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. 2: binary cross-entropy between the OAN's part logits ``(B, M)`` and the part labels
    ``(B, M)`` (1 = visible), averaged over images and parts."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
