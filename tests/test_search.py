"""Tests for orgnn.retrieval.search against brute-force references written from the definitions."""
from __future__ import annotations

import numpy as np
import pytest

from orgnn.retrieval.search import Neighbourhoods, search_neighbourhoods, search_parts_for

M, D = 6, 16


def clustered(rng: np.random.Generator, n: int, centers: np.ndarray, noise: float = 0.5):
    """Non-negative features around a few cluster centres (many cosines above 0.7)."""
    labels = rng.integers(0, len(centers), n)
    x = centers[labels] + noise * rng.normal(size=(n, *centers.shape[1:]))
    return np.maximum(x, 0).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = np.abs(rng.normal(size=(4, M, D)))
    query = clustered(rng, 20, centers)
    gallery = clustered(rng, 60, centers)
    visible = rng.random((20, M)) > 0.4
    visible[0] = True  # fully visible: searches with the upper-body parts
    visible[1] = False  # nothing visible: searches with all parts
    visible[2] = False
    visible[2, 3] = True  # a single visible part
    return query, visible, gallery


# --------------------------------------------------------------------------------------
# brute-force references (plain numpy + Python sets, straight from the definitions)
# --------------------------------------------------------------------------------------
def part_cosines(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(Q, G, M) cosine similarity of every query/gallery part pair, float64."""
    q = query.astype(np.float64)
    g = gallery.astype(np.float64)
    qn = np.linalg.norm(q, axis=-1, keepdims=True)
    gn = np.linalg.norm(g, axis=-1, keepdims=True)
    q = np.divide(q, qn, out=np.zeros_like(q), where=qn > 0)
    g = np.divide(g, gn, out=np.zeros_like(g), where=gn > 0)
    return np.einsum("qmd,gmd->qgm", q, g)


def brute_parts(visible: np.ndarray, upper=(0, 1)) -> np.ndarray:
    parts = np.zeros(visible.shape, dtype=bool)
    for i, row in enumerate(visible):
        if row.all() and upper is not None:
            parts[i, list(upper)] = True
        elif not row.any():
            parts[i] = True
        else:
            parts[i] = row
    return parts


def brute_intersection(cos, parts, k, theta, exclude=None):
    """Eq. 3: per searching part, the k nearest (self excluded) with cos >= theta; intersect."""
    result = []
    for i in range(cos.shape[0]):
        candidates = [j for j in range(cos.shape[1]) if exclude is None or j != exclude[i]]
        sets = []
        for p in np.flatnonzero(parts[i]):
            ranked = sorted(candidates, key=lambda j: -cos[i, j, p])[:k]
            sets.append({j for j in ranked if cos[i, j, p] >= theta})
        common = set.intersection(*sets)
        score = {j: cos[i, j, parts[i]].mean() for j in common}
        result.append(sorted(common, key=lambda j: -score[j]))
    return result


def brute_visible_mean(cos, parts, k, theta, exclude=None):
    """Top-k by the mean cosine over the searching parts, then the threshold."""
    result = []
    for i in range(cos.shape[0]):
        score = {
            j: cos[i, j, parts[i]].mean()
            for j in range(cos.shape[1])
            if exclude is None or j != exclude[i]
        }
        ranked = sorted(score, key=lambda j: -score[j])[:k]
        result.append([j for j in ranked if score[j] >= theta])
    return result


def check_against(res: Neighbourhoods, expected, cos, parts, k):
    assert res.index.shape == (len(expected), k) and res.index.dtype == np.int64
    assert res.score.shape == (len(expected), k) and res.score.dtype == np.float32
    assert np.isfinite(res.score).all()
    for i, exp in enumerate(expected):
        row = res.index[i]
        n = len(exp)
        assert row[:n].tolist() == exp, f"query {i}"
        assert (row[n:] == -1).all() and (res.score[i, n:] == 0).all()
        ref = [cos[i, j, parts[i]].mean() for j in exp]
        np.testing.assert_allclose(res.score[i, :n], ref, atol=1e-5)
    assert res.counts.tolist() == [len(e) for e in expected]
    assert res.num_empty == sum(len(e) == 0 for e in expected)


BRUTE = {"intersection": brute_intersection, "visible-mean": brute_visible_mean}
PARAMS = [(1, 0.5), (5, 0.6), (10, 0.7), (20, 0.8), (60, -1.0), (80, 0.3)]


# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["intersection", "visible-mean"])
@pytest.mark.parametrize("k,theta", PARAMS)
def test_matches_brute_force(data, mode, k, theta):
    query, visible, gallery = data
    cos = part_cosines(query, gallery)
    parts = brute_parts(visible)
    res = search_neighbourhoods(query, visible, gallery, k=k, theta=theta, mode=mode)
    np.testing.assert_array_equal(res.search_parts, parts)
    check_against(res, BRUTE[mode](cos, parts, k, theta), cos, parts, k)


@pytest.mark.parametrize("mode", ["intersection", "visible-mean"])
def test_nothing_below_theta(data, mode):
    query, visible, gallery = data
    cos = part_cosines(query, gallery)
    theta = 0.75
    res = search_neighbourhoods(query, visible, gallery, k=15, theta=theta, mode=mode)
    assert res.counts.sum() > 0
    for i in range(len(query)):
        for j in res.index[i][res.index[i] >= 0]:
            sims = cos[i, j, res.search_parts[i]]
            assert sims.mean() >= theta - 1e-6
            if mode == "intersection":  # every searching part passes the threshold
                assert sims.min() >= theta - 1e-6


@pytest.mark.parametrize("mode", ["intersection", "visible-mean"])
def test_empty_neighbourhoods(data, mode):
    query, visible, gallery = data
    res = search_neighbourhoods(query, visible, gallery, k=10, theta=0.999, mode=mode)
    assert res.num_empty == len(query)
    assert (res.counts == 0).all() and (res.index == -1).all() and (res.score == 0).all()

    # some (not all) empty: a threshold between the best scores of different queries
    cos = part_cosines(query, gallery)
    parts = brute_parts(visible)
    best = np.array([cos[i][:, parts[i]].mean(axis=1).max() for i in range(len(query))])
    theta = float(np.median(best))
    res = search_neighbourhoods(query, visible, gallery, k=10, theta=theta, mode=mode)
    expected = BRUTE[mode](cos, parts, 10, theta)
    assert 0 < res.num_empty < len(query)
    check_against(res, expected, cos, parts, 10)
    empty = res.counts == 0
    assert (res.index[empty] == -1).all() and (res.score[empty] == 0).all()


@pytest.mark.parametrize("mode", ["intersection", "visible-mean"])
@pytest.mark.parametrize("k,theta", [(5, -1.0), (10, 0.7), (59, -1.0)])
def test_self_exclusion(data, mode, k, theta):
    _, _, gallery = data
    rng = np.random.default_rng(1)
    visible = rng.random((len(gallery), M)) > 0.3
    exclude = np.arange(len(gallery))
    exclude[::7] = -1  # those rows may find themselves
    res = search_neighbourhoods(
        gallery, visible, gallery, k=k, theta=theta, mode=mode, exclude=exclude
    )
    for i in range(len(gallery)):
        if exclude[i] >= 0:
            assert i not in res.index[i]
    if mode == "visible-mean" and theta == -1.0:
        assert (res.counts == k).all()  # still k entries although the query is dropped
    cos = part_cosines(gallery, gallery)
    parts = brute_parts(visible)
    check_against(res, BRUTE[mode](cos, parts, k, theta, exclude), cos, parts, k)


def test_search_parts_for():
    vis = np.array(
        [
            [1, 1, 1, 1, 1, 1],  # all visible -> upper body
            [0, 0, 0, 0, 0, 0],  # none visible -> all parts
            [0, 0, 1, 1, 0, 1],  # partly visible -> visible parts
        ],
        dtype=bool,
    )
    parts = search_parts_for(vis)
    np.testing.assert_array_equal(parts[0], [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(parts[1], [1] * 6)
    np.testing.assert_array_equal(parts[2], vis[2])
    np.testing.assert_array_equal(search_parts_for(vis, None)[0], [1] * 6)
    np.testing.assert_array_equal(search_parts_for(vis, (0, 4))[0], [1, 0, 0, 0, 1, 0])
    # probabilities are thresholded at 0.5 (SPEC section 7)
    prob = np.array([[0.9, 0.5, 0.49, 0.1, 0.7, 0.2]])
    np.testing.assert_array_equal(search_parts_for(prob), [[1, 1, 0, 0, 1, 0]])
    assert parts.dtype == np.bool_ and not vis[1].any()  # input untouched


@pytest.mark.parametrize("mode", ["intersection", "visible-mean"])
def test_fully_and_none_visible_rows(data, mode):
    query, visible, gallery = data
    res = search_neighbourhoods(query, visible, gallery, k=10, theta=0.5, mode=mode)
    np.testing.assert_array_equal(res.search_parts[0], [1, 1, 0, 0, 0, 0])
    assert res.search_parts[1].all()
    # same result as searching explicitly with those parts
    override = np.zeros((len(query), M), dtype=bool)
    override[:, :2] = True
    override[1] = True
    again = search_neighbourhoods(
        query, visible, gallery, k=10, theta=0.5, mode=mode, search_parts=override
    )
    np.testing.assert_array_equal(again.index[:2], res.index[:2])
    # upper_body_parts=None: fully visible rows search with every part
    allp = search_neighbourhoods(
        query, visible, gallery, k=10, theta=0.5, mode=mode, upper_body_parts=None
    )
    assert allp.search_parts[0].all()
    cos = part_cosines(query, gallery)
    parts = brute_parts(visible, upper=None)
    check_against(allp, BRUTE[mode](cos, parts, 10, 0.5), cos, parts, 10)


@pytest.mark.parametrize("mode", ["intersection", "visible-mean"])
def test_batching_and_float16(data, mode):
    query, visible, gallery = data
    ref = search_neighbourhoods(query, visible, gallery, k=8, theta=0.6, mode=mode)
    small = search_neighbourhoods(query, visible, gallery, k=8, theta=0.6, mode=mode, batch_size=3)
    np.testing.assert_array_equal(small.index, ref.index)
    np.testing.assert_array_equal(small.score, ref.score)
    q16, g16 = query.astype(np.float16), gallery.astype(np.float16)
    half = search_neighbourhoods(q16, visible, g16, k=8, theta=0.6, mode=mode)
    cos = part_cosines(q16.astype(np.float32), g16.astype(np.float32))
    parts = brute_parts(visible)
    check_against(half, BRUTE[mode](cos, parts, 8, 0.6), cos, parts, 8)


@pytest.mark.parametrize("mode", ["intersection", "visible-mean"])
def test_zero_vectors_give_no_nan(data, mode):
    query, visible, gallery = data
    query, gallery = query.copy(), gallery.copy()
    query[3] = 0  # all parts zero
    query[4, 0] = 0
    gallery[:5] = 0
    res = search_neighbourhoods(query, visible, gallery, k=10, theta=-1.0, mode=mode)
    assert np.isfinite(res.score).all()
    cos = part_cosines(query, gallery)
    parts = brute_parts(visible)
    assert np.allclose(cos[3], 0)
    # row 3 ties everywhere at 0: only check the count and the scores
    assert res.counts[3] == 10 and (res.score[3] == 0).all()
    keep = np.ones(len(query), dtype=bool)
    keep[3] = False
    expected = BRUTE[mode](cos, parts, 10, -1.0)
    for i in np.flatnonzero(keep):
        assert res.index[i][: len(expected[i])].tolist() == expected[i]


# --------------------------------------------------------------------------------------
# IVF
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big():
    rng = np.random.default_rng(2)
    centers = np.abs(rng.normal(size=(100, M, D)))
    gallery = clustered(rng, 2400, centers, noise=0.4)
    query = clustered(rng, 200, centers, noise=0.4)
    visible = rng.random((200, M)) > 0.3
    return query, visible, gallery


def same_sets(a: Neighbourhoods, b: Neighbourhoods) -> None:
    assert (a.counts == b.counts).all()
    for i in range(len(a.index)):
        assert set(a.index[i]) == set(b.index[i])
    np.testing.assert_allclose(np.sort(a.score, axis=1), np.sort(b.score, axis=1), atol=1e-5)


def recall(approx: Neighbourhoods, exact: Neighbourhoods) -> float:
    hits = sum(
        len(set(x[x >= 0]) & set(y[y >= 0])) for x, y in zip(approx.index, exact.index)
    )
    return hits / max(1, int(exact.counts.sum()))


@pytest.mark.parametrize("mode", ["intersection", "visible-mean"])
def test_ivf_exhaustive_equals_flat_and_recall(big, mode):
    query, visible, gallery = big
    kw = dict(k=10, theta=0.6, mode=mode)
    flat = search_neighbourhoods(query, visible, gallery, **kw)
    assert flat.counts.sum() > 100
    full = search_neighbourhoods(query, visible, gallery, index="ivf", nlist=32, nprobe=32, **kw)
    same_sets(full, flat)
    assert (np.diff(full.score, axis=1)[full.index[:, 1:] >= 0] <= 1e-6).all()
    low = search_neighbourhoods(query, visible, gallery, index="ivf", nlist=32, nprobe=8, **kw)
    r = recall(low, flat)
    print(f"{mode}: IVF recall at nlist=32, nprobe=8: {r:.4f}")
    assert r >= 0.95
    assert (low.index[low.index >= 0] < len(gallery)).all()
    # one list of 32 is a real approximation here (the data is not trivially separable)
    one = search_neighbourhoods(query, visible, gallery, index="ivf", nlist=32, nprobe=1, **kw)
    assert recall(one, flat) < 1.0


def test_ivf_small_gallery_falls_back_to_flat(data):
    query, visible, gallery = data  # 60 items: only one IVF list possible
    flat = search_neighbourhoods(query, visible, gallery[:30], k=5, theta=0.5)
    with pytest.warns(RuntimeWarning, match="too small"):
        ivf = search_neighbourhoods(query, visible, gallery[:30], k=5, theta=0.5, index="ivf")
    np.testing.assert_array_equal(ivf.index, flat.index)


def test_ivf_nlist_is_clamped(big):
    query, visible, gallery = big
    with pytest.warns(RuntimeWarning, match="using nlist=61"):
        res = search_neighbourhoods(
            query, visible, gallery, k=5, theta=0.7, index="ivf", nlist=1000, nprobe=61
        )
    flat = search_neighbourhoods(query, visible, gallery, k=5, theta=0.7)
    same_sets(res, flat)


# --------------------------------------------------------------------------------------
def test_filter_repacks():
    nb = Neighbourhoods(
        index=np.array([[4, 2, 7, -1], [1, 3, -1, -1], [-1, -1, -1, -1]]),
        score=np.array([[0.9, 0.8, 0.7, 0], [0.95, 0.6, 0, 0], [0, 0, 0, 0]], dtype=np.float32),
        search_parts=np.ones((3, M), dtype=bool),
    )
    keep = np.array([[False, True, True, True], [True, False, True, True], [True] * 4])
    out = nb.filter(keep)
    np.testing.assert_array_equal(out.index, [[2, 7, -1, -1], [1, -1, -1, -1], [-1] * 4])
    np.testing.assert_array_equal(
        out.score, np.array([[0.8, 0.7, 0, 0], [0.95, 0, 0, 0], [0] * 4], dtype=np.float32)
    )
    assert out.counts.tolist() == [2, 1, 0] and out.num_empty == 1
    assert out.index.dtype == np.int64 and out.score.dtype == np.float32
    assert nb.counts.tolist() == [3, 2, 0]  # original untouched
    with pytest.raises(ValueError, match="keep must have shape"):
        nb.filter(np.ones((3, 3), dtype=bool))


# --------------------------------------------------------------------------------------
def _bad_cases():
    rng = np.random.default_rng(3)
    q = rng.random((4, M, D)).astype(np.float32)
    g = rng.random((9, M, D)).astype(np.float32)
    v = np.ones((4, M), dtype=bool)
    nan = q.copy()
    nan[1, 2, 3] = np.nan
    no_part = np.ones((4, M), dtype=bool)
    no_part[2] = False
    return [
        ((q[0], v, g), {}, "query must be a \\(N, M, D\\)"),
        ((q, v, g[:, :5]), {}, "do not match gallery"),
        ((q, v, g[..., :8]), {}, "do not match gallery"),
        ((q.astype(np.float64), v, g), {}, "float32 or float16"),
        ((q, v[:3], g), {}, "query_visible must have shape"),
        ((q, v, g), {"k": 0}, "k must be an integer >= 1"),
        ((q, v, g), {"k": 2.5}, "k must be an integer >= 1"),
        ((q, v, g), {"theta": 1.5}, "theta must be a number in \\[-1, 1\\]"),
        ((q, v, g), {"theta": float("nan")}, "theta must be a number"),
        ((q, v, g), {"mode": "union"}, "unknown mode 'union'"),
        ((q, v, g), {"index": "hnsw"}, "unknown index 'hnsw'"),
        ((nan, v, g), {}, "query contains NaN"),
        ((q, v, g * np.inf), {}, "gallery contains NaN or infinite"),
        ((q, v, g), {"exclude": np.arange(3)}, "exclude must be an integer array"),
        ((q, v, g), {"exclude": np.array([0, 1, 2, 9])}, "exclude values must be"),
        ((q, v, g), {"search_parts": no_part}, "search_parts row 2 selects no part"),
        ((q, v, g), {"search_parts": v[:, :3]}, "search_parts must be a bool array"),
        ((q, v, g), {"upper_body_parts": (0, 6)}, "upper_body_parts .* out of range"),
        ((q, v, g), {"upper_body_parts": ()}, "upper_body_parts must name"),
        ((q, v * 2.0, g), {}, "query_visible must be bool or hold values in \\[0, 1\\]"),
        ((q, v, g), {"nprobe": 0}, "nprobe must be"),
        ((q, v, g), {"nlist": 0}, "nlist must be"),
        ((q, v, g), {"batch_size": 0}, "batch_size must be"),
    ]


@pytest.mark.parametrize("args,kwargs,message", _bad_cases())
def test_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        search_neighbourhoods(*args, **kwargs)


def test_empty_inputs():
    q = np.zeros((0, M, D), dtype=np.float32)
    g = np.ones((5, M, D), dtype=np.float32)
    res = search_neighbourhoods(q, np.zeros((0, M), dtype=bool), g, k=3)
    assert res.index.shape == (0, 3) and res.num_empty == 0


def test_a_shared_index_cache_scans_the_gallery_for_nan_once(monkeypatch):
    """Calls that share an ``index_cache`` share the gallery's O(G) finiteness scan, as they
    share its index; without a cache every call scans, and a NaN is still refused."""
    import orgnn.retrieval.search as search_module

    rng = np.random.default_rng(0)
    gallery = rng.random((300, 3, 8)).astype(np.float32)
    query = rng.random((5, 3, 8)).astype(np.float32)
    vis = np.ones((5, 3), bool)
    scans = []
    isfinite = np.isfinite
    monkeypatch.setattr(search_module.np, "isfinite",
                        lambda a: scans.append(a.shape[0]) or isfinite(a))
    cache: dict = {}
    for _ in range(3):
        search_module.search_neighbourhoods(query, vis, gallery, k=4, theta=-1.0,
                                            index_cache=cache)
    search_module.kth_part_similarity(query, gallery, 3, index_cache=cache)
    assert scans.count(300) == 1
    search_module.search_neighbourhoods(query, vis, gallery, k=4, theta=-1.0)
    assert scans.count(300) == 2
    bad = gallery.copy()
    bad[7, 1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        search_module.search_neighbourhoods(query, vis, bad, k=4, theta=-1.0,
                                            index_cache=cache)
