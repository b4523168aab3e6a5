r"""Checks on a mask folder before anything trains on it: coverage and plausibility.

Two questions are asked of ``--mask-dir`` before the first step, so a bad set-up fails in
seconds with one line instead of minutes later in a DataLoader worker, or never:

1. **Coverage** (:func:`check_mask_folder`): the folder exists and holds the mask of every
   image of the split (``orgnn masks`` writes ``MASKS/<image's relative path>.png``). Each
   expected mask's folder is listed once, so the cost is one directory read per folder, not
   one ``stat`` per image.
2. **Plausibility** (:func:`mask_statistics`): on an evenly spaced sample of the masks, read as
   training reads them (resized to ``height × width``, binarised at 0.5), the share of *empty*
   masks (no person pixel: Mask R-CNN found no one) and, per part, the share of masks in which
   the part is labelled visible by :func:`orgnn.reid.masks.part_labels_from_mask`:

   .. math::
       e = \frac{1}{S} \sum_{s=1}^{S} [\,|M_s| = 0\,], \qquad
       v_k = \frac{1}{S} \sum_{s=1}^{S} y_{s,k}, \quad k = 1, \dots, 6

   OAN learns to predict ``y``; if ``y`` is almost always 0 for a part (or every mask is
   empty, as ``orgnn masks --random-weights`` writes), it learns "always occluded" and
   ``orgnn extract`` writes meaningless visibilities. :meth:`MaskStats.verdict` warns when
   ``e > 0.05`` or some ``v_k < 0.25`` and refuses when ``e > 0.5`` or some ``v_k < 0.05``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from orgnn.reid.io import mask_path_for

__all__ = ["check_mask_folder", "missing_masks", "mask_statistics", "MaskStats",
           "EMPTY_WARN", "EMPTY_REFUSE", "PART_WARN", "PART_REFUSE"]

EMPTY_WARN, EMPTY_REFUSE = 0.05, 0.5  # share of empty masks
PART_WARN, PART_REFUSE = 0.25, 0.05  # least share of masks in which a part is visible


def missing_masks(records: Sequence[tuple[str, int, int]], dataset_root: str | os.PathLike,
                  mask_root: str | os.PathLike) -> list[Path]:
    """The expected mask paths (in record order) that are not files under ``mask_root``."""
    expected = [mask_path_for(path, dataset_root, mask_root) for path, _, _ in records]
    present: dict[Path, set[str]] = {}
    for folder in {p.parent for p in expected}:
        try:
            with os.scandir(folder) as entries:
                present[folder] = {e.name for e in entries if e.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            present[folder] = set()
    return [p for p in expected if p.name not in present[p.parent]]


def check_mask_folder(records: Sequence[tuple[str, int, int]], dataset_root: str | os.PathLike,
                      mask_root: str | os.PathLike, on_missing: str = "error",
                      split: str = "training") -> list[Path]:
    """Refuse a mask folder that is absent, foreign or (with ``on_missing="error"``) partial.

    Returns:
        The missing masks (empty unless ``on_missing="skip"``: those images are then left out
        by the loader, which reports each).

    Raises:
        FileNotFoundError: no such folder. ValueError: it holds no mask of the split's
        images, or (``on_missing="error"``) lacks some of them; the message says how many.
    """
    mask_root = Path(mask_root)
    make = f"`orgnn masks --dataset-dir {dataset_root} --out {mask_root}`"
    if not mask_root.is_dir():
        raise FileNotFoundError(f"mask folder {mask_root} not found: make it with {make}")
    missing = missing_masks(records, dataset_root, mask_root)
    n = len(records)
    if missing and len(missing) == n:
        raise ValueError(f"mask folder {mask_root} holds none of the masks of the {n} {split} "
                         f"images (e.g. {missing[0]}): not the masks of {dataset_root}? "
                         f"Make them with {make}")
    if missing and on_missing == "error":
        raise ValueError(f"mask folder {mask_root} lacks the masks of {len(missing)} of the {n} "
                         f"{split} images (first: {missing[0]}): rerun {make} to complete it "
                         f"(it keeps the masks already written), or pass --on-bad-image skip "
                         f"to leave those images out")
    return missing


@dataclass
class MaskStats:
    """What :func:`mask_statistics` found: ``checked`` masks read (``unreadable`` more could
    not be), the share ``empty`` of empty masks and ``visible[k]``, the share of masks in which
    part ``k`` is labelled visible."""

    checked: int
    empty: float
    visible: Tensor
    unreadable: int = 0

    def __str__(self) -> str:
        parts = " ".join(f"{v:.2f}" for v in self.visible.tolist())
        bad = f", {self.unreadable} unreadable" if self.unreadable else ""
        return (f"{self.checked} masks checked{bad}: {100 * self.empty:.1f} % empty; share "
                f"in which each part is visible: [{parts}]")

    def verdict(self) -> tuple[str | None, bool]:
        """``(problem, refuse)``: what looks wrong (``None``: nothing) and whether it is bad
        enough to refuse training (thresholds in the module docstring)."""
        least = float(self.visible.min()) if self.checked else 0.0
        refuse = self.checked == 0 or self.empty > EMPTY_REFUSE or least < PART_REFUSE
        if not (refuse or self.empty > EMPTY_WARN or least < PART_WARN):
            return None, False
        if self.checked == 0:
            return "no mask could be read", True
        why = []
        if self.empty > EMPTY_WARN:
            why.append(f"{100 * self.empty:.1f} % of the masks are empty (no person found; "
                       f"`orgnn masks --random-weights` writes only empty masks)")
        if least < PART_WARN:
            k = int(self.visible.argmin())
            why.append(f"part {k} is visible in only {100 * least:.1f} % of them")
        return ("; ".join(why) + ": OAN would learn that parts are occluded whatever the "
                "image", refuse)


@torch.no_grad()
def mask_statistics(records: Sequence[tuple[str, int, int]], dataset_root: str | os.PathLike,
                    mask_root: str | os.PathLike, height: int = 384, width: int = 128,
                    tau: float = 0.5, sample: int = 512, workers: int = 0,
                    on_bad_image: str = "error", batch_size: int = 64) -> MaskStats:
    """Empty-mask share and per-part visible share over ``sample`` evenly spaced masks.

    Args:
        records: ``(path, pid, camid)`` of the split's images.
        height, width, tau: as in training (masks resized, then labelled with threshold tau).
        sample: masks read at most (evenly spaced over ``records``; all when fewer).
        on_bad_image: ``"error"``: an unreadable or missing mask raises
            :class:`orgnn.reid.io.BadImageError`; ``"skip"``: it is counted as unreadable.

    Shapes:
        visible: ``(6,)``.
    """
    from orgnn.reid.data import ImageSet, collate

    n = len(records)
    take = np.unique(np.linspace(0, n - 1, min(n, sample)).round().astype(int)) if n else []
    ds = ImageSet([records[i] for i in take], height, width, train=False, load_image=False,
                  mask_root=mask_root, dataset_root=dataset_root, tau=tau,
                  on_bad_image=on_bad_image)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate)
    empty, visible, checked, unreadable = 0, torch.zeros(6), 0, 0
    for batch in loader:
        unreadable += len(batch["bad"])
        if not batch["size"]:
            continue
        empty += int((batch["mask"].flatten(1).amax(1) == 0).sum())
        visible += batch["part_labels"].sum(0)
        checked += batch["size"]
    share = max(checked, 1)
    return MaskStats(checked, empty / share, visible / share, unreadable)
