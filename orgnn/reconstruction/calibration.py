r"""A search threshold that fits the feature space a user brings (SPEC §3).

The paper's :math:`\theta = 0.7` is a threshold on the paper's FEN cosines: on another
network's features it passes everything (mini-mars-parts) or leaves most images without a
neighbour (cuhk03-parts: 408 of 600 queries). Calibrated on the training split instead,

.. math::
    \theta = Q_q\big(\{\, s(t, j) : j \in \mathcal{N}_K(t),\ y_j = y_t \,\}\big),

the :math:`q`-quantile of the search scores of the *right* neighbours (same identity) in
the training images' own top-:math:`K` lists, so that only a fraction :math:`q` of right
neighbours is cut, whatever the scale of the cosines. With the default :math:`q = 0.02` the
threshold is permissive on purpose: telling right from wrong neighbours is the learned
outlier scorer's job (:mod:`orgnn.reconstruction.outliers`), the threshold only drops the hopeless
tail.
"""
from __future__ import annotations

import warnings

import numpy as np

from orgnn import distributed
from orgnn.io.features import PartFeatures
from orgnn.retrieval.search import Neighbourhoods, search_neighbourhoods

__all__ = ["calibrate_theta", "DEFAULT_QUANTILE"]

#: Share of the training split's right neighbours the calibrated threshold may cut.
DEFAULT_QUANTILE = 0.02


def calibrate_theta(train: PartFeatures, k: int, mode: str = "visible-mean",
                    quantile: float = DEFAULT_QUANTILE,
                    upper_body_parts: tuple[int, ...] | None = (0, 1),
                    index: str = "auto") -> float:
    """The search threshold :math:`\\theta` calibrated on ``train`` (see the module doc).

    Args:
        train: the training split (identities needed, never the test split).
        k: neighbourhood size of the search the threshold is for.
        mode: search mode (``"visible-mean"`` or ``"intersection"``).
        quantile: share of right neighbours the threshold may cut, in ``[0, 1)``.
        upper_body_parts: parts fully visible images search with.
        index: the search index (:func:`orgnn.retrieval.search.search_neighbourhoods`; ``"auto"``:
            exact up to :data:`orgnn.retrieval.search.AUTO_EXACT_MAX` images). Under ``torchrun``
            each rank searches its share of the images.

    Returns:
        :math:`\\theta` in ``[-1, 1]``, rounded down to 3 decimals; ``-1`` (no threshold),
        with a warning, when no training image has a right neighbour in its top ``k``.
    """
    if not 0 <= quantile < 1:
        raise ValueError(f"quantile must lie in [0, 1), got {quantile!r}")
    if train.num_images < 2:
        raise ValueError("calibrate_theta: the training split needs at least two images")
    def search(rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # under torchrun each rank searches its share (all-gathered: every rank calibrates)
        found = search_neighbourhoods(
            train.features[rows], train.visible[rows], train.features, k=k, theta=-1.0,
            mode=mode, upper_body_parts=upper_body_parts, index=index,
            exclude=np.arange(train.num_images)[rows])
        return found.index, found.score, found.search_parts

    nbrs = Neighbourhoods(*distributed.map_rows(search, train.num_images))
    pids = np.asarray(train.pids)
    right = nbrs.valid & (pids[np.clip(nbrs.index, 0, None)] == pids[:, None])
    if not right.any():
        warnings.warn("calibrate_theta: no training image has a same-identity neighbour in "
                      f"its top {k}; searching without a threshold", RuntimeWarning,
                      stacklevel=2)
        return -1.0
    theta = float(np.quantile(nbrs.score[right], quantile))
    return max(-1.0, float(np.floor(theta * 1000) / 1000))
