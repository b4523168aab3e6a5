"""Plain loop references for :mod:`orgnn.retrieval.metrics`, written from the definitions.

They are slow on purpose: one Python iteration per query (``evaluate_loop``) or per sample
(``re_ranking_loop``), no cleverness, so that the vectorised code can be checked against them.
``re_ranking_loop`` is the direct numpy rendering of the original k-reciprocal re-ranking of
Zhong et al. (CVPR 2017), step for step as the authors' code is written (dense ``(N, N)``
matrices, ``np.argsort`` of every row); the benchmarks use it as the baseline.
"""
from __future__ import annotations

import numpy as np


def evaluate_loop(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
) -> dict:
    """Market-1501 evaluation, one query at a time.

    For each query: sort the gallery by distance (stable, so ties keep gallery order), drop the
    items with the query's identity *and* camera, and read the ranks of the true matches in
    what is left. A query with no true match left is skipped.
    """
    distmat = np.asarray(distmat, dtype=np.float64)
    num_q, num_g = distmat.shape
    cmcs, aps, inps, first_ranks = [], [], [], []
    skipped = 0
    for q in range(num_q):
        order = np.argsort(distmat[q], kind="stable")
        kept_is_match = []
        for g in order:
            same_pid = g_pids[g] == q_pids[q]
            same_cam = g_camids[g] == q_camids[q]
            if same_pid and same_cam:
                continue  # junk: same person seen by the same camera
            kept_is_match.append(bool(same_pid))
        match_ranks = [r + 1 for r, m in enumerate(kept_is_match) if m]  # 1-based
        if not match_ranks:
            skipped += 1
            continue
        # precision at the n-th true match = n / (its rank)
        precisions = [n / r for n, r in enumerate(match_ranks, start=1)]
        aps.append(sum(precisions) / len(precisions))
        inps.append(len(match_ranks) / match_ranks[-1])
        first = match_ranks[0]
        first_ranks.append(first)
        # CMC at rank k: 1 if a true match is within the top k (past the end: stays 1)
        cmcs.append([1.0 if k >= first else 0.0 for k in range(1, max_rank + 1)])
    cmc = np.mean(np.asarray(cmcs), axis=0)
    return {
        "cmc": cmc,
        "mAP": float(np.mean(aps)),
        "mINP": float(np.mean(inps)),
        "rank1": float(np.mean([r <= 1 for r in first_ranks])),
        "rank5": float(np.mean([r <= 5 for r in first_ranks])),
        "rank10": float(np.mean([r <= 10 for r in first_ranks])),
        "num_valid_queries": len(aps),
        "num_skipped_queries": skipped,
    }


def _k_reciprocal(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
    """The elements of ``i``'s top ``k + 1`` whose own top ``k + 1`` contains ``i``."""
    forward = initial_rank[i, : k + 1]
    backward = initial_rank[forward, : k + 1]
    rows = np.where(backward == i)[0]
    return forward[rows]


def re_ranking_loop(
    q_g_dist: np.ndarray,
    q_q_dist: np.ndarray,
    g_g_dist: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    argsort_kind: str = "quicksort",
) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017), the original algorithm with its loops.

    Same inputs, steps and output as the authors' ``re_ranking`` (as shipped in torchreid's
    ``utils/rerank.py``): squared distances normalised by their column maximum and transposed,
    ``np.argsort`` of every row, k1-reciprocal sets expanded by the k1/2-reciprocal sets of
    their members when those overlap by more than 2/3, Gaussian weights, local query expansion
    over the k2 nearest neighbours, Jaccard distance over the query rows, and
    ``jaccard * (1 - lambda) + original * lambda`` on the query-gallery block.

    ``argsort_kind`` is the ``kind`` of the one ``np.argsort``; the default ``"quicksort"`` is
    numpy's default, as in the original. ``"stable"`` ranks equal distances by index, which
    is how :func:`orgnn.retrieval.metrics.re_ranking` breaks ties.
    """
    query_num = q_g_dist.shape[0]
    all_num = q_g_dist.shape[0] + q_g_dist.shape[1]
    original_dist = np.concatenate(
        [
            np.concatenate([q_q_dist, q_g_dist], axis=1),
            np.concatenate([q_g_dist.T, g_g_dist], axis=1),
        ],
        axis=0,
    )
    original_dist = np.power(original_dist, 2).astype(np.float32)
    original_dist = np.transpose(1.0 * original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist, kind=argsort_kind).astype(np.int32)

    half_k1 = int(np.around(k1 / 2.0))
    for i in range(all_num):
        k_reciprocal_index = _k_reciprocal(initial_rank, i, k1)
        expansion = k_reciprocal_index
        for candidate in k_reciprocal_index:
            candidate_set = _k_reciprocal(initial_rank, candidate, half_k1)
            overlap = len(np.intersect1d(candidate_set, k_reciprocal_index))
            if overlap > 2.0 / 3 * len(candidate_set):
                expansion = np.append(expansion, candidate_set)
        expansion = np.unique(expansion)
        weight = np.exp(-original_dist[i, expansion])
        V[i, expansion] = 1.0 * weight / np.sum(weight)

    original_dist = original_dist[:query_num]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    del initial_rank

    inv_index = []  # inv_index[j]: the samples whose encoding is non-zero at j
    for j in range(all_num):
        inv_index.append(np.where(V[:, j] != 0)[0])

    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
        ind_non_zero = np.where(V[i, :] != 0)[0]
        ind_images = [inv_index[ind] for ind in ind_non_zero]
        for j in range(len(ind_non_zero)):
            temp_min[0, ind_images[j]] = temp_min[0, ind_images[j]] + np.minimum(
                V[i, ind_non_zero[j]], V[ind_images[j], ind_non_zero[j]]
            )
        jaccard_dist[i] = 1 - temp_min / (2.0 - temp_min)

    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:query_num, query_num:]
