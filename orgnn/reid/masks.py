"""Person masks: Mask R-CNN inference, the part-visibility label rule, synthetic occlusion.

The part label rule (SPEC §2, used for OAN training and written down here once)
---------------------------------------------------------------------------------
Let the *person box* be the region of the mask that holds the whole person: by default the
whole crop (Re-ID images are person detection boxes, occluders included), or an explicit
``box=(top, left, bottom, right)``. Split the box exactly as the FEN splits its feature map
(:class:`orgnn.reid.models.PartPooling`): parts 0-3 are 4 horizontal stripes (top to bottom),
parts 4-5 the left and right halves; part ``i`` of ``n`` along a side of length ``L`` spans
``[floor(i L / n), ceil((i + 1) L / n))``.

    coverage_k = (rows of part k's region that contain at least one mask pixel inside
                  that region) / (rows of part k's region)
    label_k    = 1 (visible) if coverage_k >= tau (default 0.5), else 0 (occluded)

Counting rows rather than pixels makes the rule independent of the silhouette's width: a person
fills only ~40-60 % of its box, so "mask pixels / region pixels >= 0.5" would call unoccluded
legs occluded. An occluder over the bottom 40 % of the crop removes the mask from the rows it
covers, so stripes 2 (60 % of its rows covered) and 3 are labelled occluded, stripes 0-1 and both
halves (mask present in ~60 % of their rows) visible. Masks are binarised at 0.5.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from orgnn.io.atomic import atomic_write
from orgnn.reid.io import BadImageError, mask_path_for, read_image

__all__ = [
    "part_coverage",
    "part_labels_from_mask",
    "select_person",
    "build_mask_rcnn",
    "person_masks",
    "write_masks",
    "MaskSummary",
    "Occlusion",
    "synthetic_occlusion",
    "SIDES",
    "PERSON_LABEL",
]

PERSON_LABEL = 1  # COCO category id of "person" in torchvision's detection models
SIDES = ("bottom", "top", "left", "right")


def _bounds(i: int, n: int, length: int) -> tuple[int, int]:
    return (i * length) // n, -((-(i + 1) * length) // n)


def part_coverage(mask: Tensor, box: Sequence[int] | None = None, stripes: int = 4,
                  halves: int = 2) -> Tensor:
    """Row coverage of each part (see the module docstring), vectorised over a batch.

    Args:
        mask: ``(H, W)`` or ``(B, H, W)`` (bool, or float binarised at 0.5).
        box: ``(top, left, bottom, right)`` of the person box in pixels (exclusive ends), the
            same for the whole batch; ``None`` = the whole mask.

    Returns:
        ``(stripes + halves,)`` or ``(B, stripes + halves)`` float coverages in [0, 1].
    """
    single = mask.dim() == 2
    m = mask[None] if single else mask
    if m.dim() != 3:
        raise ValueError(f"mask must be (H, W) or (B, H, W), got shape {tuple(mask.shape)}")
    m = m > 0.5 if m.dtype != torch.bool else m
    if box is not None:
        top, left, bottom, right = (int(v) for v in box)
        m = m[:, top:bottom, left:right]
    h, w = m.shape[-2:]
    if h < stripes or w < halves:
        raise ValueError(f"person box {h}x{w} is too small for {stripes} stripes x "
                         f"{halves} halves")
    rows = m.any(-1).float()  # (B, H): row holds a mask pixel
    cov = [rows[:, slice(*_bounds(i, stripes, h))].mean(1) for i in range(stripes)]
    cov += [m[:, :, slice(*_bounds(j, halves, w))].any(-1).float().mean(1)
            for j in range(halves)]
    out = torch.stack(cov, 1)
    return out[0] if single else out


def part_labels_from_mask(mask: Tensor, tau: float = 0.5,
                          box: Sequence[int] | None = None) -> Tensor:
    """Part visibility labels (1 = visible), vectorised over a batch of masks.

    Rule: inside the person box (default: the whole mask), parts 0-3 are 4 horizontal stripes
    and parts 4-5 the left and right halves, split as the FEN splits its feature map. Part k is
    visible when at least ``tau`` of the rows of its region contain a mask pixel inside that
    region: ``part_coverage(mask, box) >= tau`` (the reasons are in this module's docstring).
    Shapes as :func:`part_coverage`.
    """
    return (part_coverage(mask, box) >= tau).float()


def select_person(output: dict, image_size: tuple[int, int],
                  score_thresh: float = 0.5) -> int | None:
    """Index of the person instance to keep in one Mask R-CNN output, or ``None``.

    Candidates are detections of class ``person`` with score >= ``score_thresh``. The kept one
    maximises ``mask area × (1 − d)``, where ``d`` is the distance from the instance's box centre
    to the image centre divided by half the image diagonal: the largest, most central person.
    """
    labels, scores = output["labels"], output["scores"]
    keep = ((labels == PERSON_LABEL) & (scores >= score_thresh)).nonzero().flatten()
    if keep.numel() == 0:
        return None
    h, w = image_size
    boxes = output["boxes"][keep].float()
    area = (output["masks"][keep, 0] > 0.5).flatten(1).sum(1).float()
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    d = torch.hypot(cx - w / 2, cy - h / 2) / (math.hypot(w, h) / 2)
    score = area * (1 - d.clamp(0, 1))
    return int(keep[int(score.argmax())])


def build_mask_rcnn(weights: str | os.PathLike | None = None, pretrained: bool = False,
                    random_init: bool = False, min_size: int = 800, max_size: int = 1333,
                    score_thresh: float = 0.5, max_detections: int = 100):
    """torchvision ``maskrcnn_resnet50_fpn`` in eval mode.

    Args:
        weights: local state-dict file (``torch.load(weights_only=True)``), e.g. torchvision's
            ``maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth``.
        pretrained: torchvision's named COCO weights (downloads on first use).
        random_init: random weights, for plumbing tests only (finds no one).
        min_size, max_size: the model's internal resize (torchvision defaults 800, 1333).
        score_thresh: detections below this score are dropped.
        max_detections: detections kept per image (torchvision default 100).
    """
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from orgnn.reid.models import load_backbone_state_dict

    if sum(bool(x) for x in (weights, pretrained, random_init)) != 1:
        raise ValueError("Mask R-CNN needs weights: give a local weights file (--weights PATH) "
                         "or --pretrained (torchvision downloads COCO weights; needs internet). "
                         "Without weights, skip masks: `orgnn extract --visibility ones` (every "
                         "part visible) or `--visibility occluder` (synthetic occluders, "
                         "visibility known) needs neither masks nor OAN")
    kw = dict(min_size=min_size, max_size=max_size, box_score_thresh=score_thresh,
              box_detections_per_img=max_detections)
    if pretrained:
        model = maskrcnn_resnet50_fpn(weights="DEFAULT", **kw)
    else:
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kw)
        if weights is not None:
            state = load_backbone_state_dict(weights)
            try:
                model.load_state_dict(state)
            except RuntimeError as err:
                first = str(err).splitlines()[1:2] or [str(err)[:200]]
                raise ValueError(f"{os.fspath(weights)}: not a maskrcnn_resnet50_fpn state dict "
                                 f"({first[0].strip()})") from None
    return model.eval()


@torch.no_grad()
def person_masks(model, images: Sequence[Tensor], score_thresh: float = 0.5
                 ) -> list[Tensor | None]:
    """Run Mask R-CNN on images ``(3, H, W)`` in [0, 1]; the chosen person's bool mask
    ``(H, W)`` for each, or ``None`` when no person is found."""
    outputs = model(list(images))
    masks = []
    for img, out in zip(images, outputs):
        k = select_person(out, tuple(img.shape[-2:]), score_thresh)
        masks.append(None if k is None else out["masks"][k, 0] > 0.5)
    return masks


def _save_mask_png(mask: Tensor, path: Path) -> None:
    from PIL import Image

    array = (mask.to(torch.uint8) * 255).cpu().numpy()
    atomic_write(path, lambda handle: Image.fromarray(array, mode="L").save(handle, format="PNG"))


@dataclass
class MaskSummary:
    """What :func:`write_masks` did."""

    written: int = 0
    existing: int = 0
    no_person: list[str] | None = None
    bad: list[str] | None = None

    def __str__(self) -> str:
        return (f"{self.written} mask(s) written, {self.existing} already present, "
                f"{len(self.no_person or [])} without a detected person (empty mask written), "
                f"{len(self.bad or [])} unreadable image(s) skipped")


def write_masks(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike, model,
                device: str | torch.device = "cpu", batch_size: int = 4,
                score_thresh: float = 0.5, on_bad_image: str = "error",
                progress: bool = True) -> MaskSummary:
    """One PNG person mask (0/255, the image's size) per image under ``dataset_dir``, at the same
    relative path under ``out_dir``. Resumable: existing masks are kept. Each PNG is written
    atomically. Images where no person is found get an empty mask and are listed.

    Args:
        on_bad_image: ``"error"`` stops at the first unreadable image (naming it); ``"skip"``
            reports and skips it.
    """
    from torchvision.transforms.v2.functional import pil_to_tensor
    from tqdm import tqdm

    from orgnn.reid.datasets import list_images

    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder {dataset_dir} not found")
    images = list_images(dataset_dir, recursive=True)
    if not images:
        raise ValueError(f"no images ({', '.join(e[1:] for e in ('.jpg', '.png', '.tif'))}...) "
                         f"found under {dataset_dir}")
    out_dir = Path(out_dir)
    summary = MaskSummary(no_person=[], bad=[])
    todo = []
    for path in images:
        target = mask_path_for(path, dataset_dir, out_dir)
        if target.exists():
            summary.existing += 1
        else:
            todo.append((path, target))
    model = model.to(device)
    bar = tqdm(total=len(todo), desc="masks", unit="img", disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch, tensors = [], []
        for path, target in todo[start:start + batch_size]:
            try:
                img = read_image(path)
            except BadImageError as err:
                if on_bad_image == "error":
                    raise
                summary.bad.append(str(path))
                bar.write(f"skipped {err}")
                bar.update(1)
                continue
            batch.append((path, target))
            tensors.append(pil_to_tensor(img).float().div(255).to(device))
        if not tensors:
            continue
        for (path, target), img, mask in zip(batch, tensors,
                                             person_masks(model, tensors, score_thresh)):
            if mask is None:
                summary.no_person.append(str(path))
                mask = torch.zeros(img.shape[-2:], dtype=torch.bool)
            _save_mask_png(mask, target)
            summary.written += 1
            bar.update(1)
    bar.close()
    return summary


@dataclass
class Occlusion:
    """A synthetic occlusion: the occluded image and mask, the part labels of the occluded mask,
    the side, the covered fraction of the image's height or width, and ``uncovered``: the
    fraction of each part's pixels the occluder leaves uncovered (6 values; the ``visibility``
    of the mini-mars-parts proxy)."""

    image: Tensor | None
    mask: Tensor
    labels: Tensor
    side: str
    fraction: float
    uncovered: Tensor


def synthetic_occlusion(mask: Tensor, image: Tensor | None = None, donor: Tensor | None = None,
                        side: str | None = None, fraction: float | None = None,
                        fill: str | None = None, extent: tuple[float, float] = (0.25, 0.5),
                        side_probs: Sequence[float] = (0.4, 0.2, 0.2, 0.2),
                        patch_prob: float = 0.6, tau: float = 0.5,
                        generator: torch.Generator | None = None) -> Occlusion:
    """Cover one side of an image with an occluder and derive the matching mask and labels.

    A band over ``side`` (bottom/top/left/right; drawn with ``side_probs`` when ``None``) covering
    ``fraction`` of the height or width (uniform in ``extent`` when ``None``) is filled with the
    same region of ``donor`` (``fill="patch"``: another image, i.e. another person or background)
    or a flat random colour (``fill="block"``; ``"patch"`` with probability ``patch_prob``,
    ``"block"`` when no donor is given). The band is removed from the person mask (whatever it
    shows, it is not the target person) and the labels follow :func:`part_labels_from_mask`.

    Args:
        mask: ``(H, W)`` person mask. image, donor: ``(C, H, W)`` (same size), optional.
    """
    g = generator
    if side is None:
        side = SIDES[int(torch.multinomial(torch.tensor(side_probs, dtype=torch.float), 1,
                                           generator=g))]
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if fraction is None:
        lo, hi = extent
        fraction = lo + (hi - lo) * float(torch.rand((), generator=g))
    if fill is None:
        fill = "patch" if donor is not None and float(torch.rand((), generator=g)) < patch_prob \
            else "block"
    if fill == "patch" and donor is None:
        raise ValueError("fill='patch' needs a donor image")
    h, w = mask.shape[-2:]
    region = torch.zeros(h, w, dtype=torch.bool)
    if side in ("bottom", "top"):
        n = max(1, round(fraction * h))
        rows = slice(h - n, h) if side == "bottom" else slice(0, n)
        region[rows, :] = True
    else:
        n = max(1, round(fraction * w))
        cols = slice(w - n, w) if side == "right" else slice(0, n)
        region[:, cols] = True
    new_mask = (mask > 0.5) & ~region.to(mask.device)
    new_image = None
    if image is not None:
        if fill == "patch":
            filler = donor.to(image.dtype)
        else:
            colour = torch.rand(image.shape[0], 1, 1, generator=g).to(image.dtype)
            if not image.is_floating_point():
                colour = (colour * 255).round().to(image.dtype)
            filler = colour.expand_as(image)
        new_image = torch.where(region.to(image.device), filler.to(image.device), image)
    free = (~region).float()
    uncovered = [free[slice(*_bounds(i, 4, h))].mean() for i in range(4)]
    uncovered += [free[:, slice(*_bounds(j, 2, w))].mean() for j in range(2)]
    return Occlusion(new_image, new_mask.to(mask.dtype) if mask.dtype != torch.bool else new_mask,
                     part_labels_from_mask(new_mask, tau), side, float(fraction),
                     torch.stack(uncovered))
