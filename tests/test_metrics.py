import numpy as np
import pytest
import torch

from orgnn.retrieval import metrics
from orgnn.retrieval.metrics import evaluate, re_ranking
from tests.reference_impls import evaluate_loop, re_ranking_loop

KEYS = ("mAP", "mINP", "rank1", "rank5", "rank10", "num_valid_queries", "num_skipped_queries")


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------


def hand_example():
    # gallery:  index  0  1  2  3  4
    g_pids = np.array([1, 1, 2, 3, 2])
    g_camids = np.array([0, 1, 1, 1, 0])
    q_pids = np.array([1, 2, 4])
    q_camids = np.array([0, 2, 1])
    distmat = np.array([
        [0.1, 0.5, 0.2, 0.4, 0.3],
        [0.3, 0.6, 0.1, 0.2, 0.5],
        [0.1, 0.2, 0.3, 0.4, 0.5],
    ])
    return distmat, q_pids, g_pids, q_camids, g_camids


def test_evaluate_by_hand():
    # Query 0 (pid 1, cam 0): ranked g0 g2 g4 g3 g1. g0 (pid 1, cam 0) is junk and removed,
    #   leaving g2 g4 g3 g1 with the only true match g1 at rank 4:
    #   AP = 1/4, INP = 1/4 (1 match, last at rank 4), first match at rank 4.
    # Query 1 (pid 2, cam 2): ranked g2 g3 g0 g4 g1, nothing removed (no gallery item in
    #   cam 2); true matches g2, g4 at ranks 1 and 4:
    #   AP = (1/1 + 2/4) / 2 = 0.75, INP = 2/4 = 0.5, first match at rank 1.
    # Query 2 (pid 4): no pid 4 in the gallery -> skipped.
    # mAP = (0.25 + 0.75) / 2 = 0.5, mINP = (0.25 + 0.5) / 2 = 0.375,
    # rank-1 = 1/2 (query 1 only), rank-4 and beyond = 2/2.
    out = evaluate(*hand_example(), max_rank=5)
    assert out["mAP"] == pytest.approx(0.5)
    assert out["mINP"] == pytest.approx(0.375)
    assert out["rank1"] == pytest.approx(0.5)
    assert out["rank5"] == pytest.approx(1.0)
    assert out["rank10"] == pytest.approx(1.0)
    assert out["num_valid_queries"] == 2
    assert out["num_skipped_queries"] == 1
    np.testing.assert_allclose(out["cmc"], [0.5, 0.5, 0.5, 1.0, 1.0])
    assert isinstance(out["mAP"], float) and isinstance(out["num_valid_queries"], int)


def test_evaluate_cmc_longer_than_gallery():
    # 5 gallery items, max_rank 8: the curve keeps its length, the last value repeats
    out = evaluate(*hand_example(), max_rank=8)
    np.testing.assert_allclose(out["cmc"], [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
    out = evaluate(*hand_example(), max_rank=2)
    np.testing.assert_allclose(out["cmc"], [0.5, 0.5])
    assert out["rank5"] == pytest.approx(1.0)  # does not depend on max_rank


def test_evaluate_ties_follow_gallery_order():
    distmat, q_pids, g_pids, q_camids, g_camids = hand_example()
    distmat = distmat.copy()
    distmat[0, 1] = 0.4  # true match g1 now ties with the false match g3 (0.4)
    # stable sort: g1 (index 1) before g3 (index 3) -> kept list g2 g4 g1 g3, match at rank 3
    out = evaluate(distmat[:1], q_pids[:1], g_pids, q_camids[:1], g_camids)
    assert out["mAP"] == pytest.approx(1 / 3)
    assert out["mINP"] == pytest.approx(1 / 3)


def test_evaluate_torch_inputs():
    args = hand_example()
    out_np = evaluate(*args, max_rank=5)
    out_pt = evaluate(*(torch.from_numpy(a) for a in args), max_rank=5)
    for key in KEYS:
        assert out_pt[key] == out_np[key]
    np.testing.assert_array_equal(out_pt["cmc"], out_np["cmc"])


@pytest.mark.parametrize("seed", range(6))
def test_evaluate_matches_loop(seed):
    rng = np.random.default_rng(seed)
    num_q, num_g = 37, 150
    # few identities and cameras: many junk items; query ids 0..11 vs gallery ids 0..9 leaves
    # some queries without a true match; integer distances give plenty of ties
    q_pids = rng.integers(0, 12, num_q)
    g_pids = rng.integers(0, 10, num_g)
    q_camids = rng.integers(0, 3, num_q)
    g_camids = rng.integers(0, 3, num_g)
    if seed % 2:
        distmat = rng.integers(0, 8, (num_q, num_g)).astype(np.float32)
    else:
        distmat = rng.random((num_q, num_g))
    for max_rank in (1, 10, 200):
        expected = evaluate_loop(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
        out = evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, chunk_size=8)
        for key in KEYS:
            assert out[key] == pytest.approx(expected[key], abs=1e-12), key
        assert out["cmc"].shape == (max_rank,)
        np.testing.assert_allclose(out["cmc"], expected["cmc"], atol=1e-12)
    assert out["num_skipped_queries"] > 0


def test_evaluate_errors():
    distmat, q_pids, g_pids, q_camids, g_camids = hand_example()
    with pytest.raises(ValueError, match="q_pids"):
        evaluate(distmat, q_pids[:2], g_pids, q_camids, g_camids)
    with pytest.raises(ValueError, match="g_camids"):
        evaluate(distmat, q_pids, g_pids, q_camids, g_camids[:4])
    with pytest.raises(ValueError, match="2-D"):
        evaluate(distmat[0], q_pids, g_pids, q_camids, g_camids)
    bad = distmat.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate(bad, q_pids, g_pids, q_camids, g_camids)
    with pytest.raises(ValueError, match="no valid query"):
        evaluate(distmat[2:], q_pids[2:], g_pids, q_camids[2:], g_camids)
    with pytest.raises(ValueError, match="no valid query"):  # only junk matches
        evaluate(distmat[:1, :1], q_pids[:1], g_pids[:1], q_camids[:1], g_camids[:1])
    with pytest.raises(ValueError, match="max_rank"):
        evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=0)


# --------------------------------------------------------------------------------------------
# re_ranking
# --------------------------------------------------------------------------------------------


def clustered_distances(num_q, num_g, seed, dim=8, ids=6, dtype=np.float64):
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.normal(size=(ids, dim))
    x = centres[rng.integers(0, ids, num_q + num_g)] + rng.normal(size=(num_q + num_g, dim))
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)).astype(dtype)
    return d[:num_q, num_q:], d[:num_q, :num_q], d[num_q:, num_q:]


@pytest.mark.parametrize("k1,k2", [(20, 6), (10, 3), (7, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_re_ranking_matches_loop(k1, k2, dtype):
    q_g, q_q, g_g = clustered_distances(15, 40, seed=k1, dtype=dtype)
    expected = re_ranking_loop(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=0.3)
    out = re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=0.3)
    assert out.shape == (15, 40) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_re_ranking_matches_loop_small_blocks(monkeypatch):
    # blocks that straddle nothing, end mid-way, and Jaccard groups of a single query
    monkeypatch.setattr(metrics, "_ROW_BLOCK", 7)
    monkeypatch.setattr(metrics, "_SET_BLOCK", 13)
    monkeypatch.setattr(metrics, "_MAX_PAIRS", 50)
    q_g, q_q, g_g = clustered_distances(23, 90, seed=3)
    expected = re_ranking_loop(q_g, q_q, g_g, k1=12, k2=4, lambda_value=0.5)
    out = re_ranking(q_g, q_q, g_g, k1=12, k2=4, lambda_value=0.5)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_re_ranking_asymmetric_inputs():
    # the original transposes the normalised matrix; non-symmetric inputs expose any mix-up
    rng = np.random.default_rng(0)
    q_g, q_q, g_g = rng.random((12, 30)), rng.random((12, 12)), rng.random((30, 30))
    np.fill_diagonal(q_q, 0.0)
    np.fill_diagonal(g_g, 0.0)
    expected = re_ranking_loop(q_g, q_q, g_g, k1=9, k2=3)
    np.testing.assert_allclose(re_ranking(q_g, q_q, g_g, k1=9, k2=3), expected, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_re_ranking_ties_are_stable(seed):
    # integer distances: every list is full of ties; ours ranks them by index, i.e. like the
    # original run with a stable argsort
    rng = np.random.default_rng(seed)
    d = rng.integers(1, 6, (50, 50)).astype(np.float64)
    d = np.minimum(d, d.T)
    np.fill_diagonal(d, 0.0)
    q_g, q_q, g_g = d[:14, 14:], d[:14, :14], d[14:, 14:]
    expected = re_ranking_loop(q_g, q_q, g_g, k1=10, k2=4, argsort_kind="stable")
    np.testing.assert_allclose(re_ranking(q_g, q_q, g_g, k1=10, k2=4), expected, atol=1e-5)


def test_re_ranking_torch_inputs():
    q_g, q_q, g_g = clustered_distances(10, 25, seed=1, dtype=np.float32)
    out_np = re_ranking(q_g, q_q, g_g, k1=8, k2=3)
    out_pt = re_ranking(torch.from_numpy(q_g), torch.from_numpy(q_q), torch.from_numpy(g_g),
                        k1=8, k2=3)
    np.testing.assert_array_equal(out_pt, out_np)


def test_re_ranking_output_range():
    q_g, q_q, g_g = clustered_distances(20, 60, seed=5)
    out = re_ranking(q_g, q_q, g_g)
    assert np.isfinite(out).all()
    assert (out >= 0).all() and (out <= 1 + 1e-6).all()  # jaccard and O both lie in [0, 1]


def test_re_ranking_errors():
    q_g, q_q, g_g = clustered_distances(5, 9, seed=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        re_ranking(q_g, q_q[:4, :4], g_g)
    with pytest.raises(ValueError, match="shape mismatch"):
        re_ranking(q_g.T, q_q, g_g)
    bad = g_g.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="g_g_dist contains NaN"):
        re_ranking(q_g, q_q, bad)
    with pytest.raises(ValueError, match="k1"):
        re_ranking(q_g, q_q, g_g, k1=0)
