"""Memory budget, byte-sized batches, and the scratch folders of `orgnn reconstruct`."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from orgnn.io.storage import memory_budget, parse_bytes, rows_for, working_memory
from orgnn.reconstruction.graphs import graph_bytes
from orgnn.retrieval.search import search_neighbourhoods


def test_byte_sizes_and_the_budget():
    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("1.5G") == 3 << 29 and parse_bytes("3e9") == 3_000_000_000
    assert parse_bytes("2GB") == 2_000_000_000 and parse_bytes(64 << 20) == 64 << 20
    for bad in ("two gigs", "12 parsecs", "100"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    before = memory_budget()
    assert 256 << 20 <= before <= 1 << 30
    with working_memory("64MiB") as budget:
        assert budget == memory_budget() == 64 << 20
        assert rows_for(1 << 20) == 64 and rows_for(1 << 40) == 1
        assert rows_for(1, at_most=10) == 10
    assert memory_budget() == before


def test_graph_batches_shrink_with_k_and_count_the_affinities():
    # per graph: M (K + 1) (32 F + 56 (K + 1)) bytes; graphs per batch within a budget
    def per_batch(k, m, f, budget):
        return rows_for(graph_bytes(k + 1, m, f), budget, at_most=2048)

    assert per_batch(30, 6, 256, 1 << 30) == (1 << 30) // (6 * 31 * (32 * 256 + 56 * 31))
    assert per_batch(1, 1, 4, 1 << 30) == 2048
    assert per_batch(2326, 6, 256, 4 << 30) == (4 << 30) // (
        6 * 2327 * (32 * 256 + 56 * 2327))
    assert per_batch(10 ** 6, 6, 256, 1 << 30) == 1


def test_search_in_budget_sized_blocks_is_the_same_search():
    """A budget that leaves a few queries per block gives the same neighbourhoods (exact and
    IVF-PQ): the blocks only bound the candidate arrays."""
    rng = np.random.default_rng(0)
    gallery = rng.random((700, 3, 8)).astype(np.float32)
    query = rng.random((50, 3, 8)).astype(np.float32)
    vis = rng.random((50, 3)) > 0.3
    for kw in ({}, {"index": "ivfpq"}, {"mode": "intersection"}):
        whole = search_neighbourhoods(query, vis, gallery, k=40, theta=-1.0, **kw)
        with working_memory("1MiB"):
            blocks = search_neighbourhoods(query, vis, gallery, k=40, theta=-1.0, **kw)
        np.testing.assert_array_equal(blocks.index, whole.index)
        np.testing.assert_array_equal(blocks.score, whole.score)


def test_scratch_folders_of_a_killed_run_are_removed(tmp_path):
    """A scratch folder whose owner process is gone (a killed run) goes; one of a live
    run, and a fresh one without an owner file (being made), stay; the run's own goes
    when it ends."""
    import socket

    from orgnn.cli.commands import SCRATCH_OWNER, _scratch_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    out = tmp_path / "out"
    folders = {}
    for name, owner in (("killed", f"{host} {dead.pid}"), ("live", f"{host} {os.getpid()}"),
                        ("other_host", f"elsewhere {dead.pid}"), ("fresh", None),
                        ("old", None)):
        folder = tmp_path / f".out.scratch-{name}"
        (folder / "sub").mkdir(parents=True)
        (folder / "query.npy").write_bytes(b"x" * 100)
        if owner:
            (folder / SCRATCH_OWNER).write_text(owner)
        folders[name] = folder
    hour_ago = time.time() - 3600
    os.utime(folders["old"], (hour_ago, hour_ago))
    with _scratch_dir(str(out)) as scratch:
        assert scratch.exists() and (scratch / SCRATCH_OWNER).read_text().split()[1] == \
            str(os.getpid())
        left = {p.name for p in tmp_path.iterdir()}
    assert not scratch.exists()
    assert ".out.scratch-killed" not in left and ".out.scratch-old" not in left
    assert {".out.scratch-live", ".out.scratch-other_host", ".out.scratch-fresh"} <= left


def test_graph_batches_are_cut_by_the_nodes_they_hold():
    """By hand, one part of one feature: a graph of N nodes takes N (32 + 56 N) bytes."""
    from orgnn.reconstruction.graphs import plan_graph_batches, row_widths

    assert graph_bytes(4, 1, 1) == 4 * (32 + 56 * 4) == 1024
    # counts 3, 0, 5, 1 -> nodes 4, 2, 6, 2; budget 2048: [4, 2] pads to 4 (2 x 1024),
    # the 6-node graph alone exceeds it and still runs alone, then [2]
    bounds, widths = plan_graph_batches(np.array([3, 0, 5, 1]), 1, 1, budget=2048)
    assert bounds.tolist() == [0, 2, 3, 4] and widths.tolist() == [4, 6, 2]
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 640, 2327)
    bounds, widths = plan_graph_batches(counts, 6, 256, budget=256 << 20)
    assert bounds[0] == 0 and bounds[-1] == counts.size and (np.diff(bounds) > 0).all()
    for lo, hi, width in zip(bounds[:-1], bounds[1:], widths):
        assert width == 1 + max(1, counts[lo:hi].max())
        assert hi - lo == 1 or (hi - lo) * graph_bytes(width, 6, 256) <= 256 << 20
    # padding between valid entries still counts up to the last valid one
    index = np.array([[4, -1, 7, -1], [-1, -1, -1, -1], [1, 2, -1, -1]])
    assert row_widths(index).tolist() == [3, 0, 2]


def test_large_k_reconstruction_is_the_full_width_model_and_stays_in_budget():
    """K far above what a threshold lets through: each batch is padded to its own widest
    neighbourhood and sized by bytes, and gives the full-width model's output."""
    import torch

    from orgnn.nn import ORGNN
    from orgnn.reconstruction.graphs import dense_neighbourhood_batch
    from orgnn.reconstruction.pipeline import reconstruct

    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((400, 3, 16)).astype(np.float32)
    target = rng.standard_normal((90, 3, 16)).astype(np.float32)
    k = 399
    index = np.full((90, k), -1)
    counts = rng.integers(0, 40, 90)
    for row, c in enumerate(counts):  # test set-up only
        index[row, :c] = rng.choice(400, c, replace=False)
    weight = rng.random((90, 1 + k)).astype(np.float32)
    vis = rng.random((90, 3)).astype(np.float32)
    torch.manual_seed(0)
    model = ORGNN(16, 16, num_parts=3, init="glorot", target_init="visible").eval()
    seen = []
    forward = model.forward

    def spy(x, mask, **kw):
        seen.append(x.shape)
        return forward(x, mask, **kw)

    model.forward = spy
    with working_memory("1MiB"):
        got = reconstruct(model, target, gallery, index, target_visibility=vis,
                          node_weight=weight)
    model.forward = forward
    assert max(s[2] for s in seen) == 1 + counts.max() < 1 + k
    assert len(seen) > 1
    with torch.inference_mode():
        x, mask = dense_neighbourhood_batch(target, gallery, index)
        want = model(x, mask, target_visible=torch.from_numpy(vis >= 0.5),
                     node_weight=torch.from_numpy(weight))
    np.testing.assert_allclose(got, want.numpy(), atol=2e-5)


# Run by the resident-set tests after their own script's imports: the high-water mark (VmHWM)
# reset and read, in MiB.
_RSS_PRELUDE = r"""
def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return hwm_mib()
"""


def _resident_growth_mib(script: str, *args: str) -> float:
    """Run ``script`` (which prints its resident-set growth last) in a fresh interpreter;
    skip where Linux cannot reset the resident-set peak."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the resident-set peak")
    run = subprocess.run([sys.executable, "-c", _RSS_PRELUDE + script, *args],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    growth = float(run.stdout.split()[-1])
    if growth <= 0:
        pytest.skip("this kernel does not reset the resident-set peak (clear_refs 5)")
    return growth


_PEAK_SCRIPT = r"""
import sys
import numpy as np
import torch
from orgnn.io.storage import working_memory
from orgnn.nn import ORGNN
from orgnn.reconstruction.pipeline import reconstruct


budget_mib = int(sys.argv[1])
rng = np.random.default_rng(0)
gallery = rng.standard_normal((3000, 6, 64)).astype(np.float32)
target = rng.standard_normal((256, 6, 64)).astype(np.float32)
index = np.full((256, 2999), -1)
index[:, :300] = rng.integers(0, 3000, (256, 300))  # 300 valid of K = 2,999
model = ORGNN(64, 64, num_parts=6).eval()
torch.set_num_threads(1)
before = reset_peak()
with working_memory(f"{budget_mib}MiB"):
    out = reconstruct(model, target, gallery, index, node_weight=np.ones((256, 3000), np.float32))
assert np.isfinite(out).all()
print(hwm_mib() - before)
"""


def test_large_k_reconstruction_peak_rss_follows_the_budget():
    """The resident-set growth of a K = 2,999 reconstruction (300 valid neighbours each)
    stays within a few budgets: the batches are sized from bytes at the width they hold.
    Unbatched, the 256 graphs would take 256 x graph_bytes(301) = 2.9 GiB (at K + 1 nodes,
    256 x 1.6 GB)."""
    assert 256 * graph_bytes(301, 6, 64) > 2.5 * 2 ** 30
    budget = 64
    growth = _resident_growth_mib(_PEAK_SCRIPT, str(budget))
    # the budget, the (256, 3000) weights, one batch's gathered copies and allocator slack
    assert growth < 3 * budget + 96, growth


_MAPPED_SCRIPT = r"""
import sys
import numpy as np
from orgnn.io.storage import open_npy, working_memory
from orgnn.nn import ORGNN
from orgnn.reconstruction.pipeline import reconstruct


folder = sys.argv[1]
n = 60_000
gallery = open_npy(f"{folder}/gallery.npy", (n, 6, 128), np.float16)
for start in range(0, n, 10_000):
    gallery[start:start + 10_000] = 0.5
gallery.flush()
del gallery
gallery = np.load(f"{folder}/gallery.npy", mmap_mode="r")
out = open_npy(f"{folder}/out.npy", (n, 6, 128), np.float16)
index = ((np.arange(n) + 1) % n)[:, None]
model = ORGNN(128, 128, num_parts=6).eval()
before = reset_peak()
with working_memory("32MiB"):
    reconstruct(model, gallery, gallery, index, out=out)
print(hwm_mib() - before)
"""


def test_a_mapped_gallery_reconstructing_itself_keeps_few_pages_resident(tmp_path):
    """The gallery (an 88 MiB float16 map) reconstructing itself into a mapped output: each
    finished batch's pages of both files are handed back, so the resident set grows by a
    fraction of the two files (measured: 48 MiB; 125 without handing pages back; for a 307 MB
    gallery 85 against 364)."""
    growth = _resident_growth_mib(_MAPPED_SCRIPT, str(tmp_path))
    files = 2 * 60_000 * 6 * 128 * 2 / 2 ** 20                       # 176 MiB
    assert growth < 0.5 * files, growth
