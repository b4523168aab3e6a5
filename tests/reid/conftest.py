"""Fixtures for the image side: tiny generated datasets in every layout, one ResNet-50 per module.

Everything runs on the CPU with small images (64×32 unless a test checks the 384×128 geometry);
nothing is downloaded.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torchvision", reason="the image side needs torchvision")
Image = pytest.importorskip("PIL.Image", reason="the image side needs pillow")


def person_image(pid: int, variant: int, size=(64, 32), seed: int = 0) -> np.ndarray:
    """A (H, W, 3) uint8 'person': an identity-coloured body on a noisy background."""
    rng = np.random.default_rng(seed * 100_003 + pid * 101 + variant)
    h, w = size
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    colour = np.array([(pid * 67) % 256, (pid * 151) % 256, (pid * 29 + 90) % 256], np.uint8)
    top, left = h // 16, w // 4
    img[top:h - h // 16, left:w - left] = colour
    img[top:h // 2, left:w - left, (pid + variant) % 3] //= 2  # a shirt of another shade
    return img


def person_mask(size=(64, 32)) -> np.ndarray:
    h, w = size
    m = np.zeros((h, w), np.uint8)
    m[h // 16:h - h // 16, w // 4:w - w // 4] = 255
    return m


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_market(root: Path, ids=(1, 2, 3, 4), per_id: int = 2, size=(64, 32),
                cams: int = 6, duke: bool = False, masks: Path | None = None) -> Path:
    """A Market-1501 (or DukeMTMC, ``duke=True``) folder with ``per_id`` images per identity in
    each split (query/gallery identities are ``ids`` shifted by 100)."""
    for folder, offset in (("bounding_box_train", 0), ("query", 100), ("bounding_box_test", 100)):
        for pid in ids:
            for v in range(per_id):
                cam = (v + (folder == "query")) % cams + 1
                name = (f"{pid + offset:04d}_c{cam}_f{v:07d}.jpg" if duke
                        else f"{pid + offset:04d}_c{cam}s1_{v:06d}_01.jpg")
                save(root / folder / name, person_image(pid + offset, v, size))
                if masks is not None:
                    save(masks / folder / Path(name).with_suffix(".png"), person_mask(size))
    return root


@pytest.fixture
def market_dir(tmp_path) -> Path:
    return make_market(tmp_path / "market", masks=tmp_path / "market_masks")


@pytest.fixture(autouse=True)
def _quiet_random_init(caplog):
    caplog.set_level(logging.ERROR, logger="orgnn.reid")
