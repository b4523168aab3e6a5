"""Memory budget, byte-sized batches, and the scratch folders of `orgnn reconstruct`."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from orgnn.io.storage import memory_budget, parse_bytes, rows_for, working_memory
from orgnn.reconstruction.graphs import graph_batch_size
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
    # per graph: M (K + 1) (32 F + 56 (K + 1)) bytes
    assert graph_batch_size(30, 6, 256, budget=1 << 30) == (1 << 30) // (
        6 * 31 * (32 * 256 + 56 * 31))
    assert graph_batch_size(1, 1, 4, budget=1 << 30) == 2048
    assert graph_batch_size(2326, 6, 256, budget=4 << 30) == (4 << 30) // (
        6 * 2327 * (32 * 256 + 56 * 2327))
    assert graph_batch_size(10 ** 6, 6, 256, budget=1 << 30) == 1


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
