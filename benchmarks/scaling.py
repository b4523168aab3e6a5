"""How search and reconstruction cost grow with the gallery: 10^3 to 10^6 images.

A synthetic gallery of ``G`` images (6 parts x 256-d, stored as float16: half the memory of
float32, and the search normalises to float32 anyway) is generated in chunks; ``--queries``
occluded query images of gallery identities search it with
:func:`orgnn.search.search_neighbourhoods` (visible-mean mode, K=10, theta=0.7), exactly
(``index="flat"``) and with IVF (``index="ivf"``, ``nlist = --nlist-factor * sqrt(G)``,
``nprobe``), and are then reconstructed by an untrained identity-initialised
:class:`orgnn.ORGNN` streaming ``--batch-size`` graphs at a time
(:func:`orgnn.pipeline.reconstruct`), so memory stays bounded by the index, not by
``Q x K x M x F`` intermediates.

Per size and stage the script records the time and the peak memory growth (see
``benchmarks/_common.py``). The search time is split into the index build (checking and
normalising the gallery and building the faiss index, timed by wrapping ``orgnn.search``'s
own helpers while the real call runs) and the queries (the rest); "per image" is the query
part divided by the number of queries. IVF recall is the fraction of the exact search's
neighbours (after the threshold) that IVF also returns, averaged over queries that have any.

Usage::

    python benchmarks/scaling.py                          # 10^3 .. 10^6
    python benchmarks/scaling.py --sizes 1000 10000 100000
    python benchmarks/scaling.py --quick                  # 10^3 .. 10^4, < 1 minute
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks import _common

PARTS, DIM = 6, 256


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def make_world(size: int, num_queries: int, seed: int = 0, images_per_id: int = 10,
               chunk: int = 50_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(gallery (G, 6, 256) float16, query (Q, 6, 256) float16, query_visible (Q, 6))``.

    Features are ``relu(shared + identity prototype + noise)``: non-negative like CNN part
    features, cosine about 0.85-0.9 within an identity and 0.6-0.7 across. Queries are new
    images of gallery identities with one of the usual occlusion patterns (lower or upper
    stripes, or a side half, hidden: their visibility is 0 and the feature is noise there).
    """
    rng = np.random.default_rng(seed)
    num_ids = max(1, size // images_per_id)
    shared = rng.random((PARTS, DIM), dtype=np.float32) * 1.5
    protos = rng.standard_normal((num_ids, PARTS, DIM), dtype=np.float32) * 0.7

    def images(ids: np.ndarray) -> np.ndarray:
        x = shared + protos[ids] + 0.35 * rng.standard_normal((len(ids), PARTS, DIM),
                                                              dtype=np.float32)
        return np.maximum(x, 0).astype(np.float16)

    gallery = np.empty((size, PARTS, DIM), dtype=np.float16)
    for start in range(0, size, chunk):
        stop = min(start + chunk, size)
        gallery[start:stop] = images(np.arange(start, stop) % num_ids)
    q_ids = rng.integers(0, num_ids, num_queries)
    query = images(q_ids)
    patterns = np.array([[1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1],
                         [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 1], [1, 0, 0, 0, 1, 1]],
                        dtype=np.float32)
    visible = patterns[rng.integers(0, len(patterns), num_queries)]
    noise = np.abs(rng.standard_normal(query.shape, dtype=np.float32)).astype(np.float16)
    query = np.where(visible[:, :, None] > 0, query, noise)
    return gallery, query, visible


# --------------------------------------------------------------------------------------
# Instrumentation of the real search call
# --------------------------------------------------------------------------------------
@contextmanager
def build_timer(min_rows: int):
    """Time ``orgnn.search``'s gallery checks, normalisation and index building while they run
    inside :func:`orgnn.search.search_neighbourhoods` (restored afterwards)."""
    from orgnn import search

    spent = {"build_s": 0.0}
    orig_build, orig_norm, orig_check = (search._build_index, search._normalise,
                                         search._check_features)

    def build(*a, **k):
        t0 = time.perf_counter()
        try:
            return orig_build(*a, **k)
        finally:
            spent["build_s"] += time.perf_counter() - t0

    def normalise(x):
        t0 = time.perf_counter()
        try:
            return orig_norm(x)
        finally:
            if np.shape(x)[0] >= min_rows:  # the gallery, not a batch of queries
                spent["build_s"] += time.perf_counter() - t0

    def check(x, name):
        t0 = time.perf_counter()
        try:
            return orig_check(x, name)
        finally:
            if np.shape(x)[0] >= min_rows:
                spent["build_s"] += time.perf_counter() - t0

    search._build_index, search._normalise, search._check_features = build, normalise, check
    try:
        yield spent
    finally:
        search._build_index, search._normalise, search._check_features = (
            orig_build, orig_norm, orig_check)


def recall(exact: np.ndarray, approx: np.ndarray) -> float:
    """Mean over queries with exact neighbours of |exact ∩ approx| / |exact|."""
    vals = []
    for e, a in zip(exact, approx):
        e = e[e >= 0]
        if e.size:
            vals.append(np.isin(e, a[a >= 0]).mean())
    return float(np.mean(vals)) if vals else float("nan")


# --------------------------------------------------------------------------------------
def run_size(size: int, args: argparse.Namespace) -> dict[str, Any]:
    from orgnn.nn import ORGNN
    from orgnn.pipeline import reconstruct
    from orgnn.search import search_neighbourhoods

    t0 = time.perf_counter()
    gallery, query, visible = make_world(size, args.queries, seed=args.seed)
    gen_s = time.perf_counter() - t0
    q = query.shape[0]
    nlist = max(1, min(int(round(args.nlist_factor * math.sqrt(size))), size // 39))
    row: dict[str, Any] = {"gallery": size, "queries": q, "generate_s": gen_s,
                           "gallery_mib": gallery.nbytes / _common.MiB, "nlist": nlist,
                           "nprobe": args.nprobe, "stage_s": {}, "stage_peak_mib": {}}
    found = {}
    for index in args.indexes:
        if index == "ivf" and size // 39 < 1:
            continue
        name = f"search_{index}"
        with build_timer(min_rows=size) as spent, \
                _common.stage(row["stage_s"], row["stage_peak_mib"], name):
            nbrs = search_neighbourhoods(query, visible, gallery, k=args.k, theta=args.theta,
                                         index=index, nlist=nlist if index == "ivf" else None,
                                         nprobe=args.nprobe)
        total = row["stage_s"][name]
        row[f"{index}_build_s"] = spent["build_s"]
        row[f"{index}_query_s"] = max(total - spent["build_s"], 0.0)
        row[f"{index}_per_image_ms"] = 1e3 * row[f"{index}_query_s"] / q
        row[f"{index}_empty"] = nbrs.num_empty
        found[index] = nbrs
        print(f"  G={size:>8}: {index:<4} build {spent['build_s']:7.2f} s, queries "
              f"{row[f'{index}_query_s']:7.2f} s ({row[f'{index}_per_image_ms']:.3f} ms/image),"
              f" peak +{row['stage_peak_mib'][name]:.0f} MiB, {nbrs.num_empty} empty")
    if "flat" in found and "ivf" in found:
        row["ivf_recall"] = recall(found["flat"].index, found["ivf"].index)
        print(f"  G={size:>8}: IVF recall vs exact {row['ivf_recall']:.3f}")

    model = ORGNN(DIM, DIM, num_parts=PARTS, num_layers=2, init="identity").eval()
    nbrs = found.get("flat") or next(iter(found.values()))
    with _common.stage(row["stage_s"], row["stage_peak_mib"], "reconstruct"):
        out = reconstruct(model, query, gallery, nbrs, batch_size=args.batch_size)
    row["reconstruct_per_image_ms"] = 1e3 * row["stage_s"]["reconstruct"] / q
    assert out.shape == (q, PARTS, DIM) and np.isfinite(out).all()
    print(f"  G={size:>8}: reconstruct {row['stage_s']['reconstruct']:.2f} s, peak "
          f"+{row['stage_peak_mib']['reconstruct']:.0f} MiB")
    return row


def report(rows: list[dict[str, Any]]) -> str:
    table = []
    for r in rows:
        table.append([
            r["gallery"], r["gallery_mib"],
            r.get("flat_build_s", float("nan")), r.get("flat_per_image_ms", float("nan")),
            r["stage_peak_mib"].get("search_flat", float("nan")),
            r.get("ivf_build_s", float("nan")), r.get("ivf_per_image_ms", float("nan")),
            r["stage_peak_mib"].get("search_ivf", float("nan")),
            r.get("ivf_recall", float("nan")), r["nlist"],
            r["reconstruct_per_image_ms"], r["stage_peak_mib"]["reconstruct"]])
    return _common.fmt_table(
        ["gallery", "gallery MiB (fp16)", "flat build s", "flat ms/query", "flat peak MiB",
         "IVF build s", "IVF ms/query", "IVF peak MiB", "IVF recall", "nlist",
         "reconstruct ms/image", "reconstruct peak MiB"], table)


def growth_exponent(rows: list[dict[str, Any]], key: str) -> float | None:
    """Slope of log(per-image time) against log(G) between the two largest sizes."""
    pts = [(r["gallery"], r[key]) for r in rows if r.get(key)]
    if len(pts) < 2:
        return None
    (g1, t1), (g2, t2) = pts[-2], pts[-1]
    return math.log(t2 / t1) / math.log(g2 / g1)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    _common.agg_backend()
    import matplotlib.pyplot as plt

    g = [r["gallery"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("flat_per_image_ms", "exact search, per query"),
                       ("ivf_per_image_ms", "IVF search, per query"),
                       ("reconstruct_per_image_ms", "reconstruction, per image")):
        vals = [r.get(key, float("nan")) for r in rows]
        axes[0].plot(g, vals, "o-", label=label)
    for key, label in (("flat_build_s", "exact index build"), ("ivf_build_s", "IVF build")):
        vals = [1e3 * r.get(key, float("nan")) / r["gallery"] for r in rows]
        axes[0].plot(g, vals, "x--", label=label + ", per gallery image")
    axes[0].set_ylabel("ms")
    for stage, label in (("search_flat", "exact search"), ("search_ivf", "IVF search"),
                         ("reconstruct", "reconstruction")):
        vals = [r["stage_peak_mib"].get(stage, float("nan")) for r in rows]
        axes[1].plot(g, vals, "o-", label=label)
    axes[1].plot(g, [r["gallery_mib"] for r in rows], "k:", label="gallery itself (fp16)")
    axes[1].set_ylabel("peak memory growth (MiB)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gallery size")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    recalls = ", ".join(f"{r['gallery']:.0e}: {r['ivf_recall']:.2f}" for r in rows
                        if "ivf_recall" in r)
    fig.suptitle(f"Cost vs gallery size (IVF recall {recalls})", fontsize=9)
    _common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^3 .. 10^4")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--indexes", nargs="+", default=["flat", "ivf"],
                        choices=("flat", "ivf"))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--theta", type=float, default=0.7)
    parser.add_argument("--nlist-factor", type=float, default=1.0,
                        help="IVF lists = factor * sqrt(G) (at most G // 39)")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append", action="store_true",
                        help="keep the other sizes already in --output (a later run adds one)")
    _common.add_common_args(parser)
    parser.add_argument("--output", default=None,
                        help="JSON path (default benchmarks/results/scaling.json; with "
                             "--quick: benchmarks/results/quick/)")
    parser.add_argument("--plot", default=None,
                        help="PNG path (default docs/_static/bench_scaling.png; with "
                             "--quick: benchmarks/results/quick/)")
    args = parser.parse_args(argv)
    _common.default_paths(args, "scaling", plot=True)
    settings = _common.apply_common_args(args)
    meta = _common.header(argv, "scaling.py", settings)
    sizes = args.sizes or ([1_000, 3_000, 10_000] if args.quick
                           else [1_000, 10_000, 100_000, 1_000_000])
    args.queries = args.queries or (200 if args.quick else 1000)
    rows: list[dict[str, Any]] = []
    if args.append and args.output and Path(args.output).exists():
        old = json.loads(Path(args.output).read_text())
        rows = [r for r in old["rows"] if r["gallery"] not in sizes]
        meta["earlier_runs"] = old.get("earlier_runs", []) + [
            {k: old.get(k) for k in ("command", "machine", "settings", "sizes")}]
    arguments = {k: v for k, v in vars(args).items() if k not in ("output", "plot")}
    for size in sizes:
        t0 = time.perf_counter()
        rows.append(run_size(size, args))
        rows[-1]["wall_s"] = time.perf_counter() - t0
        rows[-1]["run_command"] = meta["command"]
        rows.sort(key=lambda r: r["gallery"])
        if args.output:  # after every size: a later size that runs out of time loses nothing
            _common.write_json(args.output, {**meta, "sizes": sizes, "rows": rows,
                                             "arguments": arguments})
    print(report(rows))
    slopes = {k: growth_exponent(rows, k) for k in ("flat_per_image_ms", "ivf_per_image_ms")}
    for k, v in slopes.items():
        if v is not None:
            kind = "sub-linear" if v < 0.9 else "linear" if v <= 1.1 else "super-linear"
            print(f"growth exponent of {k} between the two largest sizes: {v:.2f} ({kind})")
    payload = {**meta, "sizes": sizes, "rows": rows, "growth_exponents": slopes,
               "arguments": arguments}
    if args.output:
        _common.write_json(args.output, payload)
    if args.plot:
        plot(rows, Path(args.plot))
    return payload


if __name__ == "__main__":
    main()
