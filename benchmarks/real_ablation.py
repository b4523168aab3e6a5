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
               "target_init": "mean"}
#: One change of the defaults per variant (the validation sweep).
VARIANTS: dict[str, tuple[dict, dict]] = {
    "defaults": ({}, {}),
    "K=10": ({"k": 10}, {"k": 10}),
    "K=30": ({"k": 30}, {"k": 30}),
    "gamma=2": ({}, {"scorer_gamma": 2.0}),
    "gamma=8": ({}, {"scorer_gamma": 8.0}),
    "1 scorer stage": ({}, {"scorer_stages": 1}),
    "2 scorer stages": ({}, {"scorer_stages": 2}),
    "1 epoch of Eq. 7": ({}, {"epochs": 1}),
    "act=relu (paper)": ({}, {"act": "relu"}),
    "no scorer (Eq. 4 alone)": ({}, {"outlier_scorer": "none"}),
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
    root = data_dir(name)
    occluded, clean = load_split_dir(root / "occluded"), load_split_dir(root / "clean")
    start = time.perf_counter()
    result = run_ablation(occluded, default_config(), progress=False)
    wall = time.perf_counter() - start
    print(format_table(result, f"\n{name}/occluded, library defaults"))
    print(f"wall {wall:.1f} s (training included)")
    clean_result = run_ablation(clean, default_config(), rows=("baseline",), progress=False)
    print(format_table(clean_result, f"{name}/clean"))
    paper = run_ablation(occluded, default_config(PAPER_SEARCH, PAPER_TRAIN),
                         rows=("avg", "orgnn"), progress=False)
    print(format_table(paper, f"{name}/occluded, the paper's literal settings"))
    return {"occluded": result.to_json(), "clean": clean_result.to_json(),
            "paper_config": paper.to_json(), "wall_seconds": round(wall, 1)}


def sweep(name: str) -> list[dict]:
    """Each variant's ``avg``/``orgnn``/``orgnn_rr`` on the validation split."""
    splits = validation_split(load_split_dir(data_dir(name) / "occluded")["train"], 0.25, 0)
    print(f"\n{name}: validation sweep on held-out training identities "
          f"({ {k: v.num_images for k, v in splits.items()} } images)")
    rows = []
    for variant, (search, train) in VARIANTS.items():
        start = time.perf_counter()
        r = run_ablation(splits, default_config(search, train),
                         rows=("avg", "orgnn", "orgnn_rr"), progress=False)
        row = {"variant": variant, "search": search, "train": train,
               **{f"{row}_{m}": r.rows[row][m] for row in r.rows for m in ("mAP", "rank1")},
               "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(f"  {variant:<26} orgnn {row['orgnn_mAP']:5.1f} / {row['orgnn_rank1']:5.1f}"
              f"   +rr {row['orgnn_rr_mAP']:5.1f} / {row['orgnn_rr_rank1']:5.1f}"
              f"   avg {row['avg_mAP']:5.1f} / {row['avg_rank1']:5.1f}   {row['seconds']} s",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS,
                        help="which real sets (default: both)")
    parser.add_argument("--sweep", action="store_true",
                        help="also run the validation sweeps (held-out training identities)")
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
            out[name]["validation_sweep"] = sweep(name)
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(out, indent=2))
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
