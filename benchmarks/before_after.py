"""The hot paths of the working tree against an earlier revision, in one process, interleaved.

``orgnn/nn/*`` and ``orgnn/reconstruction/graphs.py`` of ``--rev`` are read with ``git show``
(read-only), written to a temporary package ``orgnn_rev`` (imports renamed) and timed beside the
working tree's on the same inputs, after checking that both give the same outputs:

* ``dense_fwd`` / ``dense_fwd_bwd``: :class:`DenseORGNNConv`, ``B x N x F`` (default 4096 x 11
  x 256);
* ``sparse_fwd``: :class:`ORGNNConv` on the same complete graphs;
* ``model_fwd``: :class:`ORGNN` (6 parts, T=2, identity init) on a reconstruction batch of
  ``--model-batch`` neighbourhoods from :func:`dense_neighbourhood_batch`;
* ``graphs``: :func:`dense_neighbourhood_batch` itself.

Usage::

    python benchmarks/before_after.py --rev 3dcc0be
"""
from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks import _common
from benchmarks.layer import complete_edge_index

FILES = ("nn/__init__.py", "nn/_checks.py", "nn/functional.py", "nn/dense_orgnn_conv.py",
         "nn/orgnn_conv.py", "nn/model.py", "graphs.py")


def load_revision(rev: str, folder: Path) -> tuple[Any, Any]:
    pkg = folder / "orgnn_rev"
    (pkg / "nn").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name in FILES:
        text = subprocess.run(["git", "show", f"{rev}:orgnn/{name}"], cwd=_common.REPO,
                              capture_output=True, text=True, check=True).stdout
        text = re.sub(r"\b(from|import) orgnn\.", r"\1 orgnn_rev.", text)
        (pkg / name).write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module("orgnn_rev.nn"), importlib.import_module("orgnn_rev.graphs")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--config", default="4096:11:256", help="B:N:F of the layer runs")
    parser.add_argument("--model-batch", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    _common.add_common_args(parser)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=None,
                        help="JSON path (default benchmarks/results/before_after.json; with "
                             "--quick: benchmarks/results/quick/)")
    args = parser.parse_args(argv)
    _common.default_paths(args, "before_after", plot=False)
    settings = _common.apply_common_args(args)
    meta = _common.header(argv, "before_after.py", settings)
    if args.quick:
        args.config, args.model_batch, args.repeats = "256:11:64", 128, 3
    b, n, f = (int(v) for v in args.config.split(":"))

    import orgnn.nn as new_nn
    import orgnn.reconstruction.graphs as new_graphs
    with tempfile.TemporaryDirectory() as tmp:
        old_nn, old_graphs = load_revision(args.rev, Path(tmp))
        torch.manual_seed(0)
        x = (torch.rand(b, n, f) + 0.5 * torch.randn(b, n, f)).relu()
        new_dense = new_nn.DenseORGNNConv(f, f)
        with torch.no_grad():
            new_dense.att.weight.normal_(0, 0.05)
        old_dense = old_nn.DenseORGNNConv(f, f)
        old_dense.load_state_dict(new_dense.state_dict())
        new_sparse, old_sparse = new_nn.ORGNNConv(f, f), old_nn.ORGNNConv(f, f)
        new_sparse.load_state_dict(new_dense.state_dict())
        old_sparse.load_state_dict(new_dense.state_dict())
        flat, ei = x.reshape(-1, f), complete_edge_index(b, n, x.device)

        # a reconstruction batch: 6 parts, K = n - 1 neighbours, some padded
        rng = np.random.default_rng(0)
        bm, m, k = args.model_batch, 6, n - 1
        gallery = np.maximum(rng.standard_normal((4 * bm, m, f), dtype=np.float32) + 1, 0)
        target = gallery[:bm] + 0.1
        index = rng.integers(0, len(gallery), (bm, k))
        index[rng.random((bm, k)) < 0.1] = -1
        index = -np.sort(-index, axis=1)  # valid first
        xm, mask = new_graphs.dense_neighbourhood_batch(target, gallery, index)
        new_model = new_nn.ORGNN(f, f, num_parts=m).eval()
        old_model = old_nn.ORGNN(f, f, num_parts=m).eval()
        with torch.no_grad():
            for p in new_model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        old_model.load_state_dict(new_model.state_dict())

        def fwd_bwd(module):
            def run():
                module(x).sum().backward()
                for p in module.parameters():
                    p.grad = None
            return run

        pairs = {
            "dense_fwd": (lambda: old_dense(x), lambda: new_dense(x), True),
            "dense_fwd_bwd": (fwd_bwd(old_dense), fwd_bwd(new_dense), False),
            "sparse_fwd": (lambda: old_sparse(flat, ei), lambda: new_sparse(flat, ei), True),
            "model_fwd": (lambda: old_model(xm, mask), lambda: new_model(xm, mask), True),
            "graphs": (lambda: old_graphs.dense_neighbourhood_batch(target, gallery, index)[0],
                       lambda: new_graphs.dense_neighbourhood_batch(target, gallery, index)[0],
                       True),
        }
        diffs = {}
        with torch.inference_mode():
            for name, (old, new, check) in pairs.items():
                if check:
                    diffs[name] = float((old() - new()).abs().max())
        print("max abs difference old vs new:", {k: f"{v:.1e}" for k, v in diffs.items()})
        results = {}
        for name, (old, new, _) in pairs.items():
            cands = {"before": old, "after": new}
            if name.endswith("fwd_bwd"):
                t = _common.interleaved(cands, repeats=args.repeats)
            else:
                with torch.inference_mode():
                    t = _common.interleaved(cands, repeats=args.repeats)
            results[name] = {"before_s": t["before"]["median_s"],
                             "after_s": t["after"]["median_s"],
                             "speedup": t["before"]["median_s"] / t["after"]["median_s"],
                             "max_abs_diff": diffs.get(name)}
            print(f"{name:<14} before {1e3 * results[name]['before_s']:8.1f} ms  after "
                  f"{1e3 * results[name]['after_s']:8.1f} ms  speed-up "
                  f"{results[name]['speedup']:.2f}x")
    payload = {**meta, "rev": args.rev, "config": args.config,
               "model_batch": args.model_batch, "results": results}
    if args.output:
        _common.write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
