"""The graph-side commands: ``demo``, ``ablation``, ``train``, ``reconstruct``, ``evaluate``.

Each handler parses nothing itself: it turns the parsed arguments into library calls and
prints what they return.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_EPOCHS = 5


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help="run the full ablation on a synthetic occluded Re-ID world",
        description="Generate a synthetic Occluded-Duke-like world in memory (all queries "
                    "occluded, ~10%% of the gallery), train OR-GNN and print every row of "
                    "the paper's ablation (SPEC §6).")
    demo.add_argument("--preset", default="demo",
                      help="synthetic world preset (orgnn.datasets.PRESETS; default: demo)")
    _add_run_options(demo)
    demo.set_defaults(func=_demo)

    ablation = subparsers.add_parser(
        "ablation", help="run the ablation on part-feature files",
        description="Train on DIR/train.npz, evaluate every ablation row on DIR/query.npz "
                    "and DIR/gallery.npz, print the table and optionally write JSON.")
    ablation.add_argument("--data", required=True, help="folder with train/query/gallery.npz")
    _add_run_options(ablation)
    ablation.set_defaults(func=_ablation)

    train = subparsers.add_parser("train", help="train OR-GNN on DIR/train.npz")
    train.add_argument("--data", required=True, help="folder with train.npz")
    train.add_argument("--out", required=True, help="checkpoint path to write (atomically)")
    _add_train_options(train)
    train.set_defaults(func=_train)

    rec = subparsers.add_parser(
        "reconstruct", help="write reconstructed query/gallery part-feature files")
    rec.add_argument("--data", required=True, help="folder with query.npz and gallery.npz")
    rec.add_argument("--checkpoint", required=True, help="checkpoint from `orgnn train`")
    rec.add_argument("--out", required=True, help="output folder (query.npz, gallery.npz)")
    _add_search_options(rec)
    rec.set_defaults(func=_reconstruct)

    ev = subparsers.add_parser("evaluate", help="retrieval metrics of DIR/query vs gallery")
    ev.add_argument("--data", required=True, help="folder with query.npz and gallery.npz")
    ev.add_argument("--oan", action="store_true",
                    help="average distances over the query's visible parts only")
    ev.add_argument("--rerank", action="store_true", help="apply k-reciprocal re-ranking")
    ev.add_argument("--json", help="also write the metrics to this JSON file")
    ev.set_defaults(func=_evaluate)


# --------------------------------------------------------------------------------------
def _add_search_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("neighbourhood search (inference)")
    g.add_argument("--k", type=int, default=10, help="neighbourhood size K (default 10)")
    g.add_argument("--theta", type=float, default=0.7, help="similarity threshold (0.7)")
    g.add_argument("--mode", default="visible-mean", choices=["visible-mean", "intersection"],
                   help="search mode (default visible-mean; see docs for why)")
    g.add_argument("--index", default="flat", choices=["flat", "ivf"],
                   help="faiss index: exact (flat) or IVF for large galleries")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("OR-GNN training")
    g.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help=f"epochs (default {DEFAULT_EPOCHS}; the paper uses 120, the step "
                        "schedule is scaled)")
    g.add_argument("--train-k", type=int, default=30, help="training neighbourhood K (30)")
    g.add_argument("--train-theta", type=float, default=0.7, help="training theta (0.7)")
    g.add_argument("--init", default="identity", choices=["identity", "glorot"])
    g.add_argument("--target-init", default="visible",
                   choices=["visible", "mean", "self"],
                   help="how the target node starts: its visible parts with the hidden ones "
                        "from the neighbours' mean (default, measured best), the neighbours' "
                        "mean (the paper) or its own feature")
    g.add_argument("--classifier-init", default="imprint", choices=["imprint", "random"],
                   help="how the Eq. 7 classifier starts: the class means of the untrained "
                        "network's outputs (default, measured best) or small random weights")
    g.add_argument("--recon-weight", type=float, default=0.0,
                   help="weight of the reconstruction loss (needs clean_features)")
    g.add_argument("--seed", type=int, default=0)
    if not any(a.dest == "mode" for a in p._actions):
        g.add_argument("--mode", default="visible-mean",
                       choices=["visible-mean", "intersection"], help="search mode")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    _add_search_options(p)
    _add_train_options(p)
    p.add_argument("--rows", help="comma-separated subset of rows (default: all)")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _configs(args: argparse.Namespace):
    from orgnn.pipeline import AblationConfig
    from orgnn.training import SearchConfig, TrainConfig

    defaults = SearchConfig()
    search = SearchConfig(k=getattr(args, "k", defaults.k),
                          theta=getattr(args, "theta", defaults.theta),
                          mode=getattr(args, "mode", defaults.mode),
                          index=getattr(args, "index", defaults.index))
    train = TrainConfig(epochs=args.epochs, k=args.train_k, theta=args.train_theta,
                        mode=search.mode, init=args.init, target_init=args.target_init,
                        classifier_init=args.classifier_init,
                        recon_weight=args.recon_weight, seed=args.seed)
    return AblationConfig(search=search, train=train)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON through a temporary file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _run(splits, args: argparse.Namespace, title: str) -> int:
    from orgnn.pipeline import ABLATION_ROWS, format_table, run_ablation

    rows = ABLATION_ROWS if not args.rows else tuple(r.strip() for r in args.rows.split(","))
    result = run_ablation(splits, _configs(args), rows=rows, progress=not args.quiet)
    print(format_table(result, title))
    if args.json:
        write_json_atomic(args.json, result.to_json())
        print(f"wrote {args.json}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from orgnn.datasets import synthetic_preset

    start = time.perf_counter()
    splits = synthetic_preset(args.preset, seed=args.seed)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    print(f"synthetic world '{args.preset}' (seed {args.seed}): {sizes} images, "
          f"{splits['query'].num_parts} parts x {splits['query'].dim}-d")
    code = _run(splits, args, f"ablation on synthetic '{args.preset}' (percent)")
    print(f"total {time.perf_counter() - start:.1f} s")
    return code


def _ablation(args: argparse.Namespace) -> int:
    from orgnn.features import load_split_dir

    splits = load_split_dir(args.data)
    return _run(splits, args, f"ablation on {args.data} (percent)")


def _train(args: argparse.Namespace) -> int:
    from orgnn.features import load_split_dir
    from orgnn.training import save_checkpoint, train_orgnn

    train = load_split_dir(args.data, splits=("train",))["train"]
    config = _configs(args).train
    model = train_orgnn(train, config, progress=True)
    save_checkpoint(args.out, model, config)
    print(f"wrote {args.out}")
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    from orgnn.features import PartFeatures, load_split_dir, save_split_dir
    from orgnn.pipeline import reconstruct, search_split
    from orgnn.training import SearchConfig, load_checkpoint

    model, _ = load_checkpoint(args.checkpoint)
    splits = load_split_dir(args.data, splits=("query", "gallery"))
    gallery = splits["gallery"]
    cfg = SearchConfig(k=args.k, theta=args.theta, mode=args.mode, index=args.index)
    out = {}
    for name, target in splits.items():
        nbrs = search_split(target, gallery, cfg, same_split=name == "gallery")
        feats = reconstruct(model, target.features, gallery.features, nbrs, progress=True,
                            target_visibility=target.visibility)
        out[name] = PartFeatures(feats, np.ones(feats.shape[:2], np.float32), target.pids,
                                 target.camids, target.paths)
        print(f"{name}: {len(target)} images, {nbrs.num_empty} without neighbours")
    save_split_dir(args.out, out)
    print(f"wrote {args.out}/query.npz and {args.out}/gallery.npz")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from orgnn import metrics
    from orgnn.features import load_split_dir
    from orgnn.pipeline import METRIC_KEYS, oan_parts, part_distance

    splits = load_split_dir(args.data, splits=("query", "gallery"))
    q, g = splits["query"], splits["gallery"]
    q_parts = oan_parts(q.visible) if args.oan else None
    g_parts = oan_parts(g.visible) if args.oan else None
    dist = part_distance(q.features, g.features, q_parts)
    if args.rerank:
        dist = metrics.re_ranking(dist, part_distance(q.features, q.features, q_parts),
                                  part_distance(g.features, g.features, g_parts))
    result = metrics.evaluate(dist, q.pids, g.pids, q.camids, g.camids)
    row = {k: round(100 * float(result[k]), 2) for k in METRIC_KEYS}
    print("  ".join(f"{k} {v:.1f}" for k, v in row.items()))
    if args.json:
        write_json_atomic(args.json, row)
    return 0
