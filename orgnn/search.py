"""Neighbourhood search in the gallery (paper Eq. 3, SPEC section 3).

Every image ``I`` has ``M`` part features ``x_k(I)`` and a visibility mask ``m_k(I)``. Its
neighbourhood ``N(I)`` is a set of gallery images found with the parts it *searches with*
(:func:`search_parts_for`). Two modes are offered:

``"intersection"`` (the paper, Eq. 3): per searching part ``k``, the ``K`` gallery items most
cosine-similar by part ``k`` that have similarity at least ``theta``; ``N(I)`` is the
intersection of these per-part lists:

.. math::

    \\mathcal{N}(\\mathcal{I}_a) = \\bigcap_{m_k(\\mathcal{I}_a) \\neq 0}
    \\mathcal{N}(\\mathbf{x}_k(\\mathcal{I}_a)).

``"visible-mean"``: the top-``K`` gallery items by the *mean* cosine similarity over the
searching parts, keeping those whose mean is at least ``theta``. It is a single faiss
inner-product search over concatenated normalised parts: the gallery vector is
``concat_k(g_k / |g_k|)`` and the query vector ``concat_k(s_k q_k / |q_k|) / |S|`` (``s_k`` the
0/1 search mask, ``|S|`` its size), whose inner product is exactly the mean cosine.

In both modes the returned neighbours are ordered by that mean cosine over the searching parts
(the ``score``). ``"visible-mean"`` is the default because the intersection of per-part top-K
lists is usually tiny: on the real proxy (SPEC section 3) intersection leaves 791 of 898
occluded queries without any neighbour at K=10 (336 at K=60), visible-mean none.

Zero part vectors have cosine 0 with everything (never NaN). Search is exact
(``IndexFlatIP``) by default; ``index="ivf"`` uses ``IndexIVFFlat`` with the inner-product
metric for large galleries. faiss' global thread count is left as it is.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

__all__ = ["Neighbourhoods", "search_parts_for", "search_neighbourhoods"]

MODES = ("visible-mean", "intersection")
INDEXES = ("flat", "ivf")
#: faiss wants at least this many training points per IVF list.
MIN_POINTS_PER_LIST = 39


@dataclass
class Neighbourhoods:
    """Result of :func:`search_neighbourhoods`.

    Attributes:
        index: ``(Q, K)`` int64 gallery indices, ``-1`` where padded. Valid entries come first,
            ordered by decreasing score.
        score: ``(Q, K)`` float32 mean cosine similarity over the searching parts of each
            neighbour; padded entries hold 0.
        search_parts: ``(Q, M)`` bool, the parts each query searched with.
    """

    index: np.ndarray
    score: np.ndarray
    search_parts: np.ndarray

    def __post_init__(self) -> None:
        if self.index.ndim != 2 or self.score.shape != self.index.shape:
            raise ValueError(
                f"index and score must be (Q, K) arrays of one shape, got {self.index.shape} "
                f"and {self.score.shape}"
            )
        if self.search_parts.ndim != 2 or self.search_parts.shape[0] != self.index.shape[0]:
            raise ValueError(
                f"search_parts must be (Q, M) with Q={self.index.shape[0]}, "
                f"got {self.search_parts.shape}"
            )

    @property
    def valid(self) -> np.ndarray:
        """``(Q, K)`` bool, True where an entry is a real neighbour."""
        return self.index >= 0

    @property
    def counts(self) -> np.ndarray:
        """``(Q,)`` int64 number of valid neighbours of each query."""
        return self.valid.sum(axis=1).astype(np.int64)

    @property
    def num_empty(self) -> int:
        """Number of queries without any neighbour."""
        return int((self.counts == 0).sum())

    def filter(self, keep: np.ndarray) -> Neighbourhoods:
        """Keep only some neighbours, re-packing the survivors to the front of each row.

        Args:
            keep: ``(Q, K)`` bool, True for the entries to keep (padded entries stay dropped).

        Returns:
            A new :class:`Neighbourhoods` with the same ``search_parts``; the order of the kept
            entries is unchanged.
        """
        keep = np.asarray(keep)
        if keep.shape != self.index.shape:
            raise ValueError(f"keep must have shape {self.index.shape}, got {keep.shape}")
        if keep.dtype != np.bool_:
            raise ValueError(f"keep must be a bool array, got dtype {keep.dtype}")
        index, score = _pack(self.index, self.score, keep & self.valid, self.index.shape[1])
        return Neighbourhoods(index=index, score=score, search_parts=self.search_parts.copy())


def search_parts_for(
    visible: np.ndarray, upper_body_parts: Sequence[int] | None = (0, 1)
) -> np.ndarray:
    """The parts each image searches its neighbourhood with.

    * a partly visible image searches with its visible parts (Eq. 3);
    * an image with *every* part visible searches with ``upper_body_parts`` only, as the paper
      does on Market-1501 (``None``: with all parts);
    * an image with *no* visible part searches with all parts: the OAN found nothing reliable,
      so no part is preferred over another, and an empty search set would leave the image
      without neighbours by construction.

    Args:
        visible: ``(Q, M)`` visibility; bool, or numbers in ``[0, 1]`` where ``>= 0.5`` means
            visible (SPEC section 7).
        upper_body_parts: part indices used by fully visible images, or ``None``.

    Returns:
        ``(Q, M)`` bool search mask.
    """
    vis = _as_visibility(visible, "visible")
    m = vis.shape[1]
    parts = vis.copy()
    full = vis.all(axis=1)
    if upper_body_parts is not None:
        upper = _part_list(upper_body_parts, m)
        upper_mask = np.zeros(m, dtype=bool)
        upper_mask[upper] = True
        parts[full] = upper_mask
    none = ~vis.any(axis=1)
    parts[none] = True
    return parts


def search_neighbourhoods(
    query: np.ndarray,
    query_visible: np.ndarray,
    gallery: np.ndarray,
    *,
    k: int = 10,
    theta: float = 0.7,
    mode: str = "visible-mean",
    upper_body_parts: Sequence[int] | None = (0, 1),
    exclude: np.ndarray | None = None,
    index: str = "flat",
    nlist: int | None = None,
    nprobe: int = 16,
    batch_size: int = 4096,
    search_parts: np.ndarray | None = None,
) -> Neighbourhoods:
    """Search the gallery neighbourhood of every query image (paper Eq. 3).

    .. math::

        \\mathcal{N}(\\mathcal{I}_a) = \\bigcap_{m_k(\\mathcal{I}_a) \\neq 0}
        \\mathcal{N}(\\mathbf{x}_k(\\mathcal{I}_a))

    With ``mode="intersection"``, ``N(x_k)`` holds the ``k`` gallery items most cosine-similar
    by part ``k`` that reach ``theta``, and ``N(I)`` their intersection over the searching parts.
    With ``mode="visible-mean"``, ``N(I)`` is the top ``k`` by the mean cosine over the
    searching parts that reach ``theta``. Both order neighbours by that mean cosine.

    Args:
        query: ``(Q, M, D)`` float32/float16 part features.
        query_visible: ``(Q, M)`` visibility (bool, or numbers where ``>= 0.5`` is visible).
        gallery: ``(G, M, D)`` float32/float16 part features.
        k: neighbourhood size ``K`` (per part list in intersection mode).
        theta: similarity threshold in ``[-1, 1]``.
        mode: ``"visible-mean"`` or ``"intersection"``.
        upper_body_parts: parts used by fully visible queries (``None``: all parts).
        exclude: ``(Q,)`` int64 gallery index of each query itself, or ``-1``; never returned.
            Use it when a set searches itself (the gallery, or the training split).
        index: ``"flat"`` (exact) or ``"ivf"`` (``IndexIVFFlat``, inner product).
        nlist: IVF lists; default ``4 * sqrt(G)``, clamped to ``G // 39`` so every list has
            enough training points (below 39 points faiss falls back to flat, with a warning).
        nprobe: IVF lists visited per query.
        batch_size: queries per faiss call.
        search_parts: ``(Q, M)`` bool override of the parts to search with; when given,
            ``query_visible`` and ``upper_body_parts`` are not used to choose them.

    Returns:
        :class:`Neighbourhoods` with ``(Q, k)`` index and score arrays.
    """
    query, gallery = _check_features(query, "query"), _check_features(gallery, "gallery")
    nq, m, d = query.shape
    ng = gallery.shape[0]
    if gallery.shape[1:] != (m, d):
        raise ValueError(
            f"query parts/dims (M, D)={(m, d)} do not match gallery (M, D)={gallery.shape[1:]}"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    if not isinstance(theta, (int, float, np.floating, np.integer)) or not -1.0 <= theta <= 1.0:
        raise ValueError(f"theta must be a number in [-1, 1], got {theta!r}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if index not in INDEXES:
        raise ValueError(f"unknown index {index!r}; expected one of {INDEXES}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or nprobe < 1:
        raise ValueError(f"nprobe must be an integer >= 1, got {nprobe!r}")
    if nlist is not None and (
        isinstance(nlist, bool) or not isinstance(nlist, (int, np.integer)) or nlist < 1
    ):
        raise ValueError(f"nlist must be None or an integer >= 1, got {nlist!r}")

    vis = _as_visibility(query_visible, "query_visible")
    if vis.shape != (nq, m):
        raise ValueError(f"query_visible must have shape (Q, M)={(nq, m)}, got {vis.shape}")
    if search_parts is None:
        parts = search_parts_for(vis, upper_body_parts)
    else:
        parts = np.asarray(search_parts)
        if parts.shape != (nq, m) or parts.dtype != np.bool_:
            raise ValueError(
                f"search_parts must be a bool array of shape (Q, M)={(nq, m)}, "
                f"got {parts.dtype} {parts.shape}"
            )
        if nq and not parts.any(axis=1).all():
            bad = int(np.flatnonzero(~parts.any(axis=1))[0])
            raise ValueError(f"search_parts row {bad} selects no part; every query needs one")
        parts = parts.copy()

    excl = _check_exclude(exclude, nq, ng)
    out_index = np.full((nq, k), -1, dtype=np.int64)
    out_score = np.zeros((nq, k), dtype=np.float32)
    if nq == 0 or ng == 0:
        return Neighbourhoods(out_index, out_score, parts)

    use_ivf = index == "ivf"
    if use_ivf:
        nlist = _ivf_nlist(nlist, ng)
        use_ivf = nlist is not None
    ghat = _normalise(gallery)  # (G, M, D) float32
    # Search one more item per excluded query so that dropping the query itself still leaves k.
    k_search = min(k + int(excl is not None), ng)

    if mode == "visible-mean":
        flat = ghat.reshape(ng, m * d)
        faiss_index = _build_index(flat, use_ivf, nlist, nprobe)
        del flat
        for start in range(0, nq, batch_size):
            sl = slice(start, min(start + batch_size, nq))
            s = parts[sl]
            w = (s / s.sum(axis=1, keepdims=True)).astype(np.float32)
            q = (_normalise(query[sl]) * w[:, :, None]).reshape(len(w), m * d)
            sims, ids = faiss_index.search(q, k_search)
            keep = _valid_ids(ids, excl, sl) & (sims >= theta)
            out_index[sl], out_score[sl] = _pack(ids, sims, keep, k)
        return Neighbourhoods(out_index, out_score, parts)

    part_indexes = [  # only the parts some query searches with
        _build_index(ghat[:, p], use_ivf, nlist, nprobe) if parts[:, p].any() else None
        for p in range(m)
    ]
    del ghat
    for start in range(0, nq, batch_size):
        sl = slice(start, min(start + batch_size, nq))
        out_index[sl], out_score[sl] = _intersection_batch(
            _normalise(query[sl]), parts[sl], part_indexes, excl, sl, k, k_search, theta, ng
        )
    return Neighbourhoods(out_index, out_score, parts)


def _intersection_batch(
    qhat: np.ndarray,
    parts: np.ndarray,
    part_indexes: list[faiss.Index | None],
    excl: np.ndarray | None,
    sl: slice,
    k: int,
    k_search: int,
    theta: float,
    ng: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 3 for one batch of queries, vectorised over the batch (no per-image loop)."""
    b, m, _ = qhat.shape
    cand_ids = np.full((b, m, k), -1, dtype=np.int64)
    cand_sims = np.zeros((b, m, k), dtype=np.float32)
    excl_b = None if excl is None else excl[sl]
    for p in range(m):
        rows = np.flatnonzero(parts[:, p])
        if rows.size == 0:
            continue
        sims, ids = part_indexes[p].search(np.ascontiguousarray(qhat[rows, p]), k_search)
        # The K nearest by part p (the query itself excluded), then the threshold.
        keep = _valid_ids(ids, None if excl_b is None else excl_b[rows], slice(None))
        keep &= np.cumsum(keep, axis=1) <= k
        keep &= sims >= theta
        ids_p, sims_p = _pack(ids, sims, keep, k)
        cand_ids[rows, p] = ids_p
        cand_sims[rows, p] = sims_p

    # Count in how many searching parts each (row, id) appears; each part list is duplicate
    # free, so a candidate is in the intersection iff its count equals the row's |S|.
    valid = cand_ids >= 0
    row_of = np.broadcast_to(np.arange(b, dtype=np.int64)[:, None, None], cand_ids.shape)
    keys = row_of[valid] * ng + cand_ids[valid]
    out_ids = np.full((b, k), -1, dtype=np.int64)
    out_sims = np.zeros((b, k), dtype=np.float32)
    if keys.size == 0:
        return out_ids, out_sims
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=cand_sims[valid].astype(np.float64), minlength=uniq.size)
    urow, uid = uniq // ng, uniq % ng
    need = parts.sum(axis=1)[urow]
    hit = counts == need
    row, gid, score = urow[hit], uid[hit], sums[hit] / need[hit]
    if row.size == 0:
        return out_ids, out_sims
    order = np.lexsort((gid, -score, row))
    row, gid, score = row[order], gid[order], score[order]
    pos = np.arange(row.size) - np.searchsorted(row, row, side="left")
    ok = pos < k  # always true: the intersection is no larger than one part's list
    out_ids[row[ok], pos[ok]] = gid[ok]
    out_sims[row[ok], pos[ok]] = score[ok]
    return out_ids, out_sims


def _pack(
    ids: np.ndarray, sims: np.ndarray, keep: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Move the kept entries of each row to the front (stable) and pad to width ``k``."""
    b = ids.shape[0]
    out_ids = np.full((b, k), -1, dtype=np.int64)
    out_sims = np.zeros((b, k), dtype=np.float32)
    width = min(k, ids.shape[1])
    if b == 0 or width == 0:
        return out_ids, out_sims
    order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
    kept = np.take_along_axis(keep, order, axis=1)
    out_ids[:, :width] = np.where(kept, np.take_along_axis(ids, order, axis=1), -1)
    out_sims[:, :width] = np.where(kept, np.take_along_axis(sims, order, axis=1), 0.0)
    return out_ids, out_sims


def _valid_ids(ids: np.ndarray, excl: np.ndarray | None, sl: slice) -> np.ndarray:
    """True where faiss returned a real id that is not the query itself."""
    keep = ids >= 0
    if excl is not None:
        keep &= ids != excl[sl][:, None]
    return keep


def _normalise(x: np.ndarray) -> np.ndarray:
    """L2-normalise the last axis in float32; zero vectors stay zero (no NaN)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0).astype(np.float32)


def _build_index(
    x: np.ndarray, ivf: bool, nlist: int | None, nprobe: int
) -> faiss.Index:
    """An exact or IVF inner-product index over the rows of ``x``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    dim = x.shape[1]
    if not ivf:
        idx = faiss.IndexFlatIP(dim)
        idx.add(x)
        return idx
    quantizer = faiss.IndexFlatIP(dim)
    idx = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    idx.train(x)
    idx.add(x)
    idx.nprobe = min(nprobe, nlist)
    return idx


def _ivf_nlist(nlist: int | None, ng: int) -> int | None:
    """IVF list count: ``4 * sqrt(G)`` by default, at most ``G // 39``; None means use flat."""
    max_lists = ng // MIN_POINTS_PER_LIST
    if max_lists < 1:
        warnings.warn(
            f"gallery of {ng} items is too small to train an IVF index (needs at least "
            f"{MIN_POINTS_PER_LIST}); using exact flat search instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if nlist is None:
        return max(1, min(int(round(4 * math.sqrt(ng))), max_lists))
    if nlist > max_lists:
        warnings.warn(
            f"nlist={nlist} needs {MIN_POINTS_PER_LIST * nlist} training points but the gallery "
            f"has {ng}; using nlist={max_lists}",
            RuntimeWarning,
            stacklevel=3,
        )
        return max_lists
    return int(nlist)


def _check_features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"{name} must be a (N, M, D) array of part features, got shape {x.shape}")
    if x.dtype not in (np.float32, np.float16):
        raise ValueError(f"{name} must be float32 or float16, got dtype {x.dtype}")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"{name} needs at least one part and one dimension, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _as_visibility(visible: np.ndarray, name: str) -> np.ndarray:
    vis = np.asarray(visible)
    if vis.ndim != 2:
        raise ValueError(f"{name} must be a (Q, M) array, got shape {vis.shape}")
    if vis.dtype == np.bool_:
        return vis
    if not (np.issubdtype(vis.dtype, np.integer) or np.issubdtype(vis.dtype, np.floating)):
        raise ValueError(f"{name} must be bool or numeric, got dtype {vis.dtype}")
    if vis.size and not (np.isfinite(vis).all() and vis.min() >= 0 and vis.max() <= 1):
        raise ValueError(f"{name} must be bool or hold values in [0, 1]")
    return vis >= 0.5


def _part_list(parts: Sequence[int], m: int) -> np.ndarray:
    arr = np.asarray(list(parts), dtype=np.int64)
    if arr.size == 0:
        raise ValueError("upper_body_parts must name at least one part (or be None)")
    if arr.min() < 0 or arr.max() >= m:
        raise ValueError(f"upper_body_parts {list(parts)} out of range for M={m} parts")
    return arr


def _check_exclude(exclude: np.ndarray | None, nq: int, ng: int) -> np.ndarray | None:
    if exclude is None:
        return None
    excl = np.asarray(exclude)
    if excl.shape != (nq,) or not np.issubdtype(excl.dtype, np.integer):
        raise ValueError(
            f"exclude must be an integer array of shape (Q,)=({nq},), "
            f"got {excl.dtype} {excl.shape}"
        )
    if excl.size and (excl.min() < -1 or excl.max() >= ng):
        raise ValueError(f"exclude values must be -1 or gallery indices in [0, {ng})")
    return excl.astype(np.int64)
