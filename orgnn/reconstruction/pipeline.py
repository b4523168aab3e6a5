r"""Train -> search -> reconstruct -> evaluate: the paper's ablation (Table 4, SPEC §6).

Retrieval distance between image :math:`a` (query side) and :math:`b` (SPEC §5):

.. math::
    d(a, b) = 1 - \frac{1}{|S_a|} \sum_{k \in S_a} \cos(\mathbf{x}_k(a), \mathbf{x}_k(b))

with :math:`S_a` all parts, or (rows marked "+OAN") only the parts visible in :math:`a`.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from orgnn import distributed
from orgnn.io.features import PartFeatures
from orgnn.nn import ORGNN
from orgnn.reconstruction.calibration import calibrate_theta
from orgnn.reconstruction.graphs import map_dense_batches, plan_graph_batches, row_widths
from orgnn.reconstruction.outliers import prior_weights, score_split
from orgnn.reconstruction.training import SearchConfig, TrainConfig, train_orgnn_once
from orgnn.retrieval import metrics, rerank
from orgnn.retrieval.query_expansion import average_query_expansion, visible_global_feature
from orgnn.retrieval.search import Neighbourhoods, search_neighbourhoods

#: Every row of SPEC §6, in table order.
ABLATION_ROWS = ("baseline", "oan", "gnn", "avg", "oan_gnn", "orgnn",
                 "baseline_rr", "oan_rr", "orgnn_rr", "upper_bound",
                 "vis_global", "vis_global_rr", "aqe", "aqe_rr")
#: The peer rows: what a Re-ID toolbox user runs on the same files (SPEC §6).
PEER_ROWS = ("vis_global", "vis_global_rr", "aqe", "aqe_rr")
METRIC_KEYS = ("mAP", "rank1", "rank5", "rank10", "mINP")


# --------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------
def _normalised(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x,
                        dtype=torch.float32)
    return torch.nn.functional.normalize(t, dim=-1)


@torch.inference_mode()
def part_distance(a: np.ndarray, b: np.ndarray, a_parts: np.ndarray | None = None,
                  chunk_size: int = 4096) -> np.ndarray:
    """``(A, B)`` float32 distances: 1 - mean part cosine over ``a``'s parts ``a_parts``
    (``(A, M)`` bool; all parts when ``None``). One matrix product per chunk of rows."""
    an, bn = _normalised(a), _normalised(b)
    m = an.shape[1]
    b_flat = bn.reshape(bn.shape[0], -1).T.contiguous()
    out = np.empty((an.shape[0], bn.shape[0]), dtype=np.float32)
    weights = None
    if a_parts is not None:
        w = torch.as_tensor(np.asarray(a_parts), dtype=torch.float32)
        weights = w / w.sum(1, keepdim=True).clamp_min(1)
    for start in range(0, an.shape[0], chunk_size):
        rows = an[start:start + chunk_size]
        if weights is None:
            rows = rows / m
        else:
            rows = rows * weights[start:start + chunk_size, :, None]
        out[start:start + chunk_size] = (1 - rows.reshape(rows.shape[0], -1) @ b_flat).numpy()
    return out


def oan_parts(visible: np.ndarray) -> np.ndarray:
    """The parts an "+OAN" distance averages over: the visible ones (all, if none is)."""
    visible = np.asarray(visible, dtype=bool)
    return np.where(visible.any(1, keepdims=True), visible, True)


def rerank_distances(q_feats: np.ndarray, g_feats: np.ndarray, dist: np.ndarray,
                     q_parts: np.ndarray | None = None, g_parts: np.ndarray | None = None,
                     k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                     max_dense_bytes: int | None = None) -> np.ndarray:
    """k-reciprocal re-ranking of ``dist`` ``(Q, G)``: the :func:`part_distance` of part
    features ``(N, M, D)``; global features ``(N, D)`` count as one part.
    :func:`orgnn.retrieval.metrics.re_ranking` on the dense matrices when they fit
    (:func:`orgnn.retrieval.rerank.dense_fits`, ``max_dense_bytes``), else
    :func:`orgnn.retrieval.rerank.re_ranking_features`, which writes its result into
    ``dist``."""
    if np.ndim(q_feats) == 2:
        q_feats, g_feats = q_feats[:, None], g_feats[:, None]
    if rerank.dense_fits(len(q_feats), len(g_feats), max_dense_bytes):
        return metrics.re_ranking(dist, part_distance(q_feats, q_feats, q_parts),
                                  part_distance(g_feats, g_feats, g_parts), k1, k2,
                                  lambda_value)
    return rerank.re_ranking_features(q_feats, g_feats, q_parts, g_parts, k1, k2, lambda_value,
                                      q_g_dist=dist, out=dist)


# --------------------------------------------------------------------------------------
# Reconstruction
# --------------------------------------------------------------------------------------
@torch.inference_mode()
def reconstruct(model: ORGNN, target: np.ndarray, gallery: np.ndarray,
                neighbourhoods: Neighbourhoods | np.ndarray, batch_size: int = 2048,
                device: str | torch.device = "cpu", progress: bool = False,
                target_visibility: np.ndarray | None = None,
                node_weight: np.ndarray | None = None,
                out: np.ndarray | None = None, budget: int | None = None) -> np.ndarray:
    """Reconstruct ``target`` ``(N, M, D)`` from its neighbours in ``gallery`` with the
    OR-GNN, streaming at most ``batch_size`` graphs at a time, each batch padded to its
    widest neighbourhood and sized to ``budget`` bytes (default
    :func:`orgnn.io.storage.memory_budget`;
    :func:`~orgnn.reconstruction.graphs.plan_graph_batches`). Returns ``(N, M, F)`` float32.
    ``target_visibility`` ``(N, M)`` is needed by models with ``target_init="visible"``;
    ``node_weight`` ``(N, 1 + K)`` by models with a learned scorer (:func:`outlier_weights`
    computes it; :func:`reconstruct_split` does all of it). ``out``: an ``(N, M, F)`` array
    (e.g. a writable memory map, :func:`orgnn.io.storage.open_npy`) written batch by batch and
    returned, so the output is never held in memory (under ``torchrun`` the gathered
    result is copied into it). Under ``torchrun`` each rank reconstructs its share and rank
    0 alone receives the whole result: the other ranks get ``None``."""
    index = getattr(neighbourhoods, "index", neighbourhoods)
    if node_weight is None and getattr(model, "scorer", None) is not None:
        raise ValueError("this OR-GNN weighs neighbours with a learned outlier scorer: pass "
                         "node_weight from outlier_weights(), or use reconstruct_split()")
    model = model.to(device).eval()
    if model.target_init != "visible":
        target_visibility = None
    elif target_visibility is None:
        raise ValueError("this OR-GNN starts its targets from their visible parts "
                         "(target_init='visible'): pass target_visibility")
    # Batches sized in bytes at the nodes each really holds (a large K is mostly padding
    # under theta); under torchrun each rank runs whole batches of the single-process plan
    # (same bits), balanced by their cost.
    bounds, widths = plan_graph_batches(row_widths(index), target.shape[1], target.shape[2],
                                        model.hidden_channels, budget, batch_size)
    costs = np.diff(bounds) * widths.astype(np.float64) ** 2

    def run(rows: slice) -> np.ndarray:
        inside = bounds[(bounds >= rows.start) & (bounds <= rows.stop)] - rows.start
        return map_dense_batches(
            model, target[rows], gallery, index[rows], batch_size, device,
            None if target_visibility is None else target_visibility[rows], "reconstruct",
            progress, None if node_weight is None else node_weight[rows],
            None if out is None else out[rows], bounds=inside)

    result = distributed.map_rows(run, target.shape[0], to="main", bounds=bounds, costs=costs)
    if out is None or result is None:
        return result
    if distributed.world_size() > 1:  # each rank wrote its share; copy in the gathered rows
        out[:] = result
    return out


def outlier_weights(model: ORGNN, target: PartFeatures, gallery: PartFeatures,
                    nbrs: Neighbourhoods, gallery_nbrs: Neighbourhoods,
                    search: SearchConfig | None = None, index_cache: dict | None = None
                    ) -> np.ndarray | None:
    """The OR-GNN's prior node weights ``(N, 1 + K)`` for ``target``'s neighbourhoods
    ``nbrs`` in ``gallery``: the model's learned scorer (:mod:`orgnn.reconstruction.outliers`)
    run on them, with ``gallery_nbrs`` the gallery's own neighbourhoods (they feed the overlap
    features; pass ``nbrs`` itself when the target is the gallery). ``search`` and
    ``index_cache``: the search that found them, whose index the scorer's k-th similarities
    reuse. ``None`` for a model without a scorer."""
    scorer = getattr(model, "scorer", None)
    if scorer is None:
        return None
    same = target is gallery
    g_prob, t_prob = score_split(scorer, gallery, gallery_nbrs,
                                 None if same else target, None if same else nbrs,
                                 index=getattr(search, "index", "auto"),
                                 nprobe=getattr(search, "nprobe", None),
                                 device=getattr(search, "device", None),
                                 index_cache=index_cache)
    return prior_weights(g_prob if same else t_prob, scorer.gamma)


def reconstruct_split(model: ORGNN, target: PartFeatures, gallery: PartFeatures,
                      search: SearchConfig, *, same_split: bool, batch_size: int = 2048,
                      device: str | torch.device = "cpu", progress: bool = False,
                      index_cache: dict | None = None, out: np.ndarray | None = None,
                      timer: Any = None, gallery_nbrs: Neighbourhoods | None = None
                      ) -> tuple[np.ndarray | None, Neighbourhoods]:
    """Search ``target``'s neighbourhoods in ``gallery``, weigh them with the model's
    scorer (if any) and reconstruct: ``(features (N, M, F), neighbourhoods)`` (features
    ``None`` on ranks other than 0 under ``torchrun``).
    ``same_split``: ``target`` is the gallery itself (each image excluded from its own).
    ``index_cache``: kept by the caller to build the gallery's index once across calls.
    ``out``: receives the features batch by batch (see :func:`reconstruct`). ``timer``:
    a ``timer(stage)`` context factory (stages ``search``, ``gallery_search``, ``score``,
    ``reconstruct``). ``gallery_nbrs``: the gallery's own neighbourhoods if already
    searched with ``search`` (else searched here when the scorer needs them)."""
    timer = timer or _Timer()
    search = resolve_search(search, model)
    with timer("search"):
        nbrs = search_split(target, gallery, search, same_split=same_split,
                            index_cache=index_cache)
    weights = None
    if getattr(model, "scorer", None) is not None:
        g_nbrs = nbrs if same_split else gallery_nbrs
        if g_nbrs is None:
            with timer("gallery_search"):
                g_nbrs = search_split(gallery, gallery, search, same_split=True,
                                      index_cache=index_cache)
        with timer("score"):
            weights = outlier_weights(model, gallery if same_split else target, gallery,
                                      nbrs, g_nbrs, search, index_cache)
    with timer("reconstruct"):
        feats = reconstruct(model, target.features, gallery.features, nbrs, batch_size,
                            device, progress, target_visibility=target.visibility,
                            node_weight=weights, out=out)
    return feats, nbrs


def reconstruct_pair(model: ORGNN, query: PartFeatures, gallery: PartFeatures,
                     q_nbrs: Neighbourhoods, g_nbrs: Neighbourhoods, *, use_oan: bool = True,
                     oracle: bool = False, batch_size: int = 2048,
                     device: str | torch.device = "cpu", timer: _Timer | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Reconstruct query and gallery from their neighbourhoods, weighed by the model's
    scorer (if any): the ``orgnn``-type rows of the ablation.

    Args:
        use_oan: ``False`` for the ``gnn`` row: no part counts as visible (targets start as
            the neighbours' mean, and the scorer sees no visibility either).
        oracle: the neighbourhoods hold right neighbours only (``upper_bound``): each gets
            weight 1 instead of the scorer's.
    """
    timer = timer or _Timer()
    q_vis, g_vis = ((query.visibility, gallery.visibility) if use_oan else
                    (np.zeros_like(query.visibility), np.zeros_like(gallery.visibility)))
    q_w = g_w = None
    if getattr(model, "scorer", None) is not None:
        with timer("score"):
            if oracle:
                q_w, g_w = (prior_weights(n.valid.astype(np.float32), 1.0)
                            for n in (q_nbrs, g_nbrs))
            else:
                q_pf, g_pf = query, gallery
                if not use_oan:
                    q_pf = dataclasses.replace(query, visibility=np.ones_like(q_vis))
                    g_pf = dataclasses.replace(gallery, visibility=np.ones_like(g_vis))
                g_prob, q_prob = score_split(model.scorer, g_pf, g_nbrs, q_pf, q_nbrs)
                q_w, g_w = (prior_weights(p, model.scorer.gamma) for p in (q_prob, g_prob))
    with timer("reconstruct"):
        q = reconstruct(model, query.features, gallery.features, q_nbrs, batch_size, device,
                        target_visibility=q_vis, node_weight=q_w)
        g = reconstruct(model, gallery.features, gallery.features, g_nbrs, batch_size, device,
                        target_visibility=g_vis, node_weight=g_w)
    return q, g


def resolve_search(search: SearchConfig, model: ORGNN | None = None,
                   train: PartFeatures | None = None) -> SearchConfig:
    """``search`` with a concrete ``theta``: as given; else the threshold ``model`` was
    trained with (calibrated on its training split); else calibrated on ``train``."""
    if search.theta is not None:
        return search
    trained = getattr(getattr(model, "train_config", None), "theta", None)
    if trained is not None:
        return dataclasses.replace(search, theta=float(trained))
    if train is None:
        raise ValueError("the search threshold theta is unset (calibrated) and there is "
                         "neither a model trained with one nor a training split to "
                         "calibrate it on; pass theta")
    return dataclasses.replace(search, theta=calibrate_theta(
        train, search.k, search.mode, upper_body_parts=search.upper_body_parts))


@torch.inference_mode()
def average_reconstruct(target: np.ndarray, gallery: np.ndarray,
                        neighbourhoods: Neighbourhoods | np.ndarray,
                        batch_size: int = 4096) -> np.ndarray:
    """The ``avg`` row: each image becomes the plain mean of its neighbours (itself if it
    has none)."""
    index = getattr(neighbourhoods, "index", neighbourhoods)

    def mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = mask[:, None, 1:, None].to(x.dtype)
        return (x[:, :, 1:] * w).sum(2) / w.sum(2)

    return map_dense_batches(mean, target, gallery, index, batch_size, desc="average")


# --------------------------------------------------------------------------------------
# The ablation
# --------------------------------------------------------------------------------------
@dataclass
class AblationConfig:
    """Everything the ablation needs besides the data."""

    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    batch_size: int = 2048
    aqe_k: int = 5                  # FastReID's TEST.AQE defaults (the peer rows)
    aqe_alpha: float = 3.0
    aqe_times: int = 1


@dataclass
class AblationResult:
    rows: dict[str, dict[str, float]]
    empty_neighbourhoods: dict[str, int]
    timings: dict[str, float]
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """``{row: {"mAP", "rank1", "rank5", "rank10", "mINP"}}`` (percent) plus the
        empty-neighbourhood counts, timings (seconds) and the configuration."""
        return {**self.rows, "empty_neighbourhoods": self.empty_neighbourhoods,
                "timings": self.timings, "config": self.config}


class _Timer:
    """Accumulates wall time per stage name: ``with timer("search"): ...``."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def _percent(result: dict) -> dict[str, float]:
    return {k: round(100.0 * float(result[k]), 2) for k in METRIC_KEYS}


def search_split(target: PartFeatures, gallery: PartFeatures, cfg: SearchConfig, *,
                 same_split: bool, all_parts: bool = False,
                 index_cache: dict | None = None) -> Neighbourhoods:
    """Neighbourhoods of ``target`` in ``gallery`` (self excluded when they are one split);
    ``all_parts`` searches with every part (the "no OAN" setting). ``index_cache``: a dict
    the caller keeps to build each faiss index over ``gallery`` once for several searches
    (see :func:`orgnn.retrieval.search.search_neighbourhoods`)."""
    parts = np.ones(target.visible.shape, dtype=bool) if all_parts else None

    def search(rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Under torchrun each rank searches its share of the targets (all-gathered after).
        found = search_neighbourhoods(
            target.features[rows], target.visible[rows], gallery.features, k=cfg.k,
            theta=cfg.theta, mode=cfg.mode, upper_body_parts=cfg.upper_body_parts,
            index=cfg.index, nprobe=cfg.nprobe, device=getattr(cfg, "device", None),
            exclude=np.arange(target.num_images)[rows] if same_split else None,
            search_parts=None if parts is None else parts[rows], index_cache=index_cache)
        return found.index, found.score, found.search_parts

    return Neighbourhoods(*distributed.map_rows(search, target.num_images))


def run_ablation(splits: dict[str, PartFeatures], config: AblationConfig | None = None,
                 rows: Sequence[str] = ABLATION_ROWS, progress: bool = True,
                 models: dict[str, ORGNN] | None = None) -> AblationResult:
    """Run the ablation rows (SPEC §6) on ``{"train", "query", "gallery"}`` splits.

    Both query and gallery are reconstructed (SPEC §3). ``models`` may hold already trained
    ``"orgnn"`` and ``"oan_gnn"`` (``outlier_aware=False``) models; missing ones are trained
    on ``splits["train"]``.
    """
    config = config or AblationConfig()
    unknown = sorted(set(rows) - set(ABLATION_ROWS))
    if unknown:
        raise ValueError(f"unknown ablation rows {unknown}; known: {', '.join(ABLATION_ROWS)}")
    query, gallery = splits["query"], splits["gallery"]
    timer = _Timer()
    models = dict(models or {})
    theta_calibrated = config.search.theta is None
    with timer("search"):
        search_cfg = resolve_search(config.search, models.get("orgnn"), splits.get("train"))
    config = dataclasses.replace(config, search=search_cfg)
    results: dict[str, dict[str, float]] = {}
    empty: dict[str, int] = {}
    q_oan, g_oan = oan_parts(query.visible), oan_parts(gallery.visible)
    index_cache: dict = {}  # every search below searches this one gallery

    def score(name: str, q_feats, g_feats, q_parts=None, g_parts=None,
              rerank: str | None = None) -> None:
        if not distributed.is_main():  # under torchrun rank 0 scores what all reconstructed
            return
        with timer("evaluate"):
            dist = part_distance(q_feats, g_feats, q_parts)
            results[name] = _percent(metrics.evaluate(dist, query.pids, gallery.pids,
                                                      query.camids, gallery.camids))
        if rerank in rows:
            with timer("rerank"):
                final = rerank_distances(q_feats, g_feats, dist, q_parts, g_parts,
                                         config.k1, config.k2, config.lambda_value)
                results[rerank] = _percent(metrics.evaluate(final, query.pids, gallery.pids,
                                                            query.camids, gallery.camids))

    def model_for(outlier_aware: bool) -> ORGNN:
        key = "orgnn" if outlier_aware else "oan_gnn"
        if key not in models:
            cfg = TrainConfig(**{**config.train.__dict__, "outlier_aware": outlier_aware})
            with timer("train"):  # under torchrun: rank 0 trains, the others receive it
                models[key] = train_orgnn_once(splits["train"], cfg, progress=progress)
        return models[key]

    def run_model(model: ORGNN, q_nbrs: Neighbourhoods, g_nbrs: Neighbourhoods,
                  use_oan: bool = True, oracle: bool = False):
        return reconstruct_pair(model, query, gallery, q_nbrs, g_nbrs, use_oan=use_oan,
                                oracle=oracle, batch_size=config.batch_size,
                                device=config.search.device or "cpu", timer=timer)

    if {"baseline", "baseline_rr"} & set(rows):
        score("baseline", query.features, gallery.features, rerank="baseline_rr")
    if {"oan", "oan_rr"} & set(rows):
        score("oan", query.features, gallery.features, q_oan, g_oan, rerank="oan_rr")

    needs_visible = {"avg", "oan_gnn", "orgnn", "orgnn_rr", "upper_bound"} & set(rows)
    if needs_visible:
        with timer("search"):
            q_nbrs = search_split(query, gallery, config.search, same_split=False,
                                  index_cache=index_cache)
            g_nbrs = search_split(gallery, gallery, config.search, same_split=True,
                                  index_cache=index_cache)
        empty["query"], empty["gallery"] = q_nbrs.num_empty, g_nbrs.num_empty
        _warn_if_mostly_empty(empty, query.num_images, gallery.num_images, config.search)
        if "avg" in rows:
            with timer("reconstruct"):
                q_avg = average_reconstruct(query.features, gallery.features, q_nbrs,
                                            config.batch_size)
                g_avg = average_reconstruct(gallery.features, gallery.features, g_nbrs,
                                            config.batch_size)
            score("avg", q_avg, g_avg)
        if {"orgnn", "orgnn_rr"} & set(rows):
            q_rec, g_rec = run_model(model_for(True), q_nbrs, g_nbrs)
            score("orgnn", q_rec, g_rec, rerank="orgnn_rr")
        if "oan_gnn" in rows:
            score("oan_gnn", *run_model(model_for(False), q_nbrs, g_nbrs))
        if "upper_bound" in rows:
            q_ub = q_nbrs.filter(_same_identity(q_nbrs, query.pids, gallery.pids))
            g_ub = g_nbrs.filter(_same_identity(g_nbrs, gallery.pids, gallery.pids))
            score("upper_bound", *run_model(model_for(True), q_ub, g_ub, oracle=True))
    if "gnn" in rows:
        with timer("search"):
            q_all = search_split(query, gallery, config.search, same_split=False,
                                 all_parts=True, index_cache=index_cache)
            g_all = search_split(gallery, gallery, config.search, same_split=True,
                                 all_parts=True, index_cache=index_cache)
        empty["query_all_parts"] = q_all.num_empty
        score("gnn", *run_model(model_for(True), q_all, g_all, use_oan=False))

    if set(PEER_ROWS) & set(rows):  # global features: one part each (cosine distance)
        q_glob = visible_global_feature(query.features, query.visible)
        g_glob = visible_global_feature(gallery.features, gallery.visible)
        if {"vis_global", "vis_global_rr"} & set(rows):
            score("vis_global", q_glob[:, None], g_glob[:, None], rerank="vis_global_rr")
        if {"aqe", "aqe_rr"} & set(rows):
            q_aqe, g_aqe = average_query_expansion(q_glob, g_glob, config.aqe_k,
                                                   config.aqe_alpha, config.aqe_times)
            score("aqe", q_aqe[:, None], g_aqe[:, None], rerank="aqe_rr")

    ordered = {name: results[name] for name in ABLATION_ROWS if name in results}
    timings = {k: round(v, 3) for k, v in timer.timings.items()}
    timings["search+reconstruct+evaluate"] = round(sum(
        timer.timings.get(k, 0.0) for k in ("search", "reconstruct", "evaluate")), 3)
    return AblationResult(ordered, empty, timings, {**_config_json(config),
                          "theta_calibrated": theta_calibrated})


def _warn_if_mostly_empty(empty: dict[str, int], num_query: int, num_gallery: int,
                          search: SearchConfig) -> None:
    """Warn when a quarter or more of a split's images found no neighbour."""
    for split, total in (("query", num_query), ("gallery", num_gallery)):
        if total and empty[split] >= 0.25 * total:
            warnings.warn(
                f"{empty[split]} of {total} {split} images have no neighbour at K={search.k}, "
                f"theta={search.theta:g}: they are not reconstructed from anyone. The "
                "threshold may not suit this feature space; leave theta unset to calibrate it "
                "on the training split", RuntimeWarning, stacklevel=3)


def _same_identity(nbrs: Neighbourhoods, target_pids: np.ndarray,
                   gallery_pids: np.ndarray) -> np.ndarray:
    return gallery_pids[np.clip(nbrs.index, 0, None)] == np.asarray(target_pids)[:, None]


def _config_json(config: AblationConfig) -> dict[str, Any]:
    def plain(obj: Any) -> Any:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in obj.__dict__.items()}

    return {"search": plain(config.search), "train": plain(config.train), "k1": config.k1,
            "k2": config.k2, "lambda_value": config.lambda_value}


def format_table(result: AblationResult, title: str | None = None) -> str:
    """The ablation as a fixed-width text table (percent)."""
    lines = [title] if title else []
    header = f"{'row':<12}" + "".join(f"{k:>8}" for k in METRIC_KEYS)
    lines += [header, "-" * len(header)]
    for name, row in result.rows.items():
        lines.append(f"{name:<12}" + "".join(f"{row[k]:>8.1f}" for k in METRIC_KEYS))
    if result.empty_neighbourhoods:
        search = result.config.get("search", {})
        if search.get("theta") is not None:
            lines.append(f"search: {search.get('mode')}, K={search.get('k')}, "
                         f"theta={search['theta']:g}"
                         + (" (calibrated on the training split)"
                            if result.config.get("theta_calibrated") else ""))
        lines.append("empty neighbourhoods: " + ", ".join(
            f"{k} {v}" for k, v in result.empty_neighbourhoods.items()))
    lines.append("time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    return "\n".join(lines)
