"""Few-part queries on IVF indexes visit more lists (resolve_nprobe): checked against the
exact search and against the same index searched without the scaling; results that depend
on each query alone."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from orgnn.io.storage import take_rows
from orgnn.retrieval.search import (
    _query_vectors,
    _set_nprobe,
    resolve_nprobe,
    search_neighbourhoods,
    search_parts_for,
)

M, D, G = 6, 8, 3000
K, THETA = 10, -1.0


@pytest.fixture(scope="module")
def world():
    """Parts drawn independently per item: the neighbours by two parts are spread over
    lists whose centroids were learnt on all six."""
    rng = np.random.default_rng(0)
    gallery = np.abs(rng.normal(size=(G, M, D))).astype(np.float32)
    return gallery


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def exact_mean_cosine(query, parts, gallery) -> np.ndarray:
    """(Q, G) mean cosine over each query's searching parts, float64, plain numpy."""
    cos = np.einsum("qmd,gmd->qgm", unit(query.astype(np.float64)),
                    unit(gallery.astype(np.float64)))
    return (cos * parts[:, None, :]).sum(-1) / parts.sum(1)[:, None]


def top_k(score: np.ndarray, k: int, exclude: np.ndarray) -> np.ndarray:
    score = score.copy()
    score[np.arange(len(score)), exclude] = -np.inf
    return np.argsort(-score, axis=1, kind="stable")[:, :k]


def recall(exact: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean([np.isin(e, g).mean() for e, g in zip(exact, got)]))


def unscaled(cache: dict, query, parts, gallery, nprobe: int, per: int, exclude):
    """The same cached index searched as before the scaling: ``nprobe`` lists and ``per``
    candidates for every query, re-ranked by the exact mean cosine, top K."""
    (idx,) = [v for v in cache.values() if isinstance(v, faiss.Index)]
    _set_nprobe(idx, nprobe)
    cand = idx.search(_query_vectors(query, parts, None), per)[1]
    score = np.take_along_axis(exact_mean_cosine(query, parts, gallery), np.clip(cand, 0, None),
                               axis=1)
    score[(cand < 0) | (cand == exclude[:, None])] = -np.inf
    order = np.argsort(-score, axis=1, kind="stable")[:, :K]
    return np.take_along_axis(cand, order, axis=1)


def test_resolve_nprobe_hand_computed():
    assert resolve_nprobe(316) == 39 and resolve_nprobe(100) == 32
    assert resolve_nprobe(316, searching=2, parts=6) == 117          # ceil(39 * 6 / 2)
    assert resolve_nprobe(100, searching=2, parts=6) == 96
    assert resolve_nprobe(100, searching=6, parts=6) == 32
    assert resolve_nprobe(100, 10, searching=4, parts=6) == 15       # ceil(10 * 1.5)
    assert resolve_nprobe(100, 10, searching=5, parts=6) == 12       # ceil(12.0)
    assert resolve_nprobe(100, 50, searching=2, parts=6) == 100      # at most nlist
    assert resolve_nprobe(40, 64) == 40
    for bad in (0, 7):
        with pytest.raises(ValueError, match="searching must be in"):
            resolve_nprobe(100, searching=bad, parts=6)
    with pytest.raises(ValueError, match="searching must be in"):
        resolve_nprobe(100, searching=2)


@pytest.mark.parametrize("index,nprobe,before_max,after_min", [
    ("ivf", 10, 0.7, 0.88),      # exact scores: the lists alone, 10 of 60 before, 30 after
    ("ivfpq", 8, 0.42, 0.45),    # 8 lists before, 24 after; the 6-d 4-bit codes limit both
])
def test_two_part_search_recall_rises(world, index, nprobe, before_max, after_min):
    gallery = world
    n = 200
    rows = np.arange(n)
    query = gallery[:n]
    visible = np.ones((n, M), bool)                        # fully visible: parts 0 and 1
    parts = search_parts_for(visible)
    exact = top_k(exact_mean_cosine(query, parts, gallery), K, rows)
    cache: dict = {}
    got = search_neighbourhoods(query, visible, gallery, k=K, theta=THETA, exclude=rows,
                                index=index, nlist=60, nprobe=nprobe, index_cache=cache)
    per = K + 1 + 2 if index == "ivf" else (K + 1) * 8
    before = unscaled(cache, query, parts, gallery, nprobe, per, rows)
    r_before, r_after = recall(exact, before), recall(exact, got.index)
    assert r_before < before_max, r_before
    assert r_after > after_min and r_after > r_before + 0.05, (r_before, r_after)


@pytest.mark.parametrize("index", ["ivf", "ivfpq"])
def test_results_depend_on_each_query_alone(world, index):
    """Queries searching with 1 to 6 parts, in one call or split across two calls and
    other batch sizes: the same neighbours and scores for every query."""
    gallery = world
    rng = np.random.default_rng(1)
    n = 120
    rows = rng.choice(G, n, replace=False)
    query = gallery[rows]
    visible = rng.random((n, M)) < rng.uniform(0.2, 1.0, (n, 1))
    visible[:20] = True
    parts = search_parts_for(visible)
    assert len(np.unique(parts.sum(1))) >= 4
    cache: dict = {}
    kw = dict(k=K, theta=0.3, index=index, nlist=60, nprobe=4, index_cache=cache)
    whole = search_neighbourhoods(query, visible, gallery, exclude=rows, **kw)
    odd, even = np.arange(1, n, 2), np.arange(0, n, 2)
    for split in (odd, even):
        part = search_neighbourhoods(query[split], visible[split], gallery, exclude=rows[split],
                                     **kw)
        np.testing.assert_array_equal(part.index, whole.index[split])
        np.testing.assert_array_equal(part.score, whole.score[split])
    small = search_neighbourhoods(query, visible, gallery, exclude=rows, batch_size=7, **kw)
    np.testing.assert_array_equal(small.index, whole.index)
    np.testing.assert_array_equal(small.score, whole.score)
    # the scores are the exact mean cosines over each query's searching parts
    ref = exact_mean_cosine(query, parts, gallery)
    valid = whole.valid
    np.testing.assert_allclose(whole.score[valid], np.take_along_axis(
        ref, np.clip(whole.index, 0, None), axis=1)[valid], atol=1e-6)


def test_take_rows_parts(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, M, D)).astype(np.float16)
    path = tmp_path / "x.npy"
    np.save(path, x)
    mapped = np.load(path, mmap_mode="r")
    index = rng.integers(0, 50, (7, 9))
    parts = np.array([0, 3, 4])
    for arr in (x, mapped):
        np.testing.assert_array_equal(take_rows(arr, index, rows=4, parts=parts),
                                      x[index][:, :, parts])
        np.testing.assert_array_equal(take_rows(arr, index, rows=4), x[index])
