"""The figure commands: ``show-ranks``, ``show-graph``, ``plot-cmc``.

Thin wrappers: parse, load or train what the figure needs, call :mod:`orgnn.viz`, print.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from orgnn.cli.args import (
    choices_list,
    input_dir,
    input_file,
    int_range,
    output_file,
)
from orgnn.cli.commands import ROWS

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
    p.add_argument("--query-index", type=int_range(0), nargs="+", metavar="I",
                   help="query indices (default: the 3 queries reconstruction helps most)")
    p.add_argument("--top", type=int_range(1), default=10,
                   help="gallery items per row, >= 1 (default 10)")
    p.add_argument("--rows", default="baseline,orgnn", type=choices_list(ROWS),
                   help="comma-separated rankings to show (default baseline,orgnn; any "
                        "ablation row)")
    p.add_argument("--images-root", metavar="PATH", type=input_dir,
                   help="folder the `paths` are relative to (default: DIR/../images)")
    p.add_argument("--out", required=True, type=output_file, metavar="PNG",
                   help="PNG to write")
    _add_model(p)
    p.set_defaults(func=_show_ranks)

    p = subparsers.add_parser(
        "show-graph", help="figure: one query's neighbourhood graph per part",
        description="Draw the neighbourhood graph the OR-GNN reconstructs one query from, "
                    "one panel per part: node colour = confidence c_j (Eq. 4), edge width = "
                    "the first layer's message weight (or affinity a_ij, Eq. 6), "
                    "wrong-identity neighbours in red.")
    _add_data(p)
    p.add_argument("--query-index", type=int_range(0), metavar="I",
                   help="query index (default: the first occluded query with a wrong "
                        "neighbour)")
    p.add_argument("--edge-weight", default="attention", choices=["attention", "affinity"],
                   help="edge width: the first layer's message weight, confidence x "
                        "affinity (attention, default), or the affinity a_ij alone (Eq. 6)")
    p.add_argument("--images-root", metavar="PATH", type=input_dir,
                   help="folder the `paths` are relative to (default: DIR/../images)")
    p.add_argument("--out", required=True, type=output_file, metavar="PNG",
                   help="PNG to write")
    _add_model(p)
    p.set_defaults(func=_show_graph)

    p = subparsers.add_parser(
        "plot-cmc", help="figure: CMC curves of ablation rows",
        description="Compute the CMC curve of each --rows ablation row on part-feature files "
                    "(or a synthetic world) and plot them; or plot curves saved earlier "
                    "with --json (--from-json).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", type=input_dir,
                     help="folder with train/query/gallery.npz")
    src.add_argument("--synthetic", metavar="PRESET", choices=_presets(),
                     help="a synthetic world preset instead of files (e.g. tiny, demo)")
    src.add_argument("--from-json", metavar="JSON", type=input_file,
                     help="plot curves written by --json")
    p.add_argument("--rows", default="baseline,oan,avg,orgnn", type=choices_list(ROWS),
                   help="comma-separated ablation rows (default baseline,oan,avg,orgnn)")
    p.add_argument("--max-rank", type=int_range(1), default=20,
                   help="last rank plotted, >= 1 (default 20)")
    p.add_argument("--json", type=output_file, metavar="FILE",
                   help="also write the curves and metrics to this JSON file; the PNG and "
                        "the JSON are made visible together, the JSON last (it records "
                        "the PNG's SHA-256)")
    p.add_argument("--out", required=True, type=output_file, metavar="PNG",
                   help="PNG to write")
    _add_model(p)
    p.set_defaults(func=_plot_cmc)


# --------------------------------------------------------------------------------------
def _presets() -> list[str]:
    from orgnn.datasets import PRESETS

    return sorted(PRESETS)


def _add_data(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", type=input_dir,
                     help="folder with query/gallery(/train).npz")
    src.add_argument("--synthetic", metavar="PRESET", choices=_presets(),
                     help="a synthetic world preset instead of files (e.g. tiny, demo)")


def _add_model(p: argparse.ArgumentParser) -> None:
    from orgnn.cli.commands import _add_search_options, _add_train_options

    p.add_argument("--checkpoint", metavar="CKPT", type=input_file,
                   help="checkpoint from `orgnn train` (default: train on DIR/train.npz "
                        "for --epochs; --epochs 0: the untrained identity-initialised model)")
    _add_search_options(p)
    _add_train_options(p, min_epochs=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def need_matplotlib(command: str) -> None:
    """Refuse a figure command before any work when matplotlib is missing, naming the
    extra that brings it (:func:`orgnn.viz.require_matplotlib`)."""
    from orgnn.viz import require_matplotlib

    require_matplotlib(f"`orgnn {command}`")


def _image_note(args: argparse.Namespace, root: Path | None, splits: dict, found: int,
                total: int) -> None:
    """Say plainly when no tile came from an image, and why."""
    from orgnn.cli.commands import note

    if found or not total or not args.data:  # a synthetic world has no images
        return
    paths = splits["query"].paths
    if paths is None:
        why = "the part-feature files have no `paths` array naming the images"
    elif root is None:
        default = "" if not args.data else \
            f" ({Path(args.data).resolve().parent / 'images'} does not exist)"
        why = f"no image folder: pass --images-root{default}"
    else:
        why = (f"no image was found under {root} (e.g. {root / str(paths[0])} does not "
               f"exist or cannot be read); pass the folder the `paths` are relative to "
               f"as --images-root")
    note(f"every tile shows identity and camera instead of an image: {why}")


def _splits(args: argparse.Namespace, need_train: bool) -> dict:
    """Load (or generate) the splits, then check the arguments that depend on them."""
    from orgnn.cli.commands import fit_to_data, visibility_warnings
    from orgnn.datasets import synthetic_preset
    from orgnn.io.features import load_split_dir

    if args.synthetic:
        splits = synthetic_preset(args.synthetic, seed=args.seed)
        where = f"synthetic '{args.synthetic}' "
    else:
        names = ("train", "query", "gallery") if need_train else ("query", "gallery")
        splits = load_split_dir(args.data, splits=names)
        where = str(Path(args.data)) + "/"
    indices = getattr(args, "query_index", None)
    indices = [indices] if isinstance(indices, int) else indices or []
    bad = [i for i in indices if i >= len(splits["query"])]
    if bad:
        raise ValueError(f"--query-index {bad[0]} out of range: {where}query.npz has "
                         f"{len(splits['query'])} queries")
    fit_to_data(args, splits, where)
    visibility_warnings(splits, where, oan=True)
    return splits


def _needs_train(args: argparse.Namespace) -> bool:
    # Without a checkpoint the model is trained (its outlier scorer and threshold at least,
    # even with --epochs 0), and only ever on the training split.
    return not args.checkpoint


def _models(args: argparse.Namespace, splits: dict, keys=("orgnn",)) -> dict:
    from orgnn.cli.commands import _configs
    from orgnn.viz import prepare_model

    config = _configs(args).train
    train = splits.get("train")
    out = {}
    for key in keys:
        if key == "orgnn" and args.checkpoint:
            from orgnn.cli.commands import check_checkpoint

            out[key] = prepare_model(checkpoint=args.checkpoint)
            where = f"{args.data}/query.npz" if args.data else \
                f"synthetic world '{args.synthetic}'"
            check_checkpoint(out[key], args.checkpoint, splits["query"], where)
        else:
            out[key] = prepare_model(train, config=config, progress=not args.quiet,
                                     outlier_aware=key == "orgnn")
    return out


def _images_root(args: argparse.Namespace) -> Path | None:
    from orgnn.viz import default_images_root

    if args.images_root:
        return Path(args.images_root)
    if args.data:
        root = default_images_root(args.data)
        return root if root.is_dir() else None
    return None


def _rows(text: str) -> list[str]:
    return text.split(",")  # checked while parsing (cli.args.choices_list)


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


def _figure(out: str, draw) -> dict:
    """Draw into a temporary sibling of ``out`` with ``draw(path)``, then rename it to
    ``out`` (recorded in :data:`orgnn.io.atomic.committed`)."""
    from orgnn.io.atomic import FileSet

    with FileSet() as outputs:
        png = FileSet.temp_path(out, ".png")
        try:
            info = draw(png)
        except BaseException:
            png.unlink(missing_ok=True)
            raise
        outputs.add(out, temp=png).commit()
    return {**info, "path": str(out)}


# --------------------------------------------------------------------------------------
def _show_ranks(args: argparse.Namespace) -> int:
    from orgnn.cli.commands import _configs
    from orgnn.viz import plot_ranks, row_distances

    need_matplotlib("show-ranks")
    rows = _rows(args.rows)
    model_rows = {"gnn", "avg", "oan_gnn", "orgnn", "orgnn_rr", "upper_bound"}
    train_needed = bool(model_rows & set(rows)) and _needs_train(args)
    splits = _splits(args, need_train=train_needed)
    query, gallery = splits["query"], splits["gallery"]
    keys = ["orgnn"] + (["oan_gnn"] if "oan_gnn" in rows else [])
    models = _models(args, splits, keys) if model_rows & set(rows) else {}
    dists = row_distances(query, gallery, rows, _configs(args).search, models)
    indices = args.query_index or _helped_most(dists, query, gallery, args.top)
    root = _images_root(args)
    info = _figure(args.out, lambda png: plot_ranks(
        png, query, gallery, dists, indices, top=args.top, images_root=root))
    print(f"wrote {info['path']} ({info['size'][0]}x{info['size'][1]} px): "
          f"{info['num_queries']} queries x {len(rows)} rankings, {info['num_tiles']} tiles "
          f"({info['num_image_tiles']} from images)")
    for r in info["rankings"]:
        hits = "".join("+" if c else "-" for c in r["correct"])
        print(f"  query {r['query']:>5}  {r['row']:<12} {hits}", flush=True)
    _image_note(args, root, splits, info["num_image_tiles"], info["num_tiles"])
    return 0


def _show_graph(args: argparse.Namespace) -> int:
    from orgnn.cli.commands import _configs
    from orgnn.viz import plot_graph

    need_matplotlib("show-graph")
    splits = _splits(args, need_train=_needs_train(args))
    query, gallery = splits["query"], splits["gallery"]
    from orgnn.reconstruction.pipeline import resolve_search

    model = _models(args, splits)["orgnn"]
    search = resolve_search(_configs(args).search, model, splits.get("train"))
    index = args.query_index
    if index is None:
        index = _first_interesting(query, gallery, search)
    info = _figure(args.out, lambda png: plot_graph(
        png, query, gallery, index, model, search, edge_weight=args.edge_weight,
        images_root=_images_root(args)))
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
    from orgnn.reconstruction.pipeline import search_split

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
    from orgnn.cli.commands import _configs, counts_line, query_counts
    from orgnn.io.atomic import FileSet, sha256_file
    from orgnn.viz import ablation_cmc, plot_cmc

    need_matplotlib("plot-cmc")
    if args.json and Path(args.json).resolve() == Path(args.out).resolve():
        raise ValueError(f"--json and --out name the same file ({args.out})")
    counts = None
    if args.from_json:
        if args.json:
            raise ValueError("--json writes curves computed from --data or --synthetic; "
                             "with --from-json there is nothing new to write")
        path = Path(args.from_json)
        try:
            payload = json.loads(path.read_text())
            curves = payload["rows"]
            if not isinstance(curves, dict) or not all("cmc" in r for r in curves.values()):
                raise TypeError("rows")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a CMC file written by `orgnn plot-cmc --json` "
                             f"({type(err).__name__})") from None
        title = payload.get("title")
    else:
        rows = _rows(args.rows)
        splits = _splits(args, need_train=_needs_train(args) or "oan_gnn" in rows)
        counts = query_counts(splits["query"], splits["gallery"])
        from orgnn.cli.commands import check_scored

        check_scored(counts)
        keys = [k for k in ("orgnn", "oan_gnn") if k in rows or (
            k == "orgnn" and {"gnn", "orgnn_rr", "upper_bound"} & set(rows))]
        models = _models(args, splits, keys)
        cfg = _configs(args)
        curves = ablation_cmc(splits["query"], splits["gallery"], rows, args.max_rank,
                              search=cfg.search, models=models)
        where = "/".join(Path(args.data).resolve().parts[-2:]) if args.data else \
            f"synthetic '{args.synthetic}'"
        title = f"CMC on {where}"
    # The figure and its JSON are one set: both written first, then renamed figure first,
    # JSON last (it names the figure's SHA-256), with SIGINT/SIGTERM held meanwhile.
    with FileSet() as outputs:
        png = FileSet.temp_path(args.out, ".png")
        try:
            info = plot_cmc(png, curves, title)
        except BaseException:
            png.unlink(missing_ok=True)
            raise
        outputs.add(args.out, temp=png)
        for name, row in curves.items():
            cmc = row["cmc"]
            rank1 = row.get("rank1", cmc[0])
            rank5 = row.get("rank5", cmc[min(4, len(cmc) - 1)])
            print(f"  {name:<12} rank1 {rank1:5.1f}  rank5 {rank5:5.1f}  "
                  f"mAP {row.get('mAP', float('nan')):5.1f}")
        if counts:
            print(counts_line(counts))
        print(f"writing {args.out}" + (f" and {args.json}" if args.json else ""), flush=True)
        if args.json:
            outputs.add_json(args.json, {
                "title": title, "max_rank": args.max_rank, "rows": curves,
                "queries": counts,
                "figure": {"path": str(args.out), "sha256": sha256_file(png)}})
        outputs.commit()
    print(f"wrote {args.out} ({info['size'][0]}x{info['size'][1]} px): "
          f"{info['num_curves']} curves" + (f"; wrote {args.json}" if args.json else ""))
    return 0
