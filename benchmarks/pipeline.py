"""The whole reconstruction on synthetic worlds sized like the real data sets, stage by stage.

For each preset (``occluded_reid``, ``market1501``, ``occluded_duke``; sizes in
:data:`orgnn.datasets.synthetic.PRESETS`) the script times, on query and gallery together:

* ``search``: the neighbourhoods of the query in the gallery and of the gallery in itself
  (:func:`orgnn.reconstruction.pipeline.search_split`, exact faiss search by default, the spec's
  K/theta);
* ``graphs``: gathering the neighbourhoods into padded dense batches
  (:func:`orgnn.reconstruction.graphs.dense_neighbourhood_batch`);
* ``reconstruct``: the OR-GNN forward on those batches (an **untrained** identity-initialised
  :class:`orgnn.ORGNN`, T=2: training is not part of the timing and its cost does not depend
  on the weights' values);
* ``evaluate``: the part distance matrix and the Market-1501 metrics.

``graphs + reconstruct`` is the same loop as :func:`orgnn.reconstruction.pipeline.reconstruct`
(checked equal to it). Beside the pipeline, k-reciprocal re-ranking is timed two ways on the same
distances: ours (:func:`orgnn.retrieval.metrics.re_ranking`, including the query-query and
gallery-gallery distances it needs) and the direct numpy rendering of the original algorithm
(``re_ranking_loop`` in ``tests/reference_impls.py``), run in a child process with a time
limit; when the full size does not fit in it, the loop reference is timed on the first
``--loop-fallback`` queries and gallery items instead (the JSON and the table say which).

Usage::

    python benchmarks/pipeline.py                 # the three presets
    python benchmarks/pipeline.py --quick         # a scaled-down world, < 1 minute
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks import _common

PRESETS = ("occluded_reid", "market1501", "occluded_duke")
#: SPEC §3 inference defaults: K=10, theta=0.7 on Occluded-Duke, K=4, theta=0.8 elsewhere.
SEARCH = {"occluded_duke": (10, 0.7), "occluded_reid": (4, 0.8), "market1501": (4, 0.8)}
QUICK_OVERRIDES = dict(num_train_ids=20, num_train=200, num_test_ids=120, num_query_ids=60,
                       num_query=240, num_gallery=1200)


def run_preset(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from orgnn.datasets import synthetic_preset
    from orgnn.nn import ORGNN
    from orgnn.reconstruction.graphs import dense_neighbourhood_batch
    from orgnn.reconstruction.pipeline import oan_parts, part_distance, reconstruct, search_split
    from orgnn.reconstruction.training import SearchConfig
    from orgnn.retrieval import metrics

    overrides = dict(QUICK_OVERRIDES) if args.quick else {}
    if name == "occluded_reid" and args.quick:
        overrides.update(num_query=240, num_gallery=240, num_query_ids=120)
    overrides.update(args.world)
    t0 = time.perf_counter()
    splits = synthetic_preset(name, seed=0, **overrides)
    gen_s = time.perf_counter() - t0
    query, gallery = splits["query"], splits["gallery"]
    k, theta = SEARCH[name]
    cfg = SearchConfig(k=k, theta=theta, index=args.index)
    model = ORGNN(query.dim, query.dim, num_parts=query.num_parts, num_layers=2,
                  init="identity").eval()
    device = torch.device(args.device)
    model = model.to(device)
    timings: dict[str, float] = {}
    memory: dict[str, float] = {}
    print(f"{name}: {query.num_images} queries, {gallery.num_images} gallery images, "
          f"{query.num_parts} x {query.dim}; K={k} theta={theta} ({cfg.index} search); "
          f"generated in {gen_s:.1f} s (not timed)")

    with _common.stage(timings, memory, "search"):
        q_nbrs = search_split(query, gallery, cfg, same_split=False)
        g_nbrs = search_split(gallery, gallery, cfg, same_split=True)

    outputs = {}
    for split, target, nbrs in (("query", query, q_nbrs), ("gallery", gallery, g_nbrs)):
        parts = []
        for start in range(0, target.num_images, args.batch_size):
            sl = slice(start, start + args.batch_size)
            with _common.stage(timings, memory, "graphs", device):
                x, mask = dense_neighbourhood_batch(target.features[sl], gallery.features,
                                                    nbrs.index[sl], device)
            with _common.stage(timings, memory, "reconstruct", device), torch.inference_mode():
                parts.append(model(x, mask).float().cpu().numpy())
            del x, mask
        outputs[split] = np.concatenate(parts)
    # the loop above is orgnn.reconstruction.pipeline.reconstruct's: check it on the query side
    ref = reconstruct(model, query.features, gallery.features, q_nbrs, args.batch_size, device)
    if not np.allclose(ref, outputs["query"], atol=1e-5):
        raise AssertionError("stage loop differs from orgnn.reconstruction.pipeline.reconstruct")

    q_rec, g_rec = outputs["query"], outputs["gallery"]
    with _common.stage(timings, memory, "evaluate"):
        dist = part_distance(q_rec, g_rec)
        scores = metrics.evaluate(dist, query.pids, gallery.pids, query.camids, gallery.camids)
    pipeline_s = sum(timings[s] for s in ("search", "graphs", "reconstruct", "evaluate"))

    # re-ranking, beside the pipeline
    rr: dict[str, Any] = {}
    with _common.PeakMemory() as mem:
        t0 = time.perf_counter()
        q_q = part_distance(q_rec, q_rec)
        g_g = part_distance(g_rec, g_rec)
        t1 = time.perf_counter()
        ours = metrics.re_ranking(dist, q_q, g_g)
        rr["ours_s"] = time.perf_counter() - t1
        rr["distances_s"] = t1 - t0          # the query-query and gallery-gallery distances
    rr["ours_peak_mib"] = mem.peak_bytes / _common.MiB
    if args.loop_timeout > 0:
        rr["loop"] = time_loop_reference(dist, q_q, g_g, ours, args, tmp / name)
    del q_q, g_g

    n = query.num_images + gallery.num_images
    base = metrics.evaluate(part_distance(query.features, gallery.features, None),
                            query.pids, gallery.pids, query.camids, gallery.camids)
    return {
        "preset": name, "num_query": query.num_images, "num_gallery": gallery.num_images,
        "k": k, "theta": theta, "index": cfg.index, "batch_size": args.batch_size,
        "empty_neighbourhoods": {"query": q_nbrs.num_empty, "gallery": g_nbrs.num_empty},
        "stage_s": timings, "stage_peak_mib": memory, "pipeline_s": pipeline_s,
        "per_image_ms": 1e3 * pipeline_s / n,
        "mAP": float(scores["mAP"]), "rank1": float(scores["rank1"]),
        "baseline_mAP": float(base["mAP"]), "baseline_rank1": float(base["rank1"]),
        "oan_parts_visible_fraction": float(oan_parts(query.visible).mean()),
        "rerank": rr, "generate_s": gen_s,
    }


def time_loop_reference(dist: np.ndarray, q_q: np.ndarray, g_g: np.ndarray, ours: np.ndarray,
                        args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Run ``re_ranking_loop`` in a child process on the full size, or on a subset when the
    full size does not finish within ``--loop-timeout`` seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "q_g.npy", dist)
    np.save(folder / "q_q.npy", q_q)
    np.save(folder / "g_g.npy", g_g)
    np.save(folder / "ours.npy", ours)
    nq, ng = dist.shape
    attempts = [(nq, ng)]
    fq, fg = args.loop_fallback
    if (fq, fg) != (nq, ng) and (fq < nq or fg < ng):
        attempts.append((min(fq, nq), min(fg, ng)))
    out: dict[str, Any] = {"attempts": []}
    for q, g in attempts:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--loop-child", str(folder),
               str(q), str(g)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=args.loop_timeout)
        except subprocess.TimeoutExpired:
            waited = time.perf_counter() - t0
            out["attempts"].append({"num_query": q, "num_gallery": g,
                                    "timed_out_after_s": round(waited, 1)})
            print(f"  loop reference on {q} x {g}: still running after {waited:.0f} s, "
                  "stopped")
            continue
        if proc.returncode != 0:
            out["attempts"].append({"num_query": q, "num_gallery": g,
                                    "error": proc.stderr[-2000:]})
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        out["attempts"].append(res)
        out.update(res)
        break
    return out


def loop_child(folder: Path, q: int, g: int) -> dict[str, Any]:
    """Time ``re_ranking_loop`` and ours on the first ``q`` queries and ``g`` gallery items."""
    sys.path.insert(0, str(_common.REPO / "tests"))
    from reference_impls import re_ranking_loop

    from orgnn.retrieval import metrics

    q_g = np.load(folder / "q_g.npy", mmap_mode="r")[:q, :g].copy()
    q_q = np.load(folder / "q_q.npy", mmap_mode="r")[:q, :q].copy()
    g_g = np.load(folder / "g_g.npy", mmap_mode="r")[:g, :g].copy()
    with _common.PeakMemory() as mem:
        t0 = time.perf_counter()
        loop = re_ranking_loop(q_g, q_q, g_g)
        loop_s = time.perf_counter() - t0
    full = (q, g) == np.load(folder / "ours.npy", mmap_mode="r").shape
    t0 = time.perf_counter()
    ours = metrics.re_ranking(q_g, q_q, g_g)
    ours_s = time.perf_counter() - t0
    return {"num_query": q, "num_gallery": g, "full_size": bool(full), "loop_s": loop_s,
            "loop_peak_mib": mem.peak_bytes / _common.MiB, "ours_same_size_s": ours_s,
            "speedup": loop_s / ours_s, "max_abs_diff": float(np.abs(loop - ours).max())}


def report(results: list[dict[str, Any]]) -> str:
    stages = ("search", "graphs", "reconstruct", "evaluate")
    rows = []
    for r in results:
        rows.append([r["preset"], f"{r['num_query']} / {r['num_gallery']}",
                     *(r["stage_s"][s] for s in stages), r["pipeline_s"], r["per_image_ms"],
                     max(r["stage_peak_mib"].values()),
                     f"{100 * r['baseline_mAP']:.1f} -> {100 * r['mAP']:.1f}"])
    lines = [_common.fmt_table(["preset", "query / gallery", *(f"{s} s" for s in stages),
                                "total s", "ms / image", "peak MiB", "mAP baseline -> ours"],
                               rows), ""]
    rows = []
    for r in results:
        rr = r["rerank"]
        loop = rr.get("loop", {})
        if "loop_s" in loop:
            size = f"{loop['num_query']} x {loop['num_gallery']}" + (
                " (full)" if loop["full_size"] else " (subset)")
            rows.append([r["preset"], rr["distances_s"], rr["ours_s"], size, loop["loop_s"],
                         loop["ours_same_size_s"], loop["speedup"], loop["max_abs_diff"]])
        else:
            rows.append([r["preset"], rr["distances_s"], rr["ours_s"], "not run", "", "", "",
                         ""])
    lines.append(_common.fmt_table(
        ["preset", "q-q + g-g distances s", "re-ranking (ours) s", "loop reference size",
         "loop s", "ours, same size, child s", "speed-up", "max abs diff"], rows))
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    _common.agg_backend()
    import matplotlib.pyplot as plt

    stages = ("search", "graphs", "reconstruct", "evaluate")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r["preset"] for r in results]
    left = np.zeros(len(results))
    for s in stages:
        vals = np.array([r["stage_s"][s] for r in results])
        ax.barh(names, vals, left=left, label=s)
        left += vals
    dd = np.array([r["rerank"]["distances_s"] for r in results])
    ax.barh(names, dd, left=left, label="q-q, g-g distances (for re-ranking)", hatch="..",
            alpha=0.5)
    rr = np.array([r["rerank"]["ours_s"] for r in results])
    ax.barh(names, rr, left=left + dd, label="re-ranking (ours, optional)", hatch="//",
            alpha=0.5)
    ax.set_xlabel("seconds")
    ax.set_title("Reconstruction pipeline per stage (untrained OR-GNN, exact search)")
    ax.legend(fontsize=8)
    _common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="scaled-down worlds")
    parser.add_argument("--presets", nargs="+", default=None, choices=PRESETS)
    parser.add_argument("--index", default="flat", choices=("flat", "ivf"))
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    _common.add_common_args(parser)
    parser.add_argument("--loop-timeout", type=float, default=300.0,
                        help="seconds the loop re-ranking reference may take (0: skip it)")
    parser.add_argument("--loop-fallback", type=int, nargs=2, default=(1000, 5000),
                        metavar=("Q", "G"), help="subset timed when the full size times out")
    parser.add_argument("--output", default=None,
                        help="JSON path (default benchmarks/results/pipeline.json; with "
                             "--quick: benchmarks/results/quick/)")
    parser.add_argument("--plot", default=None,
                        help="PNG path (default docs/_static/bench_pipeline.png; with "
                             "--quick: benchmarks/results/quick/)")
    parser.add_argument("--world", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override synthetic_preset arguments (ints), e.g. num_query=300")
    parser.add_argument("--loop-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _common.default_paths(args, "pipeline", plot=True)
    args.world = {k: int(v) for k, v in (item.split("=", 1) for item in args.world)}
    settings = _common.apply_common_args(args)
    if args.loop_child:
        folder, q, g = args.loop_child
        res = loop_child(Path(folder), int(q), int(g))
        print(json.dumps(res))
        return res

    meta = _common.header(argv, "pipeline.py", settings)
    presets = args.presets or (("occluded_reid", "occluded_duke") if args.quick else PRESETS)
    if args.quick and args.loop_timeout == 300.0:
        args.loop_timeout = 60.0
    results = []
    with tempfile.TemporaryDirectory(prefix="orgnn-bench-") as tmp:
        for name in presets:
            r = run_preset(name, args, Path(tmp))
            results.append(r)
            print(report([r]))
    duke = [r for r in results if r["preset"] == "occluded_duke"]
    goals = []
    if duke and not args.quick:
        v = duke[0]["pipeline_s"]
        goals.append({"target": f"Occluded-Duke-sized pipeline ({args.device}, "
                                f"{_common.machine_info()['torch_threads']} threads)",
                      "measured": v, "goal": "< 60 s", "met": v < 60})
    for g in goals:
        print(f"target: {g['target']}: {g['measured']:.1f} s (goal {g['goal']}) "
              f"{'met' if g['met'] else 'NOT met'}")
    payload = {**meta, "note": "untrained identity-initialised ORGNN; training not timed",
               "results": results, "targets": goals}
    if args.output:
        _common.write_json(args.output, payload)
    if args.plot:
        plot(results, Path(args.plot))
    return payload


if __name__ == "__main__":
    main()
