"""Part labels from masks, person selection, Mask R-CNN plumbing, synthetic occlusion."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from orgnn.reid import (
    build_mask_rcnn,
    part_coverage,
    part_labels_from_mask,
    select_person,
    synthetic_occlusion,
    write_masks,
)

from .conftest import person_image, save


def body(h=48, w=16, top=2, bottom=None, left=4, right=12):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[top:bottom if bottom is not None else h, left:right] = True
    return m


def test_full_person_is_visible_everywhere():
    # a narrow silhouette (half the width) is still fully visible: rows are counted, not pixels
    assert part_labels_from_mask(body()).tolist() == [1, 1, 1, 1, 1, 1]
    assert part_coverage(body()).tolist() == pytest.approx([10 / 12, 1, 1, 1, 46 / 48, 46 / 48])


def test_hand_made_occlusions():
    # bottom 40 % of a 40-row box removed: rows 24..39 empty
    m = body(h=40, top=0, bottom=24)
    cov = part_coverage(m)
    assert cov.tolist() == pytest.approx([1, 1, 0.4, 0, 0.6, 0.6])
    assert part_labels_from_mask(m).tolist() == [1, 1, 0, 0, 1, 1]
    assert part_labels_from_mask(m, tau=0.7).tolist() == [1, 1, 0, 0, 0, 0]
    # left side occluded: the mask only in columns 8..11 (right half)
    m = body(left=8)
    assert part_labels_from_mask(m).tolist() == [1, 1, 1, 1, 0, 1]
    # a stripe exactly at the threshold counts as visible (>= tau)
    m = body(h=8, w=4, top=0, bottom=5, left=0, right=4)  # stripe 2 = rows 4..5: half covered
    assert part_coverage(m)[2] == 0.5 and part_labels_from_mask(m)[2] == 1
    # nothing detected: every part occluded
    assert part_labels_from_mask(torch.zeros(16, 8)).tolist() == [0] * 6


def test_person_box_and_batch():
    # the same person pasted into a bigger canvas: with its box the labels are unchanged
    canvas = torch.zeros(100, 60, dtype=torch.bool)
    canvas[20:60, 10:26] = body(h=40, top=0, bottom=24)
    assert part_labels_from_mask(canvas, box=(20, 10, 60, 26)).tolist() == [1, 1, 0, 0, 1, 1]
    masks = torch.stack([body(), body(left=8), body(bottom=20), torch.zeros(48, 16).bool()])
    batch = part_labels_from_mask(masks.float())  # float masks are binarised at 0.5
    assert batch.shape == (4, 6)
    for i in range(4):
        assert torch.equal(batch[i], part_labels_from_mask(masks[i]))
    with pytest.raises(ValueError, match="too small"):
        part_coverage(torch.ones(2, 1))


def fake_output(boxes, labels, scores, masks):
    return {"boxes": torch.tensor(boxes, dtype=torch.float), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores), "masks": torch.stack(masks)[:, None].float()}


def test_select_person():
    h, w = 100, 50
    big_edge = torch.zeros(h, w)
    big_edge[0:100, 30:50] = 1  # 2000 px, off-centre
    central = torch.zeros(h, w)
    central[10:90, 12:38] = 1  # 2080 px, centred
    car = torch.ones(h, w)
    out = fake_output([[30, 0, 50, 100], [12, 10, 38, 90], [0, 0, 50, 100]], [1, 1, 3],
                      [0.9, 0.8, 0.99], [big_edge, central, car])
    assert select_person(out, (h, w)) == 1  # the car (label 3) is never chosen
    assert select_person(out, (h, w), score_thresh=0.85) == 0
    assert select_person(out, (h, w), score_thresh=0.95) is None
    small_centre = torch.zeros(h, w)
    small_centre[45:55, 20:30] = 1
    out = fake_output([[20, 45, 30, 55], [12, 10, 38, 90]], [1, 1], [0.9, 0.9],
                      [small_centre, central])
    assert select_person(out, (h, w)) == 1  # larger wins over merely central


def test_mask_rcnn_plumbing_random_weights(tmp_path):
    torch.manual_seed(0)
    model = build_mask_rcnn(random_init=True, min_size=64, max_size=96, score_thresh=0.0,
                            max_detections=5)
    data = tmp_path / "data"
    save(data / "query" / "0001_c1s1_000001_01.jpg", person_image(1, 0))
    save(data / "sub" / "001" / "001_01.tif", person_image(2, 0, size=(48, 24)))
    (data / "notes.txt").write_text("not an image")
    out = tmp_path / "masks"
    summary = write_masks(data, out, model, batch_size=2, score_thresh=0.0, progress=False)
    assert summary.written == 2 and summary.existing == 0
    for rel, size in (("query/0001_c1s1_000001_01.png", (32, 64)), ("sub/001/001_01.png",
                                                                       (24, 48))):
        with Image.open(out / rel) as png:
            assert png.mode == "L" and png.size == size
            assert set(np.unique(np.asarray(png))) <= {0, 255}
    assert not list(out.rglob("*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*.png")} == {0o666 & ~umask}
    again = write_masks(data, out, model, progress=False)  # resumable: nothing redone
    assert again.written == 0 and again.existing == 2
    # a truncated image: refused with its path, or skipped and reported
    bad = data / "query" / "0002_c1s1_000002_01.jpg"
    save(bad, person_image(2, 1))
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"(?i)bad image .*0002_c1s1_000002_01.jpg: .*trunc"):
        write_masks(data, out, model, progress=False)
    skipped = write_masks(data, out, model, on_bad_image="skip", progress=False)
    assert skipped.bad == [str(bad)] and skipped.written == 0
    assert not (out / "query" / "0002_c1s1_000002_01.png").exists()


def test_mask_rcnn_weights_errors(tmp_path):
    with pytest.raises(ValueError, match="needs weights"):
        build_mask_rcnn()
    junk = tmp_path / "w.pth"
    torch.save({"backbone.body.conv1.weight": torch.zeros(1)}, junk)
    with pytest.raises(ValueError, match="not a maskrcnn_resnet50_fpn state dict"):
        build_mask_rcnn(junk, min_size=64, max_size=96)
    with pytest.raises(FileNotFoundError):
        build_mask_rcnn(tmp_path / "none.pth")
    with pytest.raises(ValueError, match="no images"):
        write_masks(tmp_path, tmp_path / "o", None)


def test_synthetic_occlusion_bottom_block():
    mask = body(h=40, w=16, top=0)
    image = torch.rand(3, 40, 16)
    occ = synthetic_occlusion(mask, image, side="bottom", fraction=0.4, fill="block",
                              generator=torch.Generator().manual_seed(0))
    assert occ.labels.tolist() == [1, 1, 0, 0, 1, 1]
    assert not occ.mask[24:].any() and torch.equal(occ.mask[:24], mask[:24])
    assert torch.equal(occ.image[:, :24], image[:, :24])
    colour = occ.image[:, 24:]
    assert torch.equal(colour, colour[:, :1, :1].expand_as(colour))  # flat block
    assert occ.uncovered.tolist() == pytest.approx([1, 1, 0.4, 0, 0.6, 0.6])


def test_synthetic_occlusion_patch_and_random_draws():
    mask, image, donor = body(), torch.zeros(3, 48, 16), torch.ones(3, 48, 16)
    occ = synthetic_occlusion(mask, image, donor, side="left", fraction=0.5, fill="patch")
    assert (occ.image[:, :, :8] == 1).all() and (occ.image[:, :, 8:] == 0).all()
    assert occ.labels.tolist() == [1, 1, 1, 1, 0, 1]
    g = torch.Generator().manual_seed(0)
    sides = set()
    for _ in range(40):
        occ = synthetic_occlusion(mask, image, donor, generator=g)
        sides.add(occ.side)
        assert 0.25 <= occ.fraction <= 0.5
        assert torch.equal(occ.labels, part_labels_from_mask(occ.mask))
    assert sides == {"bottom", "top", "left", "right"}
    with pytest.raises(ValueError, match="needs a donor"):
        synthetic_occlusion(mask, image, fill="patch")
