"""A validation protocol carved out of the training identities, for choosing defaults and
epochs without touching the test split.

:func:`validation_split` holds out a seeded share of the training *identities*. Their
images form a small retrieval protocol shaped like the test one: each held-out identity
gives up to ``queries_per_id`` query images from one camera, occluded ones first (a part
below the visibility threshold), and all its other images go to the gallery. Evaluation is
Market-1501 style as usual (same identity and camera dropped), so the query's other camera
holds its true matches. The remaining identities are the training split of the protocol.

With ``clean`` (the same training rows without occluders, e.g. ``clean/train.npz``) the
protocol mirrors an Occluded-Duke-like test split instead of inheriting the training split's
occlusion rate (about 50 % on cuhk03-parts, where the test gallery is 10 % occluded):
queries are occluded images only, and the gallery takes the clean version of each image
except for a seeded share ``gallery_occlusion`` (default 0.1) of occluded ones. The
training part then carries ``clean_features``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from orgnn.io.features import PartFeatures

__all__ = ["validation_split"]


def validation_split(train: PartFeatures, fraction: float = 0.25, seed: int = 0,
                     queries_per_id: int = 2, clean: PartFeatures | None = None,
                     gallery_occlusion: float = 0.1) -> dict[str, PartFeatures]:
    """``{"train", "query", "gallery"}`` built from ``train`` alone (see the module doc).

    Args:
        train: the training split, with identities and cameras.
        fraction: share of the training identities held out, in ``(0, 1)``.
        seed: seed of the identity draw and of each identity's query camera.
        queries_per_id: query images per held-out identity (>= 1).
        clean: the same rows as ``train`` without occluders; mirrors the test protocol
            (occluded queries only, a gallery occluded at ``gallery_occlusion``).
        gallery_occlusion: share of occluded gallery images, in ``[0, 1]`` (with ``clean``).

    Returns:
        The three splits; no identity is in both ``train`` and the held-out pair.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must lie in (0, 1), got {fraction!r}")
    if isinstance(queries_per_id, bool) or int(queries_per_id) < 1:
        raise ValueError(f"queries_per_id must be an integer >= 1, got {queries_per_id!r}")
    if clean is not None:
        _check_same_rows(train, clean)
        if not 0 <= gallery_occlusion <= 1:
            raise ValueError(f"gallery_occlusion must lie in [0, 1], got {gallery_occlusion!r}")
    pids = np.asarray(train.pids)
    camids = np.asarray(train.camids)
    ids = np.unique(pids)
    held_count = int(round(fraction * len(ids)))
    if held_count < 2 or held_count > len(ids) - 2:
        raise ValueError(f"a validation fraction of {fraction} of {len(ids)} training "
                         "identities leaves fewer than 2 on one side; use more identities "
                         "or another fraction")
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(ids, size=held_count, replace=False))
    in_held = np.isin(pids, held)

    rows = np.flatnonzero(in_held)
    group = np.unique(pids[rows], return_inverse=True)[1]            # identity of each row
    occluded = (np.asarray(train.visibility)[rows] < 1).any(axis=1)
    cams = camids[rows]
    key = rng.random(len(rows))
    # Each held-out identity's query camera: that of one of its images drawn at random.
    by_key = np.lexsort((key, group))
    first = by_key[np.r_[True, group[by_key][1:] != group[by_key][:-1]]]
    in_cam = cams == cams[first][group]
    # Within an identity: the query camera's images first, occluded ones first, then random.
    ranked = np.lexsort((key, ~occluded, ~in_cam, group))
    starts = np.flatnonzero(np.r_[True, group[ranked][1:] != group[ranked][:-1]])
    position = np.arange(len(ranked)) - np.repeat(starts, np.diff(np.r_[starts, len(ranked)]))
    is_query = (position < queries_per_id) & in_cam[ranked]
    if clean is not None:               # occluded queries only: the test protocol's
        is_query &= occluded[ranked]
    ranked_rows = rows[ranked]
    query_rows = np.sort(ranked_rows[is_query])
    gallery_rows = np.sort(ranked_rows[~is_query])
    train_rows = np.flatnonzero(~in_held)
    if clean is None:
        return {"train": train.subset(train_rows),
                "query": train.subset(query_rows), "gallery": train.subset(gallery_rows)}
    # Gallery: clean images, except a seeded share drawn among the occluded versions.
    occludable = gallery_rows[(np.asarray(train.visibility)[gallery_rows] < 1).any(1)]
    wanted = min(len(occludable), int(round(gallery_occlusion * len(gallery_rows))))
    use_occluded = np.isin(gallery_rows, rng.choice(occludable, wanted, replace=False))
    gallery = clean.subset(gallery_rows)
    occ = train.subset(gallery_rows)
    gallery = dataclasses.replace(
        gallery, features=np.where(use_occluded[:, None, None], occ.features, gallery.features),
        visibility=np.where(use_occluded[:, None], occ.visibility, gallery.visibility))
    fit = dataclasses.replace(train.subset(train_rows),
                              clean_features=np.asarray(clean.features)[train_rows])
    return {"train": fit, "query": train.subset(query_rows), "gallery": gallery}


def _check_same_rows(train: PartFeatures, clean: PartFeatures) -> None:
    """``clean`` must hold ``train``'s images, in the same order."""
    same = (clean.num_images == train.num_images and clean.features.shape == train.features.shape
            and np.array_equal(clean.pids, train.pids)
            and np.array_equal(clean.camids, train.camids)
            and (train.paths is None or clean.paths is None
                 or np.array_equal(clean.paths, train.paths)))
    if not same:
        raise ValueError("validation_split: clean must hold the training split's images in the "
                         "same order (same shape, identities, cameras and paths)")
