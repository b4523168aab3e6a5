"""A synthetic occluded person Re-ID world, in the part-feature format (SPEC §7).

The generator imitates FEN part features of real pedestrian crops and the occlusion protocol of
``data/mini-mars-parts`` (see that folder's README). It is numpy only, vectorised over images
(no Python loop over images) and fully determined by ``seed`` (:func:`numpy.random.default_rng`).

Identities
    Each identity owns a prototype per part (M x D): ``sqrt(cluster_share)`` times the centre of
    its "outfit" cluster (``num_clusters`` clusters; people in one cluster dress alike and are
    the hard negatives) plus ``sqrt(1 - cluster_share)`` times its own component. With
    ``outfit_coherence < 1`` each part follows the outfit cluster only with that probability
    (and a random cluster otherwise), so look-alikes agree on some parts only. Each identity
    is seen by ``cameras_per_id`` of the ``num_cameras`` cameras and has a viewpoint component
    per camera (how it looks from there), so images of one identity in one camera are near
    duplicates (like the frames of a tracklet) while cross-camera matches are harder.

Images
    The pre-activation of part k of an image of identity p seen by camera c is

    ``z = mean_level * b_k + proto[p, k] + camera_shift * cam[c, k] + view * view[p, c, k]
    + pose * (u @ B)[k] + noise * eps``

    with ``b_k`` a positive vector shared by everybody (the generic "a person is here"
    response), ``cam`` a per-camera shift, ``u @ B`` a per-image nuisance in a
    ``pose_rank``-dimensional subspace shared by all images (pose, background, lighting: unlike
    isotropic noise it does not average away over the D dimensions) and ``eps`` isotropic noise.
    The feature is ``relu(z)``: non-negative like pooled post-ReLU CNN features, with a large
    shared positive component. With the defaults the mean cosine similarity of two part features
    is about 0.64 between identities and 0.8 within one (0.85-0.95 within one camera).

Part geometry
    With ``num_parts=6`` (the FEN layout) parts 0-3 are horizontal stripes from top to bottom and
    parts 4-5 the left and right halves of the crop. Any other ``num_parts`` gives that many
    horizontal stripes. Boxes are in unit crop coordinates, see :func:`part_boxes`.

Occlusion
    An occluded image gets a band covering a fraction ``U(*band_range)`` = U(0.25, 0.5) of the
    crop from the bottom (probability 0.4), top, left or right (0.2 each). Each part's
    ``visibility`` is the fraction of its region left uncovered, computed geometrically
    (:func:`band_visibility`); e.g. a bottom band of 50% leaves stripes 0-1 fully visible,
    stripes 2-3 at 0 and both halves at 0.5. A part counts as visible when visibility >= 0.5.
    The occluded part feature is

    ``relu(v * clean + (1 - v) * occluder + local_noise * sqrt(v * (1 - v)) * eps)``

    where the occluder's part feature is, with probability ``other_person_fraction`` (0.6), the
    same part of another person (a fresh image of a random other identity of the same split, or
    with probability ``bystander_fraction`` of a person outside the data set) and otherwise the
    same part of one of ``num_occluders`` shared occluder prototypes (cars, poles, bags: around
    the same shared mean, with per-instance variation ``occluder_variation``). The last term
    models that each side of the band is pooled over a smaller area, so less spatial noise
    averages out; it vanishes for v = 0 or 1. Without it every mixture is pulled towards the
    shared mean and occluded images become "hubs", close to every other occluded image (wrong
    top-1 matches were 78% occluded gallery items against 47% on the real proxy); with it
    occluded features are, as on the real proxy, slightly less similar to others than clean
    ones. ``local_noise=0`` gives the plain linear mix. ``clean_features`` keeps the unoccluded
    features of every split.

Splits (Occluded-DukeMTMC-like by default)
    ``train`` uses ``num_train_ids`` identities (labels ``0 .. num_train_ids - 1``) with
    ``train_occluded_fraction`` (0.5) of its images occluded. ``query`` and ``gallery`` use the
    disjoint ``num_test_ids`` test identities (labels from ``num_train_ids`` on); queries come
    from the first ``num_query_ids`` of them, the others are gallery-only distractors. All
    queries are occluded (``query_occluded_fraction=1``), about 10% of the gallery is
    (``gallery_occluded_fraction=0.1``); the occluded images are exactly
    ``round(fraction * N)`` chosen at random. All queries of an identity come from its first
    camera and its first gallery image from its second, so every query has a true match under
    the Market-1501 protocol (which drops same-identity same-camera gallery items); its other
    gallery images come from any of its cameras. ``query_camera`` / ``gallery_camera`` pin every
    query / gallery image to one camera (the Occluded-REID protocol: query camera 0, gallery
    camera 1). Images are ordered by identity, like the files of a real data set, and sizes per
    identity vary moderately. ``paths`` is ``None``.

Presets (:func:`synthetic_preset`; arguments in :data:`PRESETS`)
    ``tiny`` (unit tests), ``demo`` (``orgnn demo``: a few hundred images per split, so a full
    ablation trains in a minute or two), and the sizes of ``occluded_duke``, ``occluded_reid``
    (test identities only: a Market-1501-sized train split with the 50% synthetic-occlusion
    augmentation stands in for the Market-1501 training set of that protocol) and
    ``market1501`` (no occlusion anywhere). A larger gallery holds more hard negatives, so the
    three large presets lower ``cluster_share`` to 0.5 to keep a clean rank-1 of about 85-90.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from orgnn.io.features import PartFeatures

__all__ = [
    "SIDES",
    "SIDE_PROBS",
    "PRESETS",
    "synthetic",
    "synthetic_preset",
    "part_boxes",
    "band_boxes",
    "band_visibility",
]

#: Occluder band sides, in the order used by ``side`` codes.
SIDES = ("bottom", "top", "left", "right")
#: Default probability of each side in :data:`SIDES`.
SIDE_PROBS = (0.4, 0.2, 0.2, 0.2)

#: Keyword arguments of :func:`synthetic` for each preset.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_train_ids=12, num_test_ids=12, images_per_id=6, queries_per_id=2),
    "demo": dict(num_train_ids=30, num_test_ids=30, images_per_id=16, queries_per_id=5),
    "occluded_duke": dict(num_train_ids=702, num_train=15_618, num_test_ids=1_110,
                          num_query_ids=519, num_query=2_210, num_gallery=17_661,
                          num_cameras=8, cluster_share=0.5),
    "occluded_reid": dict(num_train_ids=751, num_train=12_936, num_test_ids=200,
                          num_query=1_000, num_gallery=1_000, num_cameras=2,
                          query_camera=0, gallery_camera=1, gallery_occluded_fraction=0.0,
                          cluster_share=0.5),
    "market1501": dict(num_train_ids=751, num_train=12_936, num_test_ids=750,
                       num_query=3_368, num_gallery=15_913, num_cameras=6,
                       query_occluded_fraction=0.0, gallery_occluded_fraction=0.0,
                       train_occluded_fraction=0.0, cluster_share=0.5),
}

# --------------------------------------------------------------------------- geometry
def part_boxes(num_parts: int = 6) -> np.ndarray:
    """(M, 4) part regions ``(top, bottom, left, right)`` in unit crop coordinates.

    Six parts: four horizontal stripes top to bottom, then the left and right halves.
    Any other number: that many horizontal stripes.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    stripes = 4 if num_parts == 6 else num_parts
    edges = np.linspace(0.0, 1.0, stripes + 1)
    boxes = [(edges[i], edges[i + 1], 0.0, 1.0) for i in range(stripes)]
    if num_parts == 6:
        boxes += [(0.0, 1.0, 0.0, 0.5), (0.0, 1.0, 0.5, 1.0)]
    return np.asarray(boxes, dtype=np.float64)


def band_boxes(side: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    """(N, 4) occluder bands ``(top, bottom, left, right)`` for side codes (index into
    :data:`SIDES`) and covered fractions of the crop."""
    side = np.asarray(side, dtype=np.int64).reshape(-1)
    f = np.broadcast_to(np.asarray(fraction, dtype=np.float64).reshape(-1), side.shape)
    if np.any((side < 0) | (side >= len(SIDES))):
        raise ValueError(f"side codes must be in 0..{len(SIDES) - 1} ({', '.join(SIDES)})")
    zeros, ones = np.zeros_like(f), np.ones_like(f)
    top = np.select([side == 0], [1.0 - f], zeros)
    bottom = np.select([side == 1], [f], ones)
    left = np.select([side == 3], [1.0 - f], zeros)
    right = np.select([side == 2], [f], ones)
    return np.stack([top, bottom, left, right], axis=1)


def band_visibility(side: np.ndarray | int, fraction: np.ndarray | float,
                    num_parts: int = 6) -> np.ndarray:
    """(N, M) float32: the fraction of each part's region that an occluder band leaves uncovered.

    ``side`` is a code or array of codes into :data:`SIDES` (0 bottom, 1 top, 2 left, 3 right),
    ``fraction`` the share of the crop the band covers (from that side).
    """
    bands = band_boxes(np.atleast_1d(side), np.atleast_1d(fraction))[:, None, :]  # (N, 1, 4)
    parts = part_boxes(num_parts)[None, :, :]  # (1, M, 4)
    height = np.minimum(bands[..., 1], parts[..., 1]) - np.maximum(bands[..., 0], parts[..., 0])
    width = np.minimum(bands[..., 3], parts[..., 3]) - np.maximum(bands[..., 2], parts[..., 2])
    covered = np.clip(height, 0, None) * np.clip(width, 0, None)
    area = (parts[..., 1] - parts[..., 0]) * (parts[..., 3] - parts[..., 2])
    return np.clip(1.0 - covered / area, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- the world
class _World:
    """Shared latent structure: base response, identities, cameras, pose basis, occluders."""

    def __init__(self, rng: np.random.Generator, num_ids: int, num_cameras: int,
                 num_parts: int, dim: int, num_clusters: int, cluster_share: float,
                 pose_rank: int, num_occluders: int, cameras_per_id: int,
                 outfit_coherence: float) -> None:
        self.num_cameras = num_cameras
        self.per_id = max(2, min(cameras_per_id, num_cameras))
        m, d = num_parts, dim
        self.shape = (m, d)
        self.base = np.abs(rng.standard_normal((m, d), dtype=np.float32)) + 0.5
        centres = rng.standard_normal((num_clusters, m, d), dtype=np.float32)
        # each part follows the identity's outfit cluster with probability outfit_coherence,
        # otherwise a cluster of its own: look-alikes agree on some parts, not on all
        outfit = rng.integers(0, num_clusters, size=(num_ids, 1))
        own_cluster = rng.integers(0, num_clusters, size=(num_ids, m))
        cluster = np.where(rng.random((num_ids, m)) < outfit_coherence, outfit, own_cluster)
        own = rng.standard_normal((num_ids, m, d), dtype=np.float32)
        share = np.float32(cluster_share)
        self.protos = (np.sqrt(share) * centres[cluster, np.arange(m)]
                       + np.sqrt(1 - share) * own)
        self.cams = rng.standard_normal((num_cameras, m, d), dtype=np.float32)
        basis = rng.standard_normal((pose_rank, m * d), dtype=np.float32)
        self.pose_basis = basis / np.float32(np.sqrt(max(pose_rank, 1)))
        # each identity walks past a few cameras and looks different in each (viewpoint)
        self.seen_by = np.argsort(rng.random((num_ids, num_cameras)), axis=1)[:, :self.per_id]
        self.views = rng.standard_normal((num_ids, self.per_id, m, d), dtype=np.float32)
        self.occluders = rng.standard_normal((max(num_occluders, 1), m, d), dtype=np.float32)

    def render(self, rng: np.random.Generator, ids: np.ndarray, slots: np.ndarray,
               mean_level: float, camera_shift: float, view: float, pose: float,
               noise: float) -> np.ndarray:
        """(N, M, D) float32 clean features of identities ``ids`` seen by their camera ``slots``
        (index into ``seen_by[ids]``)."""
        n = ids.shape[0]
        m, d = self.shape
        z = rng.standard_normal((n, m, d), dtype=np.float32)
        z *= np.float32(noise)
        z += self.protos[ids]
        z += np.float32(mean_level) * self.base
        if camera_shift:
            z += np.float32(camera_shift) * self.cams[self.seen_by[ids, slots]]
        if view:
            z += np.float32(view) * self.views[ids, slots]
        if pose and self.pose_basis.shape[0]:
            coef = rng.standard_normal((n, self.pose_basis.shape[0]), dtype=np.float32)
            coef *= np.float32(pose)
            z += (coef @ self.pose_basis).reshape(n, m, d)
        np.maximum(z, 0, out=z)
        return z

    def render_occluders(self, rng: np.random.Generator, which: np.ndarray, mean_level: float,
                         noise: float) -> np.ndarray:
        """(N, M, D) float32 features of occluder prototypes ``which``; ``noise`` is the
        per-instance variation (two cars are alike, not identical)."""
        n = which.shape[0]
        m, d = self.shape
        z = rng.standard_normal((n, m, d), dtype=np.float32)
        z *= np.float32(noise)
        z += self.occluders[which]
        z += np.float32(mean_level) * self.base
        np.maximum(z, 0, out=z)
        return z


def _counts(total: int, num_ids: int, minimum: int, rng: np.random.Generator,
            what: str) -> np.ndarray:
    """Images per identity: at least ``minimum`` each, ``total`` in all, moderately uneven."""
    if num_ids < 1:
        raise ValueError(f"{what}: need at least one identity")
    if total < num_ids * minimum:
        raise ValueError(f"{what}: {total} images cannot give {num_ids} identities "
                         f"{minimum} each")
    weights = rng.gamma(4.0, size=num_ids)
    return minimum + rng.multinomial(total - num_ids * minimum, weights / weights.sum())


def _choose(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    """(n,) bool with exactly ``round(fraction * n)`` True entries at random places."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"occluded fractions must be in [0, 1], got {fraction}")
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: int(round(fraction * n))]] = True
    return mask


def synthetic(
    num_train_ids: int = 12,
    num_test_ids: int = 12,
    images_per_id: int = 6,
    *,
    num_cameras: int = 6,
    cameras_per_id: int = 3,
    num_parts: int = 6,
    dim: int = 256,
    num_query: int | None = None,
    num_query_ids: int | None = None,
    queries_per_id: int = 2,
    num_train: int | None = None,
    num_gallery: int | None = None,
    query_occluded_fraction: float = 1.0,
    gallery_occluded_fraction: float = 0.1,
    train_occluded_fraction: float = 0.5,
    noise: float = 0.3,
    view: float = 1.2,
    pose: float = 0.5,
    camera_shift: float = 0.5,
    mean_level: float = 1.2,
    num_clusters: int = 8,
    cluster_share: float = 0.62,
    outfit_coherence: float = 1.0,
    pose_rank: int = 8,
    num_occluders: int = 8,
    other_person_fraction: float = 0.6,
    occluder_variation: float = 1.5,
    bystander_fraction: float = 0.5,
    local_noise: float = 2.0,
    band_range: tuple[float, float] = (0.25, 0.5),
    side_probs: tuple[float, ...] = SIDE_PROBS,
    query_camera: int | None = None,
    gallery_camera: int | None = None,
    seed: int = 0,
) -> dict[str, PartFeatures]:
    """Generate ``{"train", "query", "gallery"}`` part features of a synthetic occluded world.

    See the module docstring for the model. ``images_per_id`` sets the default split sizes
    (``num_train = num_train_ids * images_per_id``, ``num_gallery = num_test_ids *
    images_per_id``); ``num_query`` defaults to ``num_query_ids * queries_per_id`` and
    ``num_query_ids`` to ``num_test_ids``. Features are float32 (N, M, D), visibility float32,
    pids and camids int64; ``clean_features`` holds the unoccluded features of every image.
    """
    rng = np.random.default_rng(seed)
    num_query_ids = num_test_ids if num_query_ids is None else num_query_ids
    if not 1 <= num_query_ids <= num_test_ids:
        raise ValueError(f"num_query_ids must be in 1..num_test_ids, got {num_query_ids}")
    num_train = num_train_ids * images_per_id if num_train is None else num_train
    num_gallery = num_test_ids * images_per_id if num_gallery is None else num_gallery
    num_query = num_query_ids * queries_per_id if num_query is None else num_query
    fixed = query_camera is not None and gallery_camera is not None
    if num_cameras < 1 or (num_cameras < 2 and not (fixed and query_camera != gallery_camera)):
        raise ValueError("need at least 2 cameras so that queries have cross-camera matches")
    if fixed and query_camera == gallery_camera:
        raise ValueError("query_camera and gallery_camera must differ")
    for name, cam in (("query_camera", query_camera), ("gallery_camera", gallery_camera)):
        if cam is not None and not 0 <= cam < num_cameras:
            raise ValueError(f"{name}={cam} is not a camera in 0..{num_cameras - 1}")
    lo, hi = band_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"band_range must satisfy 0 <= low <= high <= 1, got {band_range}")
    probs = np.asarray(side_probs, dtype=np.float64)
    if probs.shape != (len(SIDES),) or np.any(probs < 0) or probs.sum() <= 0:
        raise ValueError(f"side_probs needs {len(SIDES)} non-negative weights ({SIDES})")
    probs = probs / probs.sum()

    num_bystanders = max(8, num_test_ids) if bystander_fraction > 0 else 0
    bystanders = np.arange(num_train_ids + num_test_ids,
                           num_train_ids + num_test_ids + num_bystanders)
    world = _World(rng, num_train_ids + num_test_ids + num_bystanders, num_cameras, num_parts,
                   dim, num_clusters, cluster_share, pose_rank, num_occluders, cameras_per_id,
                   outfit_coherence)
    style = dict(mean_level=mean_level, camera_shift=camera_shift, view=view, pose=pose,
                 noise=noise)
    train_pool = np.arange(num_train_ids)
    test_pool = np.arange(num_train_ids, num_train_ids + num_test_ids)

    # identities and camera slots (index into world.seen_by) of each split: all queries of an
    # identity come from its first camera, its first gallery image from its second
    per_id = world.per_id

    def slots_for(ids: np.ndarray) -> np.ndarray:
        return rng.integers(0, per_id, size=ids.shape[0])

    train_ids = np.repeat(train_pool, _counts(num_train, num_train_ids,
                                              min(2, num_train // num_train_ids), rng, "train"))
    train_slots = slots_for(train_ids)
    query_pool = test_pool[:num_query_ids]
    query_ids = np.repeat(query_pool, _counts(num_query, num_query_ids, 1, rng, "query"))
    query_slots = np.zeros(num_query, dtype=np.int64)
    gallery_ids = np.repeat(test_pool, _counts(num_gallery, num_test_ids, 1, rng, "gallery"))
    gallery_slots = slots_for(gallery_ids)
    gallery_slots[np.flatnonzero(np.r_[True, gallery_ids[1:] != gallery_ids[:-1]])] = 1
    if query_camera is not None or gallery_camera is not None:
        # pinned cameras: the first camera slot of every test identity is the query camera,
        # the second the gallery camera
        q = query_camera if query_camera is not None else (gallery_camera + 1) % num_cameras
        g = gallery_camera if gallery_camera is not None else (query_camera + 1) % num_cameras
        world.seen_by[test_pool, 0], world.seen_by[test_pool, 1] = q, g
        if query_camera is not None:
            query_slots[:] = 0
        if gallery_camera is not None:
            gallery_slots[:] = 1

    out: dict[str, PartFeatures] = {}
    for split, ids, slots, fraction, pool in (
        ("train", train_ids, train_slots, train_occluded_fraction, train_pool),
        ("query", query_ids, query_slots, query_occluded_fraction, test_pool),
        ("gallery", gallery_ids, gallery_slots, gallery_occluded_fraction, test_pool),
    ):
        clean = world.render(rng, ids, slots, **style)
        features = clean.copy()
        visibility = np.ones(clean.shape[:2], dtype=np.float32)
        occluded = np.flatnonzero(_choose(rng, ids.shape[0], fraction))
        if occluded.size:
            n_occ = occluded.size
            side = rng.choice(len(SIDES), size=n_occ, p=probs)
            vis = band_visibility(side, rng.uniform(lo, hi, size=n_occ), num_parts)
            occluder = np.empty((n_occ, num_parts, dim), dtype=np.float32)
            person = rng.random(n_occ) < other_person_fraction
            k = int(person.sum())
            if k:
                # a random other identity of the same split's pool (never the image's own)
                own = np.searchsorted(pool, ids[occluded[person]])
                other = pool[(own + rng.integers(1, max(pool.size, 2), size=k)) % pool.size]
                if num_bystanders:
                    outsider = rng.random(k) < bystander_fraction
                    other[outsider] = rng.choice(bystanders, size=int(outsider.sum()))
                occluder[person] = world.render(rng, other, slots_for(other), **style)
            if n_occ - k:
                which = rng.integers(0, world.occluders.shape[0], size=n_occ - k)
                occluder[~person] = world.render_occluders(rng, which, mean_level,
                                                           occluder_variation)
            v = vis[..., None]
            mixed = v * clean[occluded] + (1.0 - v) * occluder
            if local_noise:
                # each side of the band is pooled over a smaller area, so less noise averages out
                eps = rng.standard_normal(mixed.shape, dtype=np.float32)
                mixed += np.float32(local_noise) * np.sqrt(v * (1.0 - v)) * eps
                np.maximum(mixed, 0, out=mixed)
            features[occluded] = mixed
            visibility[occluded] = vis
        out[split] = PartFeatures(
            features=features,
            visibility=visibility,
            pids=ids.astype(np.int64),
            camids=world.seen_by[ids, slots].astype(np.int64),
            clean_features=clean,
        )
    return out


def synthetic_preset(name: str, seed: int = 0, **overrides: Any) -> dict[str, PartFeatures]:
    """Generate a named preset (see :data:`PRESETS`); ``overrides`` replace its arguments."""
    try:
        kwargs = dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown synthetic preset {name!r}; choose from "
                         f"{', '.join(PRESETS)}") from None
    kwargs.update(overrides)
    return synthetic(seed=seed, **kwargs)
