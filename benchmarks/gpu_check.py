"""Everything this project measures on a GPU, in one run and one JSON.

Sections (``--sections``, all by default, in this order):

* ``layer``: ``benchmarks/layer.py`` (the OR-GNN layer against PyG's ``GATConv`` and
  ``GraphConv`` and the naive dense rule; float32 eager and ``torch.compile``, bf16 eager);
* ``pipeline``: ``benchmarks/pipeline.py`` on the Occluded-Duke-sized synthetic world
  (search, graphs, untrained OR-GNN, evaluation; the CPU loop reference is skipped);
* ``fen``: FEN throughput (:class:`orgnn.reid.models.FEN`, ResNet-50, random weights, 702
  classes) on random 384 x 128 images: inference images/s in float32 and under bf16 autocast,
  and training steps (forward, Eq. 1 as cross-entropy plus triplet, backward, SGD) per second;
* ``rerank``: :func:`orgnn.retrieval.rerank.re_ranking_features` at MSMT17's test size
  (11,659 x 82,161, 6 x 256 synthetic features) with the exact search's products on the GPU.

The device must be CUDA: without one the script stops with a message saying so. ``--device
cpu --quick`` runs every section on tiny sizes in seconds, so that the script itself is
tested on machines without a GPU (``tests/test_benchmarks_smoke.py``); its figures mean
nothing.

Usage::

    python benchmarks/gpu_check.py                   # on a CUDA machine, about 10 minutes
    python benchmarks/gpu_check.py --sections fen rerank
    python benchmarks/gpu_check.py --device cpu --quick --output /tmp/g.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import _common

SECTIONS = ("layer", "pipeline", "fen", "rerank")
#: DukeMTMC-reID's training identities: the FEN classifier size.
FEN_CLASSES = 702


def section_layer(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from benchmarks import layer

    argv = ["--device", args.device, "--output", str(tmp / "layer.json"),
            "--plot", str(tmp / "layer.png")]
    if args.quick:
        argv += ["--configs", "8:5:16", "--repeats", "1", "--no-compile", "--no-memory"]
    payload = layer.main(argv)
    return {k: payload[k] for k in ("notes", "results", "targets")}


def section_pipeline(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from benchmarks import pipeline

    argv = ["--presets", "occluded_duke", "--device", args.device, "--loop-timeout", "0",
            "--output", str(tmp / "pipeline.json"), "--plot", str(tmp / "pipeline.png")]
    if args.quick:
        argv += ["--quick", "--world", "num_train_ids=4", "num_train=40", "num_test_ids=30",
                 "num_query_ids=15", "num_query=30", "num_gallery=150", "dim=32"]
    payload = pipeline.main(argv)
    return {k: payload[k] for k in ("results", "targets")}


def _median_s(fn, device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _common._sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _common._sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def section_fen(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from orgnn.reid.losses import fen_loss
    from orgnn.reid.models import FEN

    device = torch.device(args.device)
    arch, height, width = ("resnet18", 64, 32) if args.quick else ("resnet50", 384, 128)
    batch, train_batch = (2, 4) if args.quick else (args.fen_batch, args.fen_train_batch)
    repeats, warmup = (1, 1) if args.quick else (10, 3)
    torch.manual_seed(0)
    model = FEN(FEN_CLASSES, arch=arch, _warn=False).to(device)
    model = model.to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, height, width, device=device).contiguous(
        memory_format=torch.channels_last)
    out: dict[str, Any] = {"arch": arch, "image": [height, width], "batch": batch,
                           "train_batch": train_batch, "weights": "random"}

    model.eval()
    dtypes = {"float32": None}
    if device.type == "cuda":
        dtypes["bf16_autocast"] = torch.bfloat16
    for name, dtype in dtypes.items():
        def infer(dtype=dtype) -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                        enabled=dtype is not None):
                model(images)
        s = _median_s(infer, device, repeats, warmup)
        out[f"inference_{name}"] = {"batch_s": round(s, 5), "images_per_s": round(batch / s, 1)}
        print(f"  FEN inference {name}: {batch / s:.0f} images/s", flush=True)

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    train_images = torch.randn(train_batch, 3, height, width, device=device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.arange(train_batch, device=device) // 4 % FEN_CLASSES  # P x K = B/4 x 4

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits, feats = model(train_images)
        loss, _ = fen_loss(logits, feats, labels)
        loss.backward()
        opt.step()
    s = _median_s(step, device, repeats, warmup)
    out["train_float32"] = {"step_s": round(s, 5), "images_per_s": round(train_batch / s, 1)}
    print(f"  FEN training float32: {train_batch / s:.0f} images/s", flush=True)
    if device.type == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / _common.MiB, 1)
    return out


def section_rerank(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from benchmarks import rerank_scale

    sizes = (["--queries", "60", "--gallery", "300", "--ids", "20", "--dim", "16",
              "--subset", "20", "100"] if args.quick else [])
    return rerank_scale.main([*sizes, "--device", args.device,
                              "--output", str(tmp / "rerank.json")])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda",
                        help="a CUDA device (default 'cuda'); 'cpu' only with --quick")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, seconds: checks the script, not the machine")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--fen-batch", type=int, default=128,
                        help="images per FEN inference batch (default 128)")
    parser.add_argument("--fen-train-batch", type=int, default=64,
                        help="images per FEN training step (default 64, 16 ids x 4)")
    parser.add_argument("--output", default=None,
                        help="JSON path (default benchmarks/results/gpu_check.json; with "
                             "--quick: benchmarks/results/quick/)")
    _common.add_common_args(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.quick:
        parser.error(f"--device {args.device}: this script measures a CUDA device; "
                     "use --device cpu only with --quick (a smoke run)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(2, f"gpu_check: no CUDA device here (torch {torch.__version__}, built "
                       f"for CUDA {torch.version.cuda}; torch.cuda.is_available() is False). "
                       "Run it on a GPU machine, or smoke-test with --device cpu --quick.\n")
    _common.default_paths(args, "gpu_check", plot=False)
    settings = _common.apply_common_args(args)
    meta = _common.header(argv, "gpu_check.py", settings)
    runs = {"layer": section_layer, "pipeline": section_pipeline, "fen": section_fen,
            "rerank": section_rerank}
    sections: dict[str, Any] = {}
    wall: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="orgnn-gpu-check-") as tmp:
        for name in args.sections:
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            sections[name] = runs[name](args, Path(tmp))
            wall[name] = round(time.perf_counter() - t0, 1)
    payload = {**meta, "device": str(device), "quick": args.quick, "section_wall_s": wall,
               **sections}
    if args.output:
        _common.write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
