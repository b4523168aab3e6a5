"""Loading images and masks for training and extraction: transforms, bad files, batching.

Pipeline (each step only where it applies):

1. read the image (RGB) and/or its person mask (``orgnn masks`` output), fully decoded;
2. resize to ``height × width`` (bilinear; the mask is re-binarised at 0.5);
3. synthetic occlusion with probability ``occlude_prob``
   (:func:`orgnn.reid.masks.synthetic_occlusion`);
4. training only: horizontal flip (``flip_prob``, image and mask together);
5. image: normalise with the ImageNet mean/std; training only: random erasing
   (``erasing_prob``, erased pixels set to 0 = the mean colour);
6. mask: part labels by :func:`orgnn.reid.masks.part_labels_from_mask` on the final mask.

An unreadable, truncated or missing file raises :class:`orgnn.reid.io.BadImageError` naming the
file (``on_bad_image="error"``), or the item is dropped from its batch and its path reported in
the batch's ``"bad"`` list (``on_bad_image="skip"``). Nothing is silently replaced.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from orgnn.reid.io import BadImageError, mask_path_for, read_image
from orgnn.reid.masks import part_labels_from_mask, synthetic_occlusion

__all__ = ["ImageSet", "collate", "IMAGENET_MEAN", "IMAGENET_STD", "BAD_IMAGE_CHOICES"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BAD_IMAGE_CHOICES = ("error", "skip")


def _load_resized(path, size: tuple[int, int], mode: str) -> Tensor:
    from PIL import Image

    img = read_image(path, mode).resize((size[1], size[0]), Image.BILINEAR)
    t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return t.permute(2, 0, 1) if t.dim() == 3 else t


class ImageSet(torch.utils.data.Dataset):
    """Items ``{"index", "pid", "camid", "label", "image"?, "mask"?, "part_labels"?,
    "clean_image"?, "occluded"?, "uncovered"?}`` for a list of ``(path, pid, camid)`` records.

    Args:
        records: ``(path, pid, camid)`` tuples (a dataset split).
        height, width (int): network input size (default 384 × 128).
        train (bool): random flip and erasing (default ``False``).
        load_image (bool): read the images (``False`` for OAN training, which needs masks only).
        mask_root, dataset_root: read masks from ``mask_root`` at the image's path relative to
            ``dataset_root`` (with ``.png``); both ``None`` = no masks.
        labels (dict, optional): pid → training label (default: the pid).
        flip_prob, erasing_prob (float): training augmentations (0.5 each).
        occlude_prob (float): synthetic occlusion probability (default 0).
        deterministic_occlusion (bool): draw occlusions from ``(seed, index)`` (extraction), not
            the global RNG (training).
        keep_clean (bool): also return the unoccluded normalised image as ``"clean_image"``.
        tau (float): part-label threshold. on_bad_image (str): ``"error"`` or ``"skip"``.
    """

    def __init__(self, records: Sequence[tuple[str, int, int]], height: int = 384,
                 width: int = 128, train: bool = False, load_image: bool = True,
                 mask_root: str | os.PathLike | None = None,
                 dataset_root: str | os.PathLike | None = None,
                 labels: dict[int, int] | None = None, flip_prob: float = 0.5,
                 erasing_prob: float = 0.5, occlude_prob: float = 0.0,
                 deterministic_occlusion: bool = False, keep_clean: bool = False,
                 tau: float = 0.5, seed: int = 0, on_bad_image: str = "error"):
        if on_bad_image not in BAD_IMAGE_CHOICES:
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        if (mask_root is None) != (dataset_root is None):
            raise ValueError("give both mask_root and dataset_root, or neither")
        if not load_image and mask_root is None:
            raise ValueError("nothing to load: no images and no masks")
        self.records = list(records)
        self.size = (height, width)
        self.train, self.load_image = train, load_image
        self.mask_root, self.dataset_root = mask_root, dataset_root
        self.labels = labels
        self.flip_prob, self.erasing_prob = flip_prob, erasing_prob
        self.occlude_prob, self.deterministic_occlusion = occlude_prob, deterministic_occlusion
        self.keep_clean, self.tau, self.seed = keep_clean, tau, seed
        self.on_bad_image = on_bad_image
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self._erase = None
        if train and load_image and erasing_prob > 0:
            from torchvision.transforms import v2

            self._erase = v2.RandomErasing(p=erasing_prob, value=0)

    def __len__(self) -> int:
        return len(self.records)

    def _mask_path(self, path: str):
        return mask_path_for(path, self.dataset_root, self.mask_root)

    def _read(self, index: int) -> tuple[Tensor | None, Tensor | None]:
        path = self.records[index][0]
        image = mask = None
        if self.load_image:
            image = _load_resized(path, self.size, "RGB").float().div_(255)
        if self.mask_root is not None:
            mpath = self._mask_path(path)
            if not mpath.exists():
                raise BadImageError(mpath, f"mask of {path} not found (run `orgnn masks`)")
            mask = _load_resized(mpath, self.size, "L") >= 128
        return image, mask

    def _normalise(self, image: Tensor) -> Tensor:
        return (image - self.mean) / self.std

    def __getitem__(self, index: int) -> dict:
        path, pid, camid = self.records[index]
        try:
            image, mask = self._read(index)
        except BadImageError as err:
            if self.on_bad_image == "error":
                raise
            return {"bad": str(err)}
        item = {"index": index, "pid": pid, "camid": camid,
                "label": self.labels[pid] if self.labels is not None else pid}
        if self.keep_clean and image is not None:
            item["clean_image"] = self._normalise(image)
        if self.occlude_prob > 0:
            g = (torch.Generator().manual_seed(self.seed * 1_000_003 + index)
                 if self.deterministic_occlusion else None)
            occluded = float(torch.rand((), generator=g)) < self.occlude_prob
            uncovered = torch.ones(6)
            if occluded:
                donor = None
                if image is not None and len(self.records) > 1:
                    j = (index + 1 + int(torch.randint(len(self.records) - 1, (), generator=g))) \
                        % len(self.records)
                    try:
                        donor = _load_resized(self.records[j][0], self.size, "RGB").float() / 255
                    except BadImageError:
                        donor = None  # a flat block instead; the donor is not the item itself
                base = mask if mask is not None else torch.ones(self.size, dtype=torch.bool)
                occ = synthetic_occlusion(base, image, donor, tau=self.tau, generator=g)
                image, uncovered = occ.image, occ.uncovered
                if mask is not None:
                    mask = occ.mask
            item["occluded"] = occluded
            item["uncovered"] = uncovered
        if self.train and float(torch.rand(())) < self.flip_prob:
            image = image.flip(-1) if image is not None else None
            mask = mask.flip(-1) if mask is not None else None
        if image is not None:
            image = self._normalise(image)
            if self._erase is not None:
                image = self._erase(image)
            item["image"] = image
        if mask is not None:
            item["mask"] = mask[None].float()
            item["part_labels"] = part_labels_from_mask(mask, self.tau)
        return item


def collate(items: list[dict]) -> dict:
    """Stack good items; bad ones (``on_bad_image="skip"``) are listed under ``"bad"``."""
    good = [it for it in items if "bad" not in it]
    batch: dict = {"bad": [it["bad"] for it in items if "bad" in it], "size": len(good)}
    if not good:
        return batch
    for key, value in good[0].items():
        values = [it[key] for it in good]
        batch[key] = torch.stack(values) if isinstance(value, Tensor) else torch.tensor(values)
    return batch
