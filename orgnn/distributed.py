"""Several processes, one result: ``torchrun``-sharded search and reconstruction.

Started by ``torchrun --nproc-per-node N`` (``WORLD_SIZE > 1`` in the environment), a command
calls :func:`setup`, which joins the default ``torch.distributed`` process group (NCCL when
the device is CUDA, gloo on CPU). From then on every stage gives each rank its own share
of the images (:func:`shard`): the searches
(:func:`orgnn.reconstruction.pipeline.search_split`, the training split's in
:func:`orgnn.reconstruction.calibration.calibrate_theta`), the outlier scorer's
k-th-neighbour similarities and features (:func:`orgnn.reconstruction.outliers.score_split`)
and the OR-GNN batches (:func:`orgnn.reconstruction.pipeline.reconstruct`). What a later
stage reads at any row (neighbourhoods, the gallery's scorer probabilities: ``(N, K)``
arrays) is all-gathered, so every rank holds it; the reconstructed features, the one large
result, are gathered on rank 0 alone (:func:`map_rows` with ``to="main"``; ``None`` on the
other ranks), which writes them (:func:`is_main`). Every rank searches the same gallery (a
memory-mapped file is one copy in the page cache, whatever the number of ranks). Inside
:func:`local` (rank 0 training alone,
:func:`orgnn.reconstruction.training.train_orgnn_once`) every call acts as in a single
process.

**Same files with one process or many, at the same thread count per process.** Shares
are whole *blocks* of the single-process grid (the scorer's feature chunks, of a fixed
size; the OR-GNN's batches, cut by :func:`orgnn.reconstruction.graphs.plan_graph_batches`),
at least :data:`SHARE_BLOCKS` per split (:func:`block_rows`), whatever the number of ranks:
rank ``r`` of ``W`` takes blocks ``[r B / W, (r + 1) B / W)`` of ``B`` (:func:`shard`), or
the run whose cost midpoints fall in its ``W``-th of the total (:func:`shard_blocks`). Each
rank therefore runs exactly the batches a
single process would run, with the same shapes, and the gathered arrays are bit-for-bit
the single-process arrays (the OR-GNN's float32 kernels give a row the same bits in a
batch of the same shape, but not always in a batch of another size: measured in
``tests/test_distributed.py``). Search results are per image anyway (see
:mod:`orgnn.retrieval.search`). The float32 kernels (matrix products of the scorer's
features and MLP, of the OR-GNN) also split their work by the number of threads, and a sum
split otherwise can differ in its last bit: outputs are byte-identical when each process
runs with the same thread count (``torchrun`` sets ``OMP_NUM_THREADS=1`` per rank, so
compare with a single process run with ``OMP_NUM_THREADS=1``); with other thread counts
values may differ by a float16 step (measured on cuhk03-parts: 205 of 921,600 query values).

Without ``WORLD_SIZE > 1`` nothing is joined: :func:`world_size` is 1, :func:`shard` the
whole range and :func:`all_gather_rows` the identity, so a single process runs the same code.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Group", "setup", "world_size", "rank", "is_main", "shard", "shard_blocks",
           "block_rows",
           "all_gather_rows",
           "gather_rows", "map_rows", "broadcast_bytes", "barrier", "finish", "env_world",
           "local"]

_local = threading.local()


@dataclass(frozen=True)
class Group:
    """This process' place: ``rank`` of ``world_size``, and the torch device it computes on
    (``None``: the CPU with faiss search)."""

    rank: int
    world_size: int
    device: torch.device | None
    backend: str | None = None


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from ``torchrun``'s environment (0, 1, 0 without)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: str | torch.device | None = None) -> Group:
    """Join the process group when started by ``torchrun`` with several processes.

    ``device`` ``"cuda"`` (or ``"auto"`` with a GPU present) becomes ``cuda:LOCAL_RANK`` and
    selects NCCL; anything else keeps its device and uses gloo. Returns the :class:`Group`.
    """
    _, world, local = env_world()
    dev = _device(device, local)
    if world <= 1:
        return Group(0, 1, dev)
    backend = "nccl" if dev is not None and dev.type == "cuda" else "gloo"
    if dev is not None and dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Group(dist.get_rank(), dist.get_world_size(), dev, dist.get_backend())


def _device(device: str | torch.device | None, local_rank: int) -> torch.device | None:
    if device is None:
        return None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def _joined() -> bool:
    return (dist.is_available() and dist.is_initialized()
            and not getattr(_local, "depth", 0))


def world_size() -> int:
    """Processes in the default group (1 when none is initialised, or inside
    :func:`local`)."""
    return dist.get_world_size() if _joined() else 1


def rank() -> int:
    """This process' rank in the default group (0 when none is initialised, or inside
    :func:`local`)."""
    return dist.get_rank() if _joined() else 0


@contextmanager
def local() -> Iterator[None]:
    """Within the block this process works alone: :func:`world_size` is 1, :func:`map_rows`
    runs every row here and no collective is called (for work one rank does while the
    others wait, e.g. rank 0 training)."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def is_main(group: Group | None = None) -> bool:
    """Whether this process writes outputs and prints results (rank 0 of ``group``, or of
    the default process group)."""
    return (group.rank if group is not None else rank()) == 0


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def finish() -> None:
    """Wait for every rank, then leave the process group (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(n: int, block: int = 1, rank_: int | None = None,
          world: int | None = None) -> slice:
    """This rank's rows of ``n``: a contiguous run of whole ``block``-row blocks from the
    start (the last block may be short), the blocks split as evenly as possible."""
    if n < 0 or block < 1:
        raise ValueError(f"need n >= 0 and block >= 1, got n={n}, block={block}")
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is not in a world of {w}")
    blocks = -(-n // block)
    lo, hi = r * blocks // w, (r + 1) * blocks // w
    return slice(min(lo * block, n), min(hi * block, n))


#: A split is cut into at least this many blocks (while each keeps ``MIN_BLOCK_ROWS`` rows),
#: whatever the number of ranks, so that ranks taking whole blocks get even shares.
SHARE_BLOCKS = 16
MIN_BLOCK_ROWS = 32


def block_rows(n: int, fits: int) -> int:
    r"""Rows per block of a split of ``n`` rows whose memory allows ``fits`` rows:
    :math:`\min(\text{fits}, \max(32, \lceil n / 16 \rceil))`, at least 1. The same in one
    process and on every rank (the blocks are the single-process grid)."""
    return max(1, min(fits, max(MIN_BLOCK_ROWS, -(-n // SHARE_BLOCKS))))


def shard_blocks(bounds: Sequence[int] | np.ndarray, costs: Sequence[float] | np.ndarray | None
                 = None, rank_: int | None = None, world: int | None = None) -> slice:
    r"""This rank's rows of the blocks ``bounds`` cuts (``bounds[0] = 0`` to
    ``bounds[-1] = n``): a contiguous run of whole blocks, split so that every rank gets
    about the same total ``costs`` (default: the blocks' row counts). Block ``i`` goes to
    rank :math:`\lfloor W (C_{i-1} + c_i / 2) / C \rfloor`, with :math:`C_i` the
    cumulative cost."""
    bounds = np.asarray(bounds, dtype=np.int64)
    if bounds.ndim != 1 or bounds.size < 1 or bounds[0] != 0 or np.any(np.diff(bounds) < 0):
        raise ValueError("bounds must be a rising 1-d sequence from 0")
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is not in a world of {w}")
    cost = np.diff(bounds).astype(np.float64) if costs is None else \
        np.asarray(costs, dtype=np.float64)
    if cost.shape != (bounds.size - 1,):
        raise ValueError(f"costs must have one entry per block ({bounds.size - 1}), got "
                         f"{cost.shape}")
    total = cost.sum()
    if total <= 0:
        owner = np.arange(cost.size) * w // max(1, cost.size)
    else:
        owner = np.minimum((w * (np.cumsum(cost) - cost / 2) / total).astype(np.int64), w - 1)
    mine = np.flatnonzero(owner == r)
    if mine.size:
        return slice(int(bounds[mine[0]]), int(bounds[mine[-1] + 1]))
    later = np.flatnonzero(owner > r)
    at = int(bounds[later[0]]) if later.size else int(bounds[-1])
    return slice(at, at)


def all_gather_rows(local: np.ndarray | Sequence[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """Concatenate every rank's rows in rank order, on every rank. ``local`` is one array or
    a sequence of arrays (gathered alike, returned as a list)."""
    single = isinstance(local, np.ndarray)
    arrays = [local] if single else list(local)
    if world_size() == 1:
        return arrays[0] if single else arrays
    pieces: list[list[np.ndarray] | None] = [None] * world_size()
    dist.all_gather_object(pieces, arrays)
    out = [np.concatenate([p[i] for p in pieces]) for i in range(len(arrays))]
    return out[0] if single else out


def broadcast_bytes(data: bytes | None, src: int = 0) -> bytes:
    """Rank ``src``'s ``data`` on every rank (``data`` is ignored elsewhere); in a single
    process, ``data`` itself."""
    if world_size() == 1:
        if data is None:
            raise ValueError("broadcast_bytes in a single process needs the data")
        return data
    box = [data if rank() == src else None]
    dist.broadcast_object_list(box, src)
    return box[0]


def gather_rows(local: np.ndarray | Sequence[np.ndarray], dst: int = 0
                ) -> np.ndarray | list[np.ndarray] | None:
    """Like :func:`all_gather_rows`, but only rank ``dst`` receives (and holds) the
    concatenation; the other ranks get ``None``."""
    single = isinstance(local, np.ndarray)
    arrays = [local] if single else list(local)
    if world_size() == 1:
        return arrays[0] if single else arrays
    pieces: list[list[np.ndarray] | None] | None = [None] * world_size() \
        if rank() == dst else None
    dist.gather_object(arrays, pieces, dst=dst)
    del arrays
    if pieces is None:
        return None
    out = [np.concatenate([p[i] for p in pieces]) for i in range(len(pieces[0]))]
    return out[0] if single else out


def map_rows(fn: Callable[[slice], np.ndarray | Sequence[np.ndarray]], n: int,
             block: int = 1, to: str = "all", bounds: np.ndarray | None = None,
             costs: np.ndarray | None = None) -> np.ndarray | list[np.ndarray] | None:
    """``fn(rows)`` on this rank's :func:`shard` of ``n`` rows (or, given block ``bounds``
    and their ``costs``, its :func:`shard_blocks`), gathered on every rank (``to="all"``) or
    on rank 0 alone (``to="main"``: ``None`` elsewhere); in a single process simply
    ``fn(slice(0, n))``."""
    if to not in ("all", "main"):
        raise ValueError(f"to must be 'all' or 'main', got {to!r}")
    if world_size() == 1:
        return fn(slice(0, n))
    local_rows = fn(shard(n, block) if bounds is None else shard_blocks(bounds, costs))
    return all_gather_rows(local_rows) if to == "all" else gather_rows(local_rows)
