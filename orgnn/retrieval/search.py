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
searching parts, keeping those whose mean is at least ``theta``. It is a single
inner-product search over concatenated normalised parts: the gallery vector is
``concat_k(g_k / |g_k|)`` and the query vector ``concat_k(s_k q_k / |q_k|) / |S|`` (``s_k`` the
0/1 search mask, ``|S|`` its size), whose inner product is exactly the mean cosine.

In both modes the returned neighbours are ordered by that mean cosine over the searching parts
(the ``score``). ``"visible-mean"`` is the default because the intersection of per-part top-K
lists is usually tiny: on the real proxy (SPEC section 3) intersection leaves 791 of 898
occluded queries without any neighbour at K=10 (336 at K=60), visible-mean none.

**Two stages.** An index proposes *candidates* per query (or per query and part); the final
lists are then decided on exact scores recomputed from the features themselves, one dot
product and two norms per pair,
ordered by decreasing score and, on ties, increasing gallery index. So every index and device
returns the same neighbourhoods wherever the candidates hold them, and an image's result does
not depend on the other images of its batch, on the batch size or on the thread count (the
float32 scores of BLAS can differ in the last bit between those; the recomputed ones cannot).

**Indexes and devices** (one decision, :func:`search_neighbourhoods`' ``index`` and
``device``):

* ``index="flat"``, ``device=None``: exact faiss ``IndexFlatIP`` on the CPU (the default);
* ``index="flat"``, ``device`` a torch device (``"cuda"``, ``"cuda:1"``, ``"cpu"``, ...):
  exact search as chunked torch matrix products and ``topk`` on that device. The gallery
  streams through in row chunks (``gallery_chunk``), so neither a full float32 copy of it
  nor a ``(Q, G)`` similarity matrix is ever formed; a float16 memory-mapped gallery stays on
  disk;
* ``index="ivf"``: faiss ``IndexIVFFlat`` (inner product), trained on a sample and filled in
  chunks;
* ``index="ivfpq"``: faiss ``IndexIVFPQFastScan`` (4-bit product-quantiser codes scanned
  with SIMD; optionally with an OPQ rotation, ``opq=True``): ``pq_m / 2`` bytes per gallery
  item instead of ``4 M D``; its approximate scores only pick ``refine x K`` candidates, which
  are re-ranked exactly from the (float16) features.

**Few searching parts.** The IVF lists are learnt on vectors of all ``M`` parts. A
visible-mean query that searches with ``|S| < M`` of them (a fully visible image: two of
six) finds in the nearest centroids a weaker guide to its neighbours (their other parts do
not count), so it visits ``ceil(nprobe * M / |S|)`` lists (:func:`resolve_nprobe`); its
exact re-ranking reads only its ``|S|`` parts. Queries are grouped by ``|S|`` within each
call, so the figure depends on each query alone. The intersection mode (one index per
part) and :func:`kth_part_similarity` (all parts) are not scaled. The product quantiser's
error, averaged over fewer sub-vectors, is also larger against a few-part score: ``pq_m``
(finer codes) or ``refine`` (more candidates) buy it back (measured in ``docs/scale.md``).

With ``ivf``/``ivfpq`` and a CUDA ``device`` the faiss index moves to that GPU when the
installed faiss has GPU support (``faiss-gpu``); otherwise it stays on the CPU. Zero part
vectors have cosine 0 with everything (never NaN). faiss' global thread count is left as it
is.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from orgnn.io.storage import chunk_rows, iter_rows, release_rows, rows_for, take_rows

__all__ = ["Neighbourhoods", "search_parts_for", "search_neighbourhoods", "resolve_nprobe",
           "resolve_index", "kth_part_similarity"]

MODES = ("visible-mean", "intersection")
INDEXES = ("auto", "flat", "ivf", "ivfpq")
#: ``index="auto"`` searches exactly (``flat``) up to this many gallery items and with
#: ``ivfpq`` beyond: a gallery searching itself exactly is :math:`O(G^2)` work. Measured in
#: ``docs/scale.md`` (per query, idle machine): exact 0.43 ms at 10^4 items and 4.26 ms at
#: 10^5, IVF-PQ with exact re-ranking 0.80 ms and 1.44 ms: the crossing lies between.
AUTO_EXACT_MAX = 50_000
#: Candidates per wanted neighbour that :func:`kth_part_similarity` re-scores per part.
KTH_POOL = 8
#: faiss wants at least this many training points per IVF list.
MIN_POINTS_PER_LIST = 39
#: IVF lists visited per query when ``nprobe`` is None: ``nlist // NPROBE_DIVISOR``, at least
#: :data:`MIN_NPROBE` (measured in ``docs/scale.md``: on cuhk03-parts' real features 16 of
#: 48 lists found 0.92 of the exact neighbours and cost 1.5 mAP, 32 lost 0.15 mAP; on the
#: synthetic galleries the time per query hardly depends on it, the exact re-ranking of
#: the candidates dominates).
NPROBE_DIVISOR = 8
MIN_NPROBE = 32
#: Candidates per kept neighbour that ``ivfpq`` re-ranks exactly when ``refine`` is None.
DEFAULT_REFINE = 8
#: Extra candidates the exact indexes fetch beyond K, so that a last-bit difference in a BLAS
#: score cannot change which item is the K-th (the final choice is on recomputed scores).
CANDIDATE_MARGIN = 2
#: Training points per IVF list (faiss k-means samples at most 256 per list anyway).
TRAIN_POINTS_PER_LIST = 64
#: Bits per sub-quantiser code of ``ivfpq`` (faiss' SIMD "fast scan" codes).
PQ_BITS = 4
#: Training points of the product quantiser at least.
PQ_TRAIN_POINTS = 1 << 14
#: Training sets up to this many floats are trained on one thread: k-means on them is
#: thousands of tiny parallel loops, whose thread hand-offs cost more than the work (and
#: far more on a loaded machine).
SMALL_TRAIN_FLOATS = 1 << 24
#: From this many IVF lists on, the coarse quantiser is an HNSW graph over the centroids.
HNSW_QUANTIZER_LISTS = 2048
#: Bytes of float32 candidate features gathered per exact re-scoring step.
RESCORE_BYTES = 64 * 1024 * 1024


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
    nprobe: int | None = None,
    batch_size: int = 4096,
    search_parts: np.ndarray | None = None,
    device: str | torch.device | None = None,
    pq_m: int | None = None,
    opq: bool = False,
    refine: int | None = None,
    gallery_chunk: int | None = None,
    index_cache: dict | None = None,
) -> Neighbourhoods:
    """Search the gallery neighbourhood of every query image (paper Eq. 3).

    .. math::

        \\mathcal{N}(\\mathcal{I}_a) = \\bigcap_{m_k(\\mathcal{I}_a) \\neq 0}
        \\mathcal{N}(\\mathbf{x}_k(\\mathcal{I}_a))

    With ``mode="intersection"``, ``N(x_k)`` holds the ``k`` gallery items most cosine-similar
    by part ``k`` that reach ``theta``, and ``N(I)`` their intersection over the searching parts.
    With ``mode="visible-mean"``, ``N(I)`` is the top ``k`` by the mean cosine over the
    searching parts that reach ``theta``. Both order neighbours by that mean cosine (ties: the
    lower gallery index first).

    Args:
        query: ``(Q, M, D)`` float32/float16 part features.
        query_visible: ``(Q, M)`` visibility (bool, or numbers where ``>= 0.5`` is visible).
        gallery: ``(G, M, D)`` float32/float16 part features; may be a memory map
            (:func:`orgnn.io.storage.map_npz_member`), read in row chunks.
        k: neighbourhood size ``K`` (per part list in intersection mode).
        theta: similarity threshold in ``[-1, 1]``.
        mode: ``"visible-mean"`` or ``"intersection"``.
        upper_body_parts: parts used by fully visible queries (``None``: all parts).
        exclude: ``(Q,)`` int64 gallery index of each query itself, or ``-1``; never returned.
            Use it when a set searches itself (the gallery, or the training split).
        index: ``"flat"`` (exact), ``"ivf"`` (``IndexIVFFlat``) or ``"ivfpq"``
            (``IndexIVFPQ`` + exact re-ranking), all inner product; ``"auto"``: ``flat``
            up to :data:`AUTO_EXACT_MAX` gallery items, ``ivfpq`` beyond
            (:func:`resolve_index`).
        nlist: IVF lists; default ``sqrt(G)``, clamped to ``G // 39`` so every list has
            enough training points (below 39 points the search falls back to flat, with a
            warning).
        nprobe: IVF lists visited per query that searches with all ``M`` parts; default
            ``max(32, nlist // 8)``. In visible-mean mode a query searching with ``|S|`` of
            them visits ``ceil(nprobe * M / |S|)`` (at most ``nlist``): a fully visible image
            (two upper-body parts of six) three times as many. A given ``nprobe`` is scaled
            the same way (:func:`resolve_nprobe`).
        batch_size: queries per index call (fewer where the candidates of a batch would
            outgrow :func:`orgnn.io.storage.memory_budget`).
        search_parts: ``(Q, M)`` bool override of the parts to search with; when given,
            ``query_visible`` and ``upper_body_parts`` are not used to choose them.
        device: ``None`` for faiss on the CPU; a torch device for exact search with torch
            on it (``index="flat"``), or for a GPU faiss index (``ivf``/``ivfpq``, when faiss
            has GPU support).
        pq_m: ``ivfpq`` sub-quantisers (4 bits each) per vector; must divide the vector
            dimension (``M D`` for visible-mean, ``D`` per part for intersection); default
            about ``dim / 16`` (at least 8).
        opq: ``ivfpq`` with an OPQ rotation learnt before the product quantiser.
        refine: ``ivfpq`` candidates re-ranked exactly per neighbour (default 8).
        gallery_chunk: gallery rows per chunk of the torch search and of index building
            (default: about 256 MiB of float32).
        index_cache: a dict kept by the caller to reuse the faiss indexes built for *this*
            ``gallery`` array in later calls (e.g. another ``nprobe``, or the gallery searching
            itself after the queries did); ``None`` builds them for this call only.

    Returns:
        :class:`Neighbourhoods` with ``(Q, k)`` index and score arrays.
    """
    query = _check_features(query, "query")
    gallery = _check_features(gallery, "gallery", index_cache)
    nq, m, d = query.shape
    ng = gallery.shape[0]
    if gallery.shape[1:] != (m, d):
        raise ValueError(
            f"query parts/dims (M, D)={(m, d)} do not match gallery (M, D)={gallery.shape[1:]}"
        )
    if not _is_int(k) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    if not isinstance(theta, (int, float, np.floating, np.integer)) or not -1.0 <= theta <= 1.0:
        raise ValueError(f"theta must be a number in [-1, 1], got {theta!r}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if index not in INDEXES:
        raise ValueError(f"unknown index {index!r}; expected one of {INDEXES}")
    for name, value in (("batch_size", batch_size), ("nprobe", nprobe), ("nlist", nlist),
                        ("pq_m", pq_m), ("refine", refine), ("gallery_chunk", gallery_chunk)):
        if (value is not None or name == "batch_size") and (not _is_int(value) or value < 1):
            optional = "" if name == "batch_size" else "None or "
            raise ValueError(f"{name} must be {optional}an integer >= 1, got {value!r}")
    dev = _resolve_device(device)

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

    index = resolve_index(index, ng)
    if index != "flat":
        nlist = _ivf_nlist(nlist, ng)
        if nlist is None:
            index = "flat"
    # One more per excluded query, so that dropping the query itself still leaves k.
    k_search = min(k + int(excl is not None), ng)
    cache = index_cache if index_cache is not None else {}
    finish = _finish_visible_mean if mode == "visible-mean" else _finish_intersection
    # A visible-mean query with |S| of M parts searches lists whose centroids span all M
    # parts with a |S|-part vector: it visits more of them (resolve_nprobe). The groups
    # depend on each query alone.
    if index == "ivfpq":
        per = k_search * (DEFAULT_REFINE if refine is None else int(refine))
    else:
        per = k_search + CANDIDATE_MARGIN
    per = min(per, ng)
    # Queries in blocks whose candidates and exact re-scoring fit the memory budget (the
    # torch search streams the gallery once for all queries: one block).
    width = per * (1 if mode == "visible-mean" else m)
    step = rows_for(width * (8 * 6 + 8 * m), at_most=batch_size)
    scaled = mode == "visible-mean" and index != "flat"
    for rows, searching in _part_groups(parts) if scaled else [(np.arange(nq), m)]:
        spec = _IndexSpec(index, nlist, None if nlist is None else resolve_nprobe(
            nlist, nprobe, searching=searching, parts=m), pq_m, opq, dev, gallery_chunk)
        outer = rows.size if spec.kind == "flat" and dev is not None else step
        for b0 in range(0, rows.size, outer):
            blk = _rows(rows, b0, b0 + outer)
            candidates = _candidates(query[blk], parts[blk], gallery, mode, per,
                                     None if excl is None else excl[blk], step, spec, cache)
            for start in range(b0, min(b0 + outer, rows.size), step):
                sl = _rows(rows, start, min(start + step, b0 + outer))
                cand = candidates[start - b0:start - b0 + step]
                if excl is not None:
                    cand = np.where(cand == excl[sl].reshape((-1,) + (1,) * (cand.ndim - 1)),
                                    -1, cand)
                out_index[sl], out_score[sl] = finish(query[sl], parts[sl], gallery, cand, k,
                                                      theta)
                release_rows(gallery, 0, ng)
            del candidates
    return Neighbourhoods(out_index, out_score, parts)


def _part_groups(parts: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """``(rows, |S|)`` per number of searching parts ``|S|`` among the rows of ``parts``
    (rows ascending)."""
    counts = parts.sum(axis=1)
    return [(np.flatnonzero(counts == c), int(c)) for c in np.unique(counts)]


def _rows(rows: np.ndarray, start: int, stop: int) -> slice | np.ndarray:
    """``rows[start:stop]``, as a slice where those rows are consecutive (a view of a
    mapped array, not a copy)."""
    sub = rows[start:stop]
    if sub.size and sub[-1] - sub[0] == sub.size - 1:
        return slice(int(sub[0]), int(sub[-1]) + 1)
    return sub


def resolve_index(index: str, gallery_size: int) -> str:
    """``index`` itself, or for ``"auto"``: ``"flat"`` (exact) up to
    :data:`AUTO_EXACT_MAX` gallery items, ``"ivfpq"`` beyond."""
    if index not in INDEXES:
        raise ValueError(f"unknown index {index!r}; expected one of {INDEXES}")
    if index == "auto":
        return "flat" if gallery_size <= AUTO_EXACT_MAX else "ivfpq"
    return index


def kth_part_similarity(query: np.ndarray, gallery: np.ndarray, k: int, *,
                        exclude: np.ndarray | None = None, index: str = "auto",
                        pool: int = KTH_POOL, nlist: int | None = None,
                        nprobe: int | None = None, device: str | torch.device | None = None,
                        index_cache: dict | None = None, batch_size: int = 4096
                        ) -> np.ndarray:
    r"""``(Q, M)`` float32: per part :math:`p`, each query's cosine to its :math:`k`-th most
    similar gallery item by that part,

    .. math::
        s_k^{(p)}(q) = \operatorname{kth\,max}_{j \in C(q)} \cos(\mathbf{x}_p(q),
        \mathbf{x}_p(j)),

    over candidates :math:`C(q)`: the ``pool x k`` best gallery items by the mean cosine over
    *all* parts, proposed by the same index a visible-mean search builds (so
    ``index_cache`` shares it with :func:`search_neighbourhoods`), re-scored exactly per
    part. One search per query instead of one per part; the value is exact wherever the
    candidates hold the part's true top ``k`` (measured against the exact per-part search
    in ``docs/scale.md``), and never above it. Every query searches with all ``M`` parts, so
    ``nprobe`` is used as given (no few-parts scaling, :func:`resolve_nprobe`).

    Args:
        query: ``(Q, M, D)``; gallery: ``(G, M, D)`` (may be a memory map).
        k: which neighbour (``min(k, G - 1)`` with ``exclude``).
        exclude: ``(Q,)`` gallery index of each query itself, or ``-1``.
        index, nlist, nprobe, device, index_cache, batch_size: as in
            :func:`search_neighbourhoods`.
        pool: candidates per ``k``.
    """
    query = _check_features(query, "query")
    gallery = _check_features(gallery, "gallery", index_cache)
    nq, m, _ = query.shape
    ng = gallery.shape[0]
    if not _is_int(k) or k < 1 or not _is_int(pool) or pool < 1:
        raise ValueError(f"k and pool must be integers >= 1, got k={k!r}, pool={pool!r}")
    excl = _check_exclude(exclude, nq, ng)
    out = np.zeros((nq, m), dtype=np.float32)
    kk = min(int(k), ng - (excl is not None))
    if nq == 0 or kk < 1:
        return out
    index = resolve_index(index, ng)
    if index != "flat":
        nlist = _ivf_nlist(nlist, ng)
        if nlist is None:
            index = "flat"
    per = min(ng, pool * kk + int(excl is not None))
    dev = _resolve_device(device)
    spec = _IndexSpec(index, nlist, None if nlist is None else resolve_nprobe(nlist, nprobe),
                      None, False, dev, None)
    cache = index_cache if index_cache is not None else {}
    parts = np.ones((nq, m), dtype=bool)
    step = rows_for(per * (8 * 4 + 8 * 3 * m), at_most=batch_size)
    for s in range(0, nq, step):
        sl = slice(s, min(s + step, nq))
        cand = _candidates(query[sl], parts[sl], gallery, "visible-mean", per,
                           None if excl is None else excl[sl], step, spec, cache)
        if excl is not None:
            cand = np.where(cand == excl[sl, None], -1, cand)
        cos = np.where(cand[..., None] >= 0, _cosines(query[sl], gallery, cand), -np.inf)
        kth = -np.partition(-cos, kk - 1, axis=1)[:, kk - 1]                # (b, M)
        out[sl] = np.where(np.isfinite(kth), kth, 0.0)
        release_rows(gallery, 0, ng)
    return out


def resolve_nprobe(nlist: int, nprobe: int | None = None, *, searching: int | None = None,
                   parts: int | None = None) -> int:
    r"""IVF lists visited per query.

    ``nprobe`` (default ``max(MIN_NPROBE, nlist // NPROBE_DIVISOR)``, i.e.
    ``max(32, nlist // 8)``) is the figure for a query that searches with all ``M`` parts.
    A visible-mean query that searches with :math:`|S| < M` of them (e.g. a fully visible
    image: the two upper-body parts) is a vector on :math:`|S|` parts only, while the lists'
    centroids span all :math:`M`: the centroid it is nearest to is a weaker guide to where
    its neighbours are, so it visits proportionally more lists,

    .. math::
        n_\text{probe}(|S|) = \min\left(n_\text{list},
        \left\lceil n_\text{probe} \frac{M}{|S|} \right\rceil\right),

    the same for a given ``nprobe`` as for the default (measured in ``docs/scale.md``).

    Args:
        nlist: IVF lists of the index.
        nprobe: lists visited by an all-parts query (``None``: the default above).
        searching: :math:`|S|`, the parts the query searches with (``None``: all).
        parts: :math:`M`, the parts of the index' vectors (with ``searching``).
    """
    if nprobe is None:
        nprobe = max(MIN_NPROBE, nlist // NPROBE_DIVISOR)
    if searching is not None:
        if parts is None or not 1 <= searching <= parts:
            raise ValueError(f"searching must be in [1, parts], got searching={searching!r}, "
                             f"parts={parts!r}")
        nprobe = -(-int(nprobe) * int(parts) // int(searching))
    return int(min(nprobe, nlist))


# --------------------------------------------------------------------------------------
# Stage 1: candidates
# --------------------------------------------------------------------------------------
@dataclass
class _IndexSpec:
    kind: str
    nlist: int | None
    nprobe: int | None
    pq_m: int | None
    opq: bool
    device: torch.device | None
    gallery_chunk: int | None

    def chunk(self, gallery: np.ndarray) -> int:
        return self.gallery_chunk or chunk_rows(gallery, 256 * 1024 * 1024)


def _candidates(query, parts, gallery, mode, per, excl, batch_size, spec,
                cache: dict | None = None) -> np.ndarray:
    """``(Q, per)`` (visible-mean) or ``(Q, M, per)`` (intersection) candidate gallery
    indices, ``-1`` padded; the query itself may still be among them."""
    nq, m, _ = query.shape
    jobs = ([(None, np.arange(nq))] if mode == "visible-mean" else
            [(p, np.flatnonzero(parts[:, p])) for p in range(m) if parts[:, p].any()])
    if spec.kind == "flat" and spec.device is not None:
        found = _torch_candidates(query, parts, gallery, jobs, per, excl, batch_size, spec)
    else:
        found = {}
        for p, rows in jobs:
            key = (id(gallery), gallery.shape, p, spec.kind, spec.nlist, spec.pq_m, spec.opq,
                   str(spec.device))
            idx = None if cache is None else cache.get(key)
            if idx is None:
                idx = _faiss_index(gallery, p, spec)
                if cache is not None:
                    cache[key] = idx
            if spec.kind != "flat":
                _set_nprobe(idx, spec.nprobe)
            ids = np.full((rows.size, per), -1, dtype=np.int64)
            for s in range(0, rows.size, batch_size):
                r = rows[s:s + batch_size]
                vec = _query_vectors(query[r], parts[r], p)
                ids[s:s + len(r)] = idx.search(vec, per)[1]
            found[p] = ids
            del idx
    if mode == "visible-mean":
        return found[None]
    out = np.full((nq, m, per), -1, dtype=np.int64)
    for p, rows in jobs:
        out[rows, p] = found[p]
    return out


def _query_vectors(q: np.ndarray, parts: np.ndarray, part: int | None) -> np.ndarray:
    """float32 search vectors: part ``part`` normalised, or (``None``) the weighted
    concatenation whose inner product with a gallery vector is the mean cosine."""
    if part is not None:
        return np.ascontiguousarray(_normalise(q[:, part]))
    w = (parts / parts.sum(axis=1, keepdims=True)).astype(np.float32)
    return (_normalise(q) * w[:, :, None]).reshape(len(q), -1)


def _gallery_vectors(chunk: np.ndarray, part: int | None) -> np.ndarray:
    """float32 index vectors of a gallery chunk: one normalised part, or all concatenated."""
    x = _normalise(chunk if part is None else chunk[:, part])
    return np.ascontiguousarray(x.reshape(len(x), -1))


def _faiss_index(gallery: np.ndarray, part: int | None, spec: _IndexSpec) -> faiss.Index:
    """A faiss inner-product index over the gallery vectors, filled chunk by chunk."""
    ng, m, d = gallery.shape
    dim = m * d if part is None else d
    # 64 MiB chunks: adding to an IVF-PQ index holds several float32 copies of a chunk
    # (normalised vectors, residuals), so the chunk, not the gallery, sets the peak.
    rows = spec.gallery_chunk or chunk_rows(gallery, 64 * 1024 * 1024)
    if spec.kind == "flat":
        idx = faiss.IndexFlatIP(dim)
    else:
        n_train = min(ng, max(TRAIN_POINTS_PER_LIST * spec.nlist,
                              PQ_TRAIN_POINTS if spec.kind == "ivfpq" else 0))
        pick = np.sort(np.random.default_rng(1234).choice(ng, n_train, replace=False))
        train = np.empty((n_train, dim), dtype=np.float32)
        for s in range(0, n_train, rows):
            train[s:s + rows] = _gallery_vectors(take_rows(gallery, pick[s:s + rows]), part)
        if spec.kind == "ivf":
            idx = faiss.IndexIVFFlat(_quantizer(dim, spec.nlist), dim, spec.nlist,
                                     faiss.METRIC_INNER_PRODUCT)
        else:
            pq_m = spec.pq_m or _default_pq_m(dim)
            if dim % pq_m:
                raise ValueError(f"pq_m={pq_m} must divide the vector dimension {dim}")
            # 4-bit codes scanned with SIMD ("fast scan"): encoding costs 16 distances per
            # sub-vector instead of 256 (8-bit codes took minutes per 10^5 images on 2 cores),
            # and the exact re-ranking makes up for the coarser codes.
            idx = faiss.IndexIVFPQFastScan(_quantizer(dim, spec.nlist), dim, spec.nlist, pq_m,
                                           PQ_BITS, faiss.METRIC_INNER_PRODUCT)
            idx.pq.cp.max_points_per_centroid = max(1, PQ_TRAIN_POINTS >> PQ_BITS)
            if spec.opq:
                ivfpq, opq = idx, faiss.OPQMatrix(dim, pq_m)
                idx = faiss.IndexPreTransform(opq, ivfpq)
                idx.referenced_objects = [opq, ivfpq]  # keep both alive with the wrapper
        with _faiss_threads(1 if train.size <= SMALL_TRAIN_FLOATS else None):
            idx.train(train)
        del train
    for _, chunk in iter_rows(gallery, rows):
        idx.add(_gallery_vectors(chunk, part))
    if spec.kind != "flat" and spec.device is not None and spec.device.type == "cuda" \
            and _faiss_gpus() > 0:
        res = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(res, spec.device.index or 0, idx)
        gpu.referenced_resources = res  # keep the resources alive with the index
        return gpu
    return idx


def _quantizer(dim: int, nlist: int) -> faiss.Index:
    """The IVF coarse quantiser: exact over the centroids, or, from
    :data:`HNSW_QUANTIZER_LISTS` lists on, an HNSW graph over them (assigning 10^7 vectors
    to thousands of 1536-d centroids exactly is most of the build time on a CPU)."""
    if nlist < HNSW_QUANTIZER_LISTS:
        return faiss.IndexFlatIP(dim)
    quantizer = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    quantizer.hnsw.efConstruction = 80
    return quantizer


def _set_nprobe(idx: faiss.Index, nprobe: int) -> None:
    try:
        ivf = faiss.extract_index_ivf(idx)
    except (RuntimeError, TypeError):  # a GPU index (faiss-gpu): set through its parameters
        faiss.GpuParameterSpace().set_index_parameter(idx, "nprobe", nprobe)
        return
    ivf.nprobe = nprobe
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):  # the graph must find nprobe lists
        quantizer.hnsw.efSearch = max(128, 2 * nprobe)


@contextmanager
def _faiss_threads(threads: int | None) -> Iterator[None]:
    """faiss' OpenMP thread count for a block (``None``: unchanged)."""
    if threads is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _faiss_gpus() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _default_pq_m(dim: int) -> int:
    """The largest divisor of ``dim`` that is at most ``dim / 16`` (16-d sub-vectors of 4
    bits: ``dim / 32`` bytes), or 8 for short vectors (a 16-d part in 1 byte loses too
    much)."""
    target = max(dim // 16, min(dim, 8))
    return max(m for m in range(1, target + 1) if dim % m == 0)


@torch.inference_mode()
def _torch_candidates(query, parts, gallery, jobs, per, excl, batch_size,
                      spec: _IndexSpec) -> dict[int | None, np.ndarray]:
    """Exact top-``per`` by chunked matrix products on ``spec.device``.

    The gallery streams through in row chunks (each normalised once); every job's queries
    meet each chunk in batches of at most ``batch_size``, against blocks of gallery rows
    (1024 on a CPU, where a ``4096 x 1024`` product stays in cache as faiss' own blocks do;
    whole chunks up to 256 MiB of similarities on a GPU), and a running top-``per`` is kept
    with ``topk``."""
    dev = spec.device
    m, d = gallery.shape[1:]
    step = min(batch_size, 4096)
    block = 1024 if dev.type == "cpu" else max(1024, (256 << 20) // (4 * step))
    best = {p: (torch.full((rows.size, per), -math.inf, device=dev),
                torch.full((rows.size, per), -1, dtype=torch.long, device=dev))
            for p, rows in jobs}
    excl_t = None if excl is None else torch.from_numpy(excl).to(dev)
    for g0, chunk in iter_rows(gallery, spec.chunk(gallery)):
        g = torch.nn.functional.normalize(torch.from_numpy(chunk).to(dev), dim=-1)
        gc = g.shape[0]
        for p, rows in jobs:
            gm = g.reshape(gc, m * d) if p is None else g[:, p].contiguous()
            vals, ids = best[p]
            for s in range(0, rows.size, step):
                r = rows[s:s + step]
                q = torch.from_numpy(_query_vectors(query[r], parts[r], p)).to(dev)
                local = None if excl_t is None else excl_t[torch.from_numpy(r).to(dev)] - g0
                found_v, found_i = [vals[s:s + len(r)]], [ids[s:s + len(r)]]
                for b0 in range(0, gc, block):
                    gb = gm[b0:b0 + block]
                    sims = q @ gb.T
                    if local is not None:
                        hit = (local >= b0) & (local < b0 + gb.shape[0])
                        sims[hit.nonzero().squeeze(1), local[hit] - b0] = -math.inf
                    v, i = sims.topk(min(per, gb.shape[0]), dim=1)
                    found_v.append(v)
                    found_i.append(i + (g0 + b0))
                # one merge per batch and chunk: few small ops (each is a thread fork/join)
                top_v, pick = torch.cat(found_v, dim=1).topk(per, dim=1)
                vals[s:s + len(r)] = top_v
                ids[s:s + len(r)] = torch.cat(found_i, dim=1).gather(1, pick)
        del g
    return {p: torch.where(v > -math.inf, i, -1).cpu().numpy() for p, (v, i) in best.items()}


# --------------------------------------------------------------------------------------
# Stage 2: exact scores, order, threshold
# --------------------------------------------------------------------------------------
def _cosines(q: np.ndarray, gallery: np.ndarray, ids: np.ndarray,
             part: int | np.ndarray | None = None) -> np.ndarray:
    """Cosines between query rows ``q`` ``(b, M, D)`` and their candidates ``ids`` ``(b, c)``:
    ``(b, c, M)`` per part, ``(b, c, P)`` for the parts of an index array ``part`` ``(P,)``,
    or ``(b, c)`` for one ``part``. Each value is one dot product and two norms over ``D``
    (``einsum``), so it never depends on the other rows of the batch."""
    b, c = ids.shape
    one = part is not None and np.ndim(part) == 0
    parts = None if part is None else np.atleast_1d(np.asarray(part, dtype=np.int64))
    width = (gallery.shape[1] if parts is None else parts.size) * gallery.shape[2]
    step = max(1, RESCORE_BYTES // (4 * max(1, c) * width))
    shape = () if one else (width // gallery.shape[2],)
    out = np.empty((b, c) + shape, dtype=np.float64)
    for s in range(0, b, step):
        sub = np.clip(ids[s:s + step], 0, None)
        qq = np.asarray(q[s:s + step] if part is None else q[s:s + step][:, part], np.float32)
        gg = take_rows(gallery, sub, parts=parts)  # only the parts asked for are read
        gg = np.asarray(gg[:, :, 0] if one else gg, np.float32)
        dot = np.einsum("bc...d,b...d->bc...", gg, qq)
        norm = (np.sqrt(np.einsum("bc...d,bc...d->bc...", gg, gg))
                * np.sqrt(np.einsum("b...d,b...d->b...", qq, qq))[:, None])
        out[s:s + step] = np.where(norm > 0, dot / np.where(norm > 0, norm, 1.0), 0.0)
    return out


def _ranked(ids: np.ndarray, score: np.ndarray, k: int, theta: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` valid candidates of each row by (score desc, index asc) that reach
    ``theta``, packed to the front."""
    valid = ids >= 0
    score = np.where(valid, score, -np.inf)
    order = np.lexsort((ids, -score), axis=-1)[:, :k]
    ids, score, valid = (np.take_along_axis(a, order, axis=1) for a in (ids, score, valid))
    return _pack(ids, score, valid & (score >= theta), k)


def _finish_visible_mean(q, parts, gallery, cand, k, theta):
    """Exact mean cosines over each query's searching parts, computed for those parts only:
    one vectorised step per distinct search mask in the batch (a handful: the occlusion
    patterns), never per query."""
    score = np.empty(cand.shape, dtype=np.float64)
    masks, which = np.unique(parts, axis=0, return_inverse=True)
    for i, mask in enumerate(masks):
        rows, on = np.flatnonzero(which.reshape(-1) == i), np.flatnonzero(mask)
        # the weights 1 / |S| of the mean, as a weighted sum over all parts would use them
        w = np.full(on.size, 1.0 / on.size)
        score[rows] = (_cosines(q[rows], gallery, cand[rows], on) * w).sum(axis=-1)
    ids, sc = _ranked(cand, score, k, theta)
    return ids, sc.astype(np.float32)


def _finish_intersection(q, parts, gallery, cand, k, theta):
    """Eq. 3 for one batch of queries, vectorised over the batch (no per-image loop)."""
    b, m, _ = q.shape
    ng = gallery.shape[0]
    cand_ids = np.full((b, m, k), -1, dtype=np.int64)
    cand_sims = np.zeros((b, m, k), dtype=np.float64)
    for p in range(m):
        rows = np.flatnonzero(parts[:, p])
        if rows.size == 0:
            continue
        ids = cand[rows, p]
        # The K nearest by part p (the query itself already dropped), then the threshold.
        cand_ids[rows, p], cand_sims[rows, p] = _ranked(ids, _cosines(q[rows], gallery, ids, p),
                                                        k, theta)

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
    sums = np.bincount(inverse, weights=cand_sims[valid], minlength=uniq.size)
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
    out_sims = np.zeros((b, k), dtype=sims.dtype)
    width = min(k, ids.shape[1])
    if b == 0 or width == 0:
        return out_ids, out_sims
    order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
    kept = np.take_along_axis(keep, order, axis=1)
    out_ids[:, :width] = np.where(kept, np.take_along_axis(ids, order, axis=1), -1)
    out_sims[:, :width] = np.where(kept, np.take_along_axis(sims, order, axis=1), 0.0)
    return out_ids, out_sims


def _normalise(x: np.ndarray) -> np.ndarray:
    """L2-normalise the last axis in float32; zero vectors stay zero (no NaN)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0).astype(np.float32)


def _ivf_nlist(nlist: int | None, ng: int) -> int | None:
    """IVF list count: ``sqrt(G)`` by default, at most ``G // 39``; None means use flat."""
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
        return max(1, min(int(round(math.sqrt(ng))), max_lists))
    if nlist > max_lists:
        warnings.warn(
            f"nlist={nlist} needs {MIN_POINTS_PER_LIST * nlist} training points but the gallery "
            f"has {ng}; using nlist={max_lists}",
            RuntimeWarning,
            stacklevel=3,
        )
        return max_lists
    return int(nlist)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _resolve_device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be None or a torch device, got {device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    return dev


def _check_features(x: np.ndarray, name: str, cache: dict | None = None) -> np.ndarray:
    """Shape and dtype checks, and a finiteness check in row chunks (a memory map is read
    once, never copied whole). With ``cache`` (a search's ``index_cache``) a gallery is
    scanned for NaN once across the calls that share it, as its indexes are built once:
    the scan is :math:`O(G)`, and a call searching a few items of a large gallery would
    otherwise pay it again."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"{name} must be a (N, M, D) array of part features, got shape {x.shape}")
    if x.dtype not in (np.float32, np.float16):
        raise ValueError(f"{name} must be float32 or float16, got dtype {x.dtype}")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"{name} needs at least one part and one dimension, got {x.shape}")
    key = ("finite", id(x), x.shape, x.dtype.str)
    if cache is not None and cache.get(key):
        return x
    rows = chunk_rows(x)
    for start in range(0, x.shape[0], rows):
        ok = np.isfinite(x[start:start + rows]).all()
        release_rows(x, start, start + rows)
        if not ok:
            raise ValueError(f"{name} contains NaN or infinite values")
    if cache is not None:
        cache[key] = True
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
