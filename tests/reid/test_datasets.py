"""Dataset parsers: the real mini Market-1501, and generated folders for the other layouts."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orgnn.reid import (
    DukeMTMC,
    Market1501,
    OccludedDuke,
    OccludedREID,
    PartialREID,
    build_dataset,
)

from .conftest import make_market, person_image, save

REPO = Path(__file__).resolve().parents[2]


def mini_market() -> Path:
    base = Path(os.environ.get("ORGNN_SHARED_DATA", REPO.parent / "shared" / "data"))
    path = base / "mini_market1501"
    if not path.is_dir():
        pytest.skip(f"real Market-1501 sample not found at {path} "
                    f"(set ORGNN_SHARED_DATA to the shared data folder)")
    return path


def test_real_mini_market1501():
    root = mini_market()
    ds = build_dataset("market1501", root)
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (32, 32, 32)
    assert ds.num_train_pids == 16
    for split in ("query", "gallery", "train"):
        truth = json.loads((root / "gtPepper" / f"{split}.json").read_text())
        got = {Path(p).name: (pid, cam) for p, pid, cam in ds.split(split)}
        assert set(got) == {t["img_path"] for t in truth}
        for t in truth:
            pid, cam = got[t["img_path"]]
            assert cam == t["camid"]  # c1..c6 -> 0..5
            if split != "train":  # gtPepper relabels training ids; we keep them as written
                assert pid == t["pid"]
            else:
                assert pid == int(t["img_path"][:4])
    assert {pid for _, pid, _ in ds.query} == {pid for _, pid, _ in ds.gallery}


def test_market_junk_and_distractors(tmp_path):
    root = make_market(tmp_path / "m", ids=(1, 2))
    save(root / "bounding_box_test" / "-1_c1s1_000000_00.jpg", person_image(0, 0))
    save(root / "bounding_box_test" / "0000_c3s1_000000_00.jpg", person_image(0, 1))
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"x")
    ds = Market1501(root)
    pids = [pid for _, pid, _ in ds.gallery]
    assert -1 not in pids  # junk dropped (torchreid)
    assert pids.count(0) == 1  # distractor kept
    assert {cam for _, _, cam in ds.gallery} <= set(range(6))
    assert ds.train[0][1] == 1 and ds.train[0][2] == 0
    # an archive folder under the given folder is found; mask paths stay relative to root
    ds2 = Market1501(tmp_path)
    assert ds2.data_dir == root and ds2.root == tmp_path


def test_duke_and_occluded_duke(tmp_path):
    root = make_market(tmp_path / "d", ids=(1, 2, 3), per_id=3, cams=8, duke=True)
    save(root / "query" / "0099_c8_f0000001.jpg", person_image(99, 0))
    for cls in (DukeMTMC, OccludedDuke):
        ds = cls(root)
        assert len(ds.train) == 9 and len(ds.gallery) == 9 and len(ds.query) == 10
        assert (str(root / "query" / "0099_c8_f0000001.jpg"), 99, 7) in ds.query
    with pytest.raises(ValueError, match="camera 8 out of range"):
        Market1501(root)  # Market has 6 cameras


def _occluded_reid(root: Path, ext: str, nested: bool, query="occluded_body_images"):
    for folder in (query, "whole_body_images"):
        for pid in (1, 2, 12):
            for k in (1, 2):
                name = f"{pid:03d}_{k:02d}{ext}"
                path = root / folder / (f"{pid:03d}/{name}" if nested else name)
                save(path, person_image(pid, k))
    return root


@pytest.mark.parametrize("ext", [".tif", ".jpg"])
def test_occluded_reid(tmp_path, ext):
    root = _occluded_reid(tmp_path / "or", ext, nested=True)
    ds = build_dataset("occluded_reid", root)
    assert ds.train == []
    assert len(ds.query) == len(ds.gallery) == 6
    assert {cam for _, _, cam in ds.query} == {0} and {cam for _, _, cam in ds.gallery} == {1}
    assert sorted({pid for _, pid, _ in ds.query}) == [1, 2, 12]
    assert all(p.endswith(ext) for p, _, _ in ds.query)


@pytest.mark.parametrize("query", ["partial_body_images", "occluded_body_images"])
def test_partial_reid(tmp_path, query):
    root = _occluded_reid(tmp_path / "pr", ".jpg", nested=False, query=query)
    ds = PartialREID(root)
    assert len(ds.query) == len(ds.gallery) == 6
    assert {cam for _, _, cam in ds.query} == {0} and {cam for _, _, cam in ds.gallery} == {1}
    assert Path(ds.query[0][0]).parent.name == query


def test_missing_and_malformed_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder .*nowhere not found"):
        Market1501(tmp_path / "nowhere")
    (tmp_path / "m" / "query").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="'bounding_box_train' not found.*expected the "
                                                "market1501 layout: bounding_box_train/, query/"):
        Market1501(tmp_path / "m")
    root = make_market(tmp_path / "m2", ids=(1,))
    for p in (root / "query").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match="no images in .*query"):
        Market1501(root)
    root = make_market(tmp_path / "m3", ids=(1,))
    save(root / "query" / "person_1.jpg", person_image(1, 0))
    with pytest.raises(ValueError, match="person_1.jpg does not match"):
        Market1501(root)
    (tmp_path / "or" / "whole_body_images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="'occluded_body_images' not found .*"
                                                "occluded_reid layout"):
        OccludedREID(tmp_path / "or")
    with pytest.raises(FileNotFoundError, match="'partial_body_images' or "
                                                "'occluded_body_images' not found"):
        PartialREID(tmp_path / "or")
    save(tmp_path / "or" / "occluded_body_images" / "frame.jpg", person_image(1, 0))
    save(tmp_path / "or" / "whole_body_images" / "001_01.jpg", person_image(1, 0))
    with pytest.raises(ValueError, match="cannot read an identity from .*frame.jpg"):
        OccludedREID(tmp_path / "or")
    with pytest.raises(ValueError, match="unknown dataset 'cuhk03'"):
        build_dataset("cuhk03", tmp_path)


def test_only_junk(tmp_path):
    root = make_market(tmp_path / "m", ids=(1,))
    for p in (root / "query").iterdir():
        p.rename(p.with_name("-1" + p.name[4:]))
    with pytest.raises(ValueError, match="only junk images"):
        Market1501(root)
