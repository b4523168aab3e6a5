"""The synthetic occluded Re-ID world: sizes, determinism, occlusion geometry and difficulty."""
from __future__ import annotations

import time

import numpy as np
import pytest

from orgnn.datasets import PRESETS, SIDES, band_visibility, part_boxes, synthetic, synthetic_preset
from orgnn.io.features import SPLITS, PartFeatures, load_split_dir, save_split_dir


@pytest.fixture(scope="module")
def tiny() -> dict[str, PartFeatures]:
    return synthetic_preset("tiny")


@pytest.fixture(scope="module")
def demo() -> dict[str, PartFeatures]:
    return synthetic_preset("demo")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def part_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Na, Nb) mean over parts of the cosine similarity."""
    return np.einsum("imd,jmd->ij", unit(a), unit(b)) / a.shape[1]


def rank1(query: PartFeatures, gallery: PartFeatures, clean: bool) -> float:
    """Rank-1 (%) of concatenated-all-parts retrieval, distance 1 - mean part cosine, under
    the Market-1501 protocol (same identity and camera gallery items are dropped)."""
    q = query.clean_features if clean else query.features
    g = gallery.clean_features if clean else gallery.features
    dist = 1.0 - part_cosine(q, g)
    same_id = query.pids[:, None] == gallery.pids[None, :]
    same_cam = query.camids[:, None] == gallery.camids[None, :]
    dist[same_id & same_cam] = np.inf
    best = dist.argmin(axis=1)
    return 100.0 * float(np.mean(gallery.pids[best] == query.pids))


# --------------------------------------------------------------------------- sizes and types
def test_tiny_shapes_and_dtypes(tiny):
    assert set(tiny) == set(SPLITS)
    for name, pf in tiny.items():
        pf.validate(name)
        n = pf.num_images
        assert pf.features.shape == (n, 6, 256) and pf.features.dtype == np.float32
        assert pf.clean_features.shape == pf.features.shape
        assert pf.clean_features.dtype == np.float32
        assert pf.visibility.shape == (n, 6) and pf.visibility.dtype == np.float32
        assert pf.pids.dtype == np.int64 and pf.camids.dtype == np.int64
        assert pf.pids.shape == pf.camids.shape == (n,)
        assert pf.paths is None
        assert (pf.pids >= 0).all() and (pf.camids >= 0).all() and (pf.camids < 6).all()
    assert tiny["train"].num_images == 72 and tiny["gallery"].num_images == 72
    assert tiny["query"].num_images == 24


@pytest.mark.parametrize("name, sizes, ids", [
    ("tiny", (72, 24, 72), (12, 12, 12)),
    ("demo", (480, 150, 480), (30, 30, 30)),
    ("occluded_duke", (15_618, 2_210, 17_661), (702, 519, 1_110)),
    ("occluded_reid", (12_936, 1_000, 1_000), (751, 200, 200)),
    ("market1501", (12_936, 3_368, 15_913), (751, 750, 750)),
])
def test_preset_sizes(name, sizes, ids):
    world = synthetic_preset(name, dim=4)  # sizes do not depend on dim: keep it quick
    got = tuple(world[s].num_images for s in SPLITS)
    assert got == sizes
    assert tuple(len(np.unique(world[s].pids)) for s in SPLITS) == ids
    assert world["train"].dim == 4


def test_presets_are_all_listed():
    assert set(PRESETS) == {"tiny", "demo", "occluded_duke", "occluded_reid", "market1501"}
    with pytest.raises(ValueError, match="unknown synthetic preset 'nope'.*demo"):
        synthetic_preset("nope")


def test_preset_overrides():
    world = synthetic_preset("tiny", dim=16, num_parts=4, seed=3)
    assert world["query"].features.shape[1:] == (4, 16)


@pytest.mark.slow
def test_occluded_duke_full_size():
    start = time.perf_counter()
    world = synthetic_preset("occluded_duke")
    elapsed = time.perf_counter() - start
    assert world["gallery"].features.shape == (17_661, 6, 256)
    assert world["train"].clean_features.shape == (15_618, 6, 256)
    assert elapsed < 30  # a few seconds on one core; generous for busy CI machines
    for name, pf in world.items():
        pf.validate(name)


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_world():
    a, b = synthetic_preset("tiny", seed=7), synthetic_preset("tiny", seed=7)
    for name in SPLITS:
        for key in ("features", "clean_features", "visibility", "pids", "camids"):
            np.testing.assert_array_equal(getattr(a[name], key), getattr(b[name], key))


def test_different_seed_different_world():
    a, b = synthetic_preset("tiny", seed=0), synthetic_preset("tiny", seed=1)
    for name in SPLITS:
        assert not np.allclose(a[name].clean_features, b[name].clean_features)
    assert not np.array_equal(a["query"].visibility, b["query"].visibility)


# --------------------------------------------------------------------------- geometry
def test_part_boxes():
    boxes = part_boxes(6)
    np.testing.assert_allclose(boxes[:4, :2], [[0, .25], [.25, .5], [.5, .75], [.75, 1]])
    np.testing.assert_allclose(boxes[4:], [[0, 1, 0, .5], [0, 1, .5, 1]])
    np.testing.assert_allclose(part_boxes(3)[:, :2], [[0, 1 / 3], [1 / 3, 2 / 3], [2 / 3, 1]])


@pytest.mark.parametrize("side, fraction, expected", [
    ("bottom", 0.5, [1, 1, 0, 0, 0.5, 0.5]),
    ("bottom", 0.375, [1, 1, 0.5, 0, 0.625, 0.625]),
    ("top", 0.25, [0, 1, 1, 1, 0.75, 0.75]),
    ("top", 0.4, [0, 0.4, 1, 1, 0.6, 0.6]),
    ("left", 0.3, [0.7, 0.7, 0.7, 0.7, 0.4, 1]),
    ("right", 0.5, [0.5, 0.5, 0.5, 0.5, 1, 0]),
    ("right", 0.6, [0.4, 0.4, 0.4, 0.4, 0.8, 0]),
])
def test_band_visibility_by_hand(side, fraction, expected):
    vis = band_visibility(SIDES.index(side), fraction)
    assert vis.shape == (1, 6) and vis.dtype == np.float32
    np.testing.assert_allclose(vis[0], expected, atol=1e-6)


def test_band_visibility_vectorised_and_stripes_only():
    vis = band_visibility(np.array([0, 2]), np.array([0.5, 0.3]))
    np.testing.assert_allclose(vis, [[1, 1, 0, 0, .5, .5], [.7, .7, .7, .7, .4, 1]], atol=1e-6)
    np.testing.assert_allclose(band_visibility(0, 0.5, num_parts=2), [[1, 0]], atol=1e-6)


def test_generated_visibility_follows_band_geometry(demo):
    for pf in demo.values():
        vis = pf.visibility
        occluded = (vis < 1).any(axis=1)
        v = vis[occluded]
        stripes = v[:, :4]
        horizontal = np.isclose(v[:, 4], v[:, 5])  # top / bottom band: halves alike
        vertical = np.isclose(stripes, stripes[:, :1]).all(axis=1)  # left / right band
        assert (horizontal | vertical).all()
        covered = 1 - stripes.mean(axis=1)  # share of the crop under the band
        assert covered.min() >= 0.25 - 1e-5 and covered.max() <= 0.5 + 1e-5
        # a band from any side: the clean rows are exactly 1
        np.testing.assert_array_equal(vis[~occluded], 1.0)


def test_all_sides_occur(demo):
    v = demo["train"].visibility
    v = v[(v < 1).any(axis=1)]
    bottom = (v[:, 3] < v[:, 0]).mean()
    top = (v[:, 0] < v[:, 3]).mean()
    left = (v[:, 4] < v[:, 5]).mean()
    right = (v[:, 5] < v[:, 4]).mean()
    assert bottom + top + left + right == pytest.approx(1.0)
    assert 0.3 < bottom < 0.5 and min(top, left, right) > 0.1


# --------------------------------------------------------------------------- protocol
def test_occlusion_fractions(demo):
    query, gallery, train = demo["query"], demo["gallery"], demo["train"]
    assert ((query.visibility < 1).sum(axis=1) >= 1).all()  # every query is occluded
    assert (~query.visible).any(axis=1).all()  # and has at least one part not visible
    assert (gallery.visibility < 1).any(axis=1).mean() == pytest.approx(0.1, abs=0.01)
    assert (train.visibility < 1).any(axis=1).mean() == pytest.approx(0.5, abs=0.01)


def test_unoccluded_images_keep_clean_features(demo):
    for pf in demo.values():
        clean = (pf.visibility == 1).all(axis=1)
        np.testing.assert_array_equal(pf.features[clean], pf.clean_features[clean])
        assert not np.allclose(pf.features[~clean], pf.clean_features[~clean])


def test_identities_and_cameras(demo):
    train, query, gallery = demo["train"], demo["query"], demo["gallery"]
    assert not set(train.pids) & set(gallery.pids)  # disjoint train and test identities
    assert set(query.pids) <= set(gallery.pids)
    np.testing.assert_array_equal(np.unique(train.pids), np.arange(30))
    # every query has a true match from another camera
    valid = (query.pids[:, None] == gallery.pids) & (query.camids[:, None] != gallery.camids)
    assert valid.any(axis=1).all()


def test_distractor_identities():
    world = synthetic(num_train_ids=4, num_test_ids=10, num_query_ids=6, images_per_id=4)
    assert len(np.unique(world["query"].pids)) == 6
    assert len(np.unique(world["gallery"].pids)) == 10


def test_occluded_reid_protocol():
    world = synthetic_preset("occluded_reid", dim=4)
    assert (world["query"].camids == 0).all() and (world["gallery"].camids == 1).all()
    assert (world["query"].visibility < 1).any(axis=1).all()
    assert (world["gallery"].visibility == 1).all()


def test_market1501_has_no_occlusion():
    world = synthetic_preset("market1501", dim=4)
    for pf in world.values():
        assert (pf.visibility == 1).all()
        np.testing.assert_array_equal(pf.features, pf.clean_features)


@pytest.mark.parametrize("kwargs", [
    dict(query_occluded_fraction=1.5),
    dict(num_query_ids=13),
    dict(num_cameras=1),
    dict(query_camera=1, gallery_camera=1),
    dict(query_camera=9),
    dict(band_range=(0.6, 0.4)),
    dict(side_probs=(1.0, 0.0)),
    dict(num_gallery=5),
])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        synthetic(**kwargs)


def test_round_trip_through_files(tmp_path, tiny):
    save_split_dir(tmp_path, tiny)
    back = load_split_dir(tmp_path)
    for name in SPLITS:
        np.testing.assert_array_equal(back[name].features, tiny[name].features)
        np.testing.assert_array_equal(back[name].clean_features, tiny[name].clean_features)


# --------------------------------------------------------------------------- realism
def test_features_are_non_negative(demo):
    for pf in demo.values():
        assert pf.features.min() >= 0 and pf.clean_features.min() >= 0
        assert np.isfinite(pf.features).all()


def test_same_identity_more_similar(demo):
    gallery = demo["gallery"]
    x = unit(gallery.clean_features)
    sim = np.einsum("imd,jmd->ijm", x, x)
    same = gallery.pids[:, None] == gallery.pids[None, :]
    np.fill_diagonal(same, False)
    diff = gallery.pids[:, None] != gallery.pids[None, :]
    same_mean, diff_mean = sim[same].mean(), sim[diff].mean()
    assert same_mean > diff_mean + 0.1
    assert 0.5 < diff_mean < 0.8 and 0.75 < same_mean < 0.95  # like real Re-ID features
    assert (sim[same].mean(axis=0) > sim[diff].mean(axis=0)).all()  # on every part


def test_occlusion_hurts_retrieval(demo):
    clean = rank1(demo["query"], demo["gallery"], clean=True)
    occluded = rank1(demo["query"], demo["gallery"], clean=False)
    assert clean > 75
    assert occluded < clean - 20


def test_visible_part_neighbours_are_mostly_right(demo):
    """Neighbours found with the visible parts: mostly, not all, of the query's identity."""
    query, gallery = demo["query"], demo["gallery"]
    vis = query.visible.astype(np.float32)
    sim = np.einsum("imd,jmd->ijm", unit(query.features), unit(gallery.features))
    sim = (sim * vis[:, None, :]).sum(axis=2) / vis.sum(axis=1, keepdims=True)
    top = np.argsort(-sim, axis=1)[:, :10]
    purity = (gallery.pids[top] == query.pids[:, None]).mean()
    assert 0.55 < purity < 0.95
