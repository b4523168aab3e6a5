"""Images (+ masks) → part-feature files (SPEC §7): what the reconstruction side reads.

For every image of each split: the FEN's 6 part features ``(6, 256)`` (eval mode, 384×128 by
default) and a visibility per part:

* ``visibility="oan"`` (default when an OAN checkpoint is given): the OAN's sigmoid outputs on
  the image's person mask;
* ``"ones"`` (default without OAN): every part visible, 1.0;
* ``"occluder"``: with synthetic occlusion, the fraction of each part the occluder leaves
  uncovered (1.0 for images left clean); the ground-truth visibility of the mini-mars proxy.

With ``occlude_prob > 0`` the images of ``occlude_splits`` are covered by a synthetic occluder
(drawn from ``(seed, index)``, so reruns give the same set) and ``clean_features`` holds the
features of the same images without it. Files are written atomically by
:func:`orgnn.io.features.save_part_features`; ``paths`` are relative to the dataset folder.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["extract", "extract_split", "VISIBILITY_CHOICES"]

VISIBILITY_CHOICES = ("oan", "ones", "occluder")


@torch.no_grad()
def extract_split(records, fen, dataset_root, oan=None, mask_dir=None, height: int = 384,
                  width: int = 128, batch_size: int = 64, device="cpu", workers: int = 0,
                  visibility: str = "ones", occlude_prob: float = 0.0, seed: int = 0,
                  on_bad_image: str = "error", amp: bool = True, progress: bool = True,
                  desc: str = "extract", log=print):
    """Part features of one split; returns ``(PartFeatures, skipped paths, images/s)``."""
    from tqdm import tqdm

    from orgnn.io.features import PartFeatures
    from orgnn.reid.data import ImageSet, collate

    if visibility not in VISIBILITY_CHOICES:
        raise ValueError(f"visibility must be one of {VISIBILITY_CHOICES}, got {visibility!r}")
    if visibility == "oan" and (oan is None or mask_dir is None):
        raise ValueError("visibility 'oan' needs an OAN checkpoint (--oan) and masks "
                         "(--mask-dir)")
    if visibility == "occluder" and occlude_prob <= 0:
        raise ValueError("visibility 'occluder' needs synthetic occlusion (--occlude-prob > 0)")
    if not records:
        raise ValueError(f"{desc}: no images to extract")
    device = torch.device(device)
    use_mask = visibility == "oan"
    ds = ImageSet(records, height, width, train=False, occlude_prob=occlude_prob,
                  deterministic_occlusion=True, keep_clean=occlude_prob > 0, seed=seed,
                  on_bad_image=on_bad_image,
                  **(dict(mask_root=mask_dir, dataset_root=dataset_root) if use_mask else {}))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=collate,
                                         pin_memory=device.type == "cuda")
    fen = fen.to(device).eval()
    if use_mask:
        oan = oan.to(device).eval()
    use_amp = amp and device.type == "cuda"
    feats, clean, vis, index, skipped = [], [], [], [], []
    t0, n = time.perf_counter(), 0
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        for msg in batch["bad"]:
            skipped.append(msg)
            log(f"skipped {msg}")
        if not batch["size"]:
            continue
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            feats.append(fen(batch["image"].to(device)).float().cpu())
            if occlude_prob > 0:
                clean.append(fen(batch["clean_image"].to(device)).float().cpu())
            if use_mask:
                vis.append(oan.visibility(batch["mask"].to(device)).float().cpu())
            elif visibility == "occluder":
                vis.append(batch["uncovered"].float())
            else:
                vis.append(torch.ones(batch["size"], fen.num_parts))
        index.append(batch["index"])
        n += batch["size"]
    elapsed = time.perf_counter() - t0
    if not index:
        raise ValueError(f"{desc}: every image was unreadable; nothing to write")
    idx = torch.cat(index).numpy()
    root = Path(dataset_root)
    pf = PartFeatures(
        features=torch.cat(feats).numpy().astype(np.float32),
        visibility=torch.cat(vis).clamp(0, 1).numpy().astype(np.float32),
        pids=np.array([records[i][1] for i in idx], dtype=np.int64),
        camids=np.array([records[i][2] for i in idx], dtype=np.int64),
        paths=np.array([os.path.relpath(records[i][0], root) for i in idx], dtype=str),
        clean_features=torch.cat(clean).numpy().astype(np.float32) if clean else None,
    )
    return pf, skipped, (n / elapsed if elapsed > 0 else 0.0)


def extract(dataset: str, dataset_dir: str | os.PathLike, fen_checkpoint: str | os.PathLike,
            out: str | os.PathLike, oan_checkpoint: str | os.PathLike | None = None,
            mask_dir: str | os.PathLike | None = None, splits: Sequence[str] | None = None,
            visibility: str | None = None, occlude_prob: float = 0.0,
            occlude_splits: Sequence[str] = ("query",), height: int = 384, width: int = 128,
            batch_size: int = 64, device: str = "auto", workers: int = 4, seed: int = 0,
            on_bad_image: str = "error", amp: bool = True, progress: bool = True,
            log=print) -> dict:
    """Write ``OUT/{split}.npz`` for each split of a dataset; returns a summary per split."""
    from orgnn.io.features import save_part_features
    from orgnn.reid.datasets import build_dataset
    from orgnn.reid.engine import load_model, resolve_device

    ds = build_dataset(dataset, dataset_dir)
    if visibility is None:
        visibility = "oan" if oan_checkpoint is not None else "ones"
    if splits is None:
        splits = [s for s in ("train", "query", "gallery") if ds.split(s)]
    if visibility == "oan" and mask_dir is not None:  # every split's masks, before any work
        from orgnn.reid.mask_checks import check_mask_folder

        for split in splits:
            missing = check_mask_folder(ds.split(split), ds.root, mask_dir, on_bad_image, split)
            if missing:
                log(f"{split}: {len(missing)} of {len(ds.split(split))} images have no mask in "
                    f"{mask_dir}; they are left out")
    fen = load_model(fen_checkpoint, "fen")
    oan = load_model(oan_checkpoint, "oan") if oan_checkpoint is not None else None
    dev = resolve_device(device)
    out = Path(out)
    summary = {}
    for split in splits:
        records = ds.split(split)
        if not records:
            raise ValueError(f"{dataset}: split {split!r} is empty in {dataset_dir}")
        prob = occlude_prob if split in occlude_splits else 0.0
        pf, skipped, speed = extract_split(
            records, fen, ds.root, oan, mask_dir, height, width, batch_size, dev, workers,
            visibility if (visibility != "occluder" or prob > 0) else "ones", prob, seed,
            on_bad_image, amp, progress, desc=f"extract {split}", log=log)
        path = out / f"{split}.npz"
        save_part_features(path, pf)
        summary[split] = {"path": str(path), "images": len(pf.pids), "skipped": skipped,
                          "images_per_s": speed}
        log(f"{split}: {len(pf.pids)} images -> {path} ({speed:.1f} img/s"
            f"{f', {len(skipped)} unreadable skipped' if skipped else ''})")
    return summary
