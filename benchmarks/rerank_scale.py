"""k-reciprocal re-ranking at MSMT17's test size, from features (:mod:`orgnn.retrieval.rerank`).

The dense :func:`orgnn.retrieval.metrics.re_ranking` needs the ``(G, G)`` gallery distances:
27 GB at MSMT17's 82,161 gallery images (and the ``(Q, Q)``, ``(Q, G)`` ones and its ``(Q, G)``
output: :func:`orgnn.retrieval.rerank.dense_re_ranking_bytes`). This script runs what
``orgnn evaluate --rerank`` runs on such a set, on synthetic clustered part features:

* ``distance``: the ``(Q, G)`` part distance (:func:`orgnn.reconstruction.pipeline.part_distance`);
* ``evaluate``: the Market-1501 metrics on it;
* ``rerank``: :func:`orgnn.retrieval.rerank.re_ranking_features` (k1=20, k2=6, lambda=0.3), written
  into the distance matrix in place, as :func:`orgnn.reconstruction.pipeline.rerank_distances` does;
* ``evaluate_rr``: the metrics of the re-ranked distances;

and reports each stage's wall time and the process' peak resident set during it (absolute,
Python and torch included: the ``VmHWM`` mark, reset through ``/proc/self/clear_refs`` at the
stage's start; where that is not allowed, ``ru_maxrss``, the peak of the run so far).
Afterwards, on the first ``--subset`` queries and gallery items, it checks the feature path
against the dense one (max abs difference; both timed). Features: ``--ids`` identity centres
per part, each image its centre plus Gaussian noise (``--noise``), float16 as ``orgnn
extract`` writes them; cameras uniform over 15.

Usage::

    python benchmarks/rerank_scale.py                      # 11,659 x 82,161, 6 x 256
    python benchmarks/rerank_scale.py --dim 64 --index ivf
    python benchmarks/rerank_scale.py --quick              # 600 x 3,000, seconds
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks import _common

GiB = 1024 ** 3


def peak_rss_bytes() -> int:
    """The process' peak resident set so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def stage_peak_start() -> bool:
    """Reset the resident-set high-water mark (``VmHWM``) so that :func:`stage_peak_bytes`
    reads the peak of the next stage alone; False where the kernel does not allow it."""
    return _common._reset_hwm()


def stage_peak_bytes() -> int | None:
    """The high-water mark since :func:`stage_peak_start` (bytes), None where unknown."""
    kib = _common._status_kib("VmHWM")
    return None if kib is None else kib * 1024


def make_world(num_query: int, num_gallery: int, parts: int, dim: int, ids: int, noise: float,
               seed: int, visible_fraction: float) -> dict[str, np.ndarray]:
    """Clustered float16 part features: ``centre[pid] + noise * N(0, 1)`` per part."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, parts, dim)).astype(np.float32)
    out: dict[str, np.ndarray] = {}
    for name, n in (("query", num_query), ("gallery", num_gallery)):
        pids = rng.integers(0, ids, n)
        feats = np.empty((n, parts, dim), dtype=np.float16)
        for s in range(0, n, 8192):
            p = pids[s:s + 8192]
            chunk = centres[p] + noise * rng.standard_normal((len(p), parts, dim),
                                                             dtype=np.float32)
            feats[s:s + 8192] = chunk
        out[f"{name}_features"] = feats
        out[f"{name}_pids"] = pids
        out[f"{name}_camids"] = rng.integers(0, 15, n)
        out[f"{name}_visible"] = rng.random((n, parts)) < visible_fraction
    return out


def full_size(world: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    from orgnn.reconstruction.pipeline import oan_parts, part_distance
    from orgnn.retrieval import metrics
    from orgnn.retrieval.rerank import dense_re_ranking_bytes, re_ranking_features

    q, g = world["query_features"], world["gallery_features"]
    qp = oan_parts(world["query_visible"]) if args.oan else None
    gp = oan_parts(world["gallery_visible"]) if args.oan else None
    labels = (world["query_pids"], world["gallery_pids"], world["query_camids"],
              world["gallery_camids"])
    stages: dict[str, dict[str, float]] = {}

    reset = [False]

    def start() -> float:
        reset[0] = stage_peak_start()
        return time.perf_counter()

    def record(name: str, t0: float) -> None:
        wall = round(time.perf_counter() - t0, 2)
        peak = (stage_peak_bytes() if reset[0] else None) or peak_rss_bytes()
        stages[name] = {"wall_s": wall, "peak_rss_gib": round(peak / GiB, 3),
                        "peak_method": "VmHWM reset at the stage start" if reset[0]
                        else "ru_maxrss (run so far)"}
        print(f"  {name:<12} {wall:>9.1f} s   peak RSS {peak / GiB:.2f} GiB", flush=True)

    t0 = start()
    dist = part_distance(q, g, qp)
    record("distance", t0)
    plain = rr = None
    if not args.skip_evaluate:
        t0 = start()
        plain = metrics.evaluate(dist, *labels)
        record("evaluate", t0)
    t0 = start()
    re_ranking_features(q, g, qp, gp, q_g_dist=dist, out=dist, index=args.index,
                        nprobe=args.nprobe, device=args.device)
    record("rerank", t0)
    if not args.skip_evaluate:
        t0 = start()
        rr = metrics.evaluate(dist, *labels)
        record("evaluate_rr", t0)
    del dist
    return {
        "stages": stages,
        "rerank_s": stages["rerank"]["wall_s"],
        "peak_rss_gib": max(s["peak_rss_gib"] for s in stages.values()),
        "rerank_peak_rss_gib": stages["rerank"]["peak_rss_gib"],
        "qg_float32_gib": round(4 * len(q) * len(g) / GiB, 3),
        "dense_rerank_would_need_gib": round(dense_re_ranking_bytes(len(q), len(g)) / GiB, 1),
        **({} if plain is None or rr is None else {
            "mAP": round(100 * plain["mAP"], 2), "rank1": round(100 * plain["rank1"], 2),
            "mAP_rr": round(100 * rr["mAP"], 2), "rank1_rr": round(100 * rr["rank1"], 2)}),
    }


def subset_check(world: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    """Feature path against the dense one on the first queries and gallery items."""
    from orgnn.reconstruction.pipeline import oan_parts, part_distance
    from orgnn.retrieval import metrics
    from orgnn.retrieval.rerank import re_ranking_features

    nq, ng = args.subset
    q, g = world["query_features"][:nq], world["gallery_features"][:ng]
    qp = oan_parts(world["query_visible"][:nq]) if args.oan else None
    gp = oan_parts(world["gallery_visible"][:ng]) if args.oan else None
    dist = part_distance(q, g, qp)
    t0 = time.perf_counter()
    dense = metrics.re_ranking(dist, part_distance(q, q, qp), part_distance(g, g, gp))
    dense_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    feat = re_ranking_features(q, g, qp, gp, q_g_dist=dist, device=args.device)
    feat_s = time.perf_counter() - t0
    exact = re_ranking_features(q, g, qp, gp, q_g_dist=dist) if args.index != "flat" else feat
    if args.index != "flat":
        approx = re_ranking_features(q, g, qp, gp, q_g_dist=dist, index=args.index,
                                     nprobe=args.nprobe)
    res = {"queries": nq, "gallery": ng, "dense_s": round(dense_s, 2),
           "features_flat_s": round(feat_s, 2),
           "max_abs_diff_flat_vs_dense": float(np.abs(exact - dense).max())}
    if args.index != "flat":
        res[f"max_abs_diff_{args.index}_vs_dense"] = float(np.abs(approx - dense).max())
    print(f"  subset {nq} x {ng}: dense {dense_s:.1f} s, features (flat) {feat_s:.1f} s, "
          f"max |diff| {res['max_abs_diff_flat_vs_dense']:.2e}", flush=True)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=None, help="default 11,659")
    parser.add_argument("--gallery", type=int, default=None, help="default 82,161")
    parser.add_argument("--parts", type=int, default=6)
    parser.add_argument("--dim", type=int, default=256, help="channels per part")
    parser.add_argument("--ids", type=int, default=None,
                        help="identities (default: MSMT17 test's 3,060)")
    parser.add_argument("--noise", type=float, default=3.0)
    parser.add_argument("--oan", action="store_true",
                        help="'+OAN' distances: query-side weights over visible parts")
    parser.add_argument("--visible", type=float, default=0.8,
                        help="fraction of visible parts with --oan")
    parser.add_argument("--index", default="flat", choices=("flat", "ivf"))
    parser.add_argument("--nprobe", type=int, default=None)
    parser.add_argument("--device", default="cpu",
                        help="torch device of the exact search's products (default cpu)")
    parser.add_argument("--subset", type=int, nargs=2, default=None, metavar=("Q", "G"),
                        help="sizes of the dense-vs-features check (default 1500 6000; "
                             "0 0: skip it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-evaluate", action="store_true",
                        help="leave out the two evaluate stages (distance and re-ranking only)")
    parser.add_argument("--quick", action="store_true",
                        help="600 x 3,000 and a 200 x 800 subset by default")
    parser.add_argument("--output", default=None,
                        help="JSON path (default benchmarks/results/rerank_scale.json; with "
                             "--quick: benchmarks/results/quick/)")
    _common.add_common_args(parser)
    args = parser.parse_args(argv)
    defaults = ((600, 3000, 150, (200, 800)) if args.quick
                else (11659, 82161, 3060, (1500, 6000)))
    for key, value in zip(("queries", "gallery", "ids", "subset"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    _common.default_paths(args, "rerank_scale", plot=False)
    settings = _common.apply_common_args(args)
    meta = _common.header(argv, "rerank_scale.py", settings)

    t0 = time.perf_counter()
    world = make_world(args.queries, args.gallery, args.parts, args.dim, args.ids, args.noise,
                       args.seed, args.visible)
    print(f"world: {args.queries} queries x {args.gallery} gallery, {args.parts} x {args.dim} "
          f"float16, {args.ids} identities ({time.perf_counter() - t0:.1f} s); peak RSS "
          f"{peak_rss_bytes() / GiB:.2f} GiB", flush=True)
    full = full_size(world, args)
    print(f"re-ranking {full['rerank_s']:.1f} s, peak RSS {full['rerank_peak_rss_gib']:.2f} "
          f"GiB (whole run {full['peak_rss_gib']:.2f} GiB; dense would need "
          f"{full['dense_rerank_would_need_gib']} GiB beyond the (Q, G) matrix); mAP "
          f"{full.get('mAP')} -> {full.get('mAP_rr')}", flush=True)
    subset = subset_check(world, args) if min(args.subset) > 0 else None
    payload = {**meta, "config": {k: getattr(args, k) for k in (
        "queries", "gallery", "parts", "dim", "ids", "noise", "oan", "visible", "index",
        "nprobe", "device", "seed", "skip_evaluate")}, "full": full, "subset": subset,
        "targets": [{"target": "feature re-ranking at MSMT17 size: peak RSS of the run",
                     "goal": "<= 8 GiB", "measured_gib": full["peak_rss_gib"],
                     "met": full["peak_rss_gib"] <= 8}]}
    if args.output:
        _common.write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
