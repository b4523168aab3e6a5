"""The ablation on real part features (shared/data: cuhk03-parts and mini-mars-parts), the
paper-literal configuration beside the defaults, and the validation sweeps that chose them.

    python benchmarks/real_ablation.py --json benchmarks/results/real_ablation.json
    python benchmarks/real_ablation.py --sweep --sets cuhk03-parts      # + validation sweeps

For each set: every ablation row on ``occluded/`` with the library defaults, the ``baseline``
row on ``clean/`` (same images without occluders), and the ``orgnn`` row with the paper's
literal settings (Eq. 4 alone, ReLU, training K=30 / theta=0.7, inference K=10 / theta=0.7,
target started as the neighbours' mean, 5 epochs of Eq. 7).

``--sweep`` runs on a validation split carved out of the *training* identities
(:func:`orgnn.reconstruction.validation.validation_split`, 25 %, seed 0): the test split is never
looked at to choose anything. Each variant changes one setting of the defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import faiss
import torch
import torch_geometric

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orgnn.io.features import load_split_dir  # noqa: E402
from orgnn.reconstruction.pipeline import AblationConfig, format_table, run_ablation  # noqa: E402
from orgnn.reconstruction.training import SearchConfig, TrainConfig  # noqa: E402
from orgnn.reconstruction.validation import validation_split  # noqa: E402

SETS = ("cuhk03-parts", "mini-mars-parts")
#: The paper's literal settings (SPEC §3-4), reachable by options.
PAPER_SEARCH = {"k": 10, "theta": 0.7}
PAPER_TRAIN = {"epochs": 5, "k": 30, "theta": 0.7, "outlier_scorer": "none", "act": "relu",
               "target_init": "mean", "triplet_weight": 0.0, "output_bn": False}
#: One change of the defaults per variant (the validation sweep).
VARIANTS: dict[str, tuple[dict, dict]] = {
    "defaults": ({}, {}),
    "0 epochs (untrained layers)": ({}, {"epochs": 0}),
    "1 epoch, Eq. 7 alone, raw output": ({}, {"epochs": 1, "triplet_weight": 0.0,
                                              "output_bn": False}),
    "3 epochs, Eq. 7 alone, raw output": ({}, {"epochs": 3, "triplet_weight": 0.0,
                                               "output_bn": False}),
    "6 epochs, Eq. 7 alone, raw output": ({}, {"epochs": 6, "triplet_weight": 0.0,
                                               "output_bn": False}),
    "3 epochs, Eq. 7 alone, BN output": ({}, {"epochs": 3, "triplet_weight": 0.0,
                                              "output_bn": True}),
    "3 epochs, + triplet": ({}, {"epochs": 3}),
    "3 epochs, Eq. 7 alone, W lr x0.1": ({}, {"epochs": 3, "triplet_weight": 0.0,
                                              "output_bn": False, "transform_lr": 0.1}),
    "1 epoch, imprinted head, raw output": ({}, {"epochs": 1, "classifier_init": "imprint",
                                                 "triplet_weight": 0.0, "output_bn": False}),
    "6 epochs, + triplet, BN output": ({}, {"epochs": 6, "output_bn": True}),
}


def data_root() -> Path:
    return Path(os.environ.get("ORGNN_SHARED_DATA", REPO.parent / "shared" / "data"))


def data_dir(name: str = "mini-mars-parts") -> Path:
    path = data_root() / name
    if not path.is_dir():
        sys.exit(f"{name} not found under {data_root()} (set ORGNN_SHARED_DATA)")
    return path


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"PyG {torch_geometric.__version__}, faiss {faiss.__version__}")


def default_config(search: dict | None = None, train: dict | None = None) -> AblationConfig:
    from orgnn.cli.commands import DEFAULT_EPOCHS

    return AblationConfig(search=SearchConfig(**(search or {})),
                          train=TrainConfig(**{"epochs": DEFAULT_EPOCHS, **(train or {})}))


def run_set(name: str) -> dict:
    from orgnn.reconstruction.training import train_orgnn

    root = data_dir(name)
    occluded, clean = load_split_dir(root / "occluded"), load_split_dir(root / "clean")
    config = default_config()
    start = time.perf_counter()
    trained = train_orgnn(occluded["train"], config.train, progress=False)
    result = run_ablation(occluded, config, progress=False, models={"orgnn": trained})
    wall = time.perf_counter() - start
    print(format_table(result, f"\n{name}/occluded, library defaults"))
    print(f"wall {wall:.1f} s (training included)")
    # The same run untrained (0 epochs of Eq. 7; the same fitted scorer): what learning adds.
    untrained = train_orgnn(occluded["train"], TrainConfig(**{**config.train.__dict__,
                                                               "epochs": 0}),
                            progress=False, scorer=trained.scorer)
    zero = run_ablation(occluded, config, rows=("orgnn", "orgnn_rr"), progress=False,
                        models={"orgnn": untrained})
    print(format_table(zero, f"{name}/occluded, the same with --epochs 0"))
    clean_result = run_ablation(clean, default_config(), rows=("baseline",), progress=False)
    print(format_table(clean_result, f"{name}/clean"))
    paper = run_ablation(occluded, default_config(PAPER_SEARCH, PAPER_TRAIN),
                         rows=("avg", "orgnn"), progress=False)
    print(format_table(paper, f"{name}/occluded, the paper's literal settings"))
    return {"occluded": result.to_json(), "epochs_0": zero.to_json(),
            "clean": clean_result.to_json(), "paper_config": paper.to_json(),
            "wall_seconds": round(wall, 1)}


def sweep(name: str, variants: list[str] | None = None) -> list[dict]:
    """Each variant's ``orgnn``/``orgnn_rr`` (and the peer rows) on a validation split of
    the training identities that mirrors the test protocol (occluded queries, a gallery
    occluded at 10 %, built with ``clean/train.npz``)."""
    root = data_dir(name)
    splits = validation_split(load_split_dir(root / "occluded")["train"], 0.25, 0,
                              clean=load_split_dir(root / "clean")["train"])
    print(f"\n{name}: validation sweep on held-out training identities "
          f"({ {k: v.num_images for k, v in splits.items()} } images)")
    rows = []
    for variant in variants or list(VARIANTS):
        search, train = VARIANTS[variant]
        start = time.perf_counter()
        wanted = ("orgnn", "orgnn_rr", "aqe", "aqe_rr", "vis_global_rr") \
            if variant == "defaults" else ("orgnn", "orgnn_rr")
        r = run_ablation(splits, default_config(search, train), rows=wanted, progress=False)
        row = {"variant": variant, "search": search, "train": train,
               **{f"{row}_{m}": r.rows[row][m] for row in r.rows for m in ("mAP", "rank1")},
               "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(f"  {variant:<40} orgnn {row['orgnn_mAP']:5.1f} / {row['orgnn_rank1']:5.1f}"
              f"   +rr {row['orgnn_rr_mAP']:5.1f} / {row['orgnn_rr_rank1']:5.1f}"
              f"   {row['seconds']} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS,
                        help="which real sets (default: both)")
    parser.add_argument("--sweep", action="store_true",
                        help="also run the validation sweeps (held-out training identities)")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                        metavar="NAME", help="with --sweep: only these variants")
    parser.add_argument("--no-ablation", action="store_true",
                        help="skip the test-split ablation (with --sweep: sweeps only)")
    parser.add_argument("--json", default=None, help="write all results here")
    args = parser.parse_args(argv)
    print(f"$ python benchmarks/real_ablation.py {' '.join(argv or sys.argv[1:])}")
    print(machine())
    out: dict = {"machine": machine(), "command": " ".join(["benchmarks/real_ablation.py",
                                                           *(argv or sys.argv[1:])])}
    for name in args.sets:
        out[name] = {} if args.no_ablation else run_set(name)
        if args.sweep:
            out[name]["validation_sweep"] = sweep(name, args.variants)
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(out, indent=2))
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
