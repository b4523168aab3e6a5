"""A validation protocol carved out of the training identities, for choosing defaults and
epochs without touching the test split.

:func:`validation_split` holds out a seeded share of the training *identities*. Their
images form a small retrieval protocol shaped like the test one: each held-out identity
gives up to ``queries_per_id`` query images from one camera, occluded ones first (a part
below the visibility threshold), and all its other images go to the gallery. Evaluation is
Market-1501 style as usual (same identity and camera dropped), so the query's other camera
holds its true matches. The remaining identities are the training split of the protocol.
"""
from __future__ import annotations

import numpy as np

from orgnn.features import PartFeatures

__all__ = ["validation_split"]


def validation_split(train: PartFeatures, fraction: float = 0.25, seed: int = 0,
                     queries_per_id: int = 2) -> dict[str, PartFeatures]:
    """``{"train", "query", "gallery"}`` built from ``train`` alone (see the module doc).

    Args:
        train: the training split, with identities and cameras.
        fraction: share of the training identities held out, in ``(0, 1)``.
        seed: seed of the identity draw and of each identity's query camera.
        queries_per_id: query images per held-out identity (>= 1).

    Returns:
        The three splits; no identity is in both ``train`` and the held-out pair.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must lie in (0, 1), got {fraction!r}")
    if isinstance(queries_per_id, bool) or int(queries_per_id) < 1:
        raise ValueError(f"queries_per_id must be an integer >= 1, got {queries_per_id!r}")
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
    occluded = ~train.visible[rows].all(axis=1)
    # Each held-out identity's query camera: drawn among its cameras, seeded.
    key = rng.random(len(rows))
    order = np.lexsort((key, pids[rows]))                     # by identity, shuffled within
    rows, occluded = rows[order], occluded[order]
    first = np.flatnonzero(np.r_[True, pids[rows][1:] != pids[rows][:-1]])
    query_cam = dict(zip(pids[rows[first]].tolist(), camids[rows[first]].tolist()))
    in_cam = camids[rows] == np.array([query_cam[int(p)] for p in pids[rows]])
    # Rank the query camera's images of an identity: occluded first, then at random.
    rank_key = np.lexsort((key[order], ~occluded, ~in_cam, pids[rows]))
    ranked = rows[rank_key]
    starts = np.r_[0, np.flatnonzero(pids[ranked][1:] != pids[ranked][:-1]) + 1]
    position = np.arange(len(ranked)) - np.repeat(starts, np.diff(np.r_[starts, len(ranked)]))
    cam_ok = camids[ranked] == np.array([query_cam[int(p)] for p in pids[ranked]])
    is_query = (position < queries_per_id) & cam_ok
    query_rows = np.sort(ranked[is_query])
    gallery_rows = np.sort(ranked[~is_query])
    return {"train": train.subset(np.flatnonzero(~in_held)),
            "query": train.subset(query_rows), "gallery": train.subset(gallery_rows)}
