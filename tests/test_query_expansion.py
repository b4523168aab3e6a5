"""The peer rows: the visible-part global feature and average query expansion, against
hand-written references (FastReID's ``aqe`` as a plain per-row loop)."""
from __future__ import annotations

import numpy as np
import pytest

from orgnn.reconstruction.pipeline import part_distance
from orgnn.retrieval.query_expansion import average_query_expansion, visible_global_feature


def _fastreid_aqe(query: np.ndarray, gallery: np.ndarray, qe_times: int, qe_k: int,
                  alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """FastReID's ``aqe`` (fastreid/evaluation/query_expansion.py) written out as its loop:
    query and gallery together, per row the top ``qe_k`` by cosine (itself included),
    the mean of those raw features weighted by sim ** alpha."""
    feats = np.concatenate([query, gallery]).astype(np.float64)
    for _ in range(qe_times):
        unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        sims = unit @ unit.T
        new = []
        for sim in sims:
            rank = np.argpartition(-sim, range(1, qe_k + 1))[:qe_k]
            weights = np.power(sim[rank].reshape(-1, 1), alpha)
            new.append(np.mean(feats[rank] * weights, axis=0))
        feats = np.stack(new)
    return feats[:len(query)], feats[len(query):]


@pytest.mark.parametrize("times,k,alpha", [(1, 5, 3.0), (2, 3, 1.0), (1, 1, 3.0)])
def test_aqe_equals_fastreid_reference(times, k, alpha):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    query = centres[rng.integers(0, 6, 9)] + 0.4 * rng.normal(size=(9, 16))
    gallery = centres[rng.integers(0, 6, 23)] + 0.4 * rng.normal(size=(23, 16))
    ref_q, ref_g = _fastreid_aqe(query, gallery, times, k, alpha)
    q, g = average_query_expansion(query, gallery, k, alpha, times, chunk_size=7)
    np.testing.assert_allclose(q, ref_q, atol=1e-5)
    np.testing.assert_allclose(g, ref_g, atol=1e-5)


def test_aqe_zero_rounds_is_the_input_and_bad_k_is_refused():
    x = np.eye(3, dtype=np.float32)
    q, g = average_query_expansion(x[:1], x[1:], times=0)
    np.testing.assert_array_equal(np.concatenate([q, g]), x)
    with pytest.raises(ValueError, match="k must be >= 1"):
        average_query_expansion(x[:1], x[1:], k=0)


def test_visible_global_feature_by_hand():
    features = np.array([[[3.0, 0, 0], [0, 2.0, 0], [0, 0, 5.0]],
                         [[1.0, 1, 0], [0, 0, 1.0], [2.0, 0, 0]]])
    visible = np.array([[True, True, False], [False, False, False]])
    out = visible_global_feature(features, visible)
    # image 0: unit parts 0 and 1 -> (1, 1, 0) / sqrt 2; image 1: no visible part -> all
    np.testing.assert_allclose(out[0], [2 ** -0.5, 2 ** -0.5, 0], atol=1e-6)
    summed = np.array([2 ** -0.5 + 1, 2 ** -0.5, 1.0])
    np.testing.assert_allclose(out[1], summed / np.linalg.norm(summed), atol=1e-6)
    dist = part_distance(out[:, None], out[:, None])          # one part: cosine distance
    np.testing.assert_allclose(np.diag(dist), 0, atol=1e-6)
    assert dist[0, 1] == pytest.approx(1 - out[0] @ out[1], abs=1e-6)
    with pytest.raises(ValueError, match=r"\(N, M, D\)"):
        visible_global_feature(features[0], visible)
