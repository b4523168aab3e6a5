"""Part-feature files (SPEC §7): round trips, refusals with clear messages, atomic writes."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import orgnn.io.features as features_module
from orgnn.io.features import (
    SPLITS,
    VISIBLE_THRESHOLD,
    PartFeatureError,
    PartFeatures,
    load_part_features,
    load_split_dir,
    save_part_features,
    save_split_dir,
)


def make_pf(n: int = 5, m: int = 6, d: int = 8, dtype=np.float32, paths: bool = False,
            clean: bool = False, seed: int = 0) -> PartFeatures:
    rng = np.random.default_rng(seed)
    return PartFeatures(
        features=rng.random((n, m, d)).astype(dtype),
        visibility=rng.random((n, m)).astype(np.float32),
        pids=rng.integers(0, 3, n).astype(np.int64),
        camids=rng.integers(0, 2, n).astype(np.int64),
        paths=np.array([f"img_{i:03d}.jpg" for i in range(n)]) if paths else None,
        clean_features=rng.random((n, m, d)).astype(dtype) if clean else None,
    )


def raw_arrays(pf: PartFeatures) -> dict[str, np.ndarray]:
    return {k: v for k, v in vars(pf).items() if v is not None}


def write_raw(path: Path, **arrays) -> Path:
    """Write an archive without any validation (how a broken file comes to exist)."""
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def assert_same(a: PartFeatures, b: PartFeatures) -> None:
    for key in ("features", "visibility", "pids", "camids", "paths", "clean_features"):
        x, y = getattr(a, key), getattr(b, key)
        if x is None or y is None:
            assert x is None and y is None, key
        else:
            assert x.dtype == y.dtype, key
            np.testing.assert_array_equal(x, y, err_msg=key)


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("paths", [False, True])
@pytest.mark.parametrize("clean", [False, True])
def test_round_trip(tmp_path, dtype, paths, clean):
    pf = make_pf(dtype=dtype, paths=paths, clean=clean)
    save_part_features(tmp_path / "query.npz", pf)
    back = load_part_features(tmp_path / "query.npz")
    assert_same(pf, back)
    assert back.features.dtype == dtype
    assert back.pids.dtype == np.int64 and back.camids.dtype == np.int64
    assert back.visibility.dtype == np.float32
    if paths:
        assert back.paths.dtype.kind == "U"


def test_path_with_or_without_suffix(tmp_path):
    pf = make_pf()
    save_part_features(tmp_path / "gallery", pf)
    assert (tmp_path / "gallery.npz").is_file()
    assert sorted(os.listdir(tmp_path)) == ["gallery.npz"]
    assert_same(load_part_features(tmp_path / "gallery"), pf)
    assert_same(load_part_features(str(tmp_path / "gallery.npz")), pf)


def test_properties_and_subset():
    pf = make_pf(n=7, m=6, d=4, paths=True, clean=True)
    assert (pf.num_images, pf.num_parts, pf.dim) == (7, 6, 4)
    np.testing.assert_array_equal(pf.visible, pf.visibility >= VISIBLE_THRESHOLD)
    assert pf.visible.dtype == bool
    sub = pf.subset([4, 1])
    assert sub.num_images == 2
    np.testing.assert_array_equal(sub.features, pf.features[[4, 1]])
    np.testing.assert_array_equal(sub.paths, pf.paths[[4, 1]])
    np.testing.assert_array_equal(sub.clean_features, pf.clean_features[[4, 1]])
    mask = pf.pids == pf.pids[0]
    assert pf.subset(mask).num_images == mask.sum()
    assert pf.subset(3).num_images == 1
    assert pf.subset(slice(0, 3)).num_images == 3
    assert make_pf().subset([0]).paths is None


def test_int32_and_integer_float_labels_are_converted(tmp_path):
    arrays = raw_arrays(make_pf())
    arrays["pids"] = arrays["pids"].astype(np.int32)
    arrays["camids"] = arrays["camids"].astype(np.float64)  # integer-valued
    back = load_part_features(write_raw(tmp_path / "train.npz", **arrays))
    assert back.pids.dtype == np.int64 and back.camids.dtype == np.int64
    np.testing.assert_array_equal(back.camids, arrays["camids"].astype(np.int64))


def test_validate_in_memory():
    make_pf().validate()
    bad = make_pf()
    bad.features = bad.features.astype(np.float64)
    with pytest.raises(PartFeatureError, match=r"<memory>.*'features'.*float64"):
        bad.validate()
    with pytest.raises(PartFeatureError, match="mine.npz"):
        bad.validate("mine.npz")


# --------------------------------------------------------------------------- refusals
def _nan_features(a):
    a["features"] = a["features"].copy()
    a["features"][2, 3, 1] = np.nan
    a["features"][4, 0, 0] = np.inf


def _inf_clean(a):
    a["clean_features"] = a["clean_features"].copy()
    a["clean_features"][1, 1, 1] = -np.inf


def _vis_range(a):
    a["visibility"] = a["visibility"].copy()
    a["visibility"][3, 2] = 1.5


BAD_CASES = {
    # name: (mutation, key named in the message, words that must appear)
    "missing_features": (lambda a: a.pop("features"), "features", ["missing"]),
    "missing_visibility": (lambda a: a.pop("visibility"), "visibility", ["missing"]),
    "missing_pids": (lambda a: a.pop("pids"), "pids", ["missing"]),
    "missing_camids": (lambda a: a.pop("camids"), "camids", ["missing"]),
    "features_rank": (lambda a: a.update(features=a["features"][:, 0]), "features", ["rank"]),
    "visibility_rank": (lambda a: a.update(visibility=a["visibility"][:, 0]), "visibility",
                        ["rank"]),
    "pids_rank": (lambda a: a.update(pids=a["pids"][:, None]), "pids", ["rank"]),
    "features_int": (lambda a: a.update(features=(a["features"] * 10).astype(np.int32)),
                     "features", ["dtype", "int32"]),
    "features_float64": (lambda a: a.update(features=a["features"].astype(np.float64)),
                         "features", ["dtype", "float64"]),
    "pids_fractional": (lambda a: a.update(pids=a["pids"] + 0.5), "pids",
                        ["dtype", "non-integer"]),
    "camids_str": (lambda a: a.update(camids=a["camids"].astype(str)), "camids", ["dtype"]),
    "paths_int": (lambda a: a.update(paths=np.arange(5)), "paths", ["dtype"]),
    "pids_n_mismatch": (lambda a: a.update(pids=a["pids"][:4]), "pids", ["mismatch", "4", "5"]),
    "visibility_n_mismatch": (lambda a: a.update(visibility=a["visibility"][:3]),
                              "visibility", ["mismatch"]),
    "visibility_m_mismatch": (lambda a: a.update(visibility=a["visibility"][:, :4]),
                              "visibility", ["mismatch"]),
    "clean_shape_mismatch": (lambda a: a.update(clean_features=a["clean_features"][:, :, :3]),
                             "clean_features", ["mismatch"]),
    "nan_features": (_nan_features, "features", ["NaN", "2 of", "(2, 3, 1)"]),
    "inf_clean": (_inf_clean, "clean_features", ["inf", "1 of", "(1, 1, 1)"]),
    "visibility_range": (_vis_range, "visibility", ["outside [0, 1]", "(3, 2)"]),
    "empty_split": (lambda a: a.update({k: v[:0] for k, v in a.items()}), "features",
                    ["empty"]),
    "pickled_paths": (lambda a: a.update(paths=np.array(["a", 1, None, "d", "e"],
                                                        dtype=object)), "paths", ["pickle"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_file_is_refused_with_file_key_and_problem(tmp_path, case):
    mutate, key, words = BAD_CASES[case]
    arrays = raw_arrays(make_pf(paths=True, clean=True))
    mutate(arrays)
    path = write_raw(tmp_path / f"{case}.npz", **arrays)
    with pytest.raises(PartFeatureError) as info:
        load_part_features(path)
    message = str(info.value)
    assert f"{case}.npz" in message
    assert f"'{key}'" in message
    for word in words:
        assert word in message, (word, message)
    assert info.value.key == key


def test_refusal_is_a_value_error(tmp_path):
    assert issubclass(PartFeatureError, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(PartFeatureError, match=r"nowhere\.npz.*not found"):
        load_part_features(tmp_path / "nowhere.npz")


@pytest.mark.parametrize("content", [b"", b"this is not an archive\n", b"\x93NUMPY junk"])
def test_not_an_npz(tmp_path, content):
    path = tmp_path / "query.npz"
    path.write_bytes(content)
    with pytest.raises(PartFeatureError, match=r"query\.npz.*not an \.npz archive"):
        load_part_features(path)


def test_npy_file_is_not_an_npz(tmp_path):
    path = tmp_path / "features.npy"
    np.save(path, np.zeros((2, 6, 4), np.float32))
    with pytest.raises(PartFeatureError, match="not an .npz archive"):
        load_part_features(path)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "gallery.npz"
    save_part_features(path, make_pf(n=50, d=64, paths=True, clean=True))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(PartFeatureError) as info:
        load_part_features(path)
    message = str(info.value)
    assert "gallery.npz" in message
    assert "truncated" in message or "corrupted" in message
    assert info.value.__cause__ is None  # no zipfile traceback chained in


def test_corrupted_member(tmp_path):
    path = tmp_path / "train.npz"
    save_part_features(path, make_pf(n=50, d=64))
    data = bytearray(path.read_bytes())
    start = data.index(b"features.npy") + 200
    data[start:start + 400] = b"\x00" * 400  # garbage inside the 'features' member
    path.write_bytes(bytes(data))
    with pytest.raises(PartFeatureError, match=r"train\.npz.*'features'"):
        load_part_features(path)


# --------------------------------------------------------------------------- atomic writes
def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "query.npz"
    old = make_pf(seed=1)
    save_part_features(path, old)
    before = path.read_bytes()

    def broken_savez(file, *args, **kwargs):  # the archive writer fails half-way
        file.write(b"PK\x03\x04 half an archive")
        raise RuntimeError("disk full")

    monkeypatch.setattr(features_module, "_write_npz", broken_savez)
    with pytest.raises(RuntimeError, match="disk full"):
        save_part_features(path, make_pf(seed=2))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["query.npz"]  # no temp file left behind
    monkeypatch.undo()
    assert_same(load_part_features(path), old)


def test_save_on_new_path_leaves_nothing_on_failure(tmp_path, monkeypatch):
    def broken_savez(file, *args, **kwargs):  # the archive writer fails half-way
        raise KeyboardInterrupt

    monkeypatch.setattr(features_module, "_write_npz", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        save_part_features(tmp_path / "train.npz", make_pf())
    assert os.listdir(tmp_path) == []


def test_save_validates_first(tmp_path):
    bad = make_pf()
    bad.visibility = bad.visibility + 2
    with pytest.raises(PartFeatureError, match=r"train\.npz.*'visibility'.*outside"):
        save_part_features(tmp_path / "train.npz", bad)
    assert os.listdir(tmp_path) == []


def test_saved_file_is_readable_by_others(tmp_path):
    save_part_features(tmp_path / "q.npz", make_pf())
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "q.npz").stat().st_mode & 0o777 == 0o666 & ~umask


# --------------------------------------------------------------------------- split dirs
def test_split_dir_round_trip(tmp_path):
    splits = {name: make_pf(n=4 + i, seed=i, clean=True) for i, name in enumerate(SPLITS)}
    save_split_dir(tmp_path / "world", splits)
    assert sorted(os.listdir(tmp_path / "world")) == ["gallery.npz", "query.npz", "train.npz"]
    back = load_split_dir(tmp_path / "world")
    assert list(back) == list(SPLITS)
    for name in SPLITS:
        assert_same(back[name], splits[name])
    only = load_split_dir(tmp_path / "world", splits=("query",))
    assert list(only) == ["query"]


@pytest.mark.parametrize("axis, what", [("m", "M (parts)"), ("d", "D (dim)")])
def test_split_dir_mismatch_names_both_files(tmp_path, axis, what):
    save_part_features(tmp_path / "train.npz", make_pf())
    save_part_features(tmp_path / "query.npz", make_pf())
    other = make_pf(m=4) if axis == "m" else make_pf(d=16)
    save_part_features(tmp_path / "gallery.npz", other)
    with pytest.raises(PartFeatureError) as info:
        load_split_dir(tmp_path)
    message = str(info.value)
    assert "gallery.npz" in message and "train.npz" in message
    assert what in message and "differs between splits" in message


def test_save_split_dir_refuses_mismatch_and_writes_nothing(tmp_path):
    splits = {"train": make_pf(), "query": make_pf(), "gallery": make_pf(d=16)}
    with pytest.raises(PartFeatureError, match="differs between splits"):
        save_split_dir(tmp_path / "out", splits)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_split_dir_missing_split(tmp_path):
    save_part_features(tmp_path / "train.npz", make_pf())
    with pytest.raises(PartFeatureError, match=r"query\.npz.*not found"):
        load_split_dir(tmp_path)


def test_non_finite_features_are_counted_across_row_chunks(monkeypatch):
    """The finiteness check reads large (mapped) arrays a chunk of rows at a time; the count
    and the first index must be those of the whole array."""
    import orgnn.io.storage

    monkeypatch.setattr(orgnn.io.storage, "chunk_rows", lambda arr, *a: 2)
    pf = make_pf(n=7)
    pf.features[3, 1, 2] = np.inf
    pf.features[6, 0, 0] = np.nan
    pf.features[4, 5, 7] = -np.inf
    with pytest.raises(PartFeatureError, match=r"non-finite values \(NaN/inf\): 3 of 336, "
                                               r"first at index \(3, 1, 2\)"):
        pf.validate()


def test_a_mapped_array_is_written_as_np_savez_writes_it(tmp_path):
    """The archive writer streams a memory map row chunk by row chunk (pages handed back);
    the bytes are np.savez's."""
    import io

    from orgnn.io.storage import open_npy

    mapped = open_npy(tmp_path / "x.npy", (700, 6, 8), np.float16)
    mapped[:] = np.random.default_rng(0).random((700, 6, 8))
    arrays = {"features": mapped, "pids": np.arange(700), "paths": np.array(["a", "bb"] * 350)}
    ours, theirs = io.BytesIO(), io.BytesIO()
    features_module._write_npz(ours, arrays)
    np.savez(theirs, **{k: np.asarray(v) for k, v in arrays.items()})
    assert ours.getvalue() == theirs.getvalue()
