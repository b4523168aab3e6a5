"""``orgnn masks``, ``orgnn train-oan``, ``orgnn train-fen``, ``orgnn extract``.

Thin wrappers: parse, call :mod:`orgnn.reid`, print. Importing this module needs neither
torchvision nor torch (the graph side's commands must work without them); the handlers import
what they drive.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from orgnn.cli.args import device, float_range, input_dir, int_range, output_dir

__all__ = ["register"]

_PROB = float_range(0.0, 1.0)
_POSITIVE = float_range(0.0, lo_open=True)

_DATASETS = ("market1501", "dukemtmc", "occluded_duke", "occluded_reid", "partial_reid")


def _add_common(p: argparse.ArgumentParser, dataset: bool = True) -> None:
    if dataset:
        p.add_argument("--dataset", required=True, choices=_DATASETS,
                       help="dataset layout of --dataset-dir")
    p.add_argument("--dataset-dir", required=True, metavar="DIR", help="dataset folder")
    p.add_argument("--device", default="auto", type=device,
                   help="'auto' (CUDA if available, default), 'cpu', 'cuda', 'cuda:1' ...")
    p.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                   help="unreadable/truncated image: stop naming it (default) or report and "
                        "skip it")
    p.add_argument("--no-progress", "--quiet", dest="progress", action="store_false",
                   help="no progress bars")


def _add_train(p: argparse.ArgumentParser, task: str) -> None:
    _add_common(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run folder: OUT/last.pt is the checkpoint")
    p.add_argument("--mask-dir", metavar="DIR", required=task == "oan",
                   help="person masks from `orgnn masks`" + (" (required)" if task == "oan"
                                                              else " (optional)"))
    p.add_argument("--epochs", type=int_range(1), default=120, help="epochs (default 120)")
    p.add_argument("--lr", type=_POSITIVE, default=3.5e-4,
                   help="Adam learning rate, > 0 (default 3.5e-4)")
    p.add_argument("--milestones", type=int_range(1), nargs="*", default=[40, 70],
                   help="epochs where the lr is multiplied by --gamma (default 40 70)")
    p.add_argument("--gamma", type=_POSITIVE, default=0.1,
                   help="lr factor at each milestone, > 0 (default 0.1)")
    p.add_argument("--weight-decay", type=float_range(0.0), default=5e-4,
                   help="weight decay, >= 0 (default 5e-4)")
    if task == "fen":
        p.add_argument("--P", "-P", dest="P", type=int_range(1), default=8,
                       help="identities per batch (default 8)")
        p.add_argument("--K", "-K", dest="K", type=int_range(1), default=4,
                       help="images per identity (default 4)")
        p.add_argument("--margin", type=float_range(0.0), default=0.3,
                       help="triplet margin, >= 0 (default 0.3)")
        p.add_argument("--label-smoothing", type=float_range(0.0, 1.0, hi_open=True),
                       default=0.0, help="ID-loss label smoothing in [0, 1) (default 0)")
    else:
        p.add_argument("--batch-size", type=int_range(1), default=32,
                       help="images per batch (default 32)")
        p.add_argument("--tau", type=_PROB, default=0.5,
                       help="part label threshold on mask row coverage (default 0.5)")
        p.add_argument("--allow-bad-masks", action="store_true",
                       help="train even on masks that cannot teach OAN anything (mostly empty, "
                            "or a part almost never visible); they are refused by default")
    p.add_argument("--occlude-prob", type=_PROB, default=None,
                   help="synthetic-occlusion probability (default: 0.5 OAN, 0 FEN)")
    p.add_argument("--height", type=int_range(1), default=384,
                   help="input height in pixels (default 384)")
    p.add_argument("--width", type=int_range(1), default=128,
                   help="input width in pixels (default 128)")
    p.add_argument("--flip-prob", type=_PROB, default=0.5,
                   help="horizontal-flip probability (default 0.5)")
    p.add_argument("--erasing-prob", type=_PROB, default=0.5,
                   help="random-erasing probability (default 0.5)")
    p.add_argument("--arch", default="resnet50", choices=("resnet50", "resnet34", "resnet18"),
                   help="backbone (default resnet50)")
    p.add_argument("--pool", default="avg", choices=("avg", "max"), help="per-part pooling")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--backbone-weights", metavar="PATH",
                         help="local torchvision ResNet state-dict file (weights_only load)")
    weights.add_argument("--pretrained", action="store_true",
                         help="torchvision ImageNet weights (downloads; needs internet)")
    p.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0,
                   help="random seed (default 0)")
    p.add_argument("--workers", type=int_range(0), default=4,
                   help="data-loading processes (default 4; 0: in the main process)")
    p.add_argument("--no-amp", dest="amp", action="store_false",
                   help="float32 on CUDA (AMP is on by default on CUDA, never on CPU)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue from OUT/last.pt (or CKPT)")
    p.add_argument("--checkpoint-every", type=int_range(1), default=1, metavar="EPOCHS",
                   help="write OUT/last.pt every this many epochs (and at the end)")
    p.add_argument("--max-steps", type=int_range(1), default=None,
                   help="stop after this many optimiser steps (smoke tests)")
    p.set_defaults(func=_train_oan if task == "oan" else _train_fen)


def register(subparsers) -> None:
    """Add the image-side commands to ``orgnn``'s sub-command parser."""
    p = subparsers.add_parser(
        "masks", help="person masks with Mask R-CNN (one PNG per image)",
        description="Run torchvision's Mask R-CNN over every image under --dataset-dir and "
                    "write the largest, most central person's mask as OUT/<same path>.png. "
                    "Existing masks are kept (rerun to resume).")
    _add_common(p, dataset=False)
    p.add_argument("--out", required=True, metavar="DIR", help="mask folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", metavar="PATH",
                     help="local maskrcnn_resnet50_fpn state-dict file")
    src.add_argument("--pretrained", action="store_true",
                     help="torchvision's COCO weights (downloads; needs internet)")
    src.add_argument("--random-weights", action="store_true",
                     help="untrained model: tests the plumbing only, finds no one (every "
                          "mask is empty and meaningless)")
    p.add_argument("--batch-size", type=int_range(1), default=4,
                   help="images per batch (default 4)")
    p.add_argument("--score-thresh", type=_PROB, default=0.5,
                   help="least detection score of a person (default 0.5)")
    p.add_argument("--min-size", type=int_range(1), default=800,
                   help="Mask R-CNN resize (short side, default 800)")
    p.add_argument("--max-size", type=int_range(1), default=1333,
                   help="Mask R-CNN resize (long side, default 1333)")
    p.set_defaults(func=_masks)

    _add_train(subparsers.add_parser(
        "train-fen", help="train the feature extraction network (Eq. 1)",
        description="Train FEN: PK batches, ID cross-entropy + batch-hard triplet per part. "
                    "Single GPU by default; multi-GPU with `torchrun --nproc-per-node N "
                    "--no-python orgnn train-fen ...`."),
        "fen")
    _add_train(subparsers.add_parser(
        "train-oan", help="train the occlusion-aware network on person masks (Eq. 2)",
        description="Train OAN on person masks (with synthetic occlusions) against part "
                    "labels from the mask rule; BCE per part. The mask folder is checked "
                    "first: missing masks and masks that cannot teach anything (mostly "
                    "empty, a part never visible) are refused."), "oan")

    p = subparsers.add_parser(
        "extract", help="images (+ masks) -> part-feature files (train/query/gallery .npz)",
        description="Write OUT/{train,query,gallery}.npz in the part-feature format (SPEC §7) "
                    "from a FEN checkpoint, with OAN visibility when --oan is given.")
    _add_common(p)
    p.add_argument("--fen", required=True, metavar="CKPT", help="FEN checkpoint (last.pt)")
    p.add_argument("--oan", metavar="CKPT", help="OAN checkpoint; needs --mask-dir")
    p.add_argument("--mask-dir", metavar="DIR", type=input_dir,
                   help="person masks from `orgnn masks` (needed with --oan)")
    p.add_argument("--out", required=True, metavar="DIR", type=output_dir,
                   help="folder for {train,query,gallery}.npz, replaced as one set when "
                        "every split is extracted (other files in it are kept)")
    p.add_argument("--splits", nargs="+", choices=("train", "query", "gallery"),
                   help="default: every non-empty split")
    p.add_argument("--visibility", choices=("oan", "ones", "occluder"),
                   help="default: oan with --oan, else ones")
    p.add_argument("--occlude-prob", type=_PROB, default=0.0,
                   help="cover images of --occlude-splits with a synthetic occluder with "
                        "this probability (default 0)")
    p.add_argument("--occlude-splits", nargs="+", default=["query"],
                   choices=("train", "query", "gallery"),
                   help="splits --occlude-prob applies to (default query)")
    p.add_argument("--height", type=int_range(1), default=384,
                   help="input height in pixels (default 384)")
    p.add_argument("--width", type=int_range(1), default=128,
                   help="input width in pixels (default 128)")
    p.add_argument("--batch-size", type=int_range(1), default=64,
                   help="images per batch (default 64)")
    p.add_argument("--workers", type=int_range(0), default=4,
                   help="data-loading processes (default 4; 0: in the main process)")
    p.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0,
                   help="random seed of the synthetic occluders (default 0)")
    p.add_argument("--no-amp", dest="amp", action="store_false",
                   help="float32 on CUDA (AMP is on by default on CUDA, never on CPU)")
    p.set_defaults(func=_extract)


def _warn(message: str) -> None:
    print(f"orgnn: warning: {message}", file=sys.stderr)


def _one_line_bad_image(run: Callable[[], int]) -> int:
    """Run a command; an unreadable image (from the main process or a DataLoader worker)
    becomes one line that names the file and the way around it."""
    from orgnn.reid.io import BadImageError

    try:
        return run()
    except BadImageError as err:
        raise ValueError(f"{err} (--on-bad-image skip leaves unreadable images out and "
                         f"reports each)") from None


def _compact_committed(start: int, many: str | None = None) -> None:
    """Keep :data:`orgnn.io.atomic.committed` (what an interrupted command reports as
    written) short: each path once, and the masks of ``orgnn masks`` as one entry."""
    from orgnn.io.atomic import committed

    new = list(dict.fromkeys(committed[start:]))
    if many is not None and len(new) > 1:
        new = [f"{len(new)} {many}"]
    committed[start:] = new


def _masks(args) -> int:
    from orgnn.io.atomic import committed
    from orgnn.reid.engine import resolve_device
    from orgnn.reid.masks import build_mask_rcnn, write_masks

    if args.random_weights:
        _warn("--random-weights: an untrained Mask R-CNN finds no one, so every mask written "
              "is empty and meaningless (a plumbing test; `orgnn train-oan` refuses such "
              "masks). Without weights, `orgnn extract --visibility ones|occluder` needs no "
              "masks")
    model = build_mask_rcnn(args.weights, args.pretrained, args.random_weights,
                            args.min_size, args.max_size, args.score_thresh)
    start = len(committed)
    try:
        summary = _one_line_bad_image(lambda: write_masks(
            args.dataset_dir, args.out, model, resolve_device(args.device), args.batch_size,
            args.score_thresh, args.on_bad_image, args.progress))
    finally:
        _compact_committed(start, f"mask PNGs under {args.out}")
    print(f"masks -> {args.out}: {summary}")
    return 0


def _train(args, task: str) -> int:
    from orgnn.reid.engine import TrainConfig, train

    keys = ("dataset", "dataset_dir", "out", "mask_dir", "epochs", "lr", "milestones", "gamma",
            "weight_decay", "P", "K", "batch_size", "height", "width", "flip_prob",
            "erasing_prob", "occlude_prob", "tau", "margin", "label_smoothing", "arch", "pool",
            "backbone_weights", "pretrained", "seed", "workers", "device", "amp", "resume",
            "max_steps", "checkpoint_every", "on_bad_image", "allow_bad_masks", "progress")
    cfg = TrainConfig(task=task, **{k: getattr(args, k) for k in keys if hasattr(args, k)})
    from orgnn.io.atomic import committed

    start = len(committed)
    try:
        result = _one_line_bad_image(lambda: train(cfg, warn=_warn))
    finally:
        _compact_committed(start)  # last.pt once, not once per epoch
    if result["rank"] != 0:  # torchrun: rank 0 reports
        return 0
    skipped = len(result["skipped"])
    note = f", {skipped} unreadable image(s) skipped" if skipped else ""
    print(f"{task.upper()} checkpoint -> {result['checkpoint']} ({result['steps']} steps, "
          f"{result['images_per_s']:.1f} img/s{note})")
    return 0


def _train_fen(args) -> int:
    return _train(args, "fen")


def _train_oan(args) -> int:
    return _train(args, "oan")


def _extract(args) -> int:
    from orgnn.reid.extract import extract

    if args.oan and not args.mask_dir:
        raise ValueError("--oan needs --mask-dir (the masks from `orgnn masks`)")
    from orgnn.io.atomic import replace_dir

    def build(folder) -> None:  # every split into a new folder, then one swap
        def log(message) -> None:
            print(str(message).replace(str(folder), str(args.out)))

        extract(args.dataset, args.dataset_dir, args.fen, folder, args.oan, args.mask_dir,
                args.splits, args.visibility, args.occlude_prob, args.occlude_splits,
                args.height, args.width, args.batch_size, args.device, args.workers,
                args.seed, args.on_bad_image, args.amp, args.progress, log=log)

    _one_line_bad_image(lambda: replace_dir(args.out, build))
    print(f"wrote {args.out} (one set)")
    return 0
