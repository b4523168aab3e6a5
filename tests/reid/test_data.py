"""Image/mask loading: joint flips, labels from the final mask, bad and missing files."""
from __future__ import annotations

import pytest
import torch

from orgnn.reid import BadImageError, ImageSet, Market1501, collate
from orgnn.reid.data import IMAGENET_MEAN


def test_train_flip_applies_to_image_and_mask(market_dir, tmp_path):
    ds = Market1501(market_dir)
    # a mask that only covers the left half: flipped, the right half is the visible one
    from PIL import Image

    path = ds.train[0][0]
    mask_root = tmp_path / "masks"
    target = mask_root / "bounding_box_train" / (path.rsplit("/", 1)[1][:-4] + ".png")
    target.parent.mkdir(parents=True)
    left = torch.zeros(64, 32, dtype=torch.uint8)
    left[:, :16] = 255
    Image.fromarray(left.numpy()).save(target)
    kw = dict(height=64, width=32, mask_root=mask_root, dataset_root=market_dir,
              erasing_prob=0.0)
    plain = ImageSet(ds.train[:1], **kw)[0]
    flipped = ImageSet(ds.train[:1], train=True, flip_prob=1.0, **kw)[0]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["mask"], plain["mask"].flip(-1))
    assert plain["part_labels"].tolist() == [1, 1, 1, 1, 1, 0]
    assert flipped["part_labels"].tolist() == [1, 1, 1, 1, 0, 1]
    assert plain["image"].shape == (3, 64, 32) and plain["mask"].shape == (1, 64, 32)


def test_erasing_and_normalisation(market_dir):
    ds = Market1501(market_dir)
    item = ImageSet(ds.train[:1], 64, 32)[0]
    assert item["label"] == ds.train[0][1] and item["camid"] == 0
    assert item["image"].dtype == torch.float32 and item["image"].min() < 0  # normalised
    torch.manual_seed(0)
    erased = ImageSet(ds.train[:1], 64, 32, train=True, flip_prob=0, erasing_prob=1.0)[0]
    assert (erased["image"] == 0).any() and not (item["image"] == 0).any()
    assert len(IMAGENET_MEAN) == 3


def test_bad_and_missing_files(market_dir, tmp_path):
    ds = Market1501(market_dir)
    bad = ds.query[0][0]
    with open(bad, "r+b") as f:
        f.truncate(100)
    with pytest.raises(BadImageError, match=f"bad image {bad}"):
        ImageSet(ds.query, 64, 32)[0]
    items = [ImageSet(ds.query, 64, 32, on_bad_image="skip")[i] for i in range(2)]
    batch = collate(items)
    assert batch["size"] == 1 and batch["image"].shape == (1, 3, 64, 32)
    assert len(batch["bad"]) == 1 and bad in batch["bad"][0]
    assert collate(items[:1]) == {"bad": batch["bad"], "size": 0}
    missing = ImageSet(ds.gallery, 64, 32, mask_root=tmp_path / "none", dataset_root=market_dir)
    with pytest.raises(BadImageError, match="mask of .* not found \\(run `orgnn masks`\\)"):
        missing[0]
    with pytest.raises(ValueError, match="on_bad_image"):
        ImageSet(ds.query, on_bad_image="ignore")
