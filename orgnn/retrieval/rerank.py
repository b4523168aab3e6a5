r"""k-reciprocal re-ranking from part features, without query-query or gallery-gallery matrices.

:func:`orgnn.retrieval.metrics.re_ranking` takes the dense ``(Q, G)``, ``(Q, Q)`` and ``(G, G)``
distance matrices; at MSMT17's test size (11,659 queries, 82,161 gallery images) the
gallery-gallery one alone is 27 GB. The algorithm only ever reads, for every sample :math:`i`
of the joint set (:math:`N = Q + G`), the column :math:`D_{\cdot i}` of the joint distance
matrix through

* its ``max(k1 + 1, k2)`` nearest samples and its largest entry (the normaliser of
  :math:`O_{ij} = D_{ji}^2 / \max_a D_{ai}^2`),
* the entries :math:`O_{ij}` of the sparse sets :math:`R^*(i)`,
* the query-gallery block, for the final blend.

:func:`re_ranking_features` gets the first from a search over the features (exact: chunked
matrix products; or a faiss IVF index with the candidates scored exactly), the second from one
dot product per pair, and runs the rest of the original algorithm on sparse sets
(:func:`orgnn.retrieval.metrics._expanded_v`); only the ``(Q, G)`` result is dense. With the
exact search it equals :func:`orgnn.retrieval.metrics.re_ranking` on the matrices of
:func:`orgnn.reconstruction.pipeline.part_distance` up to float rounding (wherever no two
distances of a sample tie at a list boundary).

The distance is the pipeline's (SPEC §5), :math:`d(a, b) = 1 - \sum_k w_k(a) \cos(x_k(a),
x_k(b))` with :math:`w(a) = 1/M` or, for the "+OAN" rows, :math:`a`'s visible parts
:math:`S_a` weighted :math:`1/|S_a|`; the weights are those of the *query* side of each block
of the joint matrix, as in ``re_ranking(part_distance(q, g, q_parts), part_distance(q, q,
q_parts), part_distance(g, g, g_parts))``. With unit parts concatenated into :math:`x` and
:math:`r = x \odot w`, column :math:`i` of the joint matrix is

.. math::
    D_{ai} = 1 - \langle r_a, x_i \rangle, \quad \text{except} \quad
    D_{ai} = 1 - \langle r_i, x_a \rangle \ \text{for a query } i \text{ and a gallery } a,

so without part weights one inner-product index over :math:`x / \sqrt{M}` serves every
sample.
"""
from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np
import torch

from orgnn.retrieval import metrics
from orgnn.retrieval.search import MIN_POINTS_PER_LIST, TRAIN_POINTS_PER_LIST, resolve_nprobe

__all__ = ["re_ranking_features", "dense_re_ranking_bytes", "dense_fits",
           "DENSE_RERANK_MAX_BYTES"]

#: Searches for the neighbour lists: exact chunked products, or faiss IVF (approximate).
INDEXES = ("flat", "ivf")
#: Largest working set (bytes) :func:`dense_fits` allows the dense re-ranking, whatever the
#: free memory: Market-1501 and DukeMTMC-reID (about 1.5 GB) stay dense, MSMT17 (31 GB) not.
DENSE_RERANK_MAX_BYTES = 4 * 1024 ** 3
#: Pairs whose exact distances are computed at once (two gathered ``(pairs, M D)`` blocks).
PAIR_CHUNK = 1 << 14


def dense_re_ranking_bytes(num_query: int, num_gallery: int) -> int:
    """Bytes the dense path holds beyond its ``(Q, G)`` input: the ``(Q, Q)`` and ``(G, G)``
    float32 distances, the ``(Q, G)`` output and one ``256 x N`` block of :math:`O`."""
    n = num_query + num_gallery
    return 4 * (num_query ** 2 + num_gallery ** 2 + num_query * num_gallery + 256 * n)


def dense_fits(num_query: int, num_gallery: int, max_bytes: int | None = None) -> bool:
    """Whether :func:`orgnn.retrieval.metrics.re_ranking` fits: its
    :func:`dense_re_ranking_bytes` at most ``max_bytes``, by default
    :data:`DENSE_RERANK_MAX_BYTES` or half the memory the system reports available
    (``MemAvailable``), whichever is smaller."""
    if max_bytes is None:
        max_bytes = DENSE_RERANK_MAX_BYTES
        available = _available_memory()
        if available is not None:
            max_bytes = min(max_bytes, available // 2)
    return dense_re_ranking_bytes(num_query, num_gallery) <= max_bytes


def _available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes; None where there is no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class _Columns:
    r"""Columns :math:`D_{\cdot i}` of the joint ``(N, N)`` distance matrix, from features.

    Holds :math:`x` (unit parts concatenated, float32, on ``device``) and, with part weights,
    :math:`r = x \odot w`; without them one matrix :math:`x / \sqrt{M}`.
    """

    def __init__(self, query: np.ndarray, gallery: np.ndarray, query_parts: np.ndarray | None,
                 gallery_parts: np.ndarray | None, device: torch.device) -> None:
        self.num_q, self.n = len(query), len(query) + len(gallery)
        m = query.shape[1]
        self.weighted = query_parts is not None
        x = torch.empty((self.n, query.shape[1] * query.shape[2]), dtype=torch.float32,
                        device=device)
        for offset, feats in ((0, query), (self.num_q, gallery)):
            for start in range(0, len(feats), 4096):  # one float32 chunk at a time
                chunk = torch.as_tensor(np.asarray(feats[start:start + 4096]),
                                        dtype=torch.float32).to(device)
                chunk = torch.nn.functional.normalize(chunk, dim=-1)
                x[offset + start:offset + start + len(chunk)] = chunk.reshape(len(chunk), -1)
        if not self.weighted:
            x /= math.sqrt(m)
            self.x = self.r = x
            return
        w = torch.as_tensor(np.concatenate([query_parts, gallery_parts]), dtype=torch.float32,
                            device=device)
        w = w / w.sum(1, keepdim=True).clamp_min(1)
        self.x = x
        self.r = (x.view(self.n, m, -1) * w[:, :, None]).view(self.n, -1)

    def side(self, query_side: bool) -> slice:
        return slice(0, self.num_q) if query_side else slice(self.num_q, self.n)

    def pair(self, target_query: bool, item_query: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(items, targets)``: :math:`D_{ai} = 1 - \\langle items_a, targets_i \\rangle` for
        targets ``i`` on one side and items ``a`` on the other (whole sides)."""
        t, a = self.side(target_query), self.side(item_query)
        if self.weighted and target_query and not item_query:
            return self.x[a], self.r[t]
        return self.r[a], self.x[t]

    @torch.inference_mode()
    def block(self, start: int, stop: int, items: str = "all") -> np.ndarray:
        """``(stop - start, N)`` float32: row ``i - start`` is column :math:`D_{\\cdot i}`
        (``items="gallery"``: its gallery rows only, ``(stop - start, G)``); ``start:stop``
        must lie on one side."""
        target_query = stop <= self.num_q
        offset = 0 if target_query else self.num_q
        rows = slice(start - offset, stop - offset)
        q_items, q_targets = self.pair(target_query, True)
        g_items, g_targets = self.pair(target_query, False)
        if items != "all":
            out = g_targets[rows] @ g_items.T
        elif q_targets.data_ptr() == g_targets.data_ptr():  # items: all rows of self.r
            out = q_targets[rows] @ self.r.T
        else:
            out = torch.cat([q_targets[rows] @ q_items.T, g_targets[rows] @ g_items.T], dim=1)
        return out.neg_().add_(1).cpu().numpy()

    def pairs(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """:math:`D_{ji}` (float32) for index arrays ``i``, ``j`` (one dot product each)."""
        out = np.empty(i.shape, dtype=np.float32)
        iq, jq = i < self.num_q, j < self.num_q
        for target_query in (True, False):
            for item_query in (True, False):
                sel = np.flatnonzero((iq == target_query) & (jq == item_query))
                if sel.size == 0:
                    continue
                items, targets = self.pair(target_query, item_query)
                i_off = 0 if target_query else self.num_q
                j_off = 0 if item_query else self.num_q
                for s in range(0, sel.size, PAIR_CHUNK):
                    pick = sel[s:s + PAIR_CHUNK]
                    out[pick] = 1 - _dot_rows(targets, i[pick] - i_off, items, j[pick] - j_off)
        return out


@torch.inference_mode()
def _dot_rows(a: torch.Tensor, ia: np.ndarray, b: torch.Tensor, ib: np.ndarray) -> np.ndarray:
    """``<a[ia[p]], b[ib[p]]>`` for every ``p`` (float32; numpy's gathers on the CPU, which
    are several times faster than torch's indexing there)."""
    if a.device.type == "cpu":
        return np.einsum("pd,pd->p", a.numpy().take(ia, axis=0), b.numpy().take(ib, axis=0))
    return _dot_rows_torch(a, ia, b, ib)


@torch.inference_mode()
def _dot_rows_torch(a: torch.Tensor, ia: np.ndarray, b: torch.Tensor,
                    ib: np.ndarray) -> np.ndarray:
    """:func:`_dot_rows` with torch's gathers, on the tensors' device."""
    ta, tb = torch.as_tensor(ia, device=a.device), torch.as_tensor(ib, device=b.device)
    return (a[ta] * b[tb]).sum(1).cpu().numpy()


def _flat_lists(cols: _Columns, width: int, block_rows: int,
                row_max: np.ndarray) -> np.ndarray:
    """Exact neighbour lists (stable argsort of :math:`O`'s rows) and ``row_max``, in blocks of
    columns of the joint matrix, as :func:`orgnn.retrieval.metrics.re_ranking` does on the
    dense one."""
    knn = np.empty((cols.n, width), dtype=np.int64)
    for lo, hi in ((0, cols.num_q), (cols.num_q, cols.n)):
        for start in range(lo, hi, block_rows):
            stop = min(start + block_rows, hi)
            rows = cols.block(start, stop)
            np.square(rows, out=rows)
            row_max[start:stop] = rows.max(axis=1)
            rows /= row_max[start:stop, None]
            knn[start:stop] = metrics._argsort_head(rows, width)
            del rows
    return knn


def _ivf_lists(cols: _Columns, width: int, block_rows: int, row_max: np.ndarray,
               nlist: int | None, nprobe: int | None) -> np.ndarray:
    """Neighbour lists and ``row_max`` from faiss IVF indexes: per side of the joint matrix,
    the ``width`` nearest candidates and the farthest one (searched with the negated
    vector), all scored exactly by :meth:`_Columns.pairs`; the lists are the nearest
    candidates ordered by ``(O, index)``, the normaliser the largest candidate distance."""
    near: dict[bool, list[np.ndarray]] = {True: [], False: []}
    far: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for item_query in (True, False):
        built: dict[int, faiss.Index] = {}  # one index per item matrix (and side)
        for target_query in (True, False):
            items, targets = cols.pair(target_query, item_query)
            if items.data_ptr() not in built:
                built[items.data_ptr()] = _ivf_index(items.cpu().numpy(), nlist, nprobe)
            idx = built[items.data_ptr()]
            t = targets.cpu().numpy()
            per = min(width, len(items))
            ids = np.empty((len(t), per), dtype=np.int64)
            far_ids = np.empty((len(t), 1), dtype=np.int64)
            for s in range(0, len(t), 4096):
                ids[s:s + 4096] = idx.search(t[s:s + 4096], per)[1]
                far_ids[s:s + 4096] = idx.search(-t[s:s + 4096], 1)[1]
            off = 0 if item_query else cols.num_q
            near[target_query].append(np.where(ids >= 0, ids + off, -1))
            far[target_query].append(np.where(far_ids >= 0, far_ids + off, -1))
        del built
    missing = np.iinfo(np.int64).max
    knn = np.empty((cols.n, width), dtype=np.int64)
    for target_query in (True, False):
        cand = np.concatenate(near[target_query], axis=1)
        far_c = np.concatenate(far[target_query], axis=1)
        offset = 0 if target_query else cols.num_q
        for s in range(0, len(cand), block_rows):
            c, f = cand[s:s + block_rows], far_c[s:s + block_rows]
            i = np.arange(offset + s, offset + s + len(c))[:, None]
            d2 = np.full(c.shape, np.inf, dtype=np.float32)
            ok = c >= 0
            d2[ok] = np.square(cols.pairs(np.broadcast_to(i, c.shape)[ok], c[ok]))
            f2 = np.full(f.shape, -np.inf, dtype=np.float32)
            f_ok = f >= 0
            f2[f_ok] = np.square(cols.pairs(np.broadcast_to(i, f.shape)[f_ok], f[f_ok]))
            rmax = np.maximum(np.where(ok, d2, -np.inf).max(axis=1), f2.max(axis=1))
            row_max[offset + s:offset + s + len(c)] = rmax
            key = np.where(ok, c, missing)
            order = np.lexsort((key, d2 / rmax[:, None]), axis=1)
            knn[offset + s:offset + s + len(c)] = np.take_along_axis(key, order,
                                                                     axis=1)[:, :width]
    if (knn == missing).any():
        raise RuntimeError("the IVF search found fewer neighbours than the re-ranking needs; "
                           "raise nprobe")
    return knn


def _ivf_index(items: np.ndarray, nlist: int | None, nprobe: int | None) -> faiss.Index:
    """An inner-product ``IndexIVFFlat`` over ``items`` (flat when there are too few)."""
    n, dim = items.shape
    max_lists = n // MIN_POINTS_PER_LIST
    if max_lists < 1:
        idx = faiss.IndexFlatIP(dim)
        idx.add(items)
        return idx
    nlist = min(nlist or max(1, round(math.sqrt(n))), max_lists)
    idx = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    n_train = min(n, TRAIN_POINTS_PER_LIST * nlist)
    pick = np.sort(np.random.default_rng(1234).choice(n, n_train, replace=False))
    idx.train(items[pick])
    idx.add(items)
    idx.nprobe = resolve_nprobe(nlist, nprobe)
    return idx


def re_ranking_features(
    query: np.ndarray,
    gallery: np.ndarray,
    query_parts: np.ndarray | None = None,
    gallery_parts: np.ndarray | None = None,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    q_g_dist: np.ndarray | None = None,
    out: np.ndarray | None = None,
    index: str = "flat",
    nlist: int | None = None,
    nprobe: int | None = None,
    device: str | torch.device | None = None,
    block_rows: int = 256,
) -> np.ndarray:
    r"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) of the pipeline's part distance,
    from the features: :func:`orgnn.retrieval.metrics.re_ranking` without its ``(Q, Q)`` and
    ``(G, G)`` inputs.

    With :math:`O_{ij} = D_{ji}^2 / \max_a D_{ai}^2` over the joint set, the neighbour lists
    :math:`N(i, k)`, the sets :math:`R^*(i)`, the weights :math:`\tilde V` and

    .. math::
        d^*(q, g) = (1 - \lambda)\, d_J(q, g) + \lambda\, O_{qg}

    are those of :func:`orgnn.retrieval.metrics.re_ranking` (see there); here :math:`N(i, k)`
    and the normaliser come from a search (module docs), :math:`O` on the sparse sets from one dot
    product per pair. Memory: the float32 features (twice with part weights), ``O(N (k_1 +
    k_2))`` sparse entries, blocks of ``block_rows x N`` and the ``(Q, G)`` output.

    Args:
        query: query part features, shape ``(Q, M, D)`` (any float dtype; memory maps stream).
        gallery: gallery part features, shape ``(G, M, D)``.
        query_parts: ``(Q, M)`` bool, the parts each query's distances average over (the
            "+OAN" rows; :func:`orgnn.reconstruction.pipeline.oan_parts`), or ``None`` for all
            parts.
        gallery_parts: ``(G, M)`` bool, the same for the gallery; given with ``query_parts``.
        k1: size of the k-reciprocal neighbourhood (default ``20``).
        k2: size of the local query expansion (default ``6``).
        lambda_value: weight of the original distance (default ``0.3``).
        q_g_dist: the ``(Q, G)`` distances already computed (e.g. by
            :func:`orgnn.reconstruction.pipeline.part_distance`); the original-distance term
            is read from them instead of being recomputed (default ``None``).
        out: a float32 ``(Q, G)`` array to write the result into (may be ``q_g_dist``
            itself: each block is read before it is overwritten; or a memory map).
        index: ``"flat"`` (exact chunked matrix products, default) or ``"ivf"`` (faiss
            ``IndexIVFFlat``; candidates scored exactly, lists approximate).
        nlist: IVF lists (default ``sqrt`` of the indexed items).
        nprobe: IVF lists visited (default :func:`orgnn.retrieval.search.resolve_nprobe`).
        device: torch device of the exact search (default CPU).
        block_rows: samples per block of the exact search (default ``256``).

    Returns:
        np.ndarray: re-ranked distances, shape ``(Q, G)``, float32 (``out`` when given).

    Raises:
        ValueError: on inconsistent shapes, non-finite features, ``k1 < 1`` or ``k2 < 1``,
            an unknown ``index``.
    """
    if query.ndim != 3 or gallery.ndim != 3 or query.shape[1:] != gallery.shape[1:]:
        raise ValueError(f"query and gallery must be (N, M, D) with the same M and D, got "
                         f"{query.shape} and {gallery.shape}")
    num_q, num_g = len(query), len(gallery)
    if num_q == 0 or num_g == 0:
        raise ValueError(f"need at least one query and one gallery item, got {num_q} and "
                         f"{num_g}")
    if (query_parts is None) != (gallery_parts is None):
        raise ValueError("give both query_parts and gallery_parts, or neither")
    if query_parts is not None:
        query_parts, gallery_parts = np.asarray(query_parts), np.asarray(gallery_parts)
        for name, p, x in (("query_parts", query_parts, query),
                           ("gallery_parts", gallery_parts, gallery)):
            if p.shape != x.shape[:2]:
                raise ValueError(f"{name} must have shape {x.shape[:2]}, got {p.shape}")
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    if index not in INDEXES:
        raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
    for name, d in (("q_g_dist", q_g_dist), ("out", out)):
        if d is not None and d.shape != (num_q, num_g):
            raise ValueError(f"{name} must have shape {(num_q, num_g)}, got {d.shape}")
    if out is not None and out.dtype != np.float32:
        raise ValueError(f"out must be float32, got {out.dtype}")

    cols = _Columns(query, gallery, query_parts, gallery_parts,
                    torch.device(device) if device is not None else torch.device("cpu"))
    if not bool(torch.isfinite(cols.x).all()):
        raise ValueError("query or gallery features contain NaN or inf")
    n = cols.n
    width = metrics._knn_width(n, k1, k2)
    row_max = np.empty(n, dtype=np.float32)
    if index == "flat":
        knn = _flat_lists(cols, width, block_rows, row_max)
    else:
        knn = _ivf_lists(cols, width, block_rows, row_max, nlist, nprobe)

    def gather(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return np.square(cols.pairs(i, j)) / row_max[i]

    rows, vcols, vals = metrics._expanded_v(knn, gather, k1, k2)
    del knn
    if out is None:
        out = np.empty((num_q, num_g), dtype=np.float32)
    for start, stop, jaccard in metrics._jaccard_blocks(rows, vcols, vals, num_q, n,
                                                        metrics._MAX_PAIRS):
        if q_g_dist is not None:
            orig = np.square(np.asarray(q_g_dist[start:stop], dtype=np.float32))
        else:
            orig = cols.block(start, stop, items="gallery")
            np.square(orig, out=orig)
        orig /= row_max[start:stop, None]
        jaccard *= 1 - lambda_value
        orig *= lambda_value
        out[start:stop] = jaccard + orig
    return out
