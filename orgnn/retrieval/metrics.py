"""Retrieval metrics: CMC, mAP and mINP (Market-1501 protocol) and k-reciprocal re-ranking.

Both functions take numpy arrays or torch tensors and work on the CPU with numpy (and
``torch.topk``); nothing here imports :mod:`orgnn.reid` or torchvision.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

__all__ = ["evaluate", "re_ranking", "valid_queries"]

ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype == object:
        raise ValueError(f"{name} must be a numeric array, got dtype object")
    return x


def _check_no_nan(x: np.ndarray, name: str) -> None:
    if np.issubdtype(x.dtype, np.floating) and np.isnan(x).any():
        raise ValueError(f"{name} contains NaN ({int(np.isnan(x).sum())} entries)")


def _stable_argsort(d: np.ndarray) -> np.ndarray:
    """Row-wise ``np.argsort(d, kind="stable")``, several times faster.

    The default (unstable, SIMD) argsort gets the order right up to runs of equal values; a
    second sort of the keys ``(run number, gallery index)`` packed in one int64 (run in the
    high 32 bits, index in the low 32) puts each run in index order.
    """
    order = np.argsort(d, axis=1)
    ranked = np.take_along_axis(d, order, axis=1)
    run = np.zeros(ranked.shape, dtype=np.int64)
    np.cumsum(ranked[:, 1:] != ranked[:, :-1], axis=1, out=run[:, 1:])
    del ranked
    key = (run << 32) | order
    key.sort(axis=1)
    return key & 0xFFFFFFFF


def evaluate(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 50,
    *,
    chunk_size: int = 512,
) -> dict:
    r"""CMC, mAP and mINP under the Market-1501 protocol.

    For every query, the gallery items with the query's identity **and** camera are removed
    (junk); a query with no true match left is skipped and counted. On the remaining ranked
    list of a valid query :math:`q`, with true matches at (1-based) ranks
    :math:`r_1 < \dots < r_{n_q}`,

    .. math::
        \mathrm{AP}(q) = \frac{1}{n_q} \sum_{j=1}^{n_q} \frac{j}{r_j}, \qquad
        \mathrm{INP}(q) = \frac{n_q}{r_{n_q}}, \qquad
        \mathrm{CMC}_q(k) = \mathbb{1}[r_1 \le k],

    and mAP, mINP and CMC are their means over the valid queries (Ye et al., "Deep Learning for
    Person Re-identification: A Survey"; torchreid ``eval_market1501``, FastReID
    ``evaluate_rank``).

    Ties in distance are broken by gallery index (a stable sort). torchreid and FastReID use
    ``np.argsort``'s default sort, whose order among ties is unspecified, so the numbers agree
    with theirs whenever no two gallery distances of a query are equal.

    The CMC always has ``max_rank`` entries. Past the end of a ranked list the per-query CMC
    keeps its last value (1 for a valid query), so with fewer than ``max_rank`` gallery items
    the tail repeats the last value, where torchreid instead shortens the curve to the gallery
    size; the common prefix is the same. ``rank1``/``rank5``/``rank10`` are read from the
    first-match ranks directly and do not depend on ``max_rank``.

    Queries are processed in blocks of ``chunk_size`` rows, so memory stays at a few
    ``chunk_size x G`` arrays.

    Args:
        distmat: distances, shape ``(Q, G)``; smaller is closer. NaN is rejected; ``inf`` is
            allowed and ranks last.
        q_pids: query identities, shape ``(Q,)``.
        g_pids: gallery identities, shape ``(G,)``.
        q_camids: query cameras, shape ``(Q,)``.
        g_camids: gallery cameras, shape ``(G,)``.
        max_rank: length of the CMC curve (default ``50``).
        chunk_size: number of query rows sorted at once (default ``512``).

    Returns:
        dict with ``"cmc"`` (``np.ndarray`` of ``max_rank`` fractions, ``cmc[k-1]`` = rank-k
        accuracy), ``"mAP"``, ``"mINP"``, ``"rank1"``, ``"rank5"``, ``"rank10"`` (floats in
        ``[0, 1]``, not percent), ``"num_valid_queries"`` and ``"num_skipped_queries"`` (ints).

    Raises:
        ValueError: on shape mismatches, NaN in ``distmat``, ``max_rank < 1``, or when no
            query has a true match in the gallery.
    """
    distmat = _to_numpy(distmat, "distmat")
    q_pids = _to_numpy(q_pids, "q_pids")
    g_pids = _to_numpy(g_pids, "g_pids")
    q_camids = _to_numpy(q_camids, "q_camids")
    g_camids = _to_numpy(g_camids, "g_camids")
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape "
                         f"{distmat.shape}")
    num_q, num_g = distmat.shape
    for name, arr, n, side in (("q_pids", q_pids, num_q, "rows"),
                               ("q_camids", q_camids, num_q, "rows"),
                               ("g_pids", g_pids, num_g, "columns"),
                               ("g_camids", g_camids, num_g, "columns")):
        if arr.shape != (n,):
            raise ValueError(f"shape mismatch: {name} has shape {arr.shape}, but distmat "
                             f"{distmat.shape} has {n} {side}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_no_nan(distmat, "distmat")

    first_rank = np.zeros(num_q, dtype=np.int64)  # rank of the first true match, 0 = none
    ap = np.zeros(num_q, dtype=np.float64)
    inp = np.zeros(num_q, dtype=np.float64)
    for start in range(0, num_q, chunk_size):
        stop = min(start + chunk_size, num_q)
        order = _stable_argsort(distmat[start:stop])
        same_pid = g_pids[order] == q_pids[start:stop, None]
        same_cam = g_camids[order] == q_camids[start:stop, None]
        keep = ~(same_pid & same_cam)
        del order
        good = same_pid & ~same_cam  # true matches that survive the junk removal
        # rank of each position among the kept items (1-based; junk positions are never read)
        kept_rank = np.cumsum(keep, axis=1, dtype=np.int32)
        rows, cols = np.nonzero(good)  # row-major: ranks increase within a row
        ranks = kept_rank[rows, cols].astype(np.float64)
        del kept_rank, same_pid, same_cam, keep, good
        n = np.bincount(rows, minlength=stop - start)
        hit_no = np.arange(1, rows.size + 1) - np.repeat(np.cumsum(n) - n, n)  # j of r_j
        valid = n > 0
        ap_sum = np.bincount(rows, weights=hit_no / ranks, minlength=stop - start)
        bounds = np.cumsum(n)
        ap[start:stop][valid] = ap_sum[valid] / n[valid]
        first_rank[start:stop][valid] = ranks[(bounds - n)[valid]]
        inp[start:stop][valid] = n[valid] / ranks[bounds[valid] - 1]

    valid = first_rank > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError("no valid query: no query has a true match in the gallery once the "
                         "same-identity, same-camera items are removed")
    firsts = first_rank[valid]
    counts = np.bincount(np.minimum(firsts, max_rank + 1), minlength=max_rank + 2)
    cmc = np.cumsum(counts[1 : max_rank + 1]) / num_valid
    return {
        "cmc": cmc,
        "mAP": float(ap[valid].mean()),
        "mINP": float(inp[valid].mean()),
        "rank1": float(np.mean(firsts <= 1)),
        "rank5": float(np.mean(firsts <= 5)),
        "rank10": float(np.mean(firsts <= 10)),
        "num_valid_queries": num_valid,
        "num_skipped_queries": num_q - num_valid,
    }


def valid_queries(q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
                  g_camids: ArrayLike) -> np.ndarray:
    """``(Q,)`` bool: the queries :func:`evaluate` scores, i.e. those with at least one gallery
    item of their identity seen by another camera (the others are skipped). It depends on the
    labels only, so it is the same for every distance matrix; memory is ``O(Q + G)``."""
    q_pids, g_pids = _to_numpy(q_pids, "q_pids"), _to_numpy(g_pids, "g_pids")
    q_camids, g_camids = _to_numpy(q_camids, "q_camids"), _to_numpy(g_camids, "g_camids")
    if q_pids.shape != q_camids.shape or g_pids.shape != g_camids.shape:
        raise ValueError("pids and camids must have the same shape on each side")
    num_g = len(g_pids)
    _, pid = np.unique(np.concatenate([g_pids, q_pids]), return_inverse=True)
    _, cam = np.unique(np.concatenate([g_camids, q_camids]), return_inverse=True)
    num_cams = int(cam.max()) + 1 if cam.size else 1
    key = pid.astype(np.int64) * num_cams + cam  # one integer per (identity, camera)
    gallery_pairs = np.unique(key[:num_g])
    cams_of_pid = np.bincount(gallery_pairs // num_cams, minlength=int(pid.max(initial=0)) + 1)
    same_camera_in_gallery = np.isin(key[num_g:], gallery_pairs)
    return cams_of_pid[pid[num_g:]] - same_camera_in_gallery > 0


# --------------------------------------------------------------------------------------------
# k-reciprocal re-ranking
# --------------------------------------------------------------------------------------------

# Working-set sizes of :func:`re_ranking` (module-level so tests can shrink them).
_ROW_BLOCK = 256  # rows of O per top-k block: 256 x N float32 (20 MB at N = 20k)
_SET_BLOCK = 1024  # samples per block when expanding k-reciprocal sets
_MAX_PAIRS = 1 << 23  # (query, gallery, column) triples per Jaccard group


class _Blocks:
    r"""The ``(N, N)`` matrix :math:`O` of the original algorithm, without building it.

    With :math:`D = [[D_{qq}, D_{qg}], [D_{qg}^\top, D_{gg}]]`, the original computes
    ``O = (D**2 / D**2.max(axis=0)).T``, i.e. :math:`O_{ij} = D_{ji}^2 / \max_a D_{ai}^2`:
    row ``i`` of ``O`` is column ``i`` of the squared :math:`D` over its own maximum. Squares
    are taken in the inputs' common dtype and rounded to float32, then divided in float32,
    exactly as the original does.
    """

    def __init__(self, q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray, block: int) -> None:
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.num_q, self.num_g = q_g.shape
        self.n = self.num_q + self.num_g
        self.dtype = np.result_type(q_g, q_q, g_g)
        self.block = block
        self.row_max = np.empty(self.n, dtype=np.float32)

    def square(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        # computed in the inputs' dtype, then rounded to float32 (numpy picks the loop from
        # the input, not from ``out``)
        if out is None:
            out = np.empty(x.shape, dtype=np.float32)
        return np.square(x.astype(self.dtype, copy=False), out=out)

    def square_t(self, x: np.ndarray, out: np.ndarray, tile: int = 256) -> None:
        """``out = square(x.T)``, transposing tile by tile (a plain strided copy of a tall
        column block is several times slower)."""
        for start in range(0, x.shape[0], tile):
            stop = min(start + tile, x.shape[0])
            self.square(x[start:stop].T, out=out[:, start:stop])

    def raw_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``D.T`` squared, float32 (not yet normalised)."""
        nq = self.num_q
        out = np.empty((stop - start, self.n), dtype=np.float32)
        if stop <= nq:  # query rows i: D[:, i] = [q_q[:, i]; q_g[i, :]]
            self.square_t(self.q_q[:, start:stop], out[:, :nq])
            self.square(self.q_g[start:stop], out=out[:, nq:])
        else:  # gallery rows nq + g: D[:, nq + g] = [q_g[:, g]; g_g[:, g]]
            g0, g1 = start - nq, stop - nq
            self.square_t(self.q_g[:, g0:g1], out[:, :nq])
            self.square_t(self.g_g[:, g0:g1], out[:, nq:])
        return out

    def row_blocks(self) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of blocks of at most ``block`` rows, split at ``Q``."""
        for lo, hi in ((0, self.num_q), (self.num_q, self.n)):  # never straddle Q
            for start in range(lo, hi, self.block):
                yield start, min(start + self.block, hi)

    def gather(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        r""":math:`O_{ij}` for index arrays ``i``, ``j`` (``row_max`` must be filled)."""
        nq = self.num_q
        d = np.empty(i.shape, dtype=self.dtype)
        iq, jq = i < nq, j < nq  # O_ij comes from D_ji
        m = iq & jq
        d[m] = self.q_q[j[m], i[m]]
        m = iq & ~jq
        d[m] = self.q_g[i[m], j[m] - nq]
        m = ~iq & jq
        d[m] = self.q_g[j[m], i[m] - nq]
        m = ~iq & ~jq
        d[m] = self.g_g[j[m] - nq, i[m] - nq]
        return self.square(d) / self.row_max[i]


def _argsort_head(x: np.ndarray, k: int) -> np.ndarray:
    """``np.argsort(x, axis=1, kind="stable")[:, :k]``, from ``torch.topk``.

    ``torch.topk`` finds the ``k + 1`` smallest per row (ties in any order); they are sorted
    by ``(value, index)``, and the rare rows where the ``k``-th and ``(k+1)``-th values tie
    (so equal values beyond the ``k + 1`` may have smaller indices) are redone with a full
    stable argsort.
    """
    n = x.shape[1]
    vals, idx = torch.topk(torch.from_numpy(x), min(k + 1, n), dim=1, largest=False)
    vals, idx = vals.numpy(), idx.numpy()
    order = np.lexsort((idx, vals), axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    if k < n:
        for r in np.nonzero(vals[:, k - 1] == vals[:, k])[0]:
            idx[r, :k] = np.argsort(x[r], kind="stable")[:k]
    return idx[:, :k]


def _reciprocal(nn: np.ndarray, block: int) -> np.ndarray:
    """``mask[i, a]``: is ``i`` among the neighbours of its neighbour ``nn[i, a]``?"""
    mask = np.empty(nn.shape, dtype=bool)
    for start in range(0, nn.shape[0], block):
        stop = min(start + block, nn.shape[0])
        me = np.arange(start, stop)[:, None, None]
        mask[start:stop] = (nn[nn[start:stop]] == me).any(axis=2)
    return mask


def _ragged_arange(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for every pair (vectorised)."""
    total = int(counts.sum())
    offsets = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return offsets + np.arange(total, dtype=np.int64)


def _unique_sum(
    rows: np.ndarray, cols: np.ndarray, vals: np.ndarray | None, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Merge duplicate ``(row, col)`` entries of an ``(n, n)`` sparse matrix, summing ``vals``
    (if given); returns ``rows, cols, vals`` sorted by row, then column."""
    if vals is None:
        key = np.unique(rows * n + cols)
        return key // n, key % n, None
    key, inverse = np.unique(rows * n + cols, return_inverse=True)
    summed = np.bincount(inverse.ravel(), weights=vals, minlength=key.size)
    return key // n, key % n, summed


def re_ranking(
    q_g_dist: ArrayLike,
    q_q_dist: ArrayLike,
    g_g_dist: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    r"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with
    k-reciprocal Encoding", CVPR 2017).

    Gives the result of the authors' ``re_ranking`` (the one in torchreid's
    ``utils/rerank.py``), computed with sparse sets instead of dense ``(N, N)`` loops,
    :math:`N = Q + G`. With :math:`O_{ij} = D_{ji}^2 / \max_a D_{ai}^2` built from the joint
    distance matrix :math:`D` and :math:`N(i, k)` the :math:`k + 1` nearest samples of
    :math:`i` under :math:`O` (itself included):

    .. math::
        R(i, k) &= \{ j \in N(i, k) : i \in N(j, k) \}, \\
        R^*(i) &= R(i, k_1) \cup \bigcup_{c \in R(i, k_1),\
            |R(c, h) \cap R(i, k_1)| > \frac23 |R(c, h)|} R(c, h), \qquad
            h = \mathrm{round}(k_1 / 2)\ \text{(half to even, as np.around)}, \\
        V_{ij} &= \frac{e^{-O_{ij}}}{\sum_{l \in R^*(i)} e^{-O_{il}}}\ (j \in R^*(i)), \qquad
        \tilde V_i = \frac{1}{k_2} \sum_{l \in N(i, k_2 - 1)} V_l, \\
        d_J(i, j) &= 1 - \frac{\sum_l \min(\tilde V_{il}, \tilde V_{jl})}
            {2 - \sum_l \min(\tilde V_{il}, \tilde V_{jl})}, \qquad
        d^*(i, j) = (1 - \lambda)\, d_J(i, j) + \lambda\, O_{ij}.

    (The denominator is the original's: rows of :math:`\tilde V` sum to 1, so it equals the
    sum of maxima.) The query expansion is skipped when ``k2 == 1``, as in the original.

    Ties: the neighbour lists are exactly ``np.argsort(O, kind="stable")[:, :k]`` (equal
    distances ranked by sample index; computed with ``torch.topk`` on blocks of rows of
    :math:`O`, which is never held whole). The original uses ``np.argsort``'s default sort,
    whose order among equal distances is unspecified (it even depends on the CPU's SIMD
    support), so the two can differ only where a tie straddles the ``k1 + 1``,
    ``round(k1/2) + 1`` or ``k2`` boundary of some sample's list; otherwise they agree to
    float rounding (``atol=1e-5``). Note that :math:`O` is float32, so ties do occur at
    Market-1501 sizes (a handful of samples out of 20k).

    Args:
        q_g_dist: query-gallery distances, shape ``(Q, G)``.
        q_q_dist: query-query distances, shape ``(Q, Q)``.
        g_g_dist: gallery-gallery distances, shape ``(G, G)``.
        k1: size of the k-reciprocal neighbourhood (default ``20``).
        k2: size of the local query expansion (default ``6``).
        lambda_value: weight of the original distance (default ``0.3``).

    Returns:
        np.ndarray: re-ranked query-gallery distances :math:`d^*`, shape ``(Q, G)``, float32.

    Raises:
        ValueError: on inconsistent shapes, NaN in an input, ``k1 < 1`` or ``k2 < 1``.
    """
    q_g = _to_numpy(q_g_dist, "q_g_dist")
    q_q = _to_numpy(q_q_dist, "q_q_dist")
    g_g = _to_numpy(g_g_dist, "g_g_dist")
    if q_g.ndim != 2:
        raise ValueError(f"q_g_dist must be 2-D (Q, G), got shape {q_g.shape}")
    num_q, num_g = q_g.shape
    if q_q.shape != (num_q, num_q) or g_g.shape != (num_g, num_g):
        raise ValueError(f"shape mismatch: q_g_dist {q_g.shape} needs q_q_dist "
                         f"{(num_q, num_q)} and g_g_dist {(num_g, num_g)}, got {q_q.shape} "
                         f"and {g_g.shape}")
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    for name, x in (("q_g_dist", q_g), ("q_q_dist", q_q), ("g_g_dist", g_g)):
        _check_no_nan(x, name)
    n = num_q + num_g
    O = _Blocks(q_g, q_q, g_g, block=_ROW_BLOCK)

    # 1. nearest-neighbour lists N(i, k): the first columns of the original's argsort
    knn = np.empty((n, _knn_width(n, k1, k2)), dtype=np.int64)
    for start, stop in O.row_blocks():
        rows = O.raw_rows(start, stop)
        O.row_max[start:stop] = rows.max(axis=1)
        rows /= O.row_max[start:stop, None]
        knn[start:stop] = _argsort_head(rows, knn.shape[1])
        del rows

    # 2.-4. k-reciprocal sets, Gaussian weights, local query expansion: sparse V~
    rows, cols, vals = _expanded_v(knn, O.gather, k1, k2)
    del knn

    # 5.-6. Jaccard distance, blended with the original distance O[:Q, Q:] = q_g**2 / row_max
    out = np.empty((num_q, num_g), dtype=np.float32)
    for start, stop, jaccard in _jaccard_blocks(rows, cols, vals, num_q, n, _MAX_PAIRS):
        orig = O.square(q_g[start:stop]) / O.row_max[start:stop, None]
        out[start:stop] = jaccard * (1 - lambda_value) + orig * lambda_value
    return out


def _knn_width(n: int, k1: int, k2: int) -> int:
    """Columns of the neighbour lists :func:`_expanded_v` needs: ``k1 + 1`` and ``k2``."""
    return min(max(k1 + 1, k2), n)


def _expanded_v(knn: np.ndarray, gather: Callable[[np.ndarray, np.ndarray], np.ndarray],
                k1: int, k2: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Steps 2-4 of :func:`re_ranking`: the k-reciprocal sets :math:`R^*(i)`, their Gaussian
    weights :math:`V` and the local query expansion :math:`\tilde V`, all sparse.

    Args:
        knn: ``(N, >= min(max(k1 + 1, k2), N))`` neighbour lists ``N(i, .)`` under :math:`O`
            (itself first, ties by index), the first columns of a stable argsort.
        gather: ``gather(i, j)`` returns :math:`O_{ij}` for index arrays ``i``, ``j``.
        k1, k2: as in :func:`re_ranking`.

    Returns:
        ``rows, cols, vals``: the non-zeros of :math:`\tilde V` sorted by row, then column
        (``vals`` float32).
    """
    n = knn.shape[0]
    k_f = min(k1 + 1, n)
    k_h = min(int(np.around(k1 / 2.0)) + 1, n)
    k_q = min(k2, n)

    # 2. k-reciprocal sets R(i, k1), R(c, k1/2) and the expansion R*(i)
    fwd, half = knn[:, :k_f], knn[:, :k_h]
    rec, half_rec = _reciprocal(fwd, _SET_BLOCK), _reciprocal(half, _SET_BLOCK)
    half_size = half_rec.sum(axis=1)
    parts_r, parts_c = [np.nonzero(rec)[0]], [fwd[rec]]
    block = _SET_BLOCK
    in_r_mark = np.zeros((min(block, n), n), dtype=bool)  # in_r_mark[i - start, j]: j in R(i, k1)
    for start in range(0, n, block):
        stop = min(start + block, n)
        f, r = fwd[start:stop], rec[start:stop]
        rr, aa = np.nonzero(r)
        in_r_mark[rr, f[rr, aa]] = True
        cand = half[f]  # (b, k_f, k_h): N(c, k1/2) of every c in N(i, k1)
        cand_ok = half_rec[f]  # ... masked to R(c, k1/2)
        in_r = in_r_mark[np.arange(stop - start)[:, None, None], cand]
        in_r_mark[rr, f[rr, aa]] = False
        overlap = (in_r & cand_ok).sum(axis=2)
        take = r & (overlap > 2.0 / 3 * half_size[f])
        sel = take[..., None] & cand_ok
        parts_r.append(np.nonzero(sel)[0] + start)
        parts_c.append(cand[sel])
    del rec, half_rec, half_size, in_r_mark
    rows, cols, _ = _unique_sum(np.concatenate(parts_r), np.concatenate(parts_c), None, n)
    del parts_r, parts_c

    # 3. Gaussian weights, normalised per row: V in CSR-like form (rows sorted)
    weight = np.exp(-gather(rows, cols))
    vals = weight / np.bincount(rows, weights=weight, minlength=n)[rows]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])

    # 4. local query expansion: mean of V over the k2 nearest neighbours
    if k2 != 1:
        nb = knn[:, :k_q].ravel()
        counts = indptr[nb + 1] - indptr[nb]
        pos = _ragged_arange(indptr[nb], counts)
        owner = np.repeat(np.repeat(np.arange(n), k_q), counts)
        rows, cols, vals = _unique_sum(owner, cols[pos], vals[pos], n)
        vals = vals / k_q
        del nb, counts, pos, owner
    return rows, cols, vals.astype(np.float32)


def _jaccard_blocks(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, num_q: int, n: int,
                    max_pairs: int) -> Iterator[tuple[int, int, np.ndarray]]:
    r"""Jaccard distance :math:`1 - m / (2 - m)`, :math:`m = \sum_l \min(V_{il}, V_{jl})`,
    between query rows ``i < num_q`` and gallery rows ``j >= num_q`` of a sparse ``V``,
    yielded as ``(start, stop, block)`` with ``block`` the float32 ``(stop - start, G)``
    distances of queries ``start:stop``.

    Every pair of non-zeros sharing a column contributes one ``min``; pairs are generated per
    group of queries holding at most ``max_pairs`` of them (and at most ``max_pairs`` cells
    of the block) and summed with ``bincount``.
    """
    num_g = n - num_q
    is_q = rows < num_q
    q_rows, q_cols, q_vals = rows[is_q], cols[is_q], vals[is_q]  # sorted by row
    g_order = np.argsort(cols[~is_q], kind="stable")
    g_rows = rows[~is_q][g_order] - num_q
    g_cols = cols[~is_q][g_order]
    g_vals = vals[~is_q][g_order]
    g_ptr = np.searchsorted(g_cols, np.arange(n + 1))
    g_count = np.diff(g_ptr)

    pairs = g_count[q_cols]  # pairs contributed by each query non-zero
    per_query = np.bincount(q_rows, weights=pairs, minlength=num_q)
    q_ptr = np.searchsorted(q_rows, np.arange(num_q + 1))
    max_rows = max(1, max_pairs // max(num_g, 1))
    start = 0
    while start < num_q:
        # grow the group while it stays under max_pairs (at least one query)
        cum = np.cumsum(per_query[start:start + max_rows])
        stop = start + max(1, int(np.searchsorted(cum, max_pairs, side="right")))
        lo, hi = q_ptr[start], q_ptr[stop]
        c = pairs[lo:hi]
        pos = _ragged_arange(g_ptr[q_cols[lo:hi]], c)
        local = np.repeat(q_rows[lo:hi] - start, c)
        mins = np.minimum(np.repeat(q_vals[lo:hi], c), g_vals[pos])
        m = np.bincount(local * num_g + g_rows[pos], weights=mins,
                        minlength=(stop - start) * num_g).astype(np.float32)
        del c, pos, local, mins
        yield start, stop, (1 - m / (2.0 - m)).reshape(stop - start, num_g)
        start = stop
