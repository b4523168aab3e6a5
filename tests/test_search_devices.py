"""The torch search (any torch device; CPU here), IVF-PQ with exact re-ranking, memory-mapped
galleries, and batch-independence of the results: all against the faiss exact search."""
from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from orgnn.io.features import (
    PartFeatureError,
    PartFeatures,
    load_part_features,
    load_part_features_mapped,
    save_part_features,
)
from orgnn.io.storage import iter_rows, map_npz_member
from orgnn.retrieval.search import Neighbourhoods, search_neighbourhoods

M, D = 6, 16


def clustered(rng, n, centers, noise=0.5):
    labels = rng.integers(0, len(centers), n)
    x = centers[labels] + noise * rng.normal(size=(n, *centers.shape[1:]))
    return np.maximum(x, 0).astype(np.float32)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(5)
    centers = np.abs(rng.normal(size=(40, M, D)))
    gallery = clustered(rng, 1500, centers, noise=0.45)
    query = clustered(rng, 120, centers, noise=0.45)
    visible = rng.random((120, M)) > 0.35
    visible[0] = True
    visible[1] = False
    return query, visible, gallery


def assert_same(a: Neighbourhoods, b: Neighbourhoods) -> None:
    np.testing.assert_array_equal(a.index, b.index)
    np.testing.assert_allclose(a.score, b.score, atol=1e-6)
    np.testing.assert_array_equal(a.search_parts, b.search_parts)


def recall(approx: Neighbourhoods, exact: Neighbourhoods) -> float:
    hits = sum(len(set(x[x >= 0]) & set(y[y >= 0])) for x, y in zip(approx.index, exact.index))
    return hits / max(1, int(exact.counts.sum()))


@pytest.mark.parametrize("mode", ["visible-mean", "intersection"])
@pytest.mark.parametrize("k,theta", [(1, 0.5), (10, 0.7), (25, -1.0)])
def test_torch_equals_faiss(world, mode, k, theta):
    query, visible, gallery = world
    kw = dict(k=k, theta=theta, mode=mode)
    ref = search_neighbourhoods(query, visible, gallery, **kw)
    assert ref.counts.sum() > 0
    # small gallery chunks and batches: the running top-k merge is exercised
    got = search_neighbourhoods(query, visible, gallery, device="cpu", gallery_chunk=300,
                                batch_size=50, **kw)
    assert_same(got, ref)
    got = search_neighbourhoods(query, visible, gallery, device=torch.device("cpu"), **kw)
    assert_same(got, ref)


@pytest.mark.parametrize("mode", ["visible-mean", "intersection"])
def test_torch_self_search_excludes(world, mode):
    _, _, gallery = world
    rng = np.random.default_rng(1)
    g = gallery[:400]
    visible = rng.random((len(g), M)) > 0.3
    exclude = np.arange(len(g))
    exclude[::5] = -1
    kw = dict(k=8, theta=0.6, mode=mode, exclude=exclude)
    ref = search_neighbourhoods(g, visible, g, **kw)
    got = search_neighbourhoods(g, visible, g, device="cpu", gallery_chunk=97, **kw)
    assert_same(got, ref)
    rows = np.flatnonzero(exclude >= 0)
    assert not (got.index[rows] == rows[:, None]).any()


@pytest.mark.parametrize("device", [None, "cpu"])
def test_results_do_not_depend_on_the_batch(world, device):
    """An image's neighbourhood (index and score bits) is the same in any batch, at any
    batch size and thread count: the final scores are recomputed row by row."""
    query, visible, gallery = world
    ref = search_neighbourhoods(query, visible, gallery, k=10, theta=0.6, device=device)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for bs in (1, 7, 19, 64):
            got = search_neighbourhoods(query, visible, gallery, k=10, theta=0.6,
                                        device=device, batch_size=bs)
            np.testing.assert_array_equal(got.index, ref.index)
            np.testing.assert_array_equal(got.score, ref.score)
    finally:
        torch.set_num_threads(threads)
    part = search_neighbourhoods(query[37:53], visible[37:53], gallery, k=10, theta=0.6,
                                 device=device)
    np.testing.assert_array_equal(part.score, ref.score[37:53])


@pytest.mark.parametrize("mode", ["visible-mean", "intersection"])
def test_ivfpq_refined_recall(world, mode):
    query, visible, gallery = world
    kw = dict(k=10, theta=0.6, mode=mode)
    exact = search_neighbourhoods(query, visible, gallery, **kw)
    pq = search_neighbourhoods(query, visible, gallery, index="ivfpq", nlist=16, nprobe=16,
                               refine=8, **kw)
    assert recall(pq, exact) >= 0.95
    # the kept neighbours carry exact scores, in exact order
    ok = pq.valid
    assert (np.diff(np.where(ok, pq.score, -2.0), axis=1)[ok[:, 1:]] <= 0).all()
    assert (pq.score[ok] >= 0.6).all()
    for i in range(len(query)):
        n = pq.counts[i]
        exact_row = exact.index[i][exact.valid[i]]
        np.testing.assert_allclose(pq.score[i, :n][np.isin(pq.index[i, :n], exact_row)],
                                   exact.score[i][exact.valid[i]][np.isin(exact_row,
                                                                          pq.index[i, :n])],
                                   atol=1e-6)


@pytest.fixture
def one_faiss_thread():
    """OPQ training runs many tiny parallel loops; on a loaded machine two threads wait on
    each other far longer than the work takes."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def test_ivfpq_with_opq(world, one_faiss_thread):
    query, visible, gallery = world
    g = gallery[:400]
    exact = search_neighbourhoods(query, visible, g, k=5, theta=0.6)
    got = search_neighbourhoods(query, visible, g, k=5, theta=0.6, index="ivfpq", nlist=4,
                                nprobe=4, refine=8, pq_m=8, opq=True)
    assert recall(got, exact) >= 0.9


def test_ivfpq_refuses_bad_pq_m(world):
    query, visible, gallery = world
    with pytest.raises(ValueError, match="pq_m=7 must divide"):
        search_neighbourhoods(query, visible, gallery, index="ivfpq", nlist=8, pq_m=7)


def test_memory_mapped_float16_gallery(world, tmp_path):
    query, visible, gallery = world
    g16 = gallery.astype(np.float16)
    np.savez(tmp_path / "gallery.npz", features=g16, pids=np.arange(len(g16)))
    mapped = map_npz_member(tmp_path / "gallery.npz", "features")
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float16
    ref = search_neighbourhoods(query, visible, g16, k=10, theta=0.6)
    for device in (None, "cpu"):
        assert_same(search_neighbourhoods(query, visible, mapped, k=10, theta=0.6,
                                          device=device, gallery_chunk=256), ref)
    chunks = list(iter_rows(mapped, 400))
    assert [s for s, _ in chunks] == [0, 400, 800, 1200] and chunks[0][1].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), g16)
    np.savez_compressed(tmp_path / "packed.npz", features=g16)
    with pytest.raises(ValueError, match="compressed"):
        map_npz_member(tmp_path / "packed.npz", "features")


def test_device_errors(world):
    query, visible, gallery = world
    with pytest.raises(ValueError, match="device must be"):
        search_neighbourhoods(query, visible, gallery, device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            search_neighbourhoods(query, visible, gallery, device="cuda")
    for name in ("refine", "pq_m", "gallery_chunk"):
        with pytest.raises(ValueError, match=f"{name} must be None or an integer"):
            search_neighbourhoods(query, visible, gallery, **{name: 0})


def test_load_part_features_mapped(tmp_path):
    rng = np.random.default_rng(0)
    pf = PartFeatures(rng.random((50, M, D)).astype(np.float16),
                      rng.random((50, M)).astype(np.float32), np.arange(50) % 7,
                      np.arange(50) % 3, np.array([f"img{i}.jpg" for i in range(50)]))
    save_part_features(tmp_path / "g.npz", pf)
    mapped = load_part_features_mapped(tmp_path / "g.npz")
    plain = load_part_features(tmp_path / "g.npz")
    assert isinstance(mapped.features, np.memmap)
    for key in ("features", "visibility", "pids", "camids", "paths"):
        np.testing.assert_array_equal(getattr(mapped, key), getattr(plain, key))
    bad = pf.features.copy()
    bad[31, 2, 5] = np.nan
    np.savez(tmp_path / "bad.npz", **{**pf.as_dict(), "features": bad})
    with pytest.raises(PartFeatureError, match=r"non-finite values .* \(31, 2, 5\)"):
        load_part_features_mapped(tmp_path / "bad.npz")
    np.savez(tmp_path / "short.npz", **{**pf.as_dict(), "pids": np.arange(49)})
    with pytest.raises(PartFeatureError, match="N mismatch"):
        load_part_features_mapped(tmp_path / "short.npz")


def test_load_split_dir_maps_large_uncompressed_files(tmp_path, monkeypatch):
    import orgnn.io.features as F

    rng = np.random.default_rng(1)
    pf = PartFeatures(rng.random((40, M, D)).astype(np.float16),
                      rng.random((40, M)).astype(np.float32), np.arange(40) % 5,
                      np.arange(40) % 2)
    F.save_split_dir(tmp_path, {"query": pf, "gallery": pf})
    np.savez_compressed(tmp_path / "train.npz", **pf.as_dict())
    size = (tmp_path / "query.npz").stat().st_size
    monkeypatch.setattr(F, "MAP_FILE_BYTES", size + 1)      # below the threshold: read
    assert not any(isinstance(s.features, np.memmap)
                   for s in F.load_split_dir(tmp_path, mapped=None).values())
    monkeypatch.setattr(F, "MAP_FILE_BYTES", size)
    got = F.load_split_dir(tmp_path, mapped=None)
    assert isinstance(got["query"].features, np.memmap)
    assert isinstance(got["gallery"].features, np.memmap)
    assert not isinstance(got["train"].features, np.memmap)  # compressed: read instead
    np.testing.assert_array_equal(got["train"].features, got["query"].features)
    with pytest.raises(PartFeatureError, match="compressed"):
        F.load_split_dir(tmp_path, splits=("train",), mapped=True)
