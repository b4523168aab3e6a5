"""The ablation on real part features (shared/data/mini-mars-parts), plus the sweeps behind
the defaults.

    python benchmarks/real_ablation.py                      # the table in docs/results.md
    python benchmarks/real_ablation.py --sweep              # + K/theta and training sweeps

Runs every ablation row on ``occluded/`` and the ``baseline`` row on ``clean/`` with the
library defaults, prints the tables and writes JSON (``--json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch_geometric

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orgnn.features import load_split_dir  # noqa: E402
from orgnn.pipeline import (  # noqa: E402
    AblationConfig,
    format_table,
    run_ablation,
)
from orgnn.training import SearchConfig, TrainConfig  # noqa: E402


def data_dir() -> Path:
    root = Path(os.environ.get("ORGNN_SHARED_DATA", REPO.parent / "shared" / "data"))
    path = root / "mini-mars-parts"
    if not path.is_dir():
        sys.exit(f"mini-mars-parts not found under {root} (set ORGNN_SHARED_DATA)")
    return path


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"PyG {torch_geometric.__version__}, faiss {faiss.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: the CLI default)")
    parser.add_argument("--sweep", action="store_true", help="also run the sweeps")
    parser.add_argument("--json", default=None, help="write all results here")
    args = parser.parse_args(argv)
    from orgnn.commands import DEFAULT_EPOCHS

    epochs = args.epochs or DEFAULT_EPOCHS
    root = data_dir()
    occluded, clean = load_split_dir(root / "occluded"), load_split_dir(root / "clean")
    print(f"$ python benchmarks/real_ablation.py {' '.join(argv or sys.argv[1:])}")
    print(machine())
    out: dict = {"machine": machine(), "epochs": epochs}

    config = AblationConfig(train=TrainConfig(epochs=epochs))
    start = time.perf_counter()
    result = run_ablation(occluded, config, progress=False)
    print(format_table(result, f"mini-mars-parts/occluded, defaults, {epochs} epochs"))
    clean_result = run_ablation(clean, config, rows=("baseline",), progress=False)
    print(format_table(clean_result, "mini-mars-parts/clean"))
    print(f"wall {time.perf_counter() - start:.1f} s")
    out["occluded"], out["clean"] = result.to_json(), clean_result.to_json()

    if args.sweep:
        out["sweep_search"] = sweep_search(occluded)
        out["sweep_training"] = sweep_training(with_clean_train(occluded, root), epochs)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def with_clean_train(splits: dict, root: Path) -> dict:
    """Attach the clean features of the training images (from ``all-frames.npz``, matched
    by path) so that the reconstruction-loss variant can use them."""
    frames = np.load(root / "all-frames.npz")
    train = splits["train"]
    if not np.array_equal(frames["train_path"], train.paths):
        sys.exit("all-frames.npz train paths do not match occluded/train.npz")
    return {**splits, "train": dataclasses.replace(train, clean_features=frames["train_clean"])}


def sweep_search(splits) -> list[dict]:
    """K/theta/mode for the training-free ``avg`` row (how neighbourhoods alone do)."""
    print("\nsearch sweep (avg row): mode, K, theta -> mAP / rank-1, empty queries")
    rows = []
    for mode in ("visible-mean", "intersection"):
        for k in (4, 10, 20, 30):
            for theta in (0.6, 0.7, 0.8):
                cfg = AblationConfig(search=SearchConfig(k=k, theta=theta, mode=mode))
                r = run_ablation(splits, cfg, rows=("avg",), progress=False)
                row = {"mode": mode, "k": k, "theta": theta, **r.rows["avg"],
                       "empty_query": r.empty_neighbourhoods["query"]}
                rows.append(row)
                print(f"  {mode:<13} K={k:<3} theta={theta:<4} {row['mAP']:5.1f} / "
                      f"{row['rank1']:5.1f}  empty {row['empty_query']}")
    return rows


def sweep_training(splits, epochs: int) -> list[dict]:
    """Training options of the ``orgnn`` row at the default search."""
    print("\ntraining sweep (orgnn row): option -> mAP / rank-1")
    variants = {
        "default": {},
        "glorot init": {"init": "glorot"},
        "target_init=self": {"target_init": "self"},
        "target_init=mean (paper)": {"target_init": "mean"},
        "random classifier": {"classifier_init": "random"},
        "lr x10": {"lr": 3.5e-3},
        "recon loss 1.0": {"recon_weight": 1.0},
        f"{epochs * 3} epochs": {"epochs": epochs * 3},
    }
    rows = []
    for name, change in variants.items():
        train = TrainConfig(**{"epochs": epochs, **change})
        r = run_ablation(splits, AblationConfig(train=train), rows=("orgnn", "orgnn_rr"),
                         progress=False)
        rows.append({"variant": name, **r.rows["orgnn"],
                     "rr_mAP": r.rows["orgnn_rr"]["mAP"], "rr_rank1": r.rows["orgnn_rr"]["rank1"]})
        print(f"  {name:<26} {r.rows['orgnn']['mAP']:5.1f} / {r.rows['orgnn']['rank1']:5.1f}"
              f"   +rr {r.rows['orgnn_rr']['mAP']:5.1f} / {r.rows['orgnn_rr']['rank1']:5.1f}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
