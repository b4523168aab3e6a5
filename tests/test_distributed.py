"""torchrun-sharded search and reconstruction: shares, gathering, and the same output files
from one process or two (gloo on CPU)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orgnn import distributed
from orgnn.datasets.synthetic import synthetic
from orgnn.io.features import save_split_dir
from orgnn.nn import ORGNN
from orgnn.reconstruction.graphs import map_dense_batches
from orgnn.reconstruction.training import TrainConfig, save_checkpoint
from orgnn.retrieval.search import search_neighbourhoods

REPO = Path(__file__).resolve().parents[1]


def test_shards_are_whole_blocks_covering_everything():
    for n, block, world in [(0, 4, 2), (10, 4, 2), (10, 4, 3), (2640, 2048, 2), (7, 1, 4),
                            (5, 8, 3)]:
        parts = [distributed.shard(n, block, r, world) for r in range(world)]
        assert parts[0].start == 0 and parts[-1].stop == n
        for a, b in zip(parts, parts[1:]):
            assert a.stop == b.start
        assert all(p.start % block == 0 or p.start == n for p in parts)
    assert distributed.shard(10, 4, 0, 1) == slice(0, 10)
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        distributed.shard(10, 1, 2, 2)
    with pytest.raises(ValueError, match="block >= 1"):
        distributed.shard(10, 0, 0, 1)


def test_single_process_is_the_identity():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    x = np.arange(12).reshape(6, 2)
    assert distributed.all_gather_rows(x) is x
    got = distributed.map_rows(lambda rows: (x[rows], x[rows] * 2), 6, 4)
    np.testing.assert_array_equal(got[1], x * 2)
    group = distributed.setup("cpu")
    assert group == distributed.Group(0, 1, torch.device("cpu"))
    assert distributed.setup(None).device is None


@pytest.fixture(scope="module")
def world():
    splits = synthetic(num_train_ids=4, num_test_ids=110, images_per_id=24, dim=16, seed=3)
    torch.manual_seed(0)
    model = ORGNN(16, 16, num_parts=6, num_layers=2, init="glorot", target_init="visible")
    return splits, model.eval()


def test_grid_shards_reproduce_the_whole_run(world):
    """Rank-sized pieces of the batch grid give the single run's bits (whatever a kernel does
    with other batch shapes)."""
    splits, model = world
    gallery = splits["gallery"]
    nbrs = search_neighbourhoods(gallery.features, gallery.visible, gallery.features, k=10,
                                 theta=0.3, exclude=np.arange(len(gallery)))
    vis = gallery.visibility
    with torch.inference_mode():
        whole = map_dense_batches(model, gallery.features, gallery.features, nbrs.index, 256,
                                  target_visible=vis)
        for world_size in (2, 3):
            pieces = []
            for r in range(world_size):
                rows = distributed.shard(len(gallery), 256, r, world_size)
                pieces.append(map_dense_batches(model, gallery.features[rows],
                                                gallery.features, nbrs.index[rows], 256,
                                                target_visible=vis[rows]))
            assert np.array_equal(np.concatenate(pieces), whole)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _orgnn(args: list[str], nproc: int, env: dict) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "orgnn.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
               f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={_free_port()}", "-m", "orgnn.cli", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_torchrun_two_ranks_write_the_same_files(world, tmp_path):
    """`orgnn reconstruct` with the learned outlier scorer (the default model) in one
    process (faiss search) and under torchrun with two ranks (gloo, torch search on the
    CPU), both with one thread per process: the query and gallery files are byte for byte
    the same, which checks the sharding of every stage (search, k-th similarities, scorer
    chunks, OR-GNN batches) and the torch search against faiss at once. A small memory
    budget makes several scorer chunks and graph batches per rank."""
    import json

    from orgnn.reconstruction.training import train_orgnn

    splits, _ = world
    data = tmp_path / "data"
    save_split_dir(data, {k: v for k, v in splits.items() if k != "train"})
    model = train_orgnn(splits["train"], TrainConfig(epochs=0, k=10, scorer_stages=2,
                                                     scorer_steps=20), progress=False)
    assert model.scorer is not None
    ckpt = save_checkpoint(tmp_path / "m.pt", model, model.train_config)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    outs = {}
    for nproc, extra in ((1, []), (2, ["--device", "cpu"])):
        out = tmp_path / f"out{nproc}"
        proc = _orgnn(["reconstruct", "--data", str(data), "--checkpoint", str(ckpt), "--out",
                       str(out), "--k", "10", "--quiet", "--memory-budget", "2MiB",
                       "--timings", str(tmp_path / f"t{nproc}.json"), *extra], nproc, env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("wrote ") == 2  # rank 0 alone writes and prints
        outs[nproc] = out
    for name in ("query.npz", "gallery.npz"):
        assert (outs[1] / name).read_bytes() == (outs[2] / name).read_bytes(), name
    timings = json.loads((tmp_path / "t2.json").read_text())
    assert len(timings["ranks"]) == 2
    assert {"search", "gallery_search", "kth", "score", "reconstruct_query"} <= set(
        timings["stages"])


def test_train_under_torchrun_writes_one_checkpoint(world, tmp_path):
    """`orgnn train` with two ranks: rank 0 trains and writes the checkpoint, once; rank 1
    leaves without training (it prints nothing)."""
    from orgnn.reconstruction.training import load_checkpoint

    splits, _ = world
    data = tmp_path / "data"
    save_split_dir(data, {"train": splits["train"]})
    ckpt = tmp_path / "m.pt"
    proc = _orgnn(["train", "--data", str(data), "--out", str(ckpt), "--epochs", "0",
                   "--train-k", "10", "--quiet"], 2,
                  {**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("m.pt")] == ["m.pt"]
    model, _ = load_checkpoint(ckpt)
    assert model.scorer is not None


_ABLATION_SCRIPT = """
import json, sys
import torch.distributed as dist
from orgnn import distributed
from orgnn.reconstruction import training
from orgnn.datasets import synthetic_preset
from orgnn.reconstruction.pipeline import AblationConfig, run_ablation
from orgnn.reconstruction.training import TrainConfig

group = distributed.setup("cpu")
if group.rank != 0:  # only rank 0 may train; the others must receive its model
    def refuse(*args, **kwargs):
        raise AssertionError("a rank other than 0 trained")
    training.train_orgnn = refuse
config = AblationConfig(train=TrainConfig(epochs=1, scorer_stages=2, scorer_steps=20))
result = run_ablation(synthetic_preset("tiny", seed=0), config,
                      rows=("avg", "orgnn", "upper_bound"), progress=False)
distributed.finish()
if group.rank == 0:
    json.dump(result.rows, open(sys.argv[1], "w"))
"""


def test_ablation_under_torchrun_trains_once_and_scores_the_same(tmp_path):
    """`run_ablation` with two gloo ranks: rank 0 alone trains (rank 1 would fail if it
    did), rank 1 reconstructs with the model it receives, and the rows equal one process'."""
    from orgnn.datasets import synthetic_preset
    from orgnn.reconstruction.pipeline import AblationConfig, run_ablation

    script = tmp_path / "ablation.py"
    script.write_text(_ABLATION_SCRIPT)
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(script), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore",
                               "PYTHONPATH": os.pathsep.join(
                                   [str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = AblationConfig(train=TrainConfig(epochs=1, scorer_stages=2, scorer_steps=20))
    single = run_ablation(synthetic_preset("tiny", seed=0), config, progress=False,
                          rows=("avg", "orgnn", "upper_bound"))
    import json

    assert json.loads(out.read_text()) == single.rows


def test_cost_balanced_block_shares_by_hand():
    """Block i goes to the rank its cost midpoint falls in: contiguous, covering, in order."""
    bounds = [0, 10, 20, 30, 40]
    assert [distributed.shard_blocks(bounds, None, r, 2) for r in range(2)] == \
        [slice(0, 20), slice(20, 40)]
    # costs 1, 1, 1, 9 (total 12): midpoints 0.5, 1.5, 2.5, 7.5 -> ranks 0, 0, 0, 1
    assert [distributed.shard_blocks(bounds, [1, 1, 1, 9], r, 2) for r in range(2)] == \
        [slice(0, 30), slice(30, 40)]
    # one block and three ranks: its midpoint (1.5 of 3) is rank 1's; the others hold none
    assert [distributed.shard_blocks([0, 5], None, r, 3) for r in range(3)] == \
        [slice(0, 0), slice(0, 5), slice(5, 5)]
    rng = np.random.default_rng(0)
    for world in (2, 3, 5):
        bounds = np.concatenate([[0], np.cumsum(rng.integers(0, 7, 40))])
        costs = rng.random(40)
        parts = [distributed.shard_blocks(bounds, costs, r, world) for r in range(world)]
        assert parts[0].start == 0 and parts[-1].stop == bounds[-1]
        assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
        assert all(p.start in bounds and p.stop in bounds for p in parts)
    with pytest.raises(ValueError, match="one entry per block"):
        distributed.shard_blocks([0, 4, 8], [1.0], 0, 2)
    with pytest.raises(ValueError, match="rising"):
        distributed.shard_blocks([0, 4, 2], None, 0, 2)


def test_block_rows_leave_every_split_enough_blocks_to_share():
    assert distributed.block_rows(600, 2048) == 38        # ceil(600 / 16)
    assert distributed.block_rows(100, 2048) == 32        # small splits keep 32-row blocks
    assert distributed.block_rows(10 ** 6, 870) == 870    # the memory bound wins
    assert distributed.block_rows(5, 0) == 1
    n = 2327
    assert -(-n // distributed.block_rows(n, 2048)) >= distributed.SHARE_BLOCKS - 1
