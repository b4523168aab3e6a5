"""Feature re-ranking (orgnn.retrieval.rerank) against the dense one and the loop reference."""
from __future__ import annotations

import json

import numpy as np
import pytest

from orgnn.reconstruction.pipeline import (
    AblationConfig,
    oan_parts,
    part_distance,
    rerank_distances,
    run_ablation,
)
from orgnn.retrieval import metrics, rerank
from orgnn.retrieval.rerank import dense_fits, dense_re_ranking_bytes, re_ranking_features
from tests.reference_impls import re_ranking_loop


def _world(seed: int, nq: int = 40, ng: int = 160, m: int = 3, d: int = 8):
    """Clustered continuous features: no two distances of a sample tie (ties would let the
    dense and feature paths order a list boundary differently, both correctly)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(25, m, d))
    q = centres[rng.integers(0, 25, nq)] + 0.7 * rng.normal(size=(nq, m, d))
    g = centres[rng.integers(0, 25, ng)] + 0.7 * rng.normal(size=(ng, m, d))
    q[0, 1] = 0  # a zero part: cosine 0 with everything, as in part_distance
    q_parts = oan_parts(rng.random((nq, m)) > 0.35)
    g_parts = oan_parts(rng.random((ng, m)) > 0.35)
    return q.astype(np.float32), g.astype(np.float16), q_parts, g_parts


def _dense(q, g, q_parts=None, g_parts=None, **kw):
    return metrics.re_ranking(part_distance(q, g, q_parts), part_distance(q, q, q_parts),
                              part_distance(g, g, g_parts), **kw)


@pytest.mark.parametrize("k1, k2", [(20, 6), (7, 3), (5, 1), (12, 13)])
@pytest.mark.parametrize("weighted", [False, True], ids=["all-parts", "oan-parts"])
def test_equals_dense_re_ranking(k1, k2, weighted):
    q, g, qp, gp = _world(k1 + k2)
    if not weighted:
        qp = gp = None
    expected = _dense(q, g, qp, gp, k1=k1, k2=k2, lambda_value=0.4)
    out = re_ranking_features(q, g, qp, gp, k1=k1, k2=k2, lambda_value=0.4)
    assert out.dtype == np.float32 and out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_equals_the_loop_reference():
    """Independent of metrics.re_ranking: the original algorithm's loops on the joint
    matrix (stable argsort, the tie rule of both orgnn paths)."""
    q, g, qp, gp = _world(3, nq=25, ng=90)
    expected = re_ranking_loop(part_distance(q, g, qp), part_distance(q, q, qp),
                               part_distance(g, g, gp), k1=9, k2=4, argsort_kind="stable")
    np.testing.assert_allclose(re_ranking_features(q, g, qp, gp, k1=9, k2=4), expected,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("weighted", [False, True], ids=["all-parts", "oan-parts"])
def test_ivf_with_every_list_probed_equals_dense(weighted):
    q, g, qp, gp = _world(5, nq=60, ng=400)
    if not weighted:
        qp = gp = None
    expected = _dense(q, g, qp, gp)
    out = re_ranking_features(q, g, qp, gp, index="ivf", nlist=8, nprobe=8)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_small_blocks_in_place_output_and_given_distances(monkeypatch):
    q, g, qp, gp = _world(7)
    expected = _dense(q, g, qp, gp, k1=10, k2=3)
    monkeypatch.setattr(rerank, "PAIR_CHUNK", 37)
    monkeypatch.setattr(metrics, "_MAX_PAIRS", 500)  # many Jaccard groups of a few queries
    dist = part_distance(q, g, qp)
    out = re_ranking_features(q, g, qp, gp, k1=10, k2=3, q_g_dist=dist, out=dist,
                              block_rows=7)
    assert out is dist
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_dense_size_threshold():
    # 4 (Q^2 + G^2 + Q G + 256 N) bytes
    assert dense_re_ranking_bytes(2, 3) == 4 * (4 + 9 + 6 + 256 * 5)
    assert dense_fits(3368, 15913, max_bytes=rerank.DENSE_RERANK_MAX_BYTES)  # Market-1501
    assert dense_re_ranking_bytes(11659, 82161) > 30e9  # MSMT17: the 27 GB G x G and more
    assert not dense_fits(11659, 82161)
    assert not dense_fits(10, 10, max_bytes=100)


def test_large_sets_take_the_feature_path(monkeypatch):
    """Above the threshold rerank_distances never builds the dense matrices and returns the
    feature result written into the given distances; below it, the dense one."""
    q, g, qp, gp = _world(11)
    expected = _dense(q, g, qp, gp)
    calls = []
    dense = metrics.re_ranking
    monkeypatch.setattr(metrics, "re_ranking", lambda *a, **k: calls.append(1) or dense(*a, **k))
    dist = part_distance(q, g, qp)
    out = rerank_distances(q, g, dist, qp, gp, max_dense_bytes=1000)
    assert calls == [] and out is dist
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    dist = part_distance(q, g, qp)
    out = rerank_distances(q, g, dist, qp, gp, max_dense_bytes=1 << 30)
    assert calls == [1] and out is not dist
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)


def test_global_features_take_the_feature_path_too():
    """(N, D) global features: cosine distance, one "part" on the feature path."""
    from orgnn.reconstruction.pipeline import part_distance

    def cosine_distance(a, b):     # a global feature is one part
        return part_distance(a[:, None], b[:, None])

    q, g, _, _ = _world(13)
    qf, gf = q.reshape(len(q), -1), g.reshape(len(g), -1).astype(np.float32)
    dist = cosine_distance(qf, gf)
    expected = metrics.re_ranking(dist, cosine_distance(qf, qf), cosine_distance(gf, gf))
    dense = rerank_distances(qf, gf, dist.copy())
    np.testing.assert_array_equal(dense, expected)  # below the threshold: the dense call
    out = rerank_distances(qf, gf, dist, max_dense_bytes=0)
    assert out is dist
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_rr_rows_and_cli_agree_across_paths(monkeypatch, tmp_path, capsys):
    from orgnn.cli import main
    from orgnn.datasets import synthetic_preset
    from orgnn.io.features import save_split_dir

    splits = synthetic_preset("tiny", seed=0)
    rows = ("baseline", "baseline_rr", "oan", "oan_rr", "vis_global", "vis_global_rr")
    dense = run_ablation(splits, AblationConfig(), rows=rows, progress=False).rows
    save_split_dir(tmp_path / "d", splits)
    commands = {"oan": ["--oan"], "global": ["--distance", "visible-global", "--aqe"]}

    def evaluate(name: str, how: str) -> dict:
        out = tmp_path / f"{name}-{how}.json"
        assert main(["evaluate", "--data", str(tmp_path / "d"), "--rerank",
                     *commands[name], "--json", str(out)]) == 0
        return json.loads(out.read_text())

    cli = {name: evaluate(name, "dense") for name in commands}
    monkeypatch.setattr(rerank, "DENSE_RERANK_MAX_BYTES", 0)
    sparse = run_ablation(splits, AblationConfig(), rows=rows, progress=False).rows
    capsys.readouterr()
    for name in rows:
        for key, value in dense[name].items():
            assert sparse[name][key] == pytest.approx(value, abs=1e-6), (name, key)
    assert dense["baseline_rr"] != dense["baseline"]
    for name in commands:
        assert evaluate(name, "sparse") == cli[name]


def test_bad_input_is_refused():
    q, g, qp, gp = _world(0, nq=6, ng=20)
    with pytest.raises(ValueError, match="same M and D"):
        re_ranking_features(q, g[:, :2])
    with pytest.raises(ValueError, match="both query_parts and gallery_parts"):
        re_ranking_features(q, g, qp)
    with pytest.raises(ValueError, match=r"gallery_parts must have shape \(20, 3\)"):
        re_ranking_features(q, g, qp, gp[:5])
    with pytest.raises(ValueError, match="k1 and k2"):
        re_ranking_features(q, g, k1=0)
    with pytest.raises(ValueError, match="index must be one of"):
        re_ranking_features(q, g, index="hnsw")
    with pytest.raises(ValueError, match=r"q_g_dist must have shape \(6, 20\)"):
        re_ranking_features(q, g, q_g_dist=np.zeros((6, 19), np.float32))
    with pytest.raises(ValueError, match="out must be float32"):
        re_ranking_features(q, g, out=np.zeros((6, 20)))
    bad = q.copy()
    bad[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        re_ranking_features(bad, g)


def test_device_gather_equals_numpy_gather():
    """The pair distances' torch gather (used on GPUs) against the numpy one (CPU)."""
    import torch

    rng = np.random.default_rng(0)
    a, b = torch.randn(30, 12), torch.randn(50, 12)
    ia, ib = rng.integers(0, 30, 200), rng.integers(0, 50, 200)
    expected = np.einsum("pd,pd->p", a.numpy()[ia], b.numpy()[ib])
    np.testing.assert_allclose(rerank._dot_rows_torch(a, ia, b, ib), expected, atol=1e-5)
    np.testing.assert_allclose(rerank._dot_rows(a, ia, b, ib), expected, atol=1e-5)
