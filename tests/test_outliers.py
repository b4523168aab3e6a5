"""Learned outlier removal (orgnn.reconstruction.outliers), the calibrated threshold and the
validation split, checked against plain-loop references and hand-built cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from orgnn import ORGNN
from orgnn.datasets import synthetic_preset
from orgnn.io.features import PartFeatures
from orgnn.nn.neighbour_scorer import CONTEXT_FEATURES, EDGE_FEATURES, NeighbourScorer
from orgnn.reconstruction.calibration import calibrate_theta
from orgnn.reconstruction.outliers import (
    ScorerConfig,
    _lookup_row_values,
    context_features,
    edge_features,
    fit_scorer,
    kth_neighbour_similarity,
    score_split,
    weighted_reconstruction,
)
from orgnn.reconstruction.validation import validation_split
from orgnn.retrieval.search import Neighbourhoods, search_neighbourhoods


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def _cos(a, b):
    return float(_unit(a) @ _unit(b))


@pytest.fixture(scope="module")
def world():
    return synthetic_preset("demo", seed=3)


def _small(seed=0, q=5, g=12, m=3, d=4, k=4):
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(q, m, d)).astype(np.float32)
    gallery = rng.normal(size=(g, m, d)).astype(np.float32)
    tvis = rng.random((q, m)) > 0.3
    tvis[:, 0] = True
    gvis = rng.random((g, m)) > 0.2
    nbrs = search_neighbourhoods(target, tvis, gallery, k=k, theta=-1.0)
    index = nbrs.index.copy()
    index[0, -1] = -1                                    # one padded entry
    return target, tvis, gallery, gvis, Neighbourhoods(index, nbrs.score, nbrs.search_parts)


def test_edge_features_match_a_loop_reference():
    target, tvis, gallery, gvis, nbrs = _small()
    kth = kth_neighbour_similarity(gallery, 3)
    out = edge_features(target, gallery, gvis, nbrs, kth, tvis)
    assert out.shape == nbrs.index.shape + (len(EDGE_FEATURES),)
    col = {name: i for i, name in enumerate(EDGE_FEATURES)}
    q, k = nbrs.index.shape
    m = target.shape[1]
    for t in range(q):
        parts = np.flatnonzero(nbrs.search_parts[t])
        valid = [j for j in nbrs.index[t] if j >= 0]
        scores = [np.mean([_cos(target[t, p], gallery[j, p]) for p in parts]) for j in valid]
        for pos in range(k):
            j = nbrs.index[t, pos]
            if j < 0:
                assert (out[t, pos] == 0).all()
                continue
            s = scores[pos]
            assert out[t, pos, col["score"]] == pytest.approx(s, abs=1e-5)
            assert out[t, pos, col["gap_best"]] == pytest.approx(s - scores[0], abs=1e-5)
            assert out[t, pos, col["gap_mean"]] == pytest.approx(s - np.mean(scores), abs=1e-5)
            mutual = [p for p in parts if gvis[j, p]]
            expect = (np.mean([_cos(target[t, p], gallery[j, p]) for p in mutual])
                      if mutual else s)
            assert out[t, pos, col["score_mutual"]] == pytest.approx(expect, abs=1e-5)
            assert out[t, pos, col["worst_part"]] == pytest.approx(
                min(_cos(target[t, p], gallery[j, p]) for p in parts), abs=1e-5)
            hidden = [p for p in range(m) if not tvis[t, p]]
            expect = (np.sum([_cos(target[t, p], gallery[j, p]) for p in hidden])
                      / max(len(hidden), 1))
            assert out[t, pos, col["hidden_parts"]] == pytest.approx(expect, abs=1e-5)
            others = [l for l in valid if l != j]
            pair = [np.mean([_cos(gallery[j, p], gallery[l, p]) for p in parts])
                    for l in others]
            assert out[t, pos, col["density"]] == pytest.approx(
                np.mean(pair) if pair else 0.0, abs=1e-5)
            assert out[t, pos, col["closer_than_target"]] == pytest.approx(
                sum(v > s for v in pair) / len(valid), abs=1e-5)
            kth_j = np.mean([kth[j, p] for p in parts])
            assert out[t, pos, col["score_minus_kth"]] == pytest.approx(s - kth_j, abs=1e-5)
            assert out[t, pos, col["rank"]] == pytest.approx(pos / k)


def test_kth_neighbour_similarity_by_brute_force(tmp_path):
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(9, 2, 5)).astype(np.float32)
    out = kth_neighbour_similarity(gallery, 3)
    for i in range(9):
        for p in range(2):
            sims = sorted((_cos(gallery[i, p], gallery[j, p]) for j in range(9) if j != i),
                          reverse=True)
            assert out[i, p] == pytest.approx(sims[2], abs=1e-5)
    # searched a few items at a time, from a float16 memory map: the same values
    path = tmp_path / "g.npy"
    np.save(path, gallery.astype(np.float16))
    mapped = np.load(path, mmap_mode="r")
    np.testing.assert_array_equal(kth_neighbour_similarity(mapped, 3, batch_size=4),
                                  kth_neighbour_similarity(np.load(path), 3))


def test_lookup_row_values_by_hand():
    index = np.array([[4, 2, -1], [7, 4, 1]])
    values = np.array([[0.5, 0.25, 9.0], [0.1, 0.2, 0.3]], dtype=np.float32)
    query = np.array([[[2, 4], [5, -1]], [[1, 2], [4, 7]]])
    out = _lookup_row_values(index, values, query)
    np.testing.assert_allclose(out, [[[0.25, 0.5], [0.0, 0.0]], [[0.3, 0.0], [0.2, 0.1]]])


def test_context_features_match_a_loop_reference():
    target, tvis, gallery, gvis, nbrs = _small(seed=2)
    g_nbrs = search_neighbourhoods(gallery, gvis, gallery, k=4, theta=-1.0,
                                   exclude=np.arange(len(gallery)))
    rng = np.random.default_rng(3)
    prob = rng.random(nbrs.index.shape).astype(np.float32)
    g_prob = rng.random(g_nbrs.index.shape).astype(np.float32)
    out = context_features(target, tvis, gallery, nbrs, prob, g_nbrs, g_prob, 2.0, 0.5)
    assert out.shape == nbrs.index.shape + (len(CONTEXT_FEATURES),)
    rec = weighted_reconstruction(target, tvis, gallery, nbrs.index, prob ** 2.0, 0.5)
    for t in range(nbrs.index.shape[0]):
        valid = nbrs.index[t] >= 0
        p = np.where(valid, prob[t], 0)
        for pos, j in enumerate(nbrs.index[t]):
            if j < 0:
                continue
            # overlap: sum of p_tl over the target's neighbours l that j lists too
            mine = {int(l): p[i] for i, l in enumerate(nbrs.index[t]) if l >= 0}
            theirs = [(int(l), g_prob[j, i]) for i, l in enumerate(g_nbrs.index[j]) if l >= 0]
            overlap = sum(mine.get(l, 0.0) for l, _ in theirs) / p.sum()
            weighted = sum(mine.get(l, 0.0) * w for l, w in theirs) / p.sum()
            assert out[t, pos, 0] == pytest.approx(p[pos], abs=1e-6)
            assert out[t, pos, 1] == pytest.approx(p[pos] / p.max(), abs=1e-5)
            consensus = np.mean([_cos(rec[t, m], gallery[j, m]) for m in range(3)])
            assert out[t, pos, 2] == pytest.approx(consensus, abs=1e-5)
            assert out[t, pos, 4] == pytest.approx(overlap, abs=1e-5)
            assert out[t, pos, 5] == pytest.approx(weighted, abs=1e-5)


def test_weighted_reconstruction_by_hand():
    target = np.array([[[2.0, 0.0], [0.0, 3.0]]], dtype=np.float32)      # 1 image, 2 parts
    gallery = np.array([[[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 5.0]]], np.float32)
    index = np.array([[0, 1]])
    weight = np.array([[1.0, 3.0]], dtype=np.float32)
    out = weighted_reconstruction(target, np.array([[True, False]]), gallery, index, weight,
                                  self_weight=2.0)
    # part 0: (2 * (1, 0) + 1 * (0, 1) + 3 * (1, 0)) / 6; part 1 (hidden): ((1,0) + 3 (0,1)) / 4
    np.testing.assert_allclose(out[0, 0], [5 / 6, 1 / 6], atol=1e-6)
    np.testing.assert_allclose(out[0, 1], [1 / 4, 3 / 4], atol=1e-6)


def test_scorer_learns_to_tell_right_from_wrong(world):
    train, query, gallery = world["train"], world["query"], world["gallery"]
    nbrs = search_neighbourhoods(train.features, train.visible, train.features, k=10,
                                 theta=-1.0, exclude=np.arange(train.num_images))
    scorer = fit_scorer(train, nbrs, ScorerConfig(stages=2, steps=60))
    g_nbrs = search_neighbourhoods(gallery.features, gallery.visible, gallery.features, k=10,
                                   theta=-1.0, exclude=np.arange(gallery.num_images))
    q_nbrs = search_neighbourhoods(query.features, query.visible, gallery.features, k=10,
                                   theta=-1.0)
    g_prob, q_prob = score_split(scorer, gallery, g_nbrs, query, q_nbrs)
    right = gallery.pids[np.clip(q_nbrs.index, 0, None)] == query.pids[:, None]
    valid = q_nbrs.valid

    def auc(score):
        pos, neg = score[valid & right], score[valid & ~right]
        return float((pos[:, None] > neg[None, :]).mean())

    # On unseen identities the learned probability separates better than raw similarity.
    assert auc(q_prob) > auc(q_nbrs.score) + 0.02
    assert ((q_prob >= 0) & (q_prob <= 1)).all() and (q_prob[~valid] == 0).all()
    assert g_prob.shape == g_nbrs.index.shape


def test_fit_scorer_refuses_what_it_cannot_learn(world):
    train = world["train"]
    one_id = train.subset(np.flatnonzero(train.pids == train.pids[0]))
    nbrs = search_neighbourhoods(one_id.features, one_id.visible, one_id.features, k=2,
                                 theta=-1.0, exclude=np.arange(one_id.num_images))
    with pytest.raises(ValueError, match="two training identities"):
        fit_scorer(one_id, nbrs)
    with pytest.raises(ValueError, match="stages"):
        ScorerConfig(stages=0)


def test_orgnn_node_weight_is_a_prior_on_each_sender():
    """One layer, identity init, no Eq. 4: the target row is the weighted mean of its
    neighbours; with a zero weight a neighbour has no say at all."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5)                                  # (B, M, N, F)
    weight = torch.tensor([[1.0, 0.5, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    model = ORGNN(5, 5, num_parts=3, num_layers=1, outlier_aware=True, target_init="self",
                  act="none")
    model.layers[0].outlier_aware = False                        # c = 1, the prior alone
    out = model(x, node_weight=weight)
    for b in range(2):
        w = weight[b, 1:]
        expect = (w[None, :, None] * x[b, :, 1:]).sum(1) / w.sum()
        torch.testing.assert_close(out[b], expect, atol=1e-5, rtol=1e-5)
    changed = x.clone()
    changed[0, :, 2] += 100.0                                    # the zero-weight neighbour
    torch.testing.assert_close(model(changed, node_weight=weight)[0], out[0])
    with pytest.raises(ValueError, match="node_weight must have shape"):
        model(x, node_weight=weight[:, :2])


def test_calibrated_theta_is_the_quantile_of_right_neighbour_scores(world):
    train = world["train"]
    theta = calibrate_theta(train, k=10, quantile=0.1)
    nbrs = search_neighbourhoods(train.features, train.visible, train.features, k=10,
                                 theta=-1.0, exclude=np.arange(train.num_images))
    right = nbrs.valid & (train.pids[np.clip(nbrs.index, 0, None)] == train.pids[:, None])
    scores = nbrs.score[right]
    assert np.mean(scores < theta) <= 0.1 + 1e-9
    assert np.mean(scores < theta + 0.002) >= 0.1 - 0.01
    # Scaling the feature space changes nothing (cosines); the quantile moves it.
    assert calibrate_theta(train, 10, quantile=0.5) > theta
    with pytest.raises(ValueError, match="quantile"):
        calibrate_theta(train, 10, quantile=1.5)


def test_validation_split_holds_out_identities(world):
    train = world["train"]
    splits = validation_split(train, fraction=0.3, seed=1, queries_per_id=2)
    fit, query, gallery = splits["train"], splits["query"], splits["gallery"]
    assert not set(fit.pids) & (set(query.pids) | set(gallery.pids))
    assert set(query.pids) <= set(gallery.pids) | set(query.pids)
    held = np.unique(np.r_[query.pids, gallery.pids])
    assert len(held) == round(0.3 * len(np.unique(train.pids)))
    assert fit.num_images + query.num_images + gallery.num_images == train.num_images
    for pid in np.unique(query.pids):
        cams = query.camids[query.pids == pid]
        assert len(cams) <= 2 and len(set(cams)) == 1            # one camera per identity
    # Seeded: the same call gives the same split, another seed another one.
    again = validation_split(train, fraction=0.3, seed=1)
    assert np.array_equal(again["query"].pids, query.pids)
    assert not np.array_equal(validation_split(train, 0.3, seed=2)["query"].pids, query.pids)
    with pytest.raises(ValueError, match="fraction"):
        validation_split(train, fraction=1.0)


def test_validation_queries_prefer_occluded_images():
    rng = np.random.default_rng(0)
    n = 40
    pids = np.repeat(np.arange(10), 4)
    camids = np.tile([0, 0, 1, 1], 10)
    vis = np.ones((n, 3), dtype=np.float32)
    vis[1::4, 2] = 0.1                                           # one occluded image per id, cam 0
    vis[3::4, 2] = 0.1                                           # and one in cam 1
    pf = PartFeatures(rng.normal(size=(n, 3, 4)).astype(np.float32), vis, pids, camids)
    splits = validation_split(pf, fraction=0.5, seed=0, queries_per_id=1)
    assert (splits["query"].visibility[:, 2] < 0.5).all()


def test_scorer_state_dict_round_trip():
    scorer = NeighbourScorer(stages=2, hidden=8, gamma=3.0, kth=7)
    copy = NeighbourScorer(**scorer.config())
    copy.load_state_dict(scorer.state_dict())
    x = np.random.default_rng(0).normal(size=(4, len(EDGE_FEATURES) + len(CONTEXT_FEATURES)))
    np.testing.assert_array_equal(copy.probability(1, x), scorer.probability(1, x))
    assert repr(scorer) == "NeighbourScorer(stages=2, hidden=8, gamma=3)"


# --------------------------------------------------------------------------------------
# Scale: the k-th similarity from the search index, chunks from bytes, shards
# --------------------------------------------------------------------------------------
def _clustered(n=600, m=6, d=16, ids=60, seed=0):
    rng = np.random.default_rng(seed)
    proto = rng.normal(size=(ids, m, d))
    x = proto[np.arange(n) % ids] + 0.6 * rng.normal(size=(n, m, d))
    return np.maximum(x, 0).astype(np.float32)


def test_kth_from_the_index_against_exact():
    """The pooled k-th similarity is the exact one wherever the pool holds the part's
    true top k (a pool of the whole gallery: equal), never above it, and within a bound
    of it on a clustered gallery with the default pool (8 k candidates by the all-part
    mean), from the flat and the IVF-PQ index alike."""
    from orgnn.retrieval.search import kth_part_similarity

    gallery = _clustered()
    exact = kth_neighbour_similarity(gallery, 10, method="exact")
    whole = kth_part_similarity(gallery, gallery, 10, exclude=np.arange(600), pool=60,
                                index="flat")
    np.testing.assert_allclose(whole, exact, atol=1e-5)
    for index in ("flat", "ivfpq"):
        approx = kth_neighbour_similarity(gallery, 10, method="index", index=index)
        err = exact - approx
        assert err.min() > -1e-5                       # a lower bound
        # (cuhk03-parts' real features: mean 0.022 flat, 0.035 IVF-PQ; docs/scale.md)
        assert err.mean() < 0.06 and np.quantile(err, 0.99) < 0.2, (index, err.mean())
    # "auto" follows the index: exact where the search is (flat), pooled for ivfpq
    np.testing.assert_array_equal(kth_neighbour_similarity(gallery, 10, index="flat"), exact)
    np.testing.assert_array_equal(
        kth_neighbour_similarity(gallery, 10, index="ivfpq"),
        kth_neighbour_similarity(gallery, 10, method="index", index="ivfpq"))
    with pytest.raises(ValueError, match="unknown k-th similarity method"):
        kth_neighbour_similarity(gallery, 10, method="fast")


def _scored_world(k=12):
    gallery_x = _clustered(n=300, m=3, d=8, ids=30, seed=1)
    rng = np.random.default_rng(2)
    g_vis = (rng.random((300, 3)) > 0.2).astype(np.float32)
    pids = np.arange(300) % 30
    gallery = PartFeatures(gallery_x, g_vis, pids, np.arange(300) % 2)
    query = PartFeatures(_clustered(n=90, m=3, d=8, ids=30, seed=3),
                         (rng.random((90, 3)) > 0.3).astype(np.float32), np.arange(90) % 30,
                         np.full(90, 2))
    g_nbrs = search_neighbourhoods(gallery.features, gallery.visible, gallery.features, k=k,
                                   theta=-1.0, exclude=np.arange(300))
    q_nbrs = search_neighbourhoods(query.features, query.visible, gallery.features, k=k,
                                   theta=-1.0)
    torch.manual_seed(0)
    scorer = NeighbourScorer(stages=3, hidden=8, gamma=2.0, kth=5).eval()
    return scorer, gallery, g_nbrs, query, q_nbrs


def test_score_split_chunked_and_sharded_equal_whole(monkeypatch):
    """Chunks of any size give the one-chunk probabilities (to float rounding), and shards
    of the chunk grid, as torchrun ranks run them, give exactly the one-process bits."""
    from orgnn import distributed

    scorer, gallery, g_nbrs, query, q_nbrs = _scored_world()
    whole = score_split(scorer, gallery, g_nbrs, query, q_nbrs, chunk_size=10_000)
    single = score_split(scorer, gallery, g_nbrs, query, q_nbrs, chunk_size=7)
    for a, b in zip(whole, single):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for world_size in (2, 3):
        def sharded(fn, n, block=1, to="all", ranks=world_size):
            return np.concatenate([fn(distributed.shard(n, block, r, ranks))
                                   for r in range(ranks)])
        monkeypatch.setattr(distributed, "map_rows", sharded)
        got = score_split(scorer, gallery, g_nbrs, query, q_nbrs, chunk_size=7)
        monkeypatch.undo()
        for a, b in zip(single, got):
            np.testing.assert_array_equal(a, b)


def test_scorer_features_stay_within_the_memory_budget():
    """K = G - 1: one chunk of the old fixed size would hold (Q, K, K) pair matrices
    (~110 MiB here, beside 3 copies of the (Q, K, M, D) neighbours); chunks from bytes keep
    numpy's peak allocation near the budget."""
    import tracemalloc

    from orgnn.io.storage import working_memory

    g = 300
    gallery = PartFeatures(_clustered(n=g, m=6, d=16, ids=30), np.ones((g, 6), np.float32),
                           np.arange(g) % 30, np.zeros(g, np.int64))
    nbrs = search_neighbourhoods(gallery.features, gallery.visible, gallery.features,
                                 k=g - 1, theta=-1.0, exclude=np.arange(g))
    scorer = NeighbourScorer(stages=2, hidden=8, gamma=2.0, kth=5).eval()
    budget = 24 << 20
    with working_memory(budget):
        tracemalloc.start()
        try:
            probs, _ = score_split(scorer, gallery, nbrs)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    fixed = 3 * nbrs.index.size * 4                         # (G, K) outputs and inputs
    assert peak < 3 * budget + fixed, peak / 2 ** 20
    assert probs.shape == nbrs.index.shape and np.isfinite(probs).all()


def test_long_lists_are_sampled_and_short_ones_exact(monkeypatch):
    """Above PAIR_SAMPLE entries the all-pairs features read evenly spaced neighbours and
    scale: the density is untouched, the others close to the full computation; at or below
    it nothing changes."""
    from orgnn import outliers

    scorer, gallery, g_nbrs, query, q_nbrs = _scored_world(k=40)
    kth = kth_neighbour_similarity(gallery.features, 5)
    full = edge_features(query.features, gallery.features, gallery.visible, q_nbrs, kth,
                         query.visible)
    prob = np.random.default_rng(0).random(q_nbrs.index.shape).astype(np.float32)
    g_prob = np.random.default_rng(1).random(g_nbrs.index.shape).astype(np.float32)
    ctx = context_features(query.features, query.visible, gallery.features, q_nbrs, prob,
                           g_nbrs, g_prob, 2.0, 1.0)
    monkeypatch.setattr(outliers, "PAIR_SAMPLE", 40)
    np.testing.assert_array_equal(edge_features(query.features, gallery.features,
                                                gallery.visible, q_nbrs, kth, query.visible),
                                  full)
    monkeypatch.setattr(outliers, "PAIR_SAMPLE", 10)
    sampled = edge_features(query.features, gallery.features, gallery.visible, q_nbrs, kth,
                            query.visible)
    ctx_s = context_features(query.features, query.visible, gallery.features, q_nbrs, prob,
                             g_nbrs, g_prob, 2.0, 1.0)
    col = {name: i for i, name in enumerate(EDGE_FEATURES)}
    other = [i for name, i in col.items() if name != "closer_than_target"]
    np.testing.assert_allclose(sampled[..., other], full[..., other], atol=1e-6)
    err = (sampled[..., col["closer_than_target"]] - full[..., col["closer_than_target"]])
    # 10 of 40: a sampling error of about sqrt(p (1 - p) / 10) x 0.7, and no bias
    assert np.abs(err).mean() < 0.15 and abs(err.mean()) < 0.03
    np.testing.assert_allclose(ctx_s[..., :4], ctx[..., :4], atol=1e-6)
    assert np.abs(ctx_s[..., 4:] - ctx[..., 4:]).mean() < 0.1


def test_padding_columns_are_trimmed_without_changing_the_scores(monkeypatch):
    """A large K under a threshold is mostly padding: scoring each chunk up to its last
    valid column gives the probabilities of scoring every column (to float rounding), the
    rank feature still counted against the search's K."""
    import orgnn.reconstruction.outliers as outliers
    from orgnn.retrieval.search import Neighbourhoods

    scorer, gallery, g_nbrs, query, q_nbrs = _scored_world()

    def padded(n: Neighbourhoods, extra: int) -> Neighbourhoods:
        rows = n.index.shape[0]
        return Neighbourhoods(np.concatenate([n.index, np.full((rows, extra), -1)], 1),
                              np.concatenate([n.score, np.zeros((rows, extra), np.float32)], 1),
                              n.search_parts)

    g_pad, q_pad = padded(g_nbrs, 200), padded(q_nbrs, 150)
    trimmed = score_split(scorer, gallery, g_pad, query, q_pad, chunk_size=9)
    monkeypatch.setattr(outliers, "used_width", lambda index: index.shape[1])
    every_column = score_split(scorer, gallery, g_pad, query, q_pad, chunk_size=9)
    monkeypatch.undo()
    for a, b in zip(trimmed, every_column):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert (a[:, -150:] == 0).all()
    # the rank feature divides by the search's K, not by the trimmed width
    feats = edge_features(query.features[:4], gallery.features, gallery.visible,
                          Neighbourhoods(q_nbrs.index[:4, :3], q_nbrs.score[:4, :3],
                                         q_nbrs.search_parts[:4]),
                          np.zeros(gallery.visible.shape, np.float32), query.visible[:4],
                          list_width=30)
    rank = feats[..., EDGE_FEATURES.index("rank")]
    np.testing.assert_allclose(rank[0], np.array([0, 1, 2]) / 30)
