"""Do the defaults generalise? The ablation on other protocols built from the real frames of
``shared/data/mini-mars-parts/all-frames.npz``, with the library defaults unchanged.

    python benchmarks/real_protocols.py [--json OUT.json]

Protocols (each one's query, gallery and training images are real frames; "occluded" means the
frame's synthetically occluded version, see the data README):

``occluded-duke``
    the shipped ``occluded/`` split: every query occluded, ~12% of the gallery, ~50% of train.
``occluded-reid``
    every query occluded, the whole gallery clean (Occluded-REID's setting); run with the
    defaults and with SPEC §3's inference setting for that benchmark (K=4, theta=0.8).
``occluded-gallery``
    every query occluded and half the gallery (a seeded draw).
``swapped``
    the roles of the identities swapped: train on the 16 test identities (half of their frames
    occluded) and evaluate on the 16 training identities. Each of those has two tracklets,
    mostly from one camera, so the split is by tracklet (each identity's (camera, tracklet)
    groups alternate between query and gallery) and, as SPEC §5 does for Occluded-REID, the
    query side is camera 0 and the gallery camera 1 (no same-camera exclusion).

Rows: ``baseline``, ``oan``, ``avg``, ``orgnn``, ``upper_bound``, and ``clean`` (the baseline
on the same query and gallery frames without occluders).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from _common import REPO  # noqa: F401  (puts the repository on sys.path)
from real_ablation import data_dir, machine

from orgnn.io.features import PartFeatures, load_split_dir
from orgnn.reconstruction.pipeline import AblationConfig, run_ablation
from orgnn.reconstruction.training import SearchConfig, TrainConfig

ROWS = ("baseline", "oan", "avg", "orgnn", "upper_bound")


def frames_split(frames, split: str, occluded: np.ndarray, rows=None) -> PartFeatures:
    """Frames of ``split`` (``rows`` of them), each occluded where ``occluded`` says."""
    rows = np.arange(len(frames[f"{split}_pid"])) if rows is None else rows
    occ = np.asarray(occluded, dtype=bool)
    feats = np.where(occ[:, None, None], frames[f"{split}_occluded"][rows],
                     frames[f"{split}_clean"][rows])
    vis = np.where(occ[:, None], frames[f"{split}_visibility"][rows], 1.0)
    return PartFeatures(feats.astype(np.float32), vis.astype(np.float32),
                        frames[f"{split}_pid"][rows].astype(np.int64),
                        frames[f"{split}_camid"][rows].astype(np.int64),
                        frames[f"{split}_path"][rows])


def alternate_tracklets(pids: np.ndarray, camids: np.ndarray,
                        tracklets: np.ndarray) -> np.ndarray:
    """True for the query side: each identity's (camera, tracklet) groups, in sorted order,
    alternate query, gallery, query, ..."""
    groups = np.unique(np.stack([pids, camids, tracklets], 1), axis=0)
    is_query = np.zeros(len(pids), dtype=bool)
    for pid in np.unique(groups[:, 0]):
        mine = groups[groups[:, 0] == pid]
        for rank, (_, cam, trk) in enumerate(mine):
            if rank % 2 == 0:
                is_query |= (pids == pid) & (camids == cam) & (tracklets == trk)
    return is_query


def protocols(root: Path, seed: int = 0) -> dict[str, dict[str, PartFeatures]]:
    frames = np.load(root / "all-frames.npz")
    rng = np.random.default_rng(seed)
    n = {s: len(frames[f"{s}_pid"]) for s in ("train", "query", "gallery")}
    shipped = load_split_dir(root / "occluded")
    out = {"occluded-duke": shipped}
    out["occluded-reid"] = {"train": shipped["train"],
                            "query": frames_split(frames, "query", np.ones(n["query"])),
                            "gallery": frames_split(frames, "gallery", np.zeros(n["gallery"]))}
    out["occluded-gallery"] = {"train": shipped["train"], "query": out["occluded-reid"]["query"],
                               "gallery": frames_split(frames, "gallery",
                                                       rng.random(n["gallery"]) < 0.5)}
    # swapped: the test identities train, the training identities are searched
    test_train = {s: frames_split(frames, s, rng.random(n[s]) < 0.5) for s in ("query", "gallery")}
    train = PartFeatures(*(np.concatenate([getattr(test_train["query"], f),
                                           getattr(test_train["gallery"], f)])
                           for f in ("features", "visibility", "pids", "camids", "paths")))
    is_query = alternate_tracklets(frames["train_pid"], frames["train_camid"],
                                   frames["train_tracklet"])
    q_rows, g_rows = np.flatnonzero(is_query), np.flatnonzero(~is_query)
    query = frames_split(frames, "train", np.ones(len(q_rows)), q_rows)
    gallery = frames_split(frames, "train", rng.random(len(g_rows)) < 0.125, g_rows)
    out["swapped"] = {"train": train,
                      "query": dataclasses.replace(query, camids=np.zeros_like(query.camids)),
                      "gallery": dataclasses.replace(gallery,
                                                     camids=np.ones_like(gallery.camids))}
    return out


def clean_copy(split: PartFeatures, root_frames) -> PartFeatures:
    """The same frames without occluders (matched by path)."""
    paths = np.concatenate([root_frames[f"{s}_path"] for s in ("train", "query", "gallery")])
    clean = np.concatenate([root_frames[f"{s}_clean"] for s in ("train", "query", "gallery")])
    where = {p: i for i, p in enumerate(paths)}
    rows = np.array([where[p] for p in split.paths])
    return dataclasses.replace(split, features=clean[rows].astype(np.float32),
                               visibility=np.ones_like(split.visibility))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    from orgnn.cli.commands import DEFAULT_EPOCHS

    root = data_dir()
    frames = np.load(root / "all-frames.npz")
    print(f"$ python benchmarks/real_protocols.py {' '.join(argv or sys.argv[1:])}")
    print(machine())
    results: dict = {"machine": machine(), "epochs": DEFAULT_EPOCHS}
    runs = [(name, splits, SearchConfig()) for name, splits in protocols(root).items()]
    runs.insert(2, ("occluded-reid K=4 theta=0.8", runs[1][1], SearchConfig(k=4, theta=0.8)))
    header = f"{'protocol':<28}" + "".join(f"{r:>13}" for r in (*ROWS, "clean"))
    print(f"\nmAP / rank-1, {DEFAULT_EPOCHS} epochs, defaults otherwise\n{header}")
    for name, splits, search in runs:
        start = time.perf_counter()
        config = AblationConfig(search=search, train=TrainConfig(epochs=DEFAULT_EPOCHS))
        rows = run_ablation(splits, config, rows=ROWS, progress=False).rows
        clean = {s: clean_copy(splits[s], frames) for s in ("query", "gallery")}
        rows["clean"] = run_ablation({**splits, **clean}, config, rows=("baseline",),
                                     progress=False).rows["baseline"]
        results[name] = {"rows": rows, "seconds": round(time.perf_counter() - start, 1),
                         "sizes": {s: len(splits[s]) for s in splits}}
        print(f"{name:<28}" + "".join(f"{rows[r]['mAP']:>6.1f}/{rows[r]['rank1']:<6.1f}"
                                      for r in (*ROWS, "clean")))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
