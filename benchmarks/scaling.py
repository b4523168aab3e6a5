"""How search and reconstruction cost grow with the gallery: 10^3 to 10^7 images.

A synthetic gallery of ``G`` images (6 parts x 256-d float16) is generated chunk by chunk
into a ``.npy`` file (``--workdir``, reused by later runs) and memory-mapped read-only, so the
process never holds it: 10^7 images are 29 GiB on disk. ``--queries`` occluded query images
of gallery identities then search it with :func:`orgnn.retrieval.search.search_neighbourhoods`
(visible-mean mode, K=10, theta=0.7):

* ``exact``: the torch search on the CPU (``device="cpu"``): exact, the gallery streamed in
  256 MiB chunks; the reference of every recall figure;
* ``flat`` / ``ivf``: faiss ``IndexFlatIP`` / ``IndexIVFFlat`` (float32 copies of the
  gallery: run only up to ``--full-index-max`` images);
* ``ivfpq``: faiss ``IndexIVFPQFastScan`` (96 4-bit codes, 48 bytes per image) whose candidates
  (``refine`` x K) are re-ranked exactly from the float16 file; built once, then queried at
  each ``--nprobes`` value (time per query and recall@K against ``exact``).

The queries are then reconstructed by an untrained identity-initialised :class:`orgnn.ORGNN`
from their ``ivfpq`` neighbourhoods, gathering neighbour rows from the mapped file
(:func:`orgnn.reconstruction.pipeline.reconstruct`). Per stage the script records the time, the
growth of the resident set and its absolute high-water mark (``VmHWM`` after a reset; it counts
mapped file pages the process touches, see ``benchmarks/_common.py``).

Two more measurements: ``--duke`` times the exact torch search (CPU) against faiss
``IndexFlatIP`` on the Occluded-Duke-sized synthetic world (query and gallery searches, as
:func:`orgnn.reconstruction.pipeline.search_split` runs them), interleaved, and checks they return
the same neighbours; ``--torchrun`` runs ``orgnn reconstruct`` on that world in one process and
under ``torchrun --nproc-per-node 2`` (gloo), times both and compares the output files byte for
byte.

Usage::

    python benchmarks/scaling.py                          # 10^3 .. 10^6
    python benchmarks/scaling.py --sizes 10000000 --append --recall-queries 200
    python benchmarks/scaling.py --duke --torchrun --sizes   # only the two extra rows
    python benchmarks/scaling.py --quick                  # 10^3 .. 10^4, < 1 minute
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
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
IMAGES_PER_ID = 10
#: In the gallery files' names: a file written by another version of the generator is not
#: reused.
WORLD_VERSION = "v2"
ID_BLOCK = 64
PATTERNS = np.array([[1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1],
                     [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 1], [1, 0, 0, 0, 1, 1]],
                    dtype=np.float32)


# --------------------------------------------------------------------------------------
# Data: generated in chunks, identities' prototypes from a counter-based seed
# --------------------------------------------------------------------------------------
def _generator(*key: int):
    import torch

    seed = 0
    for part in key:  # a stable mix of the key into one 63-bit seed
        seed = (seed * 1_000_003 + part + 1) % (1 << 63)
    return torch.Generator().manual_seed(seed)


def _shared(seed: int):
    import torch

    return torch.rand((PARTS, DIM), generator=_generator(seed, 1)) * 1.5


def _protos(ids: np.ndarray, seed: int):
    """Prototypes of identities ``ids``: block ``b`` of :data:`ID_BLOCK` identities comes
    from its own seed, so any identity is generated without the others."""
    import torch

    out = torch.empty((len(ids), PARTS, DIM))
    blocks = ids // ID_BLOCK
    for b in np.unique(blocks):
        table = torch.randn((ID_BLOCK, PARTS, DIM), generator=_generator(seed, 7, int(b))) * 0.7
        sel = np.flatnonzero(blocks == b)
        out[torch.from_numpy(sel)] = table[torch.from_numpy(ids[sel] % ID_BLOCK)]
    return out


def _images(ids: np.ndarray, seed: int, *key: int) -> np.ndarray:
    """``relu(shared + prototype + 0.35 noise)`` as float16 (torch's generator: twice as fast
    as numpy's here, which matters at 10^7 images)."""
    import torch

    x = _protos(ids, seed).add_(_shared(seed))
    x.add_(torch.randn(x.shape, generator=_generator(seed, *key)), alpha=0.35)
    return x.clamp_min_(0).half().numpy()


def write_world(workdir: Path, size: int, num_queries: int, seed: int = 0,
                chunk: int = 50_000) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(gallery memmap (G, 6, 256) float16, query (Q, 6, 256) float16, query_visible,
    seconds spent generating)``. Features are ``relu(shared + identity prototype + noise)``
    (mean cosine about 0.93 within an identity, 0.66 across); row ``j`` shows identity
    ``j // 10``. Queries are new images of gallery identities with one of the usual
    occlusion patterns (visibility 0 and noise on the hidden parts). The gallery file is
    written with plain file writes (no mapping held) and reused when it exists."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"gallery_{size}_s{seed}_{WORLD_VERSION}.npy"
    t0 = time.perf_counter()
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                "fortran_order": False, "shape": (size, PARTS, DIM)})
            for c, start in enumerate(range(0, size, chunk)):
                ids = np.arange(start, min(start + chunk, size)) // IMAGES_PER_ID
                fh.write(_images(ids, seed, 11, c).tobytes())
        os.replace(tmp, path)
    gallery = np.load(path, mmap_mode="r")
    rng = np.random.default_rng([seed, 13])
    num_ids = max(1, -(-size // IMAGES_PER_ID))
    q_ids = rng.integers(0, num_ids, num_queries)
    query = _images(q_ids, seed, 13)
    visible = PATTERNS[rng.integers(0, len(PATTERNS), num_queries)]
    noise = np.abs(rng.standard_normal(query.shape, dtype=np.float32)).astype(np.float16)
    query = np.where(visible[:, :, None] > 0, query, noise)
    return gallery, query, visible, time.perf_counter() - t0


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------
@contextmanager
def measured(row: dict[str, Any], name: str):
    """Time a stage; record its resident-set growth and absolute high-water mark (MiB)."""
    base = _common._status_kib("VmRSS") or 0
    _common._reset_hwm()
    t0 = time.perf_counter()
    yield
    row["stage_s"][name] = time.perf_counter() - t0
    hwm = _common._status_kib("VmHWM") or 0
    row["stage_peak_mib"][name] = max(0, hwm - base) / 1024
    row["stage_rss_peak_mib"][name] = hwm / 1024


def _partial(row: dict[str, Any], args: argparse.Namespace) -> None:
    """The stages of a size measured so far, in ``--workdir`` (a size too large to finish
    in the time at hand still leaves its first figures)."""
    path = Path(args.workdir) / f"partial_{row['gallery']}.json"
    path.write_text(json.dumps(row, indent=2, default=_common._plain))


def recall(exact: np.ndarray, approx: np.ndarray) -> float:
    """Mean over queries with exact neighbours of |exact ∩ approx| / |exact|."""
    vals = []
    for e, a in zip(exact, approx):
        e = e[e >= 0]
        if e.size:
            vals.append(np.isin(e, a[a >= 0]).mean())
    return float(np.mean(vals)) if vals else float("nan")


def run_size(size: int, args: argparse.Namespace) -> dict[str, Any]:
    from orgnn.nn import ORGNN
    from orgnn.reconstruction.pipeline import reconstruct
    from orgnn.retrieval.search import _ivf_nlist, resolve_nprobe, search_neighbourhoods

    gallery, query, visible, gen_s = write_world(Path(args.workdir), size, args.queries,
                                                 args.seed)
    q = query.shape[0]
    nq_recall = min(q, args.recall_queries or q)
    kw = dict(k=args.k, theta=args.theta)
    row: dict[str, Any] = {"gallery": size, "queries": q, "recall_queries": nq_recall,
                           "generate_s": gen_s, "gallery_mib": gallery.nbytes / _common.MiB,
                           "stage_s": {}, "stage_peak_mib": {}, "stage_rss_peak_mib": {}}
    print(f"G={size}: gallery file {row['gallery_mib']:.0f} MiB (float16, mapped), "
          f"ready in {gen_s:.1f} s")

    # IVF-PQ first (build, search, reconstruct: the bounded-memory path), the exact
    # reference after it, so that a size too large to finish still reports the first part.
    nlist = _ivf_nlist(args.nlist, size)
    model = ORGNN(DIM, DIM, num_parts=PARTS, num_layers=2, init="identity",
                  target_init="visible").eval()
    found: dict[str, np.ndarray] = {}
    if nlist is not None:
        nprobe = resolve_nprobe(nlist, None)
        row.update(nlist=nlist, nprobe_default=nprobe, refine=args.refine, pq_m=args.pq_m)
        cache: dict = {}
        pq = dict(index="ivfpq", nlist=nlist, pq_m=args.pq_m, refine=args.refine,
                  index_cache=cache, **kw)
        with measured(row, "ivfpq_build_search"):
            nbrs = search_neighbourhoods(query, visible, gallery, nprobe=nprobe, **pq)
        row["ivfpq_empty"] = nbrs.num_empty
        import faiss
        ivf = [faiss.extract_index_ivf(idx) for idx in cache.values()]
        # codes + 8-byte ids in the inverted lists, plus the centroids
        row["ivfpq_index_mib"] = sum(i.ntotal * (i.code_size + 8) + i.nlist * i.d * 4
                                     for i in ivf) / _common.MiB
        print(f"  ivfpq build+search: {row['stage_s']['ivfpq_build_search']:.1f} s, RSS peak "
              f"{row['stage_rss_peak_mib']['ivfpq_build_search']:.0f} MiB, index "
              f"{row['ivfpq_index_mib']:.0f} MiB", flush=True)
        _partial(row, args)
        n = len(nbrs.index)
        with measured(row, "reconstruct"):
            out = reconstruct(model, query[:n], gallery, nbrs, batch_size=args.batch_size,
                              target_visibility=visible[:n])
        assert out.shape == (n, PARTS, DIM) and np.isfinite(out).all()
        row["reconstruct_per_image_ms"] = 1e3 * row["stage_s"]["reconstruct"] / n
        print(f"  reconstruct: {row['stage_s']['reconstruct']:.2f} s, RSS peak "
              f"{row['stage_rss_peak_mib']['reconstruct']:.0f} MiB", flush=True)
        _partial(row, args)
        sweep = {}
        for probes in sorted(set(args.nprobes) | {nprobe}):
            if probes > nlist:
                continue
            t0 = time.perf_counter()
            got = search_neighbourhoods(query, visible, gallery, nprobe=probes, **pq)
            sweep[str(probes)] = {"per_query_ms": 1e3 * (time.perf_counter() - t0) / q}
            found[f"ivfpq/{probes}"] = got.index[:nq_recall]
            print(f"  ivfpq nlist={nlist} nprobe={probes}: "
                  f"{sweep[str(probes)]['per_query_ms']:.2f} ms/query", flush=True)
        row["ivfpq_sweep"] = sweep
        row["ivfpq_per_query_ms"] = sweep[str(nprobe)]["per_query_ms"]
        found["ivfpq"] = nbrs.index[:nq_recall]
        del cache

    with measured(row, "exact"):
        exact = search_neighbourhoods(query[:nq_recall], visible[:nq_recall], gallery,
                                      device="cpu", **kw)
    row["exact_per_query_ms"] = 1e3 * row["stage_s"]["exact"] / nq_recall
    row["exact_empty"] = exact.num_empty
    print(f"  exact (torch, CPU, streamed): {row['stage_s']['exact']:.1f} s for {nq_recall} "
          f"queries, RSS peak {row['stage_rss_peak_mib']['exact']:.0f} MiB", flush=True)
    if nlist is not None:
        row["ivfpq_recall"] = recall(exact.index, found["ivfpq"])
        for probes, entry in row["ivfpq_sweep"].items():
            entry["recall"] = recall(exact.index, found[f"ivfpq/{probes}"])
            print(f"  ivfpq nprobe={probes}: recall@{args.k} {entry['recall']:.3f}")
    else:
        nbrs = exact
        n = len(nbrs.index)
        with measured(row, "reconstruct"):
            reconstruct(model, query[:n], gallery, nbrs, batch_size=args.batch_size,
                        target_visibility=visible[:n])
        row["reconstruct_per_image_ms"] = 1e3 * row["stage_s"]["reconstruct"] / n

    if size <= args.full_index_max:
        for index in ("flat", "ivf"):
            if index == "ivf" and size // 39 < 1:
                continue
            with measured(row, index):
                got = search_neighbourhoods(query, visible, gallery, index=index, **kw)
            row[f"{index}_per_query_ms"] = 1e3 * row["stage_s"][index] / q
            row[f"{index}_recall"] = recall(exact.index, got.index[:nq_recall])
            print(f"  {index}: {row['stage_s'][index]:.1f} s (build included), recall "
                  f"{row[f'{index}_recall']:.3f}, RSS peak "
                  f"{row['stage_rss_peak_mib'][index]:.0f} MiB")

    search_stage = "ivfpq_build_search" if nlist is not None else "exact"
    row["search_reconstruct_rss_peak_mib"] = max(row["stage_rss_peak_mib"][search_stage],
                                                 row["stage_rss_peak_mib"]["reconstruct"])
    print(f"  reconstruct: {row['stage_s']['reconstruct']:.2f} s, RSS peak "
          f"{row['stage_rss_peak_mib']['reconstruct']:.0f} MiB; search + reconstruction RSS "
          f"peak {row['search_reconstruct_rss_peak_mib']:.0f} MiB")
    return row


# --------------------------------------------------------------------------------------
# Occluded-Duke-sized: torch exact search vs faiss IndexFlatIP; torchrun 1 vs 2 ranks
# --------------------------------------------------------------------------------------
def duke_devices(args: argparse.Namespace) -> dict[str, Any]:
    from orgnn.datasets import synthetic_preset
    from orgnn.reconstruction.pipeline import search_split
    from orgnn.reconstruction.training import SearchConfig

    splits = synthetic_preset("occluded_duke", seed=0)
    query, gallery = splits["query"], splits["gallery"]
    results = {}

    def run(device):
        cfg = SearchConfig(k=10, theta=0.7, device=device)
        results[device] = (search_split(query, gallery, cfg, same_split=False),
                           search_split(gallery, gallery, cfg, same_split=True))

    timing = _common.interleaved({"faiss IndexFlatIP": lambda: run(None),
                                  "torch (cpu)": lambda: run("cpu")},
                                 repeats=args.repeats, warmup=0)
    same = all(np.array_equal(a.index, b.index) and np.array_equal(a.score, b.score)
               for a, b in zip(results[None], results["cpu"]))
    ratio = timing["torch (cpu)"]["median_s"] / timing["faiss IndexFlatIP"]["median_s"]
    print(f"occluded_duke ({len(query)} queries + {len(gallery)} gallery searching "
          f"{len(gallery)}): faiss {timing['faiss IndexFlatIP']['median_s']:.1f} s, torch "
          f"{timing['torch (cpu)']['median_s']:.1f} s (x{ratio:.2f}); same neighbours and "
          f"scores: {same}")
    return {"queries": len(query), "gallery": len(gallery), "timing": timing,
            "torch_over_faiss": ratio, "same_neighbours": same}


def torchrun_row(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from orgnn.datasets import synthetic_preset
    from orgnn.io.features import save_split_dir
    from orgnn.nn import ORGNN
    from orgnn.reconstruction.training import TrainConfig, save_checkpoint

    work = Path(args.workdir) / "torchrun"
    data = work / "data"
    splits = synthetic_preset("occluded_duke", seed=0)
    save_split_dir(data, {"query": splits["query"], "gallery": splits["gallery"]})
    torch.manual_seed(0)
    model = ORGNN(256, 256, num_parts=6, num_layers=2, init="glorot", target_init="visible")
    ckpt = save_checkpoint(work / "model.pt", model, TrainConfig(target_init="visible"))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    row: dict[str, Any] = {"queries": len(splits["query"]), "gallery": len(splits["gallery"])}
    outs = {}
    for nproc in (1, 2):
        out = work / f"out{nproc}"
        cli = ["-m", "orgnn.cli", "reconstruct", "--data", str(data), "--checkpoint",
               str(ckpt), "--out", str(out), "--theta", "0.7", "--quiet"]
        if nproc == 1:
            cmd = [sys.executable, *cli]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nproc}", *cli]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=_common.REPO, env=env, capture_output=True, text=True)
        row[f"wall_s_{nproc}"] = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        row[f"command_{nproc}"] = " ".join(cmd).replace(sys.executable, "python")
        outs[nproc] = out
    row["identical_files"] = all((outs[1] / n).read_bytes() == (outs[2] / n).read_bytes()
                                 for n in ("query.npz", "gallery.npz"))
    print(f"orgnn reconstruct, occluded_duke: 1 process {row['wall_s_1']:.1f} s, torchrun x2 "
          f"{row['wall_s_2']:.1f} s; output files identical: {row['identical_files']}")
    return row


# --------------------------------------------------------------------------------------
def report(rows: list[dict[str, Any]]) -> str:
    table = []
    nan = float("nan")
    for r in rows:
        table.append([
            r["gallery"], r["gallery_mib"], r["exact_per_query_ms"],
            r["stage_rss_peak_mib"]["exact"], r.get("nlist", nan), r.get("nprobe_default", nan),
            r.get("ivfpq_per_query_ms", nan), r.get("ivfpq_recall", nan),
            r["stage_s"].get("ivfpq_build_search", nan),
            r["stage_rss_peak_mib"].get("ivfpq_build_search", nan),
            r["reconstruct_per_image_ms"], r["search_reconstruct_rss_peak_mib"]])
    return _common.fmt_table(
        ["gallery", "file MiB (fp16)", "exact ms/query", "exact RSS peak MiB", "nlist",
         "nprobe", "IVF-PQ ms/query", "IVF-PQ recall@10", "IVF-PQ build+search s",
         "IVF-PQ RSS peak MiB", "reconstruct ms/image", "search+reconstruct RSS peak MiB"],
        table)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    _common.agg_backend()
    import matplotlib.pyplot as plt

    g = [r["gallery"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, label in (("exact_per_query_ms", "exact (torch, streamed), per query"),
                       ("ivfpq_per_query_ms", "IVF-PQ + exact re-rank, per query"),
                       ("reconstruct_per_image_ms", "reconstruction, per image")):
        axes[0].plot(g, [r.get(key, float("nan")) for r in rows], "o-", label=label)
    axes[0].set_ylabel("ms")
    for stage, label in (("exact", "exact search"), ("ivfpq_build_search", "IVF-PQ build+search"),
                         ("reconstruct", "reconstruction")):
        axes[1].plot(g, [r["stage_rss_peak_mib"].get(stage, float("nan")) for r in rows],
                     "o-", label=label)
    axes[1].plot(g, [r["gallery_mib"] for r in rows], "k:", label="gallery file (fp16)")
    axes[1].set_ylabel("resident-set peak (MiB)")
    for r in rows:
        sweep = r.get("ivfpq_sweep") or {}
        if sweep:
            probes = sorted(int(p) for p in sweep)
            axes[2].plot(probes, [sweep[str(p)]["recall"] for p in probes], "o-",
                         label=f"G={r['gallery']:.0e}")
    axes[2].axhline(0.95, color="k", ls=":", lw=1)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("nprobe")
    axes[2].set_ylabel("IVF-PQ recall@10 vs exact")
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gallery size")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    _common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^3 .. 10^4")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--recall-queries", type=int, default=None,
                        help="exact search (the recall reference) for the first N queries only")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--theta", type=float, default=0.7)
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default sqrt(G))")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--pq-m", type=int, default=None,
                        help="IVF-PQ sub-quantisers (default: the library's, 96 for 6 x 256-d)")
    parser.add_argument("--refine", type=int, default=None)
    parser.add_argument("--full-index-max", type=int, default=100_000,
                        help="largest gallery given the float32 faiss flat / IVF indexes")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/orgnn_scaling",
                        help="where the gallery files are written (and reused)")
    parser.add_argument("--duke", action="store_true",
                        help="torch vs faiss exact search on the Occluded-Duke-sized world")
    parser.add_argument("--torchrun", action="store_true",
                        help="orgnn reconstruct in 1 process vs torchrun with 2 (gloo)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--generate-only", action="store_true",
                        help="write the gallery files of --sizes and stop")
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
    if args.sizes is None:
        args.sizes = [1_000, 3_000, 10_000] if args.quick else [1_000, 10_000, 100_000,
                                                                1_000_000]
    args.queries = args.queries or (200 if args.quick else 1000)
    old: dict[str, Any] = {}
    if args.append and args.output and Path(args.output).exists():
        old = json.loads(Path(args.output).read_text())
        meta["earlier_runs"] = old.get("earlier_runs", []) + [
            {k: old.get(k) for k in ("command", "machine", "settings", "sizes")}]
    rows = [r for r in old.get("rows", []) if r["gallery"] not in args.sizes]
    payload: dict[str, Any] = {**meta, "sizes": args.sizes, "rows": rows,
                               "arguments": {k: v for k, v in vars(args).items()
                                             if k not in ("output", "plot")}}
    for key in ("duke_devices", "torchrun"):
        if key in old:
            payload[key] = old[key]

    def save() -> None:
        if args.output:  # after every step: a later one that runs out of time loses nothing
            _common.write_json(args.output, payload)

    if args.generate_only:
        for size in args.sizes:
            print(f"G={size}: ready in "
                  f"{write_world(Path(args.workdir), size, 1, args.seed)[3]:.0f} s")
        return payload
    if args.duke:
        payload["duke_devices"] = {**duke_devices(args), "run_command": meta["command"]}
        save()
    if args.torchrun:
        payload["torchrun"] = {**torchrun_row(args), "run_command": meta["command"]}
        save()
    for size in args.sizes:
        t0 = time.perf_counter()
        row = run_size(size, args)
        row["wall_s"] = time.perf_counter() - t0
        row["run_command"] = meta["command"]
        rows.append(row)
        rows.sort(key=lambda r: r["gallery"])
        save()
    if rows:
        print(report(rows))
        if args.plot:
            plot(rows, Path(args.plot))
    save()
    return payload


if __name__ == "__main__":
    main()
