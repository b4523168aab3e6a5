r"""Figures: retrieval rankings (paper Fig. 4), neighbourhood graphs, CMC curves.

Three figures, each written to a PNG by one function that returns what it drew, so a test
(or a notebook) can check the content without looking at pixels:

* :func:`plot_ranks`: for each chosen query, its top-``k`` gallery items under each ranking
  (``baseline`` before reconstruction, ``orgnn`` after), with a green border for the right
  identity and a red one for a wrong one. Tiles are the images named in ``paths`` when they
  can be read, else coloured tiles with the identity and camera.
* :func:`plot_graph`: one query's neighbourhood graph :math:`\{I_a\} \cup \mathcal{N}(I_a)`,
  one panel per part: node colour is the confidence :math:`c_j` (Eq. 4), edge width the
  weight the first OR-GNN layer gives the message (Eq. 5's :math:`c_j a_{ij} / \sum c a`, or
  the affinity :math:`a_{ij}` of Eq. 6), wrong-identity neighbours are marked.
* :func:`plot_cmc`: CMC curves of ablation rows (SPEC §6), from :func:`ablation_cmc`.

Distances and rankings follow the evaluation protocol (SPEC §5): gallery items with the
query's identity *and* camera are dropped from a query's ranking. matplotlib is imported
inside the functions (Agg backend), so importing this module costs nothing.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orgnn.io.features import PartFeatures
from orgnn.nn import ORGNN
from orgnn.nn.functional import sparse_affinity, sparse_confidence
from orgnn.reconstruction.graphs import dense_neighbourhood_batch
from orgnn.reconstruction.pipeline import (
    ABLATION_ROWS,
    METRIC_KEYS,
    average_reconstruct,
    oan_parts,
    part_distance,
    reconstruct_pair,
    resolve_search,
    search_split,
)
from orgnn.reconstruction.training import SearchConfig, TrainConfig, train_orgnn
from orgnn.retrieval import metrics
from orgnn.retrieval.search import Neighbourhoods

__all__ = [
    "RANK_ROWS",
    "PART_NAMES",
    "prepare_model",
    "row_distances",
    "ablation_cmc",
    "plot_ranks",
    "plot_graph",
    "plot_cmc",
    "graph_weights",
    "fit_occluder_band",
    "default_images_root",
]

#: The rows :func:`row_distances` can compute (every row of SPEC §6).
RANK_ROWS = ABLATION_ROWS
#: Labels of the six parts (four horizontal stripes top to bottom, two vertical halves).
PART_NAMES = ("stripe 1 (top)", "stripe 2", "stripe 3", "stripe 4 (bottom)", "left half",
              "right half")
_ROW_LABELS = {"baseline": "baseline", "oan": "+OAN", "gnn": "+GNN (no OAN)",
               "avg": "+OAN +avg", "oan_gnn": "+OAN +GNN", "orgnn": "OR-GNN",
               "baseline_rr": "baseline +RR", "oan_rr": "+OAN +RR", "orgnn_rr": "OR-GNN +RR",
               "upper_bound": "upper bound"}
_GREEN, _RED, _QUERY = "#1a9641", "#d7191c", "#2b2b2b"
#: Widths in points of the lightest and the heaviest edge of a :func:`plot_graph` figure.
MIN_EDGE_WIDTH, MAX_EDGE_WIDTH = 0.4, 4.0


def require_matplotlib(what: str = "orgnn.viz") -> None:
    """Raise a one-line :class:`ValueError` naming the ``viz`` extra when matplotlib is
    missing (for commands to check before any work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(f"{what} draws with matplotlib, which is not installed: "
                         f'pip install "orgnn[viz]" (or pip install matplotlib)') from None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | os.PathLike, dpi: int) -> dict[str, Any]:
    """Write ``fig`` to ``out`` atomically (temp file, then rename); return path and size."""
    plt = _pyplot()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        with open(tmp, "rb") as handle:  # the PNG's own size (IHDR: width, height)
            header = handle.read(24)
        width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24],
                                                                            "big")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "size": (width, height)}


# --------------------------------------------------------------------------------------
# Models and distances
# --------------------------------------------------------------------------------------
def prepare_model(train: PartFeatures | None = None, checkpoint: str | os.PathLike | None = None,
                  config: TrainConfig | None = None, progress: bool = False,
                  outlier_aware: bool = True) -> ORGNN:
    """An OR-GNN for the figures: read from ``checkpoint``, else trained on ``train`` with
    ``config`` (``epochs=0`` gives the untrained identity-initialised model, i.e. the
    confidence-weighted mean of the neighbours)."""
    if checkpoint is not None:
        from orgnn.reconstruction.training import load_checkpoint

        return load_checkpoint(checkpoint)[0]
    config = config or TrainConfig()
    config = TrainConfig(**{**config.__dict__, "outlier_aware": outlier_aware})
    if train is None:
        if config.epochs > 0:
            raise ValueError("prepare_model needs a training split or a checkpoint")
        return ORGNN(256, config.hidden_channels or 256, 6, config.num_layers,
                     outlier_aware=outlier_aware, target_init=config.target_init,
                     init=config.init, act=config.act).eval()
    return train_orgnn(train, config, progress=progress)


def row_distances(query: PartFeatures, gallery: PartFeatures, rows: Sequence[str],
                  search: SearchConfig | None = None,
                  models: Mapping[str, ORGNN] | None = None,
                  train: PartFeatures | None = None, train_config: TrainConfig | None = None,
                  rerank: tuple[int, int, float] = (20, 6, 0.3),
                  progress: bool = False) -> dict[str, np.ndarray]:
    """The ``(Q, G)`` distance matrix of each ablation row (SPEC §6), as
    :func:`orgnn.reconstruction.pipeline.run_ablation` computes them.

    ``models`` may hold trained ``"orgnn"`` and ``"oan_gnn"`` models; a missing one is
    trained on ``train`` with ``train_config``. ``rerank`` is ``(k1, k2, lambda)``.
    """
    unknown = sorted(set(rows) - set(RANK_ROWS))
    if unknown:
        raise ValueError(f"unknown rows {unknown}; known: {', '.join(RANK_ROWS)}")
    search = search or SearchConfig()
    models = dict(models or {})
    wanted = set(rows)
    if search.theta is None and wanted & (_MODEL_ROWS | {"avg"}):
        known = models.get("orgnn")
        if known is None and train is not None and wanted & _MODEL_ROWS:
            known = models["orgnn"] = prepare_model(train, config=train_config,
                                                    progress=progress)
        search = resolve_search(search, known, train)
    out: dict[str, np.ndarray] = {}

    def model_for(key: str) -> ORGNN:
        if key not in models:
            if train is None:
                raise ValueError(f"row needs a trained {key!r} model: pass models or train")
            models[key] = prepare_model(train, config=train_config, progress=progress,
                                        outlier_aware=key == "orgnn")
        return models[key]

    def add(name: str, q, g, q_parts=None, g_parts=None) -> None:
        dist = part_distance(q, g, q_parts)
        if name in wanted:
            out[name] = dist
        rr = f"{name}_rr"
        if rr in wanted:
            k1, k2, lam = rerank
            out[rr] = metrics.re_ranking(dist, part_distance(q, q, q_parts),
                                         part_distance(g, g, g_parts), k1, k2, lam)

    if wanted & {"baseline", "baseline_rr"}:
        add("baseline", query.features, gallery.features)
    if wanted & {"oan", "oan_rr"}:
        add("oan", query.features, gallery.features, oan_parts(query.visible),
            oan_parts(gallery.visible))
    if wanted & {"avg", "oan_gnn", "orgnn", "orgnn_rr", "upper_bound"}:
        q_nbrs = search_split(query, gallery, search, same_split=False)
        g_nbrs = search_split(gallery, gallery, search, same_split=True)
        runs = []
        if "avg" in wanted:
            out["avg"] = part_distance(average_reconstruct(query.features, gallery.features,
                                                           q_nbrs),
                                       average_reconstruct(gallery.features, gallery.features,
                                                           g_nbrs))
        if wanted & {"orgnn", "orgnn_rr"}:
            runs.append(("orgnn", "orgnn", q_nbrs, g_nbrs))
        if "oan_gnn" in wanted:
            runs.append(("oan_gnn", "oan_gnn", q_nbrs, g_nbrs))
        if "upper_bound" in wanted:
            runs.append(("upper_bound", "orgnn",
                         q_nbrs.filter(_same_identity(q_nbrs, query.pids, gallery.pids)),
                         g_nbrs.filter(_same_identity(g_nbrs, gallery.pids, gallery.pids))))
        for name, key, qn, gn in runs:
            add(name, *reconstruct_pair(model_for(key), query, gallery, qn, gn,
                                        oracle=name == "upper_bound"))
    if "gnn" in wanted:
        model = model_for("orgnn")
        qn = search_split(query, gallery, search, same_split=False, all_parts=True)
        gn = search_split(gallery, gallery, search, same_split=True, all_parts=True)
        add("gnn", *reconstruct_pair(model, query, gallery, qn, gn, use_oan=False))
    return {name: out[name] for name in rows}


_MODEL_ROWS = {"gnn", "oan_gnn", "orgnn", "orgnn_rr", "upper_bound"}


def _same_identity(nbrs: Neighbourhoods, target_pids, gallery_pids) -> np.ndarray:
    return np.asarray(gallery_pids)[np.clip(nbrs.index, 0, None)] == \
        np.asarray(target_pids)[:, None]


def ablation_cmc(query: PartFeatures, gallery: PartFeatures,
                 rows: Sequence[str] = ("baseline", "oan", "avg", "orgnn"),
                 max_rank: int = 20, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """Per-row CMC and metrics: ``{row: {"cmc": [percent x max_rank], "mAP", "rank1", ...}}``
    (percent). ``kwargs`` go to :func:`row_distances`."""
    dists = row_distances(query, gallery, rows, **kwargs)
    out = {}
    for name, dist in dists.items():
        res = metrics.evaluate(dist, query.pids, gallery.pids, query.camids, gallery.camids,
                               max_rank=max_rank)
        # one rounding for every figure: percent to 2 decimals, printed with 1
        out[name] = {"cmc": [round(100 * float(v), 2) for v in res["cmc"]],
                     **{k: round(100 * float(res[k]), 2) for k in METRIC_KEYS}}
    return out


def _ranked(dist_row: np.ndarray, q_pid: int, q_cam: int, g_pids: np.ndarray,
            g_cams: np.ndarray, top: int) -> np.ndarray:
    """Gallery indices of the top ``top`` after dropping same-identity same-camera items."""
    order = np.argsort(dist_row, kind="stable")
    keep = ~((g_pids[order] == q_pid) & (g_cams[order] == q_cam))
    return order[keep][:top]


# --------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------
def default_images_root(data_dir: str | os.PathLike) -> Path:
    """Where ``paths`` of a part-feature folder point: ``DIR/../images`` (the layout of
    ``mini-mars-parts``)."""
    return Path(data_dir).resolve().parent / "images"


def _load_tile(root: Path | None, paths: np.ndarray | None, index: int,
               size: tuple[int, int]) -> np.ndarray | None:
    if root is None or paths is None:
        return None
    path = Path(str(paths[index]))
    path = path if path.is_absolute() else root / path
    try:
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize(size))
    except (OSError, ValueError, ImportError):
        return None


def fit_occluder_band(visibility: np.ndarray, tol: float = 0.05
                      ) -> tuple[str, float] | None:
    """The occluder band ``(side, fraction)`` (see :func:`orgnn.datasets.band_visibility`)
    that best explains a 6-part visibility vector, or ``None`` when no band fits within
    ``tol`` per part or nothing is covered. Used to shade the synthetic occluder on a
    query tile, since the frames on disk are the un-occluded ones."""
    from orgnn.datasets import SIDES, band_visibility

    vis = np.asarray(visibility, dtype=np.float64).reshape(-1)
    if vis.size != 6 or vis.min() >= 1 - 1e-6:
        return None
    fractions = np.linspace(0.01, 1.0, 100)
    best = None
    for code, side in enumerate(SIDES):
        pred = band_visibility(np.full(fractions.shape, code), fractions)
        err = np.abs(pred - vis).max(axis=1)
        i = int(err.argmin())
        if best is None or err[i] < best[0]:
            best = (float(err[i]), side, float(fractions[i]))
    return (best[1], best[2]) if best[0] <= tol else None


def _draw_tile(ax, image: np.ndarray | None, pid: int, cam: int, colour: str,
               caption: str | None = None, band: tuple[str, float] | None = None) -> bool:
    """One tile with a coloured border; returns True when it shows an image."""
    from matplotlib.patches import Rectangle

    if image is not None:
        ax.imshow(image, extent=(0, 1, 2, 0), aspect="auto")
    else:
        rng = np.random.default_rng(int(pid) * 7919 + 17)
        ax.add_patch(Rectangle((0, 0), 1, 2, color=rng.uniform(0.55, 0.95, 3)))
        ax.text(0.5, 1.0, f"id {pid}\ncam {cam}", ha="center", va="center", fontsize=7)
    if band is not None:
        side, f = band
        box = {"bottom": (0, 2 * (1 - f), 1, 2 * f), "top": (0, 0, 1, 2 * f),
               "left": (0, 0, f, 2), "right": (1 - f, 0, f, 2)}[side]
        ax.add_patch(Rectangle(box[:2], box[2], box[3], facecolor=(0.1, 0.1, 0.1, 0.55),
                               hatch="///", edgecolor="white", linewidth=0))
    ax.set_xlim(0, 1)
    ax.set_ylim(2, 0)
    ax.set_aspect("equal", adjustable="box", anchor="C")   # the crop's 1:2, never stretched
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)
    if caption:
        ax.set_title(caption, fontsize=6, pad=2)
    return image is not None


# --------------------------------------------------------------------------------------
# Figure 1: rankings before / after
# --------------------------------------------------------------------------------------
def plot_ranks(out: str | os.PathLike, query: PartFeatures, gallery: PartFeatures,
               distances: Mapping[str, np.ndarray], query_indices: Sequence[int],
               top: int = 10, images_root: str | os.PathLike | None = None,
               shade_occluders: bool = True, dpi: int = 100) -> dict[str, Any]:
    """Draw each query of ``query_indices`` and its top-``top`` gallery items under every
    ranking in ``distances`` (``{row name: (Q, G) distances}``, e.g. ``baseline`` and
    ``orgnn``; rows of the matrices are all queries, or just ``query_indices`` in order).

    A green border marks the query's identity, a red one a wrong identity. Tiles come from
    ``images_root / paths[i]`` when readable, else show the identity and camera. A query
    whose part visibility matches an occluder band gets the band shaded (the features were
    computed from the occluded image; the frame on disk is the clean one).

    Returns:
        ``{"path", "size", "num_queries", "num_rows", "num_tiles", "num_image_tiles",
        "num_id_tiles", "rankings": [{"query", "row", "gallery", "correct"}, ...]}``.
    """
    plt = _pyplot()
    query_indices = [int(i) for i in query_indices]
    if not query_indices:
        raise ValueError("plot_ranks needs at least one query index")
    if not distances:
        raise ValueError("plot_ranks needs at least one distance matrix")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    for i in query_indices:
        if not 0 <= i < query.num_images:
            raise ValueError(f"query index {i} out of range: the query split has "
                             f"{query.num_images} images")
    root = None if images_root is None else Path(images_root)
    g_pids, g_cams = np.asarray(gallery.pids), np.asarray(gallery.camids)
    names = list(distances)
    nq, nr = len(query_indices), len(names)
    tile_w, tile_h = 0.62, 1.24
    query_w = 1.0 if nr == 1 else 1.5      # a query spanning several rows is drawn larger
    fig = plt.figure(figsize=(1.1 + tile_w * 1.15 * (top + query_w + 0.4),
                              0.35 + nq * nr * (tile_h + 0.25)))
    grid = fig.add_gridspec(nq * nr, top + 2, width_ratios=[query_w, 0.35] + [1] * top,
                            left=0.02, right=0.99, top=1 - 0.3 / fig.get_figheight(),
                            bottom=0.02, hspace=0.35, wspace=0.08)
    tiles = image_tiles = 0
    rankings = []
    for b, qi in enumerate(query_indices):
        q_pid, q_cam = int(query.pids[qi]), int(query.camids[qi])
        band = fit_occluder_band(query.visibility[qi]) if shade_occluders else None
        ax = fig.add_subplot(grid[b * nr:(b + 1) * nr, 0])
        image = _load_tile(root, query.paths, qi, (64, 128))
        image_tiles += _draw_tile(ax, image, q_pid, q_cam, _QUERY, band=band)
        ax.set_title(f"query {qi}\nid {q_pid}", fontsize=7, pad=2)
        tiles += 1
        for r, name in enumerate(names):
            dist = np.asarray(distances[name])
            row = dist[qi] if dist.shape[0] == query.num_images else dist[b]
            ranked = _ranked(row, q_pid, q_cam, g_pids, g_cams, top)
            correct = g_pids[ranked] == q_pid
            rankings.append({"query": qi, "row": name, "gallery": ranked.tolist(),
                             "correct": correct.tolist()})
            label_ax = fig.add_subplot(grid[b * nr + r, 1])
            label_ax.axis("off")
            label_ax.text(0.9, 0.5, _ROW_LABELS.get(name, name), rotation=90, ha="center",
                          va="center", fontsize=8, fontweight="bold")
            for c, gi in enumerate(ranked):
                ax = fig.add_subplot(grid[b * nr + r, c + 2])
                image = _load_tile(root, gallery.paths, int(gi), (64, 128))
                image_tiles += _draw_tile(ax, image, int(g_pids[gi]), int(g_cams[gi]),
                                          _GREEN if correct[c] else _RED,
                                          caption=f"{c + 1}" if b == 0 and r == 0 else None)
                tiles += 1
    meta = _save(fig, out, dpi)
    return {**meta, "num_queries": nq, "num_rows": nr * nq, "num_tiles": tiles,
            "num_image_tiles": image_tiles, "num_id_tiles": tiles - image_tiles,
            "rankings": rankings}


# --------------------------------------------------------------------------------------
# Figure 2: one query's neighbourhood graph per part
# --------------------------------------------------------------------------------------
@torch.inference_mode()
def graph_weights(model: ORGNN, x: torch.Tensor, mask: torch.Tensor
                  ) -> dict[str, np.ndarray]:
    """What the first OR-GNN layer sees on one neighbourhood graph.

    Args:
        model: the per-part model (its first layer is used).
        x: ``(M, N, F)`` features, node 0 the target (as the model initialises it).
        mask: ``(N,)`` bool valid nodes.

    Returns:
        ``{"confidence": (M, N), "affinity": (M, N, N), "attention": (M, N, N)}``;
        ``attention[k, i, j]`` is the normalised weight of the message ``j -> i``.
    """
    layer = model.layers[0]
    n = x.size(1)
    pairs = torch.ones(n, n, dtype=torch.bool).fill_diagonal_(False) & mask[:, None] & mask
    dst, src = pairs.nonzero().T                                    # complete, no self-loops
    confidence = sparse_confidence(x.transpose(0, 1), src, dst).T   # (M, N), Eq. 4
    conf = list(torch.where(mask, confidence, 0.0))
    aff, att = [], []
    for k in range(x.size(0)):
        xk = x[k]
        aff.append(sparse_affinity(xk[:, None, :], xk[None, :, :], layer.att_weight[k],
                                   layer.att_bias[k]))
        _, alpha = layer.part(k)(xk, mask=mask, return_attention_weights=True)
        att.append(alpha[0])                                        # one graph: (1, N, N)
    return {"confidence": torch.stack(conf).numpy(), "affinity": torch.stack(aff).numpy(),
            "attention": torch.stack(att).numpy()}


def plot_graph(out: str | os.PathLike, query: PartFeatures, gallery: PartFeatures,
               query_index: int, model: ORGNN, search: SearchConfig | None = None,
               edge_weight: str = "attention", images_root: str | os.PathLike | None = None,
               dpi: int = 110) -> dict[str, Any]:
    """Draw query ``query_index``'s neighbourhood graph once per part.

    The graph is the one the OR-GNN reconstructs the query from: the target (node 0, a star,
    initialised as the model does: mean of the neighbours, or the image's own feature) and
    its neighbours :math:`\\mathcal{N}(I_a)` from the gallery (circles, numbered by rank).
    Node colour is the confidence :math:`c_j` (Eq. 4) of part ``k``; edge width is the first
    layer's normalised message weight (``edge_weight="attention"``) or the affinity
    :math:`a_{ij}` (``"affinity"``); the edges into the target are drawn dark. Neighbours of
    the query's identity have a green ring, wrong identities a red ring and a cross.

    Returns:
        ``{"path", "size", "num_panels", "num_nodes", "num_neighbours", "num_wrong",
        "neighbours", "confidence", "edge_weights"}`` (arrays as nested lists).
    """
    plt = _pyplot()
    from matplotlib.colors import Normalize

    if edge_weight not in ("attention", "affinity"):
        raise ValueError(f"edge_weight must be 'attention' or 'affinity', got {edge_weight!r}")
    if not 0 <= query_index < query.num_images:
        raise ValueError(f"query index {query_index} out of range: the query split has "
                         f"{query.num_images} images")
    search = resolve_search(search or SearchConfig(), model)
    target = query.subset([query_index])
    nbrs = search_split(target, gallery, search, same_split=False)
    x, mask = dense_neighbourhood_batch(target.features, gallery.features, nbrs.index)
    x, mask = x[0], mask[0]                                          # (M, N, F), (N,)
    n = int(mask.sum())
    x, mask = x[:, :n], mask[:n]
    empty = nbrs.num_empty == 1
    x = model.start_targets(x.unsqueeze(1), mask.to(x.dtype).view(1, 1, -1),
                            torch.as_tensor(target.visible))[:, 0]  # as the model starts it
    weights = graph_weights(model, x, mask)
    if empty:  # the model saw the image as its own only neighbour; draw the image alone
        n = 1
    conf = weights["confidence"][:, :n]
    edges = weights[edge_weight][:, :n, :n]
    index = nbrs.index[0][:n - 1]
    q_pid = int(query.pids[query_index])
    correct = np.asarray(gallery.pids)[index] == q_pid
    m = x.size(0)
    names = PART_NAMES if m == 6 else tuple(f"part {k + 1}" for k in range(m))

    cols = (m + 1) // 2
    fig = plt.figure(figsize=(1.9 + 3.0 * cols, 6.4))
    grid = fig.add_gridspec(2, cols + 2, width_ratios=[0.9] + [3] * cols + [0.12],
                            left=0.02, right=0.91, top=0.88, bottom=0.09, wspace=0.15,
                            hspace=0.25)
    ax = fig.add_subplot(grid[:, 0])
    root = None if images_root is None else Path(images_root)
    image = _load_tile(root, query.paths, query_index, (64, 128))
    _draw_tile(ax, image, q_pid, int(query.camids[query_index]), _QUERY,
               band=fit_occluder_band(query.visibility[query_index]))
    ax.set_title(f"query {query_index}\nid {q_pid}", fontsize=8)

    angles = np.pi / 2 - 2 * np.pi * np.arange(max(n - 1, 1)) / max(n - 1, 1)
    pos = np.vstack([[0.0, 0.0], np.stack([np.cos(angles), np.sin(angles)], 1)[:n - 1]])
    # Re-ID features are non-negative, so confidences of real data sit near 1: the colour
    # scale starts at the smallest confidence (rounded down to 0.05) to keep differences seen.
    low = float(np.floor(20 * conf[:, :n].min()) / 20) if n > 1 else 0.0
    norm = Normalize(min(low, 0.95), 1)
    cmap = plt.get_cmap("viridis")
    # Only the read-out row is drawn: the messages into the target, the ones its
    # reconstruction is made of (with all n(n-1)/2 edges a 30-node graph is a grey disc).
    read_out = edges[:, 0, 1:n]
    width = _edge_widths(read_out)
    for k in range(m):
        ax = fig.add_subplot(grid[k // cols, 1 + k % cols])
        for j in range(1, n):
            ax.plot(*pos[[0, j]].T, color="0.2", alpha=0.8, linewidth=float(width(edges[k, 0, j])),
                    zorder=1, solid_capstyle="butt")
        ring = [_QUERY] + [_GREEN if c else _RED for c in correct]
        ax.scatter(pos[1:, 0], pos[1:, 1], s=260, c=conf[k, 1:n], cmap=cmap, norm=norm,
                   edgecolors=ring[1:], linewidths=2.5, zorder=2)
        ax.scatter(pos[:1, 0], pos[:1, 1], s=520, marker="*", c=conf[k, :1], cmap=cmap,
                   norm=norm, edgecolors=_QUERY, linewidths=1.2, zorder=3)
        for j in range(1, n):
            ax.text(*(pos[j] * 1.22), f"{j}" + ("" if correct[j - 1] else "✗"),
                    ha="center", va="center", fontsize=7,
                    color=_QUERY if correct[j - 1] else _RED)
        vis = float(query.visibility[query_index, k])
        state = "visible" if vis >= 0.5 else "occluded"
        ax.set_title(f"{names[k]}\n{state} ({vis:.2f})", fontsize=8,
                     color=_QUERY if vis >= 0.5 else _RED)
        ax.set_xlim(-1.45, 1.45)
        ax.set_ylim(-1.45, 1.45)
        ax.set_aspect("equal")
        ax.axis("off")
    cax = fig.add_subplot(grid[:, -1])
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax,
                 label="confidence $c_j$ (Eq. 4)")
    what = ("message weight $c_j a_{ij} / \\sum c\\, a$" if edge_weight == "attention"
            else "affinity $a_{ij}$ (Eq. 6)")
    if read_out.size:
        _edge_legend(fig, read_out, width, what)
    title = (f"query {query_index}: {n - 1} neighbours, {int((~correct).sum())} of another "
             f"identity (red)   ·   edges into the target (star): the thicker, the larger "
             f"its {what}")
    if empty:
        title = f"query {query_index}: no neighbour, the graph is the image alone"
    fig.suptitle(title, fontsize=9)
    meta = _save(fig, out, dpi)
    return {**meta, "num_panels": m, "num_nodes": n, "num_neighbours": n - 1,
            "num_wrong": int((~correct).sum()), "neighbours": index.tolist(),
            "confidence": conf.tolist(), "edge_weights": edges.tolist()}


def _edge_widths(weights: np.ndarray):
    """Line width (points) of an edge weight: linear over the figure's weights, from
    ``MIN_EDGE_WIDTH`` (smallest) to ``MAX_EDGE_WIDTH`` (largest), so that the small
    differences of a near-uniform neighbourhood are seen (the legend gives the values);
    all ``(MIN + MAX) / 2`` when the weights are equal."""
    lo, hi = (float(weights.min()), float(weights.max())) if weights.size else (0.0, 0.0)
    span = hi - lo
    if span <= 1e-9 * max(abs(hi), 1.0):
        return lambda w: np.full(np.shape(w), (MIN_EDGE_WIDTH + MAX_EDGE_WIDTH) / 2)
    return lambda w: MIN_EDGE_WIDTH + (MAX_EDGE_WIDTH - MIN_EDGE_WIDTH) * (
        np.asarray(w, dtype=np.float64) - lo) / span


def _edge_legend(fig, weights: np.ndarray, width, what: str) -> None:
    """A legend of three edge widths: the largest, median and smallest drawn weight."""
    from matplotlib.lines import Line2D

    values = np.quantile(weights, [1.0, 0.5, 0.0])
    handles = [Line2D([], [], color="0.2", alpha=0.8, linewidth=float(width(v)),
                      solid_capstyle="butt") for v in values]
    labels = [f"{name} {v:.3g}" for name, v in zip(("max", "median", "min"), values)]
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False,
               title=what, title_fontsize=7, bbox_to_anchor=(0.5, 0.0), handlelength=3)


# --------------------------------------------------------------------------------------
# Figure 3: CMC curves
# --------------------------------------------------------------------------------------
def plot_cmc(out: str | os.PathLike, curves: Mapping[str, Mapping[str, Any]],
             title: str | None = None, dpi: int = 110) -> dict[str, Any]:
    """CMC curves of ablation rows: ``curves`` is :func:`ablation_cmc`'s output (``cmc`` in
    percent, rank 1 first; ``mAP``/``rank1`` are shown in the legend when present)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    if not curves:
        raise ValueError("plot_cmc needs at least one curve")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = ["-", "--", "-.", ":"]
    max_rank = 0
    for i, (name, row) in enumerate(curves.items()):
        cmc = np.asarray(row["cmc"], dtype=float)
        max_rank = max(max_rank, cmc.size)
        label = _ROW_LABELS.get(name, name)
        if "mAP" in row and "rank1" in row:
            label += f"  (mAP {row['mAP']:.1f}, R1 {row['rank1']:.1f})"
        ax.plot(np.arange(1, cmc.size + 1), cmc, styles[i % 4], marker="o", markersize=3,
                linewidth=2 if name in ("orgnn", "orgnn_rr") else 1.3, label=label)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_xlim(1, max_rank)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    meta = _save(fig, out, dpi)
    return {**meta, "num_curves": len(curves), "rows": list(curves), "max_rank": max_rank}
