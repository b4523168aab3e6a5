"""The graph-side commands: ``demo``, ``ablation``, ``train``, ``reconstruct``, ``evaluate``.

Each handler parses nothing itself: it turns the parsed arguments into library calls and
prints what they return. Arguments are range-checked while parsing (:mod:`orgnn.cli.args`);
what depends on the data (``--k`` against the gallery size, a checkpoint against the
features' parts and dimension) is checked right after loading, before any search, training
or output. Outputs are written atomically, several files as one set (:mod:`orgnn.io.atomic`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from orgnn.cli.args import (
    choices_list,
    device,
    float_range,
    input_dir,
    input_file,
    int_range,
    output_dir,
    output_file,
)
from orgnn.io.atomic import pid_alive, write_json_atomic

__all__ = ["register", "write_json_atomic"]

#: Eq. 7 epochs after the outlier scorer is trained: 0, measured best on a validation split
#: of cuhk03-parts' training identities (docs/results.md); the paper trains 120.
DEFAULT_EPOCHS = 6
#: Rows of SPEC §6 (a copy, so that ``--help`` does not import torch; a test keeps it equal
#: to :data:`orgnn.reconstruction.pipeline.ABLATION_ROWS`).
ROWS = ("baseline", "oan", "gnn", "avg", "oan_gnn", "orgnn", "baseline_rr", "oan_rr",
        "orgnn_rr", "upper_bound", "vis_global", "vis_global_rr", "aqe", "aqe_rr")


def register(subparsers: argparse._SubParsersAction) -> None:
    from orgnn.datasets import PRESETS

    demo = subparsers.add_parser(
        "demo", help="run the full ablation on a synthetic occluded Re-ID world",
        description="Generate a synthetic Occluded-Duke-like world in memory (all queries "
                    "occluded, ~10% of the gallery), train OR-GNN and print every row of "
                    "the paper's ablation (SPEC §6).")
    demo.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                      help="synthetic world preset (orgnn.datasets.PRESETS; default: demo)")
    _add_run_options(demo)
    demo.set_defaults(func=_demo)

    ablation = subparsers.add_parser(
        "ablation", help="run the ablation on part-feature files",
        description="Train on DIR/train.npz, evaluate every ablation row on DIR/query.npz "
                    "and DIR/gallery.npz, print the table and the number of queries scored, "
                    "and optionally write it all as JSON.")
    ablation.add_argument("--data", required=True, metavar="DIR", type=input_dir,
                          help="folder with train/query/gallery.npz")
    _add_run_options(ablation)
    ablation.set_defaults(func=_ablation)

    train = subparsers.add_parser(
        "train", help="train OR-GNN on DIR/train.npz",
        description="Train the OR-GNN (Eq. 7) on the neighbourhoods of DIR/train.npz and "
                    "write a checkpoint (plain tensors, read with weights_only=True) for "
                    "`orgnn reconstruct` and the figure commands.")
    train.add_argument("--data", required=True, metavar="DIR", type=input_dir,
                       help="folder with train.npz")
    train.add_argument("--out", required=True, metavar="CKPT", type=output_file,
                       help="checkpoint file to write (atomically; replaces an old one)")
    _add_train_options(train)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    rec = subparsers.add_parser(
        "reconstruct", help="write reconstructed query/gallery part-feature files",
        description="Search each query's and gallery image's neighbourhood in DIR/gallery.npz, "
                    "reconstruct its parts with a trained OR-GNN and write OUT/query.npz and "
                    "OUT/gallery.npz (every part visible; features in the input's float32 or "
                    "float16). OUT is replaced as a whole, in one swap: it is always either "
                    "the old folder or the complete new one.")
    rec.add_argument("--data", required=True, metavar="DIR", type=input_dir,
                     help="folder with query.npz and gallery.npz")
    rec.add_argument("--checkpoint", required=True, metavar="CKPT", type=input_file,
                     help="checkpoint from `orgnn train`")
    rec.add_argument("--out", required=True, metavar="OUT", type=output_dir,
                     help="output folder (query.npz, gallery.npz); other files already in "
                          "it are kept")
    _add_search_options(rec)
    rec.add_argument("--map", default="auto", choices=["auto", "always", "never"],
                     help="memory-map the input features instead of reading them: auto "
                          "(default) for uncompressed files of 1 GiB or more; see "
                          "docs/scale.md")
    rec.add_argument("--memory-budget", default=None, metavar="BYTES",
                     type=_byte_size,
                     help="working memory one chunk or batch of any stage may take, e.g. "
                          "2GiB, 512MiB (default: a quarter of the available memory, "
                          "256 MiB to 1 GiB); peak resident memory is about this plus the "
                          "process' own (~1 GiB) and the (N, K) neighbourhood arrays")
    rec.add_argument("--timings", type=output_file, metavar="FILE",
                     help="also write each stage's wall and CPU seconds and peak resident "
                          "memory (every rank's under torchrun) to this JSON file")
    rec.add_argument("--quiet", action="store_true", help="no progress bars")
    rec.set_defaults(func=_reconstruct)

    ev = subparsers.add_parser(
        "evaluate", help="retrieval metrics of DIR/query vs gallery",
        description="Rank DIR/gallery.npz for every query of DIR/query.npz (SPEC §5: 1 - mean "
                    "part cosine) and print mAP, rank-1/5/10 and mINP under the Market-1501 "
                    "protocol, with the number of queries scored (a query without a gallery "
                    "image of its identity from another camera is skipped).")
    ev.add_argument("--data", required=True, metavar="DIR", type=input_dir,
                    help="folder with query.npz and gallery.npz")
    ev.add_argument("--oan", action="store_true",
                    help="average distances over the query's visible parts only (the same "
                         "as --distance oan)")
    ev.add_argument("--distance", default="parts", choices=["parts", "oan", "visible-global"],
                    help="parts: 1 - mean part cosine (default, SPEC §5); oan: over the "
                         "query's visible parts only; visible-global: cosine of each image's "
                         "visible-part global feature (the sum of its unit visible parts, "
                         "normalised), what a Re-ID toolbox user compares first")
    ev.add_argument("--aqe", action="store_true",
                    help="average query expansion first (FastReID's: top 5, weights sim^3, "
                         "one round); with --distance visible-global")
    ev.add_argument("--rerank", action="store_true",
                    help="apply k-reciprocal re-ranking (from the features, without "
                         "query-query and gallery-gallery matrices, when those would not "
                         "fit in memory)")
    ev.add_argument("--json", type=output_file, metavar="FILE",
                    help="also write the metrics and query counts to this JSON file")
    ev.set_defaults(func=_evaluate)


# --------------------------------------------------------------------------------------
def _add_search_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("neighbourhood search (inference)")
    g.add_argument("--k", type=int_range(1), default=30,
                   help="neighbourhood size K, >= 1 (default 30; more than the gallery's "
                        "images is lowered to that number, with a note)")
    g.add_argument("--theta", type=float_range(-1.0, 1.0), default=None,
                   help="similarity threshold in [-1, 1] (default: calibrated on the "
                        "training split so that 2%% of right neighbours fall below it, the "
                        "one the model was trained with; the paper uses 0.7)")
    g.add_argument("--mode", default="visible-mean", choices=["visible-mean", "intersection"],
                   help="search mode (default visible-mean; see docs for why)")
    g.add_argument("--index", default="auto", choices=["auto", "flat", "ivf", "ivfpq"],
                   help="exact (flat), IVF, or IVF-PQ with exact re-ranking (galleries of "
                        "millions); auto (default): flat up to 50,000 gallery images, ivfpq "
                        "beyond; see docs/scale.md")
    g.add_argument("--device", default=None, metavar="DEV", type=device,
                   help="torch device for the exact search and the OR-GNN (cpu, cuda, "
                        "cuda:1, auto); default: faiss search and the OR-GNN on the CPU. "
                        "Under torchrun, cuda means cuda:LOCAL_RANK")


def _add_train_options(p: argparse.ArgumentParser, min_epochs: int = 0) -> None:
    g = p.add_argument_group("OR-GNN training")
    g.add_argument("--epochs", type=int_range(min_epochs), default=DEFAULT_EPOCHS,
                   help=f"epochs of Eq. 7 after the outlier scorer is trained, >= {min_epochs} "
                        f"(default {DEFAULT_EPOCHS}, measured best on held-out training "
                        "identities; the paper uses 120, the step schedule is scaled)")
    g.add_argument("--train-k", type=int_range(1), default=30,
                   help="training neighbourhood size K, >= 1 (default 30, the inference K, "
                        "as in the paper)")
    g.add_argument("--train-theta", type=float_range(-1.0, 1.0), default=None,
                   help="training similarity threshold in [-1, 1] (default: calibrated on "
                        "the training split; the paper uses 0.7)")
    g.add_argument("--outlier-scorer", default="learned", choices=["learned", "none"],
                   help="weigh each neighbour by a learned probability that it shares the "
                        "target's identity (default, measured best) or by Eq. 4 alone (the "
                        "paper)")
    g.add_argument("--scorer-stages", type=int_range(1), default=3,
                   help="refinement stages of the outlier scorer, >= 1 (default 3)")
    g.add_argument("--scorer-gamma", type=float_range(0.0, lo_open=True), default=4.0,
                   help="exponent of the scorer's probability as a node weight, > 0 "
                        "(default 4)")
    g.add_argument("--act", default="none", choices=["none", "relu"],
                   help="activation of Eq. 5: none (default; part features with negative "
                        "entries lose half their energy to a ReLU) or relu (the paper)")
    g.add_argument("--validation-split", type=float_range(0.0, 1.0, lo_open=True,
                                                          hi_open=True),
                   default=None, metavar="FRACTION",
                   help="hold out this share of the training identities (seeded by --seed) "
                        "as the query/gallery and train on the rest: for choosing settings "
                        "without the test split (ablation and train)")
    g.add_argument("--init", default="identity", choices=["identity", "glorot"],
                   help="how the layers' transform W starts: the identity, so the untrained "
                        "network is a confidence-weighted mean of the neighbours (default), "
                        "or Glorot-random")
    g.add_argument("--target-init", default="visible",
                   choices=["visible", "mean", "self"],
                   help="how the target node starts: its visible parts with the hidden ones "
                        "from the neighbours' mean (default, measured best), the neighbours' "
                        "mean (the paper) or its own feature")
    g.add_argument("--classifier-init", default="random", choices=["random", "imprint"],
                   help="how the Eq. 7 classifier starts: small random weights (default, "
                        "measured best) or the class means of the untrained network's outputs")
    g.add_argument("--triplet-weight", type=float_range(0.0), default=1.0,
                   help="weight (>= 0) of a batch-hard triplet loss (margin 0.3) on the "
                        "reconstructed targets' retrieval distance, beside Eq. 7 (default 1, "
                        "measured best; 0: Eq. 7 alone, the paper)")
    g.add_argument("--transform-lr", type=float_range(0.0, lo_open=True), default=1.0,
                   help="learning-rate multiplier (> 0) of the layers' transform W "
                        "(default 1)")
    g.add_argument("--output-bn", default="off", choices=["off", "on"],
                   help="retrieve with the raw output (off: default, the paper) or the Eq. 7 "
                        "head's batch-normalised output (on: the BNNeck convention; it "
                        "helped Eq. 7 alone, not with the triplet term)")
    g.add_argument("--recon-weight", type=float_range(0.0), default=0.0,
                   help="weight (>= 0) of an extra loss pulling the reconstruction towards "
                        "the same image without occluder; needs that image's features as "
                        "the optional `clean_features` array of train.npz (default 0: off)")
    g.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0,
                   help="random seed of training (and of a synthetic world) (default 0)")
    if not any(a.dest == "mode" for a in p._actions):
        g.add_argument("--mode", default="visible-mean",
                       choices=["visible-mean", "intersection"], help="search mode")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    _add_search_options(p)
    _add_train_options(p)
    p.add_argument("--rows", type=choices_list(ROWS),
                   help="comma-separated subset of rows (default: all)")
    p.add_argument("--json", type=output_file, metavar="FILE",
                   help="write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _configs(args: argparse.Namespace):
    from orgnn.reconstruction.pipeline import AblationConfig
    from orgnn.reconstruction.training import SearchConfig, TrainConfig

    defaults = SearchConfig()
    search = SearchConfig(k=getattr(args, "k", defaults.k),
                          theta=getattr(args, "theta", defaults.theta),
                          mode=getattr(args, "mode", defaults.mode),
                          index=getattr(args, "index", defaults.index),
                          device=getattr(args, "device", defaults.device))
    train = TrainConfig(epochs=args.epochs, k=args.train_k, theta=args.train_theta,
                        mode=search.mode, init=args.init, target_init=args.target_init,
                        classifier_init=args.classifier_init,
                        triplet_weight=args.triplet_weight, transform_lr=args.transform_lr,
                        output_bn=args.output_bn == "on",
                        recon_weight=args.recon_weight, seed=args.seed,
                        outlier_scorer=args.outlier_scorer, scorer_stages=args.scorer_stages,
                        scorer_gamma=args.scorer_gamma, act=args.act)
    return AblationConfig(search=search, train=train)


# --------------------------------------------------------------------------------------
# Checks against the data (after loading, before any work) and what was measured
# --------------------------------------------------------------------------------------
def warn(message: str) -> None:
    print(f"orgnn: warning: {message}", file=sys.stderr)


def note(message: str) -> None:
    print(f"orgnn: note: {message}", file=sys.stderr)


def fit_to_data(args: argparse.Namespace, splits: dict, where: str = "") -> None:
    """Lower ``--k`` to the gallery size and ``--train-k`` to the training split's size
    minus one (each with a note), and refuse ``--recon-weight`` without clean features."""
    gallery, train = splits.get("gallery"), splits.get("train")
    if gallery is not None and getattr(args, "k", None) and args.k > len(gallery):
        note(f"--k {args.k} is more than the gallery's {len(gallery)} images; "
             f"using --k {len(gallery)}")
        args.k = len(gallery)
    if train is not None and getattr(args, "train_k", None):
        limit = max(len(train) - 1, 1)
        if args.train_k > limit:
            note(f"--train-k {args.train_k} is more than the {len(train)} training images "
                 f"less the target; using --train-k {limit}")
            args.train_k = limit
        if getattr(args, "recon_weight", 0) > 0 and train.clean_features is None:
            raise ValueError(f"--recon-weight {args.recon_weight:g} needs the training "
                             f"images' occluder-free features, but {where}train.npz has no "
                             f"`clean_features` array")


def visibility_warnings(splits: dict, where: str = "", oan: bool = False) -> None:
    """Warn when a split has no visible part at all, and (``oan``) when most queries have
    no visible part, so that the visible-part distance falls back to all parts."""
    for name in ("query", "gallery", "train"):
        pf = splits.get(name)
        if pf is not None and len(pf) and not pf.visible.any():
            warn(f"{where}{name}.npz: no part of any image is visible (every visibility "
                 f"< 0.5): the visible-part (+OAN) distances and searches fall back to all "
                 f"parts, so those rows measure the same as without OAN")
    query = splits.get("query")
    if oan and query is not None and query.visible.any():
        blind = int((~query.visible.any(1)).sum())
        if 2 * blind > len(query):
            warn(f"{blind} of {len(query)} queries have no visible part: +OAN compares "
                 f"them on all parts, as without OAN")


def query_counts(query, gallery) -> dict[str, int]:
    """How many queries the Market-1501 protocol scores (SPEC §5) and how many it skips."""
    from orgnn.retrieval.metrics import valid_queries

    scored = int(valid_queries(query.pids, gallery.pids, query.camids, gallery.camids).sum())
    return {"total": len(query), "scored": scored, "skipped": len(query) - scored}


def check_scored(counts: dict[str, int]) -> None:
    """Refuse when no query can be scored; warn when fewer than half can."""
    if counts["scored"] == 0:
        raise ValueError(f"no query can be scored: none of the {counts['total']} queries has "
                         f"a gallery image of its identity from another camera")
    if 2 * counts["scored"] < counts["total"]:
        warn(f"only {counts['scored']} of {counts['total']} queries have a true match in the "
             f"gallery (an image of their identity from another camera); the metrics "
             f"describe those {counts['scored']} only, {counts['skipped']} are skipped")


def counts_line(counts: dict[str, int]) -> str:
    return (f"queries scored: {counts['scored']} of {counts['total']} ({counts['skipped']} "
            f"skipped: no gallery image of their identity from another camera)")


def check_checkpoint(model, checkpoint: str, pf, source: str) -> None:
    """The checkpoint's parts and feature size must be the data's; name both files."""
    have = (int(model.num_parts), int(model.in_channels))
    if have != (pf.num_parts, pf.dim):
        raise ValueError(f"checkpoint {checkpoint} is for features of {have[0]} parts x "
                         f"{have[1]}-d, but {source} has {pf.num_parts} parts x {pf.dim}-d: "
                         f"use a checkpoint trained on this data (`orgnn train`)")


def check_feature_space(model, checkpoint: str, pf, source: str) -> None:
    """Warn, naming both files, when ``pf``'s random-pair part cosines are far from those
    of the features the checkpoint was trained on (its θ then means something else here).
    Checkpoints without a fingerprint (older ones) are not checked."""
    from orgnn.reconstruction.training import feature_fingerprint, fingerprint_mismatch

    space = getattr(model, "feature_space", None) or {}
    theirs = space.get("pair_cosine_quantiles")
    if not theirs:
        return
    ours = feature_fingerprint(pf.features)
    if fingerprint_mismatch(theirs, ours):
        trained = space.get("source", "its training data")
        theta = getattr(getattr(model, "train_config", None), "theta", None)
        warn(f"{source} does not look like the features checkpoint {checkpoint} was trained "
             f"on ({trained}): the median part cosine of random image pairs is "
             f"{ours[2]:.2f} here, {theirs[2]:.2f} there (5-95%: {theirs[0]:.2f}-"
             f"{theirs[-1]:.2f})" + (f", so its theta {theta:.3f} means something else"
                                     if theta is not None else "")
             + "; train a checkpoint on this data (`orgnn train`)")


def warn_if_mostly_empty(num_empty: int, total: int, source: str, args: argparse.Namespace,
                         model=None) -> None:
    """Warn when a quarter or more of ``source``'s images found no neighbour (they are
    reconstructed from themselves alone), and say what to do."""
    if not total or num_empty < 0.25 * total:
        return
    theta = args.theta
    if theta is None:
        theta = getattr(getattr(model, "train_config", None), "theta", None)
    where = "given by --theta" if args.theta is not None else "from the checkpoint"
    warn(f"{num_empty} of {total} images of {source} have no neighbour at K={args.k}"
         + (f", theta={theta:.3f} ({where})" if theta is not None else "")
         + ": they are reconstructed from themselves alone. The threshold does not suit "
           "these features: use a checkpoint trained on this data (`orgnn train`), or pass a "
           "lower --theta")


def _byte_size(text: str) -> int:
    from orgnn.io.storage import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _data_prefix(data: str) -> str:
    return str(Path(data)) + "/"


# --------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------
def _run(splits, args: argparse.Namespace, title: str, where: str = "") -> int:
    from orgnn import distributed
    from orgnn.reconstruction.pipeline import ABLATION_ROWS, format_table, run_ablation

    rows = ABLATION_ROWS if not args.rows else tuple(args.rows.split(","))
    group = distributed.setup(getattr(args, "device", None))
    fit_to_data(args, splits, where)
    visibility_warnings(splits, where, oan=bool({"oan", "oan_rr"} & set(rows)))
    counts = query_counts(splits["query"], splits["gallery"])
    check_scored(counts)
    config = _configs(args)
    config.search.device = None if group.device is None else str(group.device)
    result = run_ablation(splits, config, rows=rows, progress=not args.quiet and
                          distributed.is_main())
    distributed.finish()
    if not distributed.is_main(group):  # under torchrun rank 0 prints and writes
        return 0
    print(format_table(result, title))
    print(counts_line(counts))
    if args.json:
        write_json_atomic(args.json, {**result.to_json(), "queries": counts})
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
    from orgnn.io.features import load_split_dir

    splits = load_split_dir(args.data)
    title = f"ablation on {args.data} (percent)"
    if args.validation_split is not None:
        from orgnn.reconstruction.validation import validation_split

        splits = validation_split(splits["train"], args.validation_split, args.seed)
        title = (f"ablation on a validation split of {args.data}/train.npz ("
                 f"{args.validation_split:g} of its identities held out, seed {args.seed}; "
                 "percent)")
    return _run(splits, args, title, _data_prefix(args.data))


def _train(args: argparse.Namespace) -> int:
    from orgnn.distributed import env_world
    from orgnn.io.features import load_split_dir
    from orgnn.reconstruction.training import (
        FINGERPRINT_LEVELS,
        feature_fingerprint,
        save_checkpoint,
        train_orgnn,
    )

    if env_world()[0] != 0:
        # Under torchrun rank 0 alone trains and writes the one checkpoint; the other
        # ranks leave at once (no process group is joined: nothing is shared, and a rank
        # waiting at a barrier would time out on a long training).
        return 0

    splits = load_split_dir(args.data, splits=("train",))
    if args.validation_split is not None:
        from orgnn.reconstruction.validation import validation_split

        held = validation_split(splits["train"], args.validation_split, args.seed)
        splits = {"train": held["train"]}
        print(f"training on {held['train'].num_images} images; "
              f"{held['query'].num_images + held['gallery'].num_images} of held-out identities "
              "left out")
    where = _data_prefix(args.data)
    fit_to_data(args, splits, where)
    visibility_warnings(splits, where)
    train = splits["train"]
    print(f"training on {where}train.npz: {train.num_images} images, "
          f"{len(np.unique(train.pids))} identities, {train.num_parts} parts x "
          f"{train.dim}-d", flush=True)
    model = train_orgnn(train, _configs(args).train, progress=not args.quiet)
    config = model.train_config  # theta as calibrated
    space = {"pair_cosine_quantiles": feature_fingerprint(train.features),
             "levels": list(FINGERPRINT_LEVELS), "source": f"{where}train.npz"}
    save_checkpoint(args.out, model, config, feature_space=space)
    how = ("given by --train-theta" if args.train_theta is not None else
           f"calibrated on the training split: {config.theta_quantile:.0%} of right "
           f"neighbours fall below it")
    print(f"wrote {args.out}: theta {config.theta:.3f} ({how}), K {config.k}, "
          f"{config.mode} search; `orgnn reconstruct` searches with this theta unless "
          f"--theta is given")
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    from orgnn import distributed
    from orgnn.io.storage import working_memory

    with working_memory(args.memory_budget):
        return _reconstruct_within_budget(args, distributed.setup(args.device))


def _reconstruct_within_budget(args: argparse.Namespace, group) -> int:
    """Search both splits' neighbourhoods in the gallery (each searched once; the
    gallery's serve the query's scoring too), score them with the model's outlier scorer
    (both sides in one pass, the k-th similarities computed once), reconstruct, write.
    Every stage is sharded under ``torchrun``; rank 0 writes."""
    from orgnn import distributed
    from orgnn.io.atomic import pause_for_tests, replace_dir
    from orgnn.io.features import PartFeatures, load_split_dir, save_split_dir
    from orgnn.io.storage import is_mapped, open_npy
    from orgnn.reconstruction import pipeline
    from orgnn.reconstruction.outliers import (
        kth_neighbour_similarity,
        prior_weights,
        score_split,
    )
    from orgnn.reconstruction.training import SearchConfig, load_checkpoint

    if Path(args.out).resolve() == Path(args.data).resolve():
        raise ValueError(f"--out {args.out} is the --data folder: its query.npz and "
                         f"gallery.npz would be replaced by reconstructions; name another "
                         f"folder")
    clock = _StageClock()
    with clock("load"):
        model, _ = load_checkpoint(args.checkpoint)
        splits = load_split_dir(args.data, splits=("query", "gallery"),
                                mapped={"auto": None, "always": True, "never": False}[args.map])
    where = _data_prefix(args.data)
    for name, pf in splits.items():
        check_checkpoint(model, args.checkpoint, pf, f"{where}{name}.npz")
    check_feature_space(model, args.checkpoint, splits["gallery"], f"{where}gallery.npz")
    fit_to_data(args, splits, where)
    visibility_warnings(splits, where)
    query, gallery = splits["query"], splits["gallery"]
    main = distributed.is_main(group)
    cfg = pipeline.resolve_search(SearchConfig(
        k=args.k, theta=args.theta, mode=args.mode, index=args.index,
        device=None if group.device is None else str(group.device)), model)
    index_cache: dict = {}  # the gallery's faiss index, built once for every search
    nbrs, weights = {}, {"query": None, "gallery": None}
    with clock("search"):
        nbrs["query"] = pipeline.search_split(query, gallery, cfg, same_split=False,
                                              index_cache=index_cache)
    with clock("gallery_search"):
        nbrs["gallery"] = pipeline.search_split(gallery, gallery, cfg, same_split=True,
                                                index_cache=index_cache)
    scorer = getattr(model, "scorer", None)
    if scorer is not None:
        search_kw = dict(index=cfg.index, nprobe=cfg.nprobe, device=cfg.device,
                         index_cache=index_cache)
        with clock("kth"):
            kth = kth_neighbour_similarity(gallery.features, scorer.kth, **search_kw)
        with clock("score"):
            g_prob, q_prob = score_split(scorer, gallery, nbrs["gallery"], query,
                                         nbrs["query"], kth=kth, **search_kw)
        weights = {"query": prior_weights(q_prob, scorer.gamma),
                   "gallery": prior_weights(g_prob, scorer.gamma)}
        del g_prob, q_prob, kth
    index_cache.clear()
    out = {}
    with _scratch_dir(args.out) as scratch:
        for name, target in splits.items():
            # A mapped input (a large file) is reconstructed into a mapped scratch file,
            # batch by batch, and streamed from there into the output archive.
            dest = None
            if scratch is not None and is_mapped(target.features) and group.world_size == 1:
                dest = open_npy(scratch / f"{name}.npy", (len(target), target.num_parts,
                                model.hidden_channels), target.features.dtype)
            with clock(f"reconstruct_{name}"):
                feats = pipeline.reconstruct(
                    model, target.features, gallery.features, nbrs[name],
                    device=group.device or "cpu", progress=not args.quiet and main,
                    target_visibility=target.visibility, node_weight=weights[name],
                    out=dest)
            weights[name] = None
            if main:  # rank 0 alone holds the gathered features
                feats = feats.astype(target.features.dtype, copy=False)  # float16 in and out
                out[name] = PartFeatures(feats, np.ones(feats.shape[:2], np.float32),
                                         target.pids, target.camids, target.paths)
                print(f"{name}: {len(target)} images, {nbrs[name].num_empty} without "
                      f"neighbours", flush=True)
                warn_if_mostly_empty(nbrs[name].num_empty, len(target),
                                     f"{where}{name}.npz", args, model)
        if main:
            def build(folder: Path) -> None:
                save_split_dir(folder, {"query": out["query"]})
                pause_for_tests("query.npz written")
                save_split_dir(folder, {"gallery": out["gallery"]})

            with clock("write"):
                replace_dir(args.out, build)
    timings = clock.gather()
    distributed.finish()
    if not main:
        return 0
    print(f"wrote {args.out}/query.npz and {args.out}/gallery.npz (one set)")
    if args.timings:
        write_json_atomic(args.timings, {"stages": timings[0], "ranks": timings,
                                         "k": cfg.k, "theta": cfg.theta,
                                         "index": cfg.index})
        print(f"wrote {args.timings}")
    return 0


class _StageClock:
    """``with clock(stage):`` records the stage's wall seconds, this process' CPU seconds
    (:func:`time.process_time`: robust where other work shares the machine) and the
    resident-set high-water mark during the stage (``VmHWM`` after a reset, MiB; Linux)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _reset_peak_rss()
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.stages[name] = {"wall_s": round(time.perf_counter() - wall, 3),
                                 "cpu_s": round(time.process_time() - cpu, 3),
                                 "peak_rss_mib": _peak_rss_mib()}

    def gather(self) -> list[dict[str, dict[str, float]]]:
        """Every rank's stages, in rank order (on every rank)."""
        from orgnn import distributed

        if distributed.world_size() == 1:
            return [self.stages]
        import torch.distributed as dist

        box: list = [None] * distributed.world_size()
        dist.all_gather_object(box, self.stages)
        return box


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return float("nan")


#: Owner file in a scratch folder: ``host pid`` of the run that made it.
SCRATCH_OWNER = "owner"


@contextmanager
def _scratch_dir(out: str) -> Iterator[Path | None]:
    """A hidden scratch folder beside ``out`` (same file system), removed afterwards
    whatever happens; ``None`` where it cannot be made (the output is then held in memory).
    Folders a killed run left behind (their owner process gone) are removed first."""
    parent = Path(out).resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_scratch(parent, Path(out).name)
        scratch = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.scratch-", dir=parent))
        (scratch / SCRATCH_OWNER).write_text(f"{socket.gethostname()} {os.getpid()}")
    except OSError:
        yield None
        return
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _remove_stale_scratch(parent: Path, name: str, grace_s: float = 600.0) -> None:
    """Remove ``.NAME.scratch-*`` folders whose owner (this host) is no longer running;
    one without an owner file only when older than ``grace_s`` (it may be being made)."""
    host = socket.gethostname()
    for folder in parent.glob(f".{name}.scratch-*"):
        try:
            owner = (folder / SCRATCH_OWNER).read_text().split()
        except OSError:
            owner = []
        if len(owner) == 2:
            if owner[0] != host or pid_alive(int(owner[1])):
                continue
        elif time.time() - folder.stat().st_mtime < grace_s:
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _evaluate(args: argparse.Namespace) -> int:
    from orgnn.io.features import load_split_dir
    from orgnn.reconstruction.pipeline import (
        METRIC_KEYS,
        oan_parts,
        part_distance,
        rerank_distances,
    )
    from orgnn.retrieval import metrics

    splits = load_split_dir(args.data, splits=("query", "gallery"))
    q, g = splits["query"], splits["gallery"]
    if args.oan:
        if args.distance not in ("parts", "oan"):
            raise ValueError("--oan is --distance oan; it cannot be combined "
                             f"with --distance {args.distance}")
        args.distance = "oan"
    if args.aqe and args.distance != "visible-global":
        raise ValueError("--aqe expands the visible-part global feature; add "
                         "--distance visible-global")
    visibility_warnings(splits, _data_prefix(args.data),
                        oan=args.distance in ("oan", "visible-global"))
    counts = query_counts(q, g)
    check_scored(counts)
    q_feats, g_feats = q.features, g.features
    if args.distance == "visible-global":  # one part per image: the cosine distance
        from orgnn.retrieval.query_expansion import (
            average_query_expansion,
            visible_global_feature,
        )

        q_feats = visible_global_feature(q.features, q.visible)
        g_feats = visible_global_feature(g.features, g.visible)
        if args.aqe:
            q_feats, g_feats = average_query_expansion(q_feats, g_feats)
        q_feats, g_feats = q_feats[:, None], g_feats[:, None]
    q_parts = oan_parts(q.visible) if args.distance == "oan" else None
    g_parts = oan_parts(g.visible) if args.distance == "oan" else None
    dist = part_distance(q_feats, g_feats, q_parts)
    if args.rerank:
        dist = rerank_distances(q_feats, g_feats, dist, q_parts, g_parts)
    result = metrics.evaluate(dist, q.pids, g.pids, q.camids, g.camids)
    assert result["num_valid_queries"] == counts["scored"]
    row = {k: round(100 * float(result[k]), 2) for k in METRIC_KEYS}
    print("  ".join(f"{k} {v:.1f}" for k, v in row.items()))
    print(counts_line(counts))
    if args.json:
        payload: dict[str, Any] = {**row, "queries": counts}
        write_json_atomic(args.json, payload)
        print(f"wrote {args.json}")
    return 0
