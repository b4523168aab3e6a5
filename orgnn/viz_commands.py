"""The figure commands: ``show-ranks``, ``show-graph``, ``plot-cmc``.

Thin wrappers: parse, load or train what the figure needs, call :mod:`orgnn.viz`, print.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the figure commands to ``orgnn``'s sub-command parser."""
    p = subparsers.add_parser(
        "show-ranks", help="figure: each query's top-k before and after reconstruction",
        description="Draw each query and its top-k gallery items under every --rows ranking "
                    "(default: baseline, then OR-GNN), like the paper's Fig. 4: green border "
                    "= right identity, red = wrong. Tiles are the images named in the files' "
                    "`paths` when found under --images-root, else identity tiles.")
    _add_data(p)
    p.add_argument("--query-index", type=int, nargs="+", metavar="I",
                   help="query indices (default: the 3 queries reconstruction helps most)")
    p.add_argument("--top", type=int, default=10, help="gallery items per row (default 10)")
    p.add_argument("--rows", default="baseline,orgnn",
                   help="comma-separated rankings to show (default baseline,orgnn; any "
                        "ablation row)")
    p.add_argument("--images-root", metavar="PATH",
                   help="folder the `paths` are relative to (default: DIR/../images)")
    p.add_argument("--out", required=True, help="PNG to write")
    _add_model(p)
    p.set_defaults(func=_show_ranks)

    p = subparsers.add_parser(
        "show-graph", help="figure: one query's neighbourhood graph per part",
        description="Draw the neighbourhood graph the OR-GNN reconstructs one query from, "
                    "one panel per part: node colour = confidence c_j (Eq. 4), edge width = "
                    "the first layer's message weight (or affinity a_ij, Eq. 6), "
                    "wrong-identity neighbours in red.")
    _add_data(p)
    p.add_argument("--query-index", type=int, metavar="I",
                   help="query index (default: the first occluded query with a wrong "
                        "neighbour)")
    p.add_argument("--edge-weight", default="attention", choices=["attention", "affinity"])
    p.add_argument("--images-root", metavar="PATH",
                   help="folder the `paths` are relative to (default: DIR/../images)")
    p.add_argument("--out", required=True, help="PNG to write")
    _add_model(p)
    p.set_defaults(func=_show_graph)

    p = subparsers.add_parser(
        "plot-cmc", help="figure: CMC curves of ablation rows",
        description="Compute the CMC curve of each --rows ablation row on part-feature files "
                    "(or a synthetic world) and plot them; or plot curves saved earlier "
                    "with --json (--from-json).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="folder with train/query/gallery.npz")
    src.add_argument("--synthetic", metavar="PRESET",
                     help="a synthetic world preset instead of files (e.g. tiny, demo)")
    src.add_argument("--from-json", metavar="JSON", help="plot curves written by --json")
    p.add_argument("--rows", default="baseline,oan,avg,orgnn",
                   help="comma-separated ablation rows (default baseline,oan,avg,orgnn)")
    p.add_argument("--max-rank", type=int, default=20, help="last rank plotted (default 20)")
    p.add_argument("--json", help="also write the curves and metrics to this JSON file")
    p.add_argument("--out", required=True, help="PNG to write")
    _add_model(p)
    p.set_defaults(func=_plot_cmc)


# --------------------------------------------------------------------------------------
def _add_data(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="folder with query/gallery(/train).npz")
    src.add_argument("--synthetic", metavar="PRESET",
                     help="a synthetic world preset instead of files (e.g. tiny, demo)")


def _add_model(p: argparse.ArgumentParser) -> None:
    from orgnn.commands import _add_search_options, _add_train_options

    p.add_argument("--checkpoint", metavar="CKPT",
                   help="checkpoint from `orgnn train` (default: train on DIR/train.npz "
                        "for --epochs; --epochs 0: the untrained identity-initialised model)")
    _add_search_options(p)
    _add_train_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _splits(args: argparse.Namespace, need_train: bool) -> dict:
    from orgnn.datasets import synthetic_preset
    from orgnn.features import load_split_dir

    if args.synthetic:
        return synthetic_preset(args.synthetic, seed=args.seed)
    names = ("train", "query", "gallery") if need_train else ("query", "gallery")
    return load_split_dir(args.data, splits=names)


def _needs_train(args: argparse.Namespace) -> bool:
    return not args.checkpoint and args.epochs > 0


def _models(args: argparse.Namespace, splits: dict, keys=("orgnn",)) -> dict:
    from orgnn.commands import _configs
    from orgnn.viz import prepare_model

    config = _configs(args).train
    train = splits.get("train")
    if train is None and config.epochs <= 0:
        train = splits["query"]  # only its shape is used: the model is not trained
    out = {}
    for key in keys:
        if key == "orgnn" and args.checkpoint:
            out[key] = prepare_model(checkpoint=args.checkpoint)
        else:
            out[key] = prepare_model(train, config=config, progress=not args.quiet,
                                     outlier_aware=key == "orgnn")
    return out


def _images_root(args: argparse.Namespace) -> Path | None:
    from orgnn.viz import default_images_root

    if args.images_root:
        root = Path(args.images_root)
        if not root.is_dir():
            raise ValueError(f"--images-root {root}: no such folder")
        return root
    if args.data:
        root = default_images_root(args.data)
        return root if root.is_dir() else None
    return None


def _rows(text: str) -> list[str]:
    from orgnn.viz import RANK_ROWS

    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in RANK_ROWS]
    if not rows or unknown:
        raise ValueError(f"--rows: unknown rows {unknown}; choose from {', '.join(RANK_ROWS)}")
    return rows


def _helped_most(dists: dict, query, gallery, top: int, count: int = 3) -> list[int]:
    """Queries that the last ranking improves most over the first: most extra right
    identities in the top ``top``, then the largest move of the first right match."""
    first, last = dists[next(iter(dists))], dists[list(dists)[-1]]
    junk = (query.pids[:, None] == gallery.pids[None]) & \
           (query.camids[:, None] == gallery.camids[None])
    match = (query.pids[:, None] == gallery.pids[None]) & ~junk

    def hits(d):
        order = np.argsort(np.where(junk, np.inf, d), axis=1, kind="stable")
        ranked = np.take_along_axis(match, order, axis=1)
        first_hit = np.where(ranked.any(1), ranked.argmax(1), d.shape[1])
        return ranked[:, :top].sum(1), first_hit

    (n0, f0), (n1, f1) = hits(first), hits(last)
    score = (n1 - n0) * (first.shape[1] + 1) + (f0 - f1)
    return [int(i) for i in np.argsort(-score, kind="stable")[:count]]


# --------------------------------------------------------------------------------------
def _show_ranks(args: argparse.Namespace) -> int:
    from orgnn.commands import _configs
    from orgnn.viz import plot_ranks, row_distances

    rows = _rows(args.rows)
    model_rows = {"gnn", "avg", "oan_gnn", "orgnn", "orgnn_rr", "upper_bound"}
    train_needed = bool(model_rows & set(rows)) and _needs_train(args)
    splits = _splits(args, need_train=train_needed)
    query, gallery = splits["query"], splits["gallery"]
    keys = ["orgnn"] + (["oan_gnn"] if "oan_gnn" in rows else [])
    models = _models(args, splits, keys) if model_rows & set(rows) else {}
    dists = row_distances(query, gallery, rows, _configs(args).search, models)
    indices = args.query_index or _helped_most(dists, query, gallery, args.top)
    info = plot_ranks(args.out, query, gallery, dists, indices, top=args.top,
                      images_root=_images_root(args))
    print(f"wrote {info['path']} ({info['size'][0]}x{info['size'][1]} px): "
          f"{info['num_queries']} queries x {len(rows)} rankings, {info['num_tiles']} tiles "
          f"({info['num_image_tiles']} from images)")
    for r in info["rankings"]:
        hits = "".join("+" if c else "-" for c in r["correct"])
        print(f"  query {r['query']:>5}  {r['row']:<12} {hits}")
    return 0


def _show_graph(args: argparse.Namespace) -> int:
    from orgnn.commands import _configs
    from orgnn.viz import plot_graph

    splits = _splits(args, need_train=_needs_train(args))
    query, gallery = splits["query"], splits["gallery"]
    model = _models(args, splits)["orgnn"]
    search = _configs(args).search
    index = args.query_index
    if index is None:
        index = _first_interesting(query, gallery, search)
    info = plot_graph(args.out, query, gallery, index, model, search,
                      edge_weight=args.edge_weight, images_root=_images_root(args))
    conf = np.asarray(info["confidence"])
    wrong = ~np.isin(info["neighbours"], np.flatnonzero(gallery.pids == query.pids[index]))
    print(f"wrote {info['path']} ({info['size'][0]}x{info['size'][1]} px): query {index}, "
          f"{info['num_neighbours']} neighbours ({info['num_wrong']} wrong identity), "
          f"{info['num_panels']} parts")
    if info["num_neighbours"]:
        right_c = conf[:, 1:][:, ~wrong].mean() if (~wrong).any() else float("nan")
        wrong_c = conf[:, 1:][:, wrong].mean() if wrong.any() else float("nan")
        print(f"  mean confidence: right identity {right_c:.3f}, wrong identity {wrong_c:.3f}")
    return 0


def _first_interesting(query, gallery, search) -> int:
    """The first occluded query whose neighbourhood holds a wrong identity (else 0)."""
    from orgnn.pipeline import search_split

    occluded = np.flatnonzero(~query.visible.all(1))
    candidates = occluded if occluded.size else np.arange(query.num_images)
    candidates = candidates[:512]
    nbrs = search_split(query.subset(candidates), gallery, search, same_split=False)
    pids = np.asarray(gallery.pids)[np.clip(nbrs.index, 0, None)]
    wrong = ((pids != query.pids[candidates][:, None]) & nbrs.valid).any(1)
    right = ((pids == query.pids[candidates][:, None]) & nbrs.valid).any(1)
    good = np.flatnonzero(wrong & right)
    return int(candidates[good[0]]) if good.size else int(candidates[0])


def _plot_cmc(args: argparse.Namespace) -> int:
    from orgnn.commands import _configs, write_json_atomic
    from orgnn.viz import ablation_cmc, plot_cmc

    if args.from_json:
        path = Path(args.from_json)
        try:
            payload = json.loads(path.read_text())
            curves = payload["rows"]
        except FileNotFoundError:
            raise
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a CMC file written by `orgnn plot-cmc --json` "
                             f"({type(err).__name__})") from None
        title = payload.get("title")
    else:
        rows = _rows(args.rows)
        splits = _splits(args, need_train=_needs_train(args) or "oan_gnn" in rows)
        keys = [k for k in ("orgnn", "oan_gnn") if k in rows or (
            k == "orgnn" and {"gnn", "orgnn_rr", "upper_bound"} & set(rows))]
        models = _models(args, splits, keys)
        cfg = _configs(args)
        curves = ablation_cmc(splits["query"], splits["gallery"], rows, args.max_rank,
                              search=cfg.search, models=models)
        where = "/".join(Path(args.data).resolve().parts[-2:]) if args.data else \
            f"synthetic '{args.synthetic}'"
        title = f"CMC on {where}"
        if args.json:
            write_json_atomic(args.json, {"title": title, "max_rank": args.max_rank,
                                          "rows": curves})
            print(f"wrote {args.json}")
    info = plot_cmc(args.out, curves, title)
    print(f"wrote {info['path']} ({info['size'][0]}x{info['size'][1]} px): "
          f"{info['num_curves']} curves")
    for name, row in curves.items():
        cmc = row["cmc"]
        print(f"  {name:<12} rank1 {cmc[0]:5.1f}  rank5 {cmc[min(4, len(cmc) - 1)]:5.1f}  "
              f"mAP {row.get('mAP', float('nan')):5.1f}")
    return 0
