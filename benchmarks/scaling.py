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


def stage_clock(row: dict[str, Any], label: str):
    """``with stage(name):`` is :func:`measured` plus the stage's CPU seconds
    (``row["stage_cpu_s"]``), printed after ``label``."""
    @contextmanager
    def stage(name: str):
        cpu = time.process_time()
        with measured(row, name):
            yield
        row["stage_cpu_s"][name] = time.process_time() - cpu
        print(f"  {label}{name}: {row['stage_cpu_s'][name]:.1f} CPU s, RSS peak "
              f"{row['stage_rss_peak_mib'][name]:.0f} MiB", flush=True)

    return stage


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
        ivf = [faiss.extract_index_ivf(idx) for idx in cache.values()
               if isinstance(idx, faiss.Index)]
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
    """`orgnn reconstruct` of the Occluded-Duke-sized world with the default checkpoint
    (the learned scorer; :func:`train_checkpoint`) in one process and under ``torchrun``
    with 2 ranks (gloo), one thread per process in both: wall time, every rank's CPU
    seconds per stage against the single process', and the output files compared byte for
    byte."""
    from orgnn.datasets import synthetic_preset
    from orgnn.io.features import save_split_dir

    work = Path(args.workdir) / "torchrun"
    data = work / "data"
    splits = synthetic_preset("occluded_duke", seed=0)
    if not (data / "gallery.npz").exists():
        save_split_dir(data, {"query": splits["query"], "gallery": splits["gallery"]})
    ckpt, _ = train_checkpoint(args)
    row: dict[str, Any] = {"queries": len(splits["query"]), "gallery": len(splits["gallery"]),
                           "threads_per_process": 1}
    outs, stages = {}, {}
    for nproc in (1, 2):
        out, t = work / f"out{nproc}", work / f"t{nproc}.json"
        cli = ["reconstruct", "--data", str(data), "--checkpoint", str(ckpt), "--out",
               str(out), "--quiet", "--timings", str(t)]
        _, row[f"wall_s_{nproc}"], row[f"cpu_s_{nproc}"] = _cli(
            cli, {"OMP_NUM_THREADS": "1"}, nproc)
        stages[nproc] = json.loads(t.read_text())["ranks"]
        outs[nproc] = out
    row["stages_1"] = stages[1][0]
    row["stages_2"] = stages[2]
    row["rank_cpu_share"] = {
        stage: [round(r[stage]["cpu_s"] / max(v["cpu_s"], 1e-9), 3) for r in stages[2]]
        for stage, v in stages[1][0].items() if v["cpu_s"] >= 0.5}
    row["identical_files"] = all((outs[1] / n).read_bytes() == (outs[2] / n).read_bytes()
                                 for n in ("query.npz", "gallery.npz"))
    print(f"orgnn reconstruct, occluded_duke, default checkpoint: 1 process "
          f"{row['wall_s_1']:.1f} s, torchrun x2 {row['wall_s_2']:.1f} s; each rank's CPU "
          f"share per stage {row['rank_cpu_share']}; output files identical: "
          f"{row['identical_files']}")
    return row


# --------------------------------------------------------------------------------------
# The default method through the CLI: `orgnn train`, then `orgnn reconstruct`
# --------------------------------------------------------------------------------------
TRAIN_IDS = 400          # training identities (10 images each), disjoint from the gallery's


def write_cli_world(workdir: Path, size: int, num_queries: int, seed: int = 0) -> Path:
    """``DIR/{query,gallery}.npz`` part-feature files (SPEC §7) of the synthetic world of
    ``size`` gallery images (float16, uncompressed: mapped by `orgnn reconstruct`), made
    from :func:`write_world`'s gallery file chunk by chunk; reused when present."""
    from orgnn.io.features import PartFeatures, save_part_features

    folder = workdir / f"cli_{size}_s{seed}_{WORLD_VERSION}"
    if (folder / "gallery.npz").exists():
        return folder
    gallery, query, visible, _ = write_world(workdir, size, num_queries, seed)
    rng = np.random.default_rng([seed, 13])
    q_ids = rng.integers(0, max(1, -(-size // IMAGES_PER_ID)), num_queries)  # as write_world
    folder.mkdir(parents=True, exist_ok=True)
    save_part_features(folder / "query.npz", PartFeatures(
        query, visible.astype(np.float32), q_ids.astype(np.int64),
        np.full(num_queries, 2, np.int64)))
    ids = np.arange(size) // IMAGES_PER_ID
    save_part_features(folder / "gallery.npz", PartFeatures(
        gallery, np.ones((size, PARTS), np.float32), ids.astype(np.int64),
        (np.arange(size) % 2).astype(np.int64)))
    return folder


def write_cli_train(workdir: Path, seed: int = 0) -> Path:
    """``DIR/train.npz``: :data:`TRAIN_IDS` identities of their own (ids beyond any
    gallery's), half of the images occluded as the queries are."""
    from orgnn.io.features import PartFeatures, save_part_features

    folder = workdir / f"cli_train_s{seed}_{WORLD_VERSION}"
    if (folder / "train.npz").exists():
        return folder
    ids = (10 ** 8 + np.arange(TRAIN_IDS * IMAGES_PER_ID) // IMAGES_PER_ID).astype(np.int64)
    x = _images(ids, seed, 17)
    rng = np.random.default_rng([seed, 17])
    visible = np.where(rng.random(len(ids))[:, None] < 0.5,
                       PATTERNS[rng.integers(0, len(PATTERNS), len(ids))], 1.0)
    noise = np.abs(rng.standard_normal(x.shape, dtype=np.float32)).astype(np.float16)
    x = np.where(visible[:, :, None] > 0, x, noise)
    folder.mkdir(parents=True, exist_ok=True)
    save_part_features(folder / "train.npz", PartFeatures(
        x, visible.astype(np.float32), ids - 10 ** 8, (np.arange(len(ids)) % 2).astype(
            np.int64)))
    return folder


def _cli(args_: list[str], env: dict | None = None, nproc: int = 1
         ) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``orgnn ARGS`` (under torchrun with ``nproc`` > 1); ``(process, wall s, CPU s
    of the children)``."""
    import resource

    if nproc == 1:
        cmd = [sys.executable, "-m", "orgnn.cli", *args_]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "orgnn.cli", *args_]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=_common.REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc, wall, cpu


def train_checkpoint(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """`orgnn train` with its defaults (the learned scorer) on the synthetic training
    split; reused when present."""
    work = Path(args.workdir)
    data = write_cli_train(work, args.seed)
    ckpt = work / f"default_s{args.seed}_{WORLD_VERSION}.pt"
    row: dict[str, Any] = {"train_images": TRAIN_IDS * IMAGES_PER_ID}
    if not ckpt.exists():
        _, row["wall_s"], row["cpu_s"] = _cli(["train", "--data", str(data), "--out",
                                               str(ckpt), "--quiet"])
        print(f"orgnn train: {row['wall_s']:.1f} s ({row['cpu_s']:.1f} CPU s)", flush=True)
    return ckpt, row


def _exact_kth(sample: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """``(S, M)``: per part, the exact cosine of gallery items ``sample`` to their k-th
    nearest other gallery item (streamed through the gallery, one chunk at a time)."""
    from orgnn.io.storage import iter_rows
    from orgnn.retrieval.search import _normalise

    q = _normalise(np.asarray(gallery[sample], np.float32))            # (S, M, D)
    best = np.full((len(sample), PARTS, k + 1), -np.inf, np.float32)
    for g0, chunk in iter_rows(gallery):
        sims = np.einsum("smd,gmd->smg", q, _normalise(chunk))
        own = sample - g0
        inside = (own >= 0) & (own < len(chunk))
        sims[np.flatnonzero(inside), :, own[inside]] = -np.inf
        best = -np.partition(-np.concatenate([best, sims], -1), k, axis=-1)[..., :k + 1]
    return -np.partition(-best, k - 1, axis=-1)[..., k - 1]


def cli_row(size: int, ckpt: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`orgnn reconstruct` of ``size`` gallery images and the queries with the default
    checkpoint (``--index`` as given: ivfpq for the scaling figure), its stage timings
    (wall, CPU, peak RSS), and, on samples, the recall of the neighbourhoods and the error
    of the k-th similarities against the exact ones."""
    from orgnn.io.storage import map_npz_member
    from orgnn.reconstruction.training import load_checkpoint
    from orgnn.retrieval.search import kth_part_similarity, search_neighbourhoods

    work = Path(args.workdir)
    data = write_cli_world(work, size, args.queries, args.seed)
    out = work / f"cli_out_{size}_{args.cli_index}"
    timings = work / f"cli_timings_{size}_{args.cli_index}.json"
    _, wall, cpu = _cli(["reconstruct", "--data", str(data), "--checkpoint", str(ckpt),
                         "--out", str(out), "--index", args.cli_index, "--quiet",
                         "--timings", str(timings)])
    t = json.loads(timings.read_text())
    row: dict[str, Any] = {"gallery": size, "queries": args.queries, "index": args.cli_index,
                           "k": t["k"], "theta": t["theta"], "wall_s": wall, "cpu_s": cpu,
                           "stages": t["stages"],
                           "peak_rss_mib": max(v["peak_rss_mib"] for v in t["stages"].values())}
    items = size + args.queries
    row["wall_ms_per_item"] = 1e3 * wall / items
    row["cpu_ms_per_item"] = 1e3 * cpu / items
    print(f"G={size} ({args.cli_index}): {wall:.0f} s wall, {cpu:.0f} CPU s "
          f"({row['cpu_ms_per_item']:.2f} CPU ms per item), peak RSS "
          f"{row['peak_rss_mib']:.0f} MiB; " + ", ".join(
              f"{k} {v['cpu_s']:.0f}" for k, v in t["stages"].items()), flush=True)
    # recall of the neighbourhoods and the k-th similarity error, on samples
    gallery = map_npz_member(data / "gallery.npz", "features")
    with np.load(data / "query.npz") as z:
        query, q_vis = z["features"], z["visibility"]
    model, _ = load_checkpoint(ckpt)
    rng = np.random.default_rng(5)
    n = min(args.recall_queries or 200, size)
    sample = np.sort(rng.choice(size, n, replace=False))
    g_vis = np.ones((n, PARTS), np.float32)
    kw = dict(k=t["k"], theta=t["theta"])
    for name, feats, vis, excl in (("query", query[:n], q_vis[:n], None),
                                   ("gallery", np.asarray(gallery[sample]), g_vis, sample)):
        exact = search_neighbourhoods(feats, vis, gallery, device="cpu", exclude=excl, **kw)
        approx = search_neighbourhoods(feats, vis, gallery, index=args.cli_index,
                                       exclude=excl, **kw)
        row[f"{name}_recall"] = recall(exact.index, approx.index)
    exact_kth = _exact_kth(sample, gallery, model.scorer.kth)
    approx_kth = kth_part_similarity(np.asarray(gallery[sample]), gallery, model.scorer.kth,
                                     exclude=sample, index=args.cli_index)
    err = exact_kth - approx_kth
    row["kth_error"] = {"mean": float(err.mean()), "p99": float(np.quantile(err, 0.99)),
                        "max": float(err.max()), "exact_share": float((err < 1e-5).mean())}
    print(f"  recall@{t['k']}: query {row['query_recall']:.3f}, gallery "
          f"{row['gallery_recall']:.3f}; k-th similarity error mean "
          f"{row['kth_error']['mean']:.4f} (p99 {row['kth_error']['p99']:.4f})", flush=True)
    return row


def sampled_row(size: int, ckpt: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The stages of `orgnn reconstruct --index ivfpq` (the same library calls, in this
    process) on a gallery of ``size`` items, with the per-item stages timed on
    ``--sample`` gallery items instead of all of them: the index is built for the whole
    gallery, the queries are searched in full, and ``sample`` gallery items are searched
    (their own neighbourhoods), given their k-th similarities, scored and reconstructed.
    The scorer's overlap features read every neighbour's own neighbourhood and previous
    probabilities; random lists of the same shape stand in for those of the rest of the
    gallery (the work per item does not depend on their content). CPU seconds
    per item times ``G + Q`` states the whole run's CPU time; recall and the k-th error
    are measured on the sample against the exact values."""
    from orgnn.io.features import PartFeatures
    from orgnn.reconstruction import pipeline
    from orgnn.reconstruction.outliers import (
        context_features,
        edge_features,
        feature_rows,
        prior_weights,
    )
    from orgnn.reconstruction.training import SearchConfig, load_checkpoint
    from orgnn.retrieval.search import (
        Neighbourhoods,
        kth_part_similarity,
        search_neighbourhoods,
    )

    gallery_x, query_x, q_vis, gen_s = write_world(Path(args.workdir), size, args.queries,
                                                   args.seed)
    gallery = PartFeatures(gallery_x, np.ones((size, PARTS), np.float32),
                           (np.arange(size) // IMAGES_PER_ID).astype(np.int64),
                           (np.arange(size) % 2).astype(np.int64))
    model, _ = load_checkpoint(ckpt)
    cfg = pipeline.resolve_search(SearchConfig(index="ivfpq"), model)
    n = min(args.sample, size)
    sample = np.sort(np.random.default_rng(5).choice(size, n, replace=False))
    row: dict[str, Any] = {"gallery": size, "queries": args.queries, "sample": n,
                           "k": cfg.k, "theta": cfg.theta, "generate_s": gen_s,
                           "stage_s": {}, "stage_cpu_s": {}, "stage_peak_mib": {},
                           "stage_rss_peak_mib": {}}

    stage = stage_clock(row, f"G={size} ")

    cache: dict = {}
    kw = dict(k=cfg.k, theta=cfg.theta, index="ivfpq", index_cache=cache)
    with stage("index_build"):
        search_neighbourhoods(query_x[:1], q_vis[:1], gallery_x, **kw)
    with stage("search"):
        q_nbrs = search_neighbourhoods(query_x, q_vis, gallery_x, **kw)
    s_feats, s_vis = np.asarray(gallery_x[sample]), np.ones((n, PARTS), np.float32)
    with stage("gallery_search"):
        s_nbrs = search_neighbourhoods(s_feats, s_vis, gallery_x, exclude=sample, **kw)
    with stage("kth"):
        kth_s = kth_part_similarity(s_feats, gallery_x, model.scorer.kth, exclude=sample,
                                    index="ivfpq", index_cache=cache)
    # What the sample's scoring reads of the rest of the gallery (its neighbours' own
    # neighbourhoods, k-th values and previous probabilities) is, in a whole run, the
    # gallery's own results; here random lists of the same shape stand in for them (their
    # content does not change the work).
    g_index = np.random.default_rng(6).integers(0, size, (size, cfg.k))
    g_index[sample] = s_nbrs.index
    g_parts = np.zeros((size, PARTS), bool)
    g_parts[:, :2] = True
    g_nbrs = Neighbourhoods(g_index, np.full((size, cfg.k), 0.5, np.float32), g_parts)
    kth = np.zeros((size, PARTS), np.float32)
    kth[sample] = kth_s
    scorer = model.scorer
    g_prob = np.random.default_rng(7).random((size, cfg.k)).astype(np.float32)
    with stage("score"):  # what score_split does per target chunk, for the sample alone
        prob = np.zeros(s_nbrs.index.shape, np.float32)
        rows = feature_rows(cfg.k, cfg.k, PARTS, DIM)
        for c0 in range(0, n, rows):
            sl = slice(c0, min(c0 + rows, n))
            nb = Neighbourhoods(s_nbrs.index[sl], s_nbrs.score[sl], s_nbrs.search_parts[sl])
            base = edge_features(s_feats[sl], gallery_x, gallery.visible, nb, kth, s_vis[sl])
            p = scorer.probability(0, base)
            for st in range(1, scorer.stages):
                ctx = context_features(s_feats[sl], s_vis[sl], gallery_x, nb, p, g_nbrs,
                                       g_prob, scorer.gamma, scorer.self_weight)
                p = scorer.probability(st, np.concatenate([base, ctx], -1))
            prob[sl] = p
    with stage("reconstruct"):
        out = pipeline.reconstruct(model, s_feats, gallery_x, s_nbrs,
                                   target_visibility=s_vis,
                                   node_weight=prior_weights(prob, model.scorer.gamma))
    assert np.isfinite(out).all()
    per_item = {name: row["stage_cpu_s"][name] / n
                for name in ("gallery_search", "kth", "score", "reconstruct")}
    row["cpu_ms_per_gallery_item"] = {k: 1e3 * v for k, v in per_item.items()}
    row["cpu_s_estimate"] = (row["stage_cpu_s"]["index_build"] + row["stage_cpu_s"]["search"]
                             + sum(per_item.values()) * (size + args.queries))
    row["cpu_ms_per_item_estimate"] = 1e3 * row["cpu_s_estimate"] / (size + args.queries)
    row["peak_rss_mib"] = max(row["stage_rss_peak_mib"].values())
    # recall and k-th error on (part of) the sample, against the exact values
    m = min(n, args.recall_queries or 200)
    exact = search_neighbourhoods(s_feats[:m], s_vis[:m], gallery_x, k=cfg.k, theta=cfg.theta,
                                  device="cpu", exclude=sample[:m])
    row["gallery_recall"] = recall(exact.index, s_nbrs.index[:m])
    exact_q = search_neighbourhoods(query_x[:m], q_vis[:m], gallery_x, k=cfg.k,
                                    theta=cfg.theta, device="cpu")
    row["query_recall"] = recall(exact_q.index, q_nbrs.index[:m])
    err = _exact_kth(sample[:m], gallery_x, model.scorer.kth) - kth_s[:m]
    row["kth_error"] = {"mean": float(err.mean()), "p99": float(np.quantile(err, 0.99)),
                        "max": float(err.max()), "exact_share": float((err < 1e-5).mean())}
    print(f"G={size}: ~{row['cpu_ms_per_item_estimate']:.2f} CPU ms per item "
          f"({row['cpu_ms_per_gallery_item']}), peak RSS {row['peak_rss_mib']:.0f} MiB, "
          f"recall query {row['query_recall']:.3f} gallery {row['gallery_recall']:.3f}, "
          f"k-th error mean {row['kth_error']['mean']:.4f}", flush=True)
    return row


def search_recall_row(size: int, args: argparse.Namespace) -> dict[str, Any]:
    """The IVF-PQ neighbourhood search alone, as :func:`sampled_row` measures its recall:
    ``--sample`` gallery items searching the gallery (fully visible: the two upper-body
    parts, themselves excluded) and the ``--queries`` occluded queries (3 to 5 parts), K and
    theta from ``--k`` / ``--theta`` (30 and 0.737 for the default checkpoint's figures).
    Time per query of each search (the index built before, timed apart; the least CPU
    time of ``--repeats`` runs), recall@K of the
    first ``--recall-queries`` (200) against the exact torch search, and that recall split
    into the neighbours of the same identity and those of others."""
    import inspect

    from orgnn.retrieval import search
    from orgnn.retrieval.search import search_neighbourhoods

    gallery, query, q_vis, _ = write_world(Path(args.workdir), size, args.queries, args.seed)
    n = min(args.sample, size)
    sample = np.sort(np.random.default_rng(5).choice(size, n, replace=False))
    m = min(n, args.queries, args.recall_queries or 200)
    s_feats, s_vis = np.asarray(gallery[sample]), np.ones((n, PARTS), np.float32)
    nlist = search._ivf_nlist(args.nlist, size)
    row: dict[str, Any] = {"gallery": size, "sample": n, "queries": args.queries,
                           "recall_queries": m, "k": args.k, "theta": args.theta,
                           "nlist": nlist, "nprobe": args.nprobe, "refine": args.refine,
                           "pq_m": args.pq_m, "label": args.label,
                           "stage_s": {}, "stage_cpu_s": {}, "stage_peak_mib": {},
                           "stage_rss_peak_mib": {}}
    # lists visited per number of searching parts (a version of the library without the
    # few-parts scaling takes no `searching`)
    scaled = "searching" in inspect.signature(search.resolve_nprobe).parameters
    row["nprobe_by_parts"] = {
        c: search.resolve_nprobe(nlist, args.nprobe, **(
            dict(searching=c, parts=PARTS) if scaled else {})) for c in range(1, PARTS + 1)}
    stage = stage_clock(row, f"G={size} [{args.label}] ")
    cache: dict = {}
    kw = dict(k=args.k, theta=args.theta, index="ivfpq", nlist=nlist, nprobe=args.nprobe,
              refine=args.refine, pq_m=args.pq_m, index_cache=cache)
    with stage("index_build"):
        search_neighbourhoods(query[:1], q_vis[:1], gallery, **kw)
    import faiss
    ivf = faiss.extract_index_ivf(next(v for v in cache.values() if isinstance(v, faiss.Index)))
    row["index_mib"] = (ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4) / _common.MiB
    # each search --repeats times (the machine is shared): the least CPU time counts
    cpu: dict[str, list[float]] = {"gallery_search": [], "query_search": []}
    for _ in range(max(1, args.repeats)):
        with stage("gallery_search"):
            got_g = search_neighbourhoods(s_feats, s_vis, gallery, exclude=sample, **kw)
        cpu["gallery_search"].append(row["stage_cpu_s"]["gallery_search"])
        with stage("query_search"):
            got_q = search_neighbourhoods(query, q_vis, gallery, **kw)
        cpu["query_search"].append(row["stage_cpu_s"]["query_search"])
    row["repeats_cpu_s"] = cpu
    exact_g = search_neighbourhoods(s_feats[:m], s_vis[:m], gallery, k=args.k,
                                    theta=args.theta, device="cpu", exclude=sample[:m])
    q_ids = np.random.default_rng([args.seed, 13]).integers(
        0, max(1, -(-size // IMAGES_PER_ID)), args.queries)          # as write_world
    exact_q = search_neighbourhoods(query[:m], q_vis[:m], gallery, k=args.k,
                                    theta=args.theta, device="cpu")
    for name, exact, got, ids, count in (
            ("gallery", exact_g, got_g, sample[:m] // IMAGES_PER_ID, n),
            ("query", exact_q, got_q, q_ids[:m], args.queries)):
        same = (exact.index // IMAGES_PER_ID == ids[:, None]) & exact.valid
        hit = np.array([np.isin(e, a[a >= 0]) for e, a in zip(exact.index, got.index[:m])])
        hit &= exact.valid
        row[name] = {
            "per_query_ms": 1e3 * row["stage_s"][f"{name}_search"] / count,
            "cpu_ms_per_query": 1e3 * min(cpu[f"{name}_search"]) / count,
            "recall": recall(exact.index, got.index[:m]),
            "exact_neighbours": float(exact.counts.mean()),
            "same_identity": float(same.sum(1).mean()),
            "same_identity_recall": float(hit[same].mean()) if same.any() else None,
            "other_recall": float(hit[exact.valid & ~same].mean())
            if (exact.valid & ~same).any() else None,
        }
        r = row[name]
        print(f"  {name}: recall@{args.k} {r['recall']:.3f} (same identity "
              f"{r['same_identity_recall']:.3f} of {r['same_identity']:.1f}, others "
              f"{r['other_recall'] or float('nan'):.3f} of "
              f"{r['exact_neighbours'] - r['same_identity']:.1f}), "
              f"{r['cpu_ms_per_query']:.2f} CPU ms/query", flush=True)
    return row


def cuhk03_row(args: argparse.Namespace) -> dict[str, Any]:
    """mAP of the default checkpoint (trained with `orgnn train` on cuhk03-parts' training
    split) after `orgnn reconstruct` exact (``--index flat``) and approximate
    (``--index ivfpq``: IVF-PQ search and the pooled k-th similarities), and with ``--k``
    the gallery size (peak RSS)."""
    data = Path(args.cuhk03)
    work = Path(args.workdir) / "cuhk03"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "default.pt"
    row: dict[str, Any] = {"data": str(data)}
    if not ckpt.exists():
        _, row["train_wall_s"], row["train_cpu_s"] = _cli(["train", "--data", str(data),
                                                           "--out", str(ckpt), "--quiet"])
    for index in ("flat", "ivfpq"):
        out, t = work / f"out_{index}", work / f"t_{index}.json"
        _, wall, cpu = _cli(["reconstruct", "--data", str(data), "--checkpoint", str(ckpt),
                             "--out", str(out), "--index", index, "--quiet", "--timings",
                             str(t)])
        _cli(["evaluate", "--data", str(out), "--json", str(work / f"m_{index}.json")])
        metrics = json.loads((work / f"m_{index}.json").read_text())
        row[index] = {"wall_s": wall, "cpu_s": cpu, "mAP": metrics["mAP"],
                      "rank1": metrics["rank1"], "stages": json.loads(t.read_text())["stages"]}
        print(f"cuhk03-parts {index}: mAP {metrics['mAP']:.2f}, rank-1 "
              f"{metrics['rank1']:.2f} ({wall:.0f} s)", flush=True)
    row["mAP_change"] = row["ivfpq"]["mAP"] - row["flat"]["mAP"]
    return row


def full_k_row(args: argparse.Namespace) -> dict[str, Any]:
    """``orgnn reconstruct --k G`` (``G`` the gallery size) on ``--cuhk03`` with the default
    checkpoint, whole, under the default memory budget: wall and CPU time, every stage's
    resident-set peak, and the mAP of the result beside the default ``K``'s. Under the
    checkpoint's threshold most of each list is padding, which the scorer's chunks and the
    OR-GNN's batches leave out (:func:`orgnn.reconstruction.graphs.plan_graph_batches`)."""
    from orgnn.io.features import load_part_features

    data = Path(args.cuhk03)
    work = Path(args.workdir) / "cuhk03"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "default.pt"
    if not ckpt.exists():
        _cli(["train", "--data", str(data), "--out", str(ckpt), "--quiet"])
    k = len(load_part_features(data / "gallery.npz"))
    out, t = work / "out_full_k", work / "t_full_k.json"
    _, wall, cpu = _cli(["reconstruct", "--data", str(data), "--checkpoint", str(ckpt),
                         "--k", str(k), "--out", str(out), "--quiet", "--timings", str(t)])
    timings = json.loads(t.read_text())
    _cli(["evaluate", "--data", str(out), "--json", str(work / "m_full_k.json")])
    metrics = json.loads((work / "m_full_k.json").read_text())
    row: dict[str, Any] = {
        "k": k, "theta": timings["theta"], "wall_s": wall, "cpu_s": cpu,
        "stages": timings["stages"], "mAP": metrics["mAP"], "rank1": metrics["rank1"],
        "peak_rss_mib": max(v["peak_rss_mib"] for v in timings["stages"].values())}
    print(f"cuhk03-parts, K = {k}: {wall:.0f} s wall, {cpu:.0f} CPU s, peak RSS "
          f"{row['peak_rss_mib']:.0f} MiB; mAP {row['mAP']:.2f}, rank-1 {row['rank1']:.2f}",
          flush=True)
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
    parser.add_argument("--cli", action="store_true",
                        help="the default checkpoint through `orgnn train` and `orgnn "
                             "reconstruct` at --sizes (stage times, CPU, RSS, recall)")
    parser.add_argument("--sampled", action="store_true",
                        help="the stages in this process at --sizes, per-item stages timed "
                             "on --sample gallery items (sampled_row)")
    parser.add_argument("--sample", type=int, default=2000)
    parser.add_argument("--search-recall", action="store_true",
                        help="the IVF-PQ search alone at --sizes: recall@K of the gallery's "
                             "own neighbourhoods (--sample items) and of the queries against "
                             "exact, time per query (search_recall_row)")
    parser.add_argument("--nprobe", type=int, default=None,
                        help="with --search-recall: nprobe (default: the library's)")
    parser.add_argument("--label", default="",
                        help="with --search-recall: the rows' label (e.g. the code version)")
    parser.add_argument("--cli-index", default="ivfpq",
                        help="--index of the --cli runs (default ivfpq)")
    parser.add_argument("--cuhk03", default=None, metavar="DIR",
                        help="also: mAP of exact vs approximate path on this part-feature "
                             "folder (e.g. /work/shared/data/cuhk03-parts/occluded)")
    parser.add_argument("--cuhk03-full-k", action="store_true",
                        help="with --cuhk03: `orgnn reconstruct --k` the gallery size, whole "
                             "(time, peak RSS per stage, mAP)")
    parser.add_argument("--skip-cuhk03-map", action="store_true",
                        help="with --cuhk03: skip the exact vs approximate mAP runs")
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
    for key in ("duke_devices", "torchrun", "cuhk03", "cuhk03_full_k", "cli", "sampled",
                "search_recall"):
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
    if args.cuhk03 and not args.skip_cuhk03_map:
        payload["cuhk03"] = {**cuhk03_row(args), "run_command": meta["command"]}
        save()
    if args.cuhk03 and args.cuhk03_full_k:
        payload["cuhk03_full_k"] = {**full_k_row(args), "run_command": meta["command"]}
        save()
    if args.search_recall:
        runs = old.get("search_recall", [])
        for size in args.sizes:
            row = search_recall_row(size, args)
            row["run_command"] = meta["command"]
            runs.append(row)
            payload["search_recall"] = runs
            save()
        return payload
    if args.sampled:
        ckpt, _ = train_checkpoint(args)
        sampled = {str(r["gallery"]): r for r in old.get("sampled", [])}
        for size in args.sizes:
            row = sampled_row(size, ckpt, args)
            row["run_command"] = meta["command"]
            sampled[str(size)] = row
            payload["sampled"] = sorted(sampled.values(), key=lambda r: r["gallery"])
            save()
        return payload
    if args.cli:
        ckpt, train_row = train_checkpoint(args)
        cli_rows = {str(r["gallery"]) + r["index"]: r for r in old.get("cli", {}).get(
            "rows", [])}
        payload["cli"] = {"train": train_row, "rows": list(cli_rows.values())}
        for size in args.sizes:
            row = cli_row(size, ckpt, args)
            row["run_command"] = meta["command"]
            cli_rows[str(size) + args.cli_index] = row
            payload["cli"]["rows"] = sorted(cli_rows.values(),
                                            key=lambda r: (r["index"], r["gallery"]))
            save()
        return payload
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
