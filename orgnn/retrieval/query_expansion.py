r"""What a Re-ID user with part features runs first: the visible-part global feature and
FastReID's average query expansion (the peer rows ``vis_global`` and ``aqe`` of SPEC §6).

The visible-part global feature of image :math:`a` with part features
:math:`\mathbf{x}_k(a)` and visible parts :math:`S_a` (all parts when none is visible):

.. math::
    \mathbf{g}(a) = \frac{\sum_{k \in S_a} \hat{\mathbf{x}}_k(a)}
                         {\big\|\sum_{k \in S_a} \hat{\mathbf{x}}_k(a)\big\|},
    \qquad \hat{\mathbf{x}} = \mathbf{x} / \|\mathbf{x}\|,

compared by cosine distance :math:`1 - \langle \mathbf{g}(a), \mathbf{g}(b) \rangle`: the
retrieval distance of SPEC §5 with one part
(:func:`orgnn.reconstruction.pipeline.part_distance` on ``g[:, None]``).

Average query expansion (alpha-QE, as FastReID's ``aqe`` ships it): query and gallery
features are expanded together; in each round every feature becomes the mean of its top
:math:`k` most cosine-similar features of the joint set (itself included), weighted by
their similarity to the power :math:`\alpha`:

.. math::
    \mathbf{f}'_i = \frac{1}{k} \sum_{j \in \mathrm{top}_k(i)} s_{ij}^{\alpha}\, \mathbf{f}_j,
    \qquad s_{ij} = \cos(\mathbf{f}_i, \mathbf{f}_j).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["visible_global_feature", "average_query_expansion"]


def visible_global_feature(features: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """``(N, D)`` float32 unit visible-part global features (see the module doc).

    Args:
        features: part features ``(N, M, D)``.
        visible: ``(N, M)`` bool visibility (all parts are used where none is visible).
    """
    feats = np.asarray(features)
    visible = np.asarray(visible, dtype=bool)
    if feats.ndim != 3 or visible.shape != feats.shape[:2]:
        raise ValueError(f"visible_global_feature: features must be (N, M, D) and visible "
                         f"(N, M), got {feats.shape} and {visible.shape}")
    parts = np.where(visible.any(1, keepdims=True), visible, True)
    x = F.normalize(torch.as_tensor(feats, dtype=torch.float32), dim=-1)
    summed = (x * torch.from_numpy(parts).unsqueeze(-1).to(x.dtype)).sum(1)
    return F.normalize(summed, dim=-1).numpy()


@torch.inference_mode()
def average_query_expansion(query: np.ndarray, gallery: np.ndarray, k: int = 5,
                            alpha: float = 3.0, times: int = 1, chunk_size: int = 4096
                            ) -> tuple[np.ndarray, np.ndarray]:
    r"""FastReID's average query expansion (``aqe``; see the module doc).

    Args:
        query: ``(Q, D)`` features.
        gallery: ``(G, D)`` features.
        k: neighbours averaged, the feature itself included (FastReID's ``QE_K``; 5).
        alpha: exponent of the similarity weights (``ALPHA``; 3).
        times: rounds (``QE_TIME``; 1).
        chunk_size: rows of the joint similarity matrix computed at a time.

    Returns:
        The expanded ``(Q, D)`` and ``(G, D)`` features (float32, not normalised).
    """
    if k < 1 or times < 0:
        raise ValueError(f"average_query_expansion: k must be >= 1 and times >= 0, got "
                         f"k={k}, times={times}")
    q = np.asarray(query)
    feats = torch.cat([torch.as_tensor(q, dtype=torch.float32),
                       torch.as_tensor(np.asarray(gallery), dtype=torch.float32)])
    kk = min(k, feats.size(0))
    for _ in range(times):
        unit = F.normalize(feats, dim=-1)
        expanded = torch.empty_like(feats)
        for start in range(0, feats.size(0), chunk_size):
            sims, idx = (unit[start:start + chunk_size] @ unit.T).topk(kk, dim=1)
            weights = sims.pow(alpha).unsqueeze(-1)
            expanded[start:start + chunk_size] = (feats[idx] * weights).mean(1)
        feats = expanded
    return feats[:len(q)].numpy(), feats[len(q):].numpy()
