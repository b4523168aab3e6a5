r"""Learned outlier removal: which of an image's neighbours share its identity?

The OR-GNN's outlier-aware module (Eq. 4) scores each neighbour :math:`j` of a target
:math:`t` by its cosine to the mean of the others. On real data that is a weak test of
"same person" (edge AUC 0.79 on cuhk03-parts), and averaging wrong identities is what keeps
reconstruction from working: averaging only the right neighbours lifts cuhk03-parts from
21 to 64 mAP. This module learns the test, supervised by the identities that every training
neighbourhood knows, and hands the OR-GNN a prior weight per neighbour that multiplies
Eq. 4's confidence (:class:`~orgnn.ORGNN`'s ``node_weight``).

**Edge features** (:func:`edge_features`, per target-neighbour pair, all from part features,
visibilities and the neighbourhood lists; no camera, no identity): the mean cosine over the
target's searching parts and over the parts visible in both, its gap to the best and the
mean neighbour, the worst visible part, the hidden parts' cosine, the spread over parts, the
neighbour's density among the other neighbours (Eq. 4's quantity), how many neighbours it
finds closer than the target (local reciprocity), the similarity minus the neighbour's own
:math:`k`-th nearest gallery similarity (global reciprocity, as in k-reciprocal
re-ranking), its rank and visibility.

**Stages** (:func:`context_features`): stage :math:`s > 1` adds what stage :math:`s-1`
believed: the previous probability and its ratio to the neighbourhood's best, the cosine
of the neighbour to the reconstruction those probabilities give (over *all* parts, hidden
ones filled in), and the overlap between the target's confident neighbours and the
neighbour's own neighbourhood (weighted as the k-reciprocal encoding weights it). Each
stage is a small MLP trained with binary cross-entropy:

.. math::
    p^{(s)}_{tj} = \sigma\big(\mathrm{MLP}_s(\mathbf{e}_{tj} \,\|\, \mathbf{c}^{(s-1)}_{tj})\big),
    \qquad
    \mathcal{L}_s = \mathrm{BCE}\big(p^{(s)}_{tj}, \mathbb{1}[y_t = y_j]\big)

and the prior handed to the OR-GNN is :math:`w_j = (p_{tj})^\gamma`. Everything is
vectorised over targets (chunks of ``chunk_size`` targets, by default as many as fit the
memory budget, :func:`feature_rows`), never a loop over images.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from orgnn import distributed
from orgnn.io.features import PartFeatures
from orgnn.io.storage import iter_rows, memory_budget, release_rows, rows_for, take_rows
from orgnn.nn.neighbour_scorer import CONTEXT_FEATURES, EDGE_FEATURES, NeighbourScorer
from orgnn.reconstruction.graphs import used_width
from orgnn.retrieval.search import Neighbourhoods, kth_part_similarity, resolve_index
from orgnn.retrieval.search import _normalise as _unit  # L2 per part; zero vectors stay zero

#: Items per exact search call of :func:`kth_neighbour_similarity`.
KTH_SEARCH_BATCH = 65536
KTH_METHODS = ("auto", "exact", "index")
#: Neighbourhood lists longer than this are sampled (evenly spaced entries, the sums scaled
#: to the whole list) in the two features that compare every neighbour with every other
#: (``closer_than_target``, the overlaps): :math:`O(K)` work per pair instead of :math:`O(K)`
#: per pair and neighbour. Exact for every list of at most this many entries (the
#: default :math:`K = 30`, the training split's 30).
PAIR_SAMPLE = 128

__all__ = ["ScorerConfig", "edge_features", "context_features", "feature_rows",
           "kth_neighbour_similarity", "fit_scorer", "score_split", "weighted_reconstruction",
           "prior_weights"]

@dataclass
class ScorerConfig:
    """How the neighbour scorer is built and trained.

    Attributes:
        stages: number of refinement stages (each one MLP); 1 uses the edge features only.
        hidden: MLP width.
        steps: full-batch Adam steps per stage.
        lr, weight_decay: Adam settings.
        gamma: exponent of the prior handed to the OR-GNN, :math:`w = p^\\gamma`.
        self_weight: prior of the target's own visible parts in the reconstruction.
        kth: the ``k`` of the global-reciprocity feature (default: the neighbourhood size).
        max_edges: each stage's MLP learns from at most this many (target, neighbour) pairs,
            a seeded sample (the features are computed for all of them).
        seed: seed of the MLP initialisation and of the sample.
    """

    stages: int = 3
    hidden: int = 32
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-4
    gamma: float = 4.0
    self_weight: float = 1.0
    kth: int | None = None
    max_edges: int = 40_000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("stages", "hidden", "steps", "max_edges"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ScorerConfig.{name} must be an integer >= 1, got {value!r}")
        if not self.gamma > 0:
            raise ValueError(f"ScorerConfig.gamma must be > 0, got {self.gamma!r}")
        if not self.self_weight >= 0:
            raise ValueError(f"ScorerConfig.self_weight must be >= 0, got {self.self_weight!r}")
        if self.kth is not None and (isinstance(self.kth, bool) or self.kth < 1):
            raise ValueError(f"ScorerConfig.kth must be None or an integer >= 1, "
                             f"got {self.kth!r}")


# --------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------
def kth_neighbour_similarity(gallery: np.ndarray, k: int,
                             batch_size: int = KTH_SEARCH_BATCH, *, method: str = "auto",
                             index: str = "auto", nprobe: int | None = None,
                             device: str | None = None, index_cache: dict | None = None
                             ) -> np.ndarray:
    """``(G, M)``: per part, each gallery item's cosine to its ``k``-th nearest *other*
    gallery item (the item itself excluded).

    Two ways, one result where the second finds the true neighbours:

    * ``method="exact"``: one exact faiss index per part, every item searched
      (:math:`O(M G^2 D)`); one part's unit vectors are held at a time, read from
      ``gallery`` (which may be a memory map) in row chunks;
    * ``method="index"``: :func:`orgnn.retrieval.search.kth_part_similarity`: one search per item in
      the index the neighbourhood search uses (``index``, ``nprobe``, ``device``;
      ``index_cache`` shares it), its ``8 k`` candidates re-scored exactly per part. With
      ``index="ivfpq"`` (what ``"auto"`` picks beyond
      :data:`orgnn.retrieval.search.AUTO_EXACT_MAX` items) no step is :math:`O(G^2)`;
    * ``method="auto"`` (default): ``exact`` where the search itself is exact (``index``
      resolves to ``"flat"``: :func:`orgnn.retrieval.search.resolve_index`, up to
      :data:`orgnn.retrieval.search.AUTO_EXACT_MAX` items with ``"auto"``), ``index`` otherwise. One
      switch, ``index``, makes the whole path exact or approximate.

    Under ``torchrun`` each rank searches its share of the items (all-gathered).
    """
    if method not in KTH_METHODS:
        raise ValueError(f"unknown k-th similarity method {method!r}; expected one of "
                         f"{KTH_METHODS}")
    g, m, _ = gallery.shape
    if g < 2:
        return np.zeros((g, m), dtype=np.float32)
    if method == "auto":
        method = "exact" if resolve_index(index, g) == "flat" else "index"
    if method == "index":
        def rows_kth(rows: slice) -> np.ndarray:
            ids = np.arange(g)[rows]
            return kth_part_similarity(gallery[rows], gallery, k, exclude=ids, index=index,
                                       nprobe=nprobe, device=device, index_cache=index_cache)
        return distributed.map_rows(rows_kth, g)
    kk = min(k, g - 1)
    parts = []
    for p in range(m):  # M exact indexes, one at a time
        part = np.concatenate([_unit(chunk[:, p]) for _, chunk in iter_rows(gallery)])
        search = faiss.IndexFlatIP(part.shape[1])
        search.add(part)

        def rows_kth(rows: slice, part=part, search=search) -> np.ndarray:
            out = np.zeros(rows.stop - rows.start, dtype=np.float32)
            for start in range(rows.start, rows.stop, batch_size):
                ids = np.arange(start, min(start + batch_size, rows.stop))
                sims, found = search.search(part[ids], kk + 1)
                not_self = found != ids[:, None]
                # the kk-th entry that is not the item itself (it is usually first)
                order = np.argsort(~not_self, axis=1, kind="stable")[:, kk - 1]
                out[ids - rows.start] = sims[np.arange(len(ids)), order]
            return out
        parts.append(distributed.map_rows(rows_kth, g))
        del search, part
    return np.stack(parts, 1)


def feature_rows(k: int, kg: int, num_parts: int, dim: int, budget: int | None = None) -> int:
    """Targets per chunk of :func:`edge_features` / :func:`context_features` so that one
    chunk's arrays stay within ``budget`` bytes (default
    :func:`orgnn.io.storage.memory_budget`): about six float32 copies of the ``(K, M, D)``
    neighbours, the ``(K, K)`` pair similarities (in column blocks when even one target's
    would not fit) and the ``(K, K_g)`` overlap look-ups, per target."""
    per_row = (24 * k * num_parts * dim + 12 * k * min(k, PAIR_SAMPLE)
               + 64 * k * min(kg, PAIR_SAMPLE))
    return rows_for(per_row, budget)


def edge_features(target: np.ndarray, gallery: np.ndarray, gallery_visible: np.ndarray,
                  nbrs: Neighbourhoods, kth: np.ndarray,
                  target_visible: np.ndarray | None = None,
                  list_width: int | None = None) -> np.ndarray:
    """``(Q, K, len(EDGE_FEATURES))`` float32 features of every (target, neighbour) pair.

    Memory: a few float32 copies of the ``(Q, K, M, D)`` neighbours; the ``(Q, K, K)``
    pair similarities are formed in column blocks within
    :func:`orgnn.io.storage.memory_budget` (the density feature needs none of them: it is
    linear in the neighbours), and for ``K`` above :data:`PAIR_SAMPLE` only against that
    many evenly spaced neighbours (``closer_than_target`` then is an estimate).

    Args:
        target: ``(Q, M, D)`` target features.
        gallery: ``(G, M, D)`` features the neighbour indices point into.
        gallery_visible: ``(G, M)`` bool visibility of the gallery items.
        nbrs: the targets' neighbourhoods (``search_parts`` gives the target's parts).
        kth: ``(G, M)`` from :func:`kth_neighbour_similarity` on ``gallery``.
        target_visible: ``(Q, M)`` bool; parts outside it count as hidden (default: the
            searching parts).
        list_width: the ``K`` of the search, which the ``rank`` feature divides by, when
            ``nbrs`` holds only its first columns (trimmed padding); default ``K`` itself.
    """
    index = nbrs.index
    valid = index >= 0
    idx = np.clip(index, 0, None)
    parts = nbrs.search_parts.astype(np.float32)                       # (Q, M)
    weights = parts / parts.sum(1, keepdims=True)
    shown = parts if target_visible is None else np.asarray(target_visible, np.float32)
    nbr = _unit(take_rows(gallery, idx))                               # (Q, K, M, D)
    part_cos = np.einsum("qmd,qkmd->qkm", _unit(target), nbr)
    score = (part_cos * weights[:, None]).sum(-1)
    mutual = parts[:, None] * np.asarray(gallery_visible, np.float32)[idx]
    score_mutual = np.where(mutual.sum(-1) > 0, (part_cos * mutual).sum(-1)
                            / np.maximum(mutual.sum(-1), 1), score)
    worst = np.where(parts[:, None] > 0, part_cos, np.inf).min(-1)
    hidden = 1 - shown
    hidden_cos = (part_cos * hidden[:, None]).sum(-1) / np.maximum(hidden.sum(1), 1)[:, None]
    spread = np.sqrt((((part_cos - score[..., None]) ** 2) * weights[:, None]).sum(-1))

    vm = valid.astype(np.float32)
    count = vm.sum(1, keepdims=True)
    mean_score = (score * vm).sum(1, keepdims=True) / np.maximum(count, 1)
    density, closer = _pair_statistics(nbr, weights, vm, score)
    kth_j = (np.asarray(kth, np.float32)[idx] * weights[:, None]).sum(-1)
    rank = np.broadcast_to(np.arange(index.shape[1], dtype=np.float32)
                           / (list_width or index.shape[1]), score.shape)
    searched = np.broadcast_to(parts.sum(1, keepdims=True) / parts.shape[1], score.shape)
    columns = [score_mutual, mutual.mean(-1), score, score - score[:, :1], score - mean_score,
               worst, hidden_cos, density, score - density, closer / np.maximum(count, 1),
               score - kth_j, kth_j, rank, searched, spread]
    out = np.stack(columns, -1).astype(np.float32)
    return np.where(valid[..., None], out, 0.0)


def _pair_statistics(nbr: np.ndarray, weights: np.ndarray, vm: np.ndarray, score: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    r"""Per neighbour :math:`j` of each target: its density, the mean over the other valid
    neighbours :math:`l` of the pair similarity
    :math:`\pi_{jl} = \sum_p w_p \cos(\mathbf{x}_p(j), \mathbf{x}_p(l))`, and the number
    of them with :math:`\pi_{jl}` above the target's own similarity to :math:`j`.

    Only the target's searching parts (:math:`w_p > 0`) enter the products. The density
    is linear, :math:`\sum_l \pi_{jl} = \langle w \circ x_j, \sum_l x_l \rangle`; the
    count needs the pairs, formed ``(Q, K, L)`` in column blocks of ``L`` within the
    memory budget. Lists longer than :data:`PAIR_SAMPLE` (far beyond the default
    :math:`K = 30`) are compared with that many evenly spaced neighbours and the count
    scaled, so the work per pair stays bounded."""
    q, k, m, d = nbr.shape
    # the searching parts first (a target has at most `used` of them): 3x fewer products
    # for fully visible images, which search with two parts
    used = max(1, int((weights > 0).sum(1).max(initial=1)))
    order = np.argsort(weights <= 0, axis=1, kind="stable")[:, :used]
    w = np.take_along_axis(weights, order, 1)
    xs = np.take_along_axis(nbr, order[:, None, :, None], 2)
    x = np.ascontiguousarray(xs).reshape(q, k, used * d)
    wx = (xs * w[:, None, :, None]).reshape(q, k, used * d)
    del xs
    count = vm.sum(1, keepdims=True)
    total = np.einsum("qk,qkf->qf", vm, x)
    self_pair = np.einsum("qkf,qkf->qk", wx, x)
    density = (np.einsum("qkf,qf->qk", wx, total) - self_pair * vm) / np.maximum(count - 1, 1)
    # the other neighbours l: all of them, or PAIR_SAMPLE evenly spaced ones for long lists
    pos, _ = _sample_positions(count[:, 0].astype(np.int64), k)          # (Q, S)
    cols = np.take_along_axis(x, pos[..., None], 1)                      # (Q, S, F)
    col_ok = np.take_along_axis(vm, pos, 1) > 0
    if k > PAIR_SAMPLE:  # repeated positions of short lists count once
        col_ok &= (np.arange(pos.shape[1]) < count) | (count > PAIR_SAMPLE)
    closer = np.zeros((q, k), dtype=np.float32)
    others = np.zeros((q, k), dtype=np.float32)
    block = rows_for(12 * q * k, at_most=pos.shape[1])
    wx_t, cols_t = torch.from_numpy(wx), torch.from_numpy(np.ascontiguousarray(cols))
    for l0 in range(0, pos.shape[1], block):
        l1 = min(l0 + block, pos.shape[1])
        pair = (wx_t @ cols_t[:, l0:l1].transpose(1, 2)).numpy()         # (Q, K, L)
        other = col_ok[:, None, l0:l1] & (pos[:, None, l0:l1] != np.arange(k)[:, None])
        closer += ((pair > score[:, :, None]) & other).sum(-1)
        others += other.sum(-1)
    # all the others read: the count itself; a sample: scaled to the count
    closer = np.where(others >= count - 1, closer,
                      closer * (count - 1) / np.maximum(others, 1)).astype(np.float32)
    return density.astype(np.float32), closer


def weighted_reconstruction(target: np.ndarray, target_visible: np.ndarray,
                            gallery: np.ndarray, index: np.ndarray, weight: np.ndarray,
                            self_weight: float) -> np.ndarray:
    r"""``(Q, M, D)``: per part, the weighted mean of the unit-normalised neighbours and the
    target's own visible parts,

    .. math::
        \hat{\mathbf{x}}_k(t) = \frac{\lambda m_k(t)\,\mathbf{x}_k(t) + \sum_j w_j \mathbf{x}_k(j)}
                                     {\lambda m_k(t) + \sum_j w_j},

    the target itself where the denominator vanishes."""
    valid = index >= 0
    w = np.where(valid, weight, 0.0).astype(np.float32)
    own = _unit(target)
    num = np.einsum("qk,qkmd->qmd", w, _unit(take_rows(gallery, np.clip(index, 0, None))))
    sw = self_weight * np.asarray(target_visible, np.float32)
    num += sw[..., None] * own
    den = w.sum(1)[:, None] + sw
    return np.where(den[..., None] > 1e-8, num / np.maximum(den, 1e-8)[..., None], own)


def context_features(target: np.ndarray, target_visible: np.ndarray, gallery: np.ndarray,
                     nbrs: Neighbourhoods, prob: np.ndarray, gallery_nbrs: Neighbourhoods,
                     gallery_prob: np.ndarray, gamma: float, self_weight: float
                     ) -> np.ndarray:
    """``(Q, K, len(CONTEXT_FEATURES))``: what the previous stage's probabilities ``prob``
    ``(Q, K)`` (and ``gallery_prob`` for ``gallery_nbrs``, the gallery items' own
    neighbourhoods) say about each pair."""
    index = nbrs.index
    valid = index >= 0
    idx = np.clip(index, 0, None)
    p = np.where(valid, prob, 0.0).astype(np.float32)
    best = p.max(1, keepdims=True)
    rec = _unit(weighted_reconstruction(target, target_visible, gallery, index, p ** gamma,
                                        self_weight))
    consensus = np.einsum("qmd,qkmd->qk", rec, _unit(take_rows(gallery, idx))) / rec.shape[1]
    consensus = np.where(valid, consensus, 0.0)
    best_consensus = np.where(valid, consensus, -np.inf).max(1, keepdims=True)
    # Overlap of the target's neighbours l (weighted by p_tl) with neighbour j's own list
    # (estimated from PAIR_SAMPLE evenly spaced entries of that list when it is longer).
    pos, scale = _sample_positions((gallery_nbrs.index >= 0).sum(1)[idx],
                                   gallery_nbrs.index.shape[1])
    their = gallery_nbrs.index[idx[..., None], pos]                       # (Q, K, S)
    their_p = np.where(their >= 0, gallery_prob[idx[..., None], pos], 0.0)
    p_of_their = _lookup_row_values(index, p, their)                     # (Q, K, S)
    total = np.maximum(p.sum(1, keepdims=True), 1e-6)
    overlap = p_of_their.sum(-1) * scale / total
    overlap_w = (p_of_their * their_p).sum(-1) * scale / total
    out = np.stack([p, p / np.maximum(best, 1e-6), consensus,
                    consensus - np.where(np.isfinite(best_consensus), best_consensus, 0.0),
                    overlap, overlap_w], -1).astype(np.float32)
    return np.where(valid[..., None], out, 0.0)


def _sample_positions(count: np.ndarray, width: int, sample: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Which entries of lists of ``width`` slots (``count`` valid ones first, any shape)
    to read: all of them when ``width <= sample`` (scale 1), else ``sample`` evenly spaced
    valid positions and the factor ``count / sample`` that turns their sum into an
    estimate of the whole list's. Returns ``(positions (..., S), scale (...))``."""
    sample = PAIR_SAMPLE if sample is None else sample
    if width <= sample:
        pos = np.broadcast_to(np.arange(width), count.shape + (width,))
        return pos, np.ones(count.shape, np.float32)
    i = np.arange(sample)
    many = count[..., None] > sample
    pos = np.where(many, i * count[..., None] // sample, i)        # (..., S)
    scale = np.where(count > sample, count / sample, 1.0).astype(np.float32)
    return pos, scale


def _lookup_row_values(index: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``out[q, ...] = values[q, l]`` where ``index[q, l] == query[q, ...] >= 0``, else 0
    (one sorted search over row-offset keys; entries of a row of ``index`` are distinct)."""
    rows, width = index.shape
    span = int(max(index.max(initial=0), query.max(initial=0))) + 2
    keys = np.where(index >= 0, np.arange(rows)[:, None] * span + index, -1).ravel()
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    flat_q = query.reshape(rows, -1)
    wanted = np.where(flat_q >= 0, np.arange(rows)[:, None] * span + flat_q, -2)
    pos = np.clip(np.searchsorted(sorted_keys, wanted), 0, keys.size - 1)
    found = (sorted_keys[pos] == wanted) & (wanted >= 0)
    out = np.where(found, values.ravel()[order[pos]], 0.0)
    return out.reshape(query.shape).astype(np.float32)


# --------------------------------------------------------------------------------------
# Scoring a split
# --------------------------------------------------------------------------------------
@dataclass
class _Split:
    """One side to score: targets, the gallery they point into, and that gallery's own
    neighbourhoods (for the overlap features)."""

    target: np.ndarray
    target_visible: np.ndarray
    nbrs: Neighbourhoods
    base: np.ndarray                                                     # (Q, K, E0)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _rows(nbrs: Neighbourhoods, sl: slice, width: int | None = None) -> Neighbourhoods:
    cols = slice(0, width)
    return Neighbourhoods(nbrs.index[sl, cols], nbrs.score[sl, cols], nbrs.search_parts[sl])


def _chunk_size(chunk_size: int | None, nbrs: Neighbourhoods, gallery_nbrs: Neighbourhoods,
                gallery: np.ndarray) -> int:
    """Targets per feature chunk: ``chunk_size``, or what fits the memory budget cut to
    :func:`orgnn.distributed.block_rows` (enough chunks for ``torchrun`` ranks, which take
    whole chunks, to get even shares of a split)."""
    if chunk_size is not None:
        return chunk_size
    # sized by the columns the lists really use (score_split trims each chunk's padding)
    return distributed.block_rows(nbrs.index.shape[0], feature_rows(
        max(1, used_width(nbrs.index)), max(1, used_width(gallery_nbrs.index)),
        gallery.shape[1], gallery.shape[2]))


def _base_features(target: PartFeatures, gallery: PartFeatures, nbrs: Neighbourhoods,
                   kth: np.ndarray, chunk_size: int | None) -> np.ndarray:
    out = np.zeros(nbrs.index.shape + (len(EDGE_FEATURES),), np.float32)
    for sl in _chunks(target.num_images, _chunk_size(chunk_size, nbrs, nbrs, gallery.features)):
        out[sl] = edge_features(target.features[sl], gallery.features, gallery.visible,
                                _rows(nbrs, sl), kth, target.visible[sl])
    return out


def _context(split: _Split, gallery: PartFeatures, prob: np.ndarray,
             gallery_nbrs: Neighbourhoods, gallery_prob: np.ndarray, gamma: float,
             self_weight: float, chunk_size: int | None) -> np.ndarray:
    out = np.zeros(split.nbrs.index.shape + (len(CONTEXT_FEATURES),), np.float32)
    size = _chunk_size(chunk_size, split.nbrs, gallery_nbrs, gallery.features)
    for sl in _chunks(split.target.shape[0], size):
        out[sl] = context_features(split.target[sl], split.target_visible[sl],
                                   gallery.features, _rows(split.nbrs, sl), prob[sl],
                                   gallery_nbrs, gallery_prob, gamma, self_weight)
    return np.concatenate([split.base, out], -1)


def score_split(scorer: NeighbourScorer, gallery: PartFeatures,
                gallery_nbrs: Neighbourhoods, targets: PartFeatures | None = None,
                target_nbrs: Neighbourhoods | None = None, chunk_size: int | None = None,
                *, kth: np.ndarray | None = None, kth_method: str = "auto",
                index: str = "auto", nprobe: int | None = None, device: str | None = None,
                index_cache: dict | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Same-identity probabilities of the gallery's own neighbourhoods and (optionally) of
    ``targets``' neighbourhoods in the gallery, through every stage of ``scorer``.

    The gallery is scored first at each stage, since the targets' overlap features read the
    gallery's probabilities of the stage before. Features are computed ``chunk_size``
    targets at a time (default: as many as :func:`feature_rows` fits in the memory budget)
    and each chunk goes through the stage's MLP on its own, so a target's probabilities
    depend on nothing but its chunk. The edge features are kept between stages where all of
    them fit a quarter of the budget, else computed again. The k-th-neighbour similarities come from
    :func:`kth_neighbour_similarity` (``kth_method``; ``index``, ``nprobe``, ``device``
    and ``index_cache`` are the neighbourhood search's, whose index it shares), unless
    given as ``kth`` ``(G, M)``.

    Under ``torchrun`` each rank scores whole chunks of its share of each side (the chunk
    grid of one process: the same bits) and the probabilities are all-gathered after each
    stage, as the next stage reads any gallery item's.

    Returns:
        ``(gallery_prob (G, Kg), target_prob (Q, K) or None)``.
    """
    if targets is not None and target_nbrs is None:
        raise ValueError("score_split: targets need target_nbrs")
    kth_sims = kth if kth is not None else kth_neighbour_similarity(
        gallery.features, scorer.kth, method=kth_method, index=index, nprobe=nprobe,
        device=device, index_cache=index_cache)
    sides = [(gallery, gallery_nbrs)] + ([(targets, target_nbrs)] if targets is not None
                                         else [])
    sizes = [_chunk_size(chunk_size, nbrs, gallery_nbrs, gallery.features)
             for _, nbrs in sides]
    keep = sum(n.index.size for _, n in sides) * 4 * len(EDGE_FEATURES) <= memory_budget() / 4
    bases: dict[tuple[int, int], np.ndarray] = {}

    def base(i: int, sl: slice, chunk: Neighbourhoods) -> np.ndarray:
        target, nbrs = sides[i]
        found = bases.get((i, sl.start))
        if found is None:
            found = edge_features(target.features[sl], gallery.features, gallery.visible,
                                  chunk, kth_sims, target.visible[sl],
                                  list_width=nbrs.index.shape[1])
            if keep:
                bases[(i, sl.start)] = found
        return found

    def stage_prob(stage: int, i: int, previous: list[np.ndarray] | None) -> np.ndarray:
        target, nbrs = sides[i]

        def run(rows: slice) -> np.ndarray:
            out = np.zeros((rows.stop - rows.start, nbrs.index.shape[1]), np.float32)
            for start in range(rows.start, rows.stop, sizes[i]):
                sl = slice(start, min(start + sizes[i], rows.stop))
                # the chunk's lists up to their last valid entry: under a threshold, a
                # large K is mostly padding, which every feature ignores
                width = max(1, used_width(nbrs.index[sl]))
                chunk = _rows(nbrs, sl, width)
                feats = base(i, sl, chunk)
                if stage:
                    ctx = context_features(target.features[sl], target.visible[sl],
                                           gallery.features, chunk,
                                           previous[i][sl, :width], gallery_nbrs,
                                           previous[0], scorer.gamma, scorer.self_weight)
                    feats = np.concatenate([feats, ctx], -1)
                out[sl.start - rows.start:sl.stop - rows.start, :width] = \
                    scorer.probability(stage, feats)
                release_rows(target.features, sl.start, sl.stop)  # a mapped gallery's pages
            return out
        return distributed.map_rows(run, target.num_images, sizes[i])

    probs: list[np.ndarray] | None = None
    for stage in range(scorer.stages):
        probs = [stage_prob(stage, i, probs) for i in range(len(sides))]
    probs = [np.where(nbrs.index >= 0, p, 0.0).astype(np.float32)
             for (_, nbrs), p in zip(sides, probs)]
    return probs[0], (probs[1] if targets is not None else None)


def _fit_stage(scorer: NeighbourScorer, stage: int, features: np.ndarray, labels: np.ndarray,
               sample: np.ndarray, config: ScorerConfig) -> None:
    x = torch.from_numpy(features.reshape(-1, features.shape[-1])[sample])
    y = torch.from_numpy(labels.reshape(-1)[sample].astype(np.float32))
    if x.shape[0] == 0:
        raise ValueError("fit_scorer: the training split has no neighbour pairs to learn from")
    getattr(scorer, f"mean{stage}").copy_(x.mean(0))
    getattr(scorer, f"std{stage}").copy_(x.std(0).nan_to_num(1.0).clamp_min(1e-6))
    mlp = scorer.mlps[stage]
    optimiser = torch.optim.Adam(mlp.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide MLP: threads cost more than they give (and much
    try:                      # more on a busy machine)
        for _ in range(config.steps):
            optimiser.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(scorer.logits(stage, x), y)
            loss.backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    if not torch.isfinite(loss):
        raise RuntimeError(f"fit_scorer: stage {stage} diverged (loss {loss.item()})")


def fit_scorer(train: PartFeatures, nbrs: Neighbourhoods, config: ScorerConfig | None = None,
               chunk_size: int | None = None,
               on_stage: Callable[[int], None] | None = None) -> NeighbourScorer:
    """Train a :class:`~orgnn.nn.neighbour_scorer.NeighbourScorer` on the training split's
    own neighbourhoods ``nbrs`` (each image searched in the split, itself excluded), stage
    by stage; stage
    ``s`` learns from stage ``s - 1``'s probabilities on the same neighbourhoods.
    ``on_stage(s)`` is called as stage ``s`` starts (``-1``: the edge features), for
    progress bars."""
    on_stage = on_stage or (lambda stage: None)
    config = config or ScorerConfig()
    if len(np.unique(train.pids)) < 2:
        raise ValueError("fit_scorer: needs at least two training identities")
    torch.manual_seed(config.seed)
    kth = config.kth or max(nbrs.index.shape[1], 1)
    scorer = NeighbourScorer(config.stages, config.hidden, config.gamma, config.self_weight,
                             kth)
    valid = nbrs.index >= 0
    labels = (np.asarray(train.pids)[np.clip(nbrs.index, 0, None)]
              == np.asarray(train.pids)[:, None]) & valid
    if labels[valid].all() or not labels[valid].any():
        raise ValueError("fit_scorer: every training neighbour has the same label (all right "
                         "or all wrong); widen the search (k, theta)")
    on_stage(-1)
    with distributed.local():  # the fit is one process' work (rank 0's under torchrun)
        kth_sims = kth_neighbour_similarity(train.features, kth)
    split = _Split(train.features, train.visible, nbrs,
                   _base_features(train, train, nbrs, kth_sims, chunk_size))
    features = split.base
    sample = np.flatnonzero(valid.reshape(-1))
    if sample.size > config.max_edges:
        rng = np.random.default_rng(config.seed)
        sample = np.sort(rng.choice(sample, size=config.max_edges, replace=False))
    for stage in range(config.stages):
        on_stage(stage)
        if stage:
            prob = np.where(valid, scorer.probability(stage - 1, features), 0.0)
            features = _context(split, train, prob, nbrs, prob, config.gamma,
                                config.self_weight, chunk_size)
        _fit_stage(scorer, stage, features, labels, sample, config)
    return scorer.eval()


def scorer_config_dict(config: ScorerConfig) -> dict[str, Any]:
    return asdict(config)


def prior_weights(prob: np.ndarray, gamma: float, target_weight: float = 1.0) -> np.ndarray:
    r"""``(N, 1 + K)`` OR-GNN node weights from same-identity probabilities ``(N, K)``: the
    target's own weight first, then :math:`p^\gamma` per neighbour (0 where padded)."""
    prob = np.asarray(prob, dtype=np.float32)
    return np.concatenate([np.full((prob.shape[0], 1), target_weight, np.float32),
                           np.clip(prob, 0, 1) ** gamma], axis=1)
