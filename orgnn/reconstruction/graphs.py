r"""The adapter: part features + neighbourhoods -> batches of neighbourhood graphs.

A neighbourhood graph of image :math:`I_a` is complete over :math:`\{I_a\} \cup
\mathcal{N}(I_a)`, with the target :math:`I_a` as node 0 and its neighbours after it in
decreasing similarity. Two renderings:

* :func:`dense_neighbourhood_batch`: padded ``(B, M, 1 + K, D)`` features and a ``(B, 1 + K)``
  node mask, for :class:`~orgnn.DenseORGNNConv` / :class:`~orgnn.ORGNN`;
* :func:`pyg_neighbourhood_batch`: a :class:`torch_geometric.data.Batch` of complete graphs
  whose ``x`` is ``(n_g, M, D)``, for :class:`~orgnn.ORGNNConv`.

:func:`map_dense_batches` streams a whole split through a function of the dense rendering
(the OR-GNN, or the plain mean), a fixed number of graphs at a time.

An image without neighbours gets itself as its only neighbour, so it passes through the same
OR-GNN as every other image (a graph of its own feature), and all outputs share one space.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Batch
from tqdm.auto import tqdm

from orgnn import distributed
from orgnn.io.features import VISIBLE_THRESHOLD
from orgnn.io.storage import memory_budget, release_rows, take_rows


def _as_tensor(x: np.ndarray | Tensor, device: torch.device | str | None = None) -> Tensor:
    if isinstance(x, np.ndarray):  # a read-only batch (rows of a memory map) is copied
        x = torch.from_numpy(np.ascontiguousarray(x) if x.flags.writeable else np.array(x))
    return x.to(device=device, dtype=torch.float32, non_blocking=True)


def dense_neighbourhood_batch(
    target: np.ndarray | Tensor,
    gallery: np.ndarray | Tensor,
    index: np.ndarray | Tensor,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Gather neighbourhood graphs into a padded batch.

    Args:
        target: ``(B, M, D)`` features of the images to reconstruct.
        gallery: ``(G, M, D)`` features the neighbour indices point into.
        index: ``(B, K)`` int neighbour indices into ``gallery``; ``-1`` pads; a row with no
            neighbour uses the target itself as its single neighbour.
        device: where to build the batch.

    Returns:
        ``(x, mask)``: ``(B, M, 1 + K, D)`` float32 features (node 0 = target) and
        ``(B, 1 + K)`` bool mask.
    """
    target_t = _as_tensor(target, device)
    index_t = torch.as_tensor(np.asarray(index) if not isinstance(index, Tensor) else index,
                              dtype=torch.long, device=target_t.device)
    if index_t.dim() != 2 or index_t.size(0) != target_t.size(0):
        raise ValueError(f"index must have shape (B={target_t.size(0)}, K), got "
                         f"{tuple(index_t.shape)}")
    if index_t.size(1) == 0:
        index_t = index_t.new_full((index_t.size(0), 1), -1)
    valid = index_t >= 0
    empty = ~valid.any(dim=1)
    if isinstance(gallery, Tensor):
        gathered = gallery[index_t.clamp_min(0).to(gallery.device)]
        neighbours = _as_tensor(gathered, target_t.device)
    else:  # gather in numpy first: only B * K rows travel to the device
        rows = np.clip(index_t.cpu().numpy(), 0, None)
        # (B, K, M, D); from a memory-mapped gallery without read-ahead, pages handed back
        neighbours = _as_tensor(take_rows(gallery, rows), target_t.device)
    neighbours = torch.where(valid[..., None, None], neighbours, 0.0)
    # Empty neighbourhood: the image itself is its only neighbour.
    neighbours[:, 0] = torch.where(empty[:, None, None], target_t, neighbours[:, 0])
    valid = valid.clone()
    valid[:, 0] |= empty
    # Built as one (M, B, N, D) buffer and returned as its (B, M, N, D) view: the model works
    # part-major, so this layout spares it a copy.
    b, k, m, d = neighbours.shape
    x = neighbours.new_empty(m, b, 1 + k, d)
    x[:, :, 0] = target_t.transpose(0, 1)
    x[:, :, 1:] = neighbours.permute(2, 0, 1, 3)
    x = x.transpose(0, 1)
    mask = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
    return x, mask


def pyg_neighbourhood_batch(x: Tensor, mask: Tensor) -> Batch:
    """The same neighbourhoods as a PyG :class:`~torch_geometric.data.Batch` of complete
    graphs (no self-loops): graph ``b`` has ``x`` of shape ``(n_b, M, D)``, target first.

    Args:
        x: ``(B, M, N, D)`` from :func:`dense_neighbourhood_batch`.
        mask: ``(B, N)`` bool; valid nodes must come first in each row.
    """
    if not bool((mask.cummin(dim=1).values == mask).all()):
        raise ValueError("mask rows must hold their valid nodes first (no gaps)")
    sizes = mask.sum(1)
    nodes = x.transpose(1, 2)[mask]                                   # (sum n_b, M, D)
    ptr = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    graph = torch.repeat_interleave(torch.arange(len(sizes), device=x.device), sizes * sizes)
    # All ordered pairs within each graph, vectorised: pair p of graph b -> (p // n, p % n).
    first_pair = torch.cat([sizes.new_zeros(1), (sizes * sizes).cumsum(0)[:-1]])
    pair = torch.arange(graph.numel(), device=x.device) - first_pair[graph]
    n = sizes[graph]
    dst, src = pair // n + ptr[graph], pair % n + ptr[graph]
    keep = src != dst
    edge_index = torch.stack([src[keep], dst[keep]])
    batch = Batch(x=nodes, edge_index=edge_index,
                  batch=torch.repeat_interleave(torch.arange(len(sizes), device=x.device), sizes),
                  ptr=ptr)
    batch._num_graphs = len(sizes)
    return batch



def row_widths(index: np.ndarray) -> np.ndarray:
    """``(B,)`` columns each row of ``index`` ``(B, K)`` needs: the position of its last
    valid (``>= 0``) entry + 1 (its valid count, as valid entries come first), 0 if none."""
    valid = np.asarray(index) >= 0
    return np.where(valid.any(axis=1), valid.shape[1] - np.argmax(valid[:, ::-1], axis=1), 0)


def used_width(index: np.ndarray) -> int:
    """Columns of ``index`` ``(B, K)`` up to the last valid (``>= 0``) entry of any row:
    the rest is padding in every row."""
    return int(row_widths(index).max(initial=0))


def graph_bytes(width: int, num_parts: int, dim: int, hidden: int | None = None) -> int:
    r"""Bytes one dense graph of ``width`` nodes takes while the OR-GNN runs on it: about
    eight float32 copies of its :math:`(M, N, F)` features and fourteen of its
    :math:`(M, N, N)` affinities, logits and masks
    (:func:`orgnn.nn.functional.dense_orgnn_aggregate` forms those, never an
    :math:`N \times N \times F` tensor)."""
    f = max(dim, hidden or dim)
    return num_parts * width * (32 * f + 56 * width)


def plan_graph_batches(counts: np.ndarray, num_parts: int, dim: int,
                       hidden: int | None = None, budget: int | None = None,
                       at_most: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    r"""Cut a split's graphs, in order, into contiguous batches sized in bytes.

    A batch of graphs is padded to :math:`N_b = 1 + \max_{t \in b} n_t` nodes (``n_t`` the
    valid neighbours of target ``t``; valid neighbours come first in every row), so each
    batch grows while ``rows x graph_bytes(N_b)`` fits ``budget`` (default
    :func:`orgnn.io.storage.memory_budget`), up to ``at_most`` graphs, and to at most
    :math:`\max(32, \lceil n / 16 \rceil)` graphs so that a split has enough batches to
    share among ``torchrun`` ranks. The plan depends only on ``counts`` and the budget: one
    process and every rank cut the same batches.

    Args:
        counts: ``(n,)`` columns each target's graph needs (its valid neighbours, or the
            position of its last valid one + 1 where padding sits between them).
        num_parts, dim, hidden: the graphs' parts, feature and hidden sizes.

    Returns:
        ``(bounds, widths)``: ``(B + 1,)`` batch boundaries (``bounds[0] = 0``,
        ``bounds[-1] = n``) and ``(B,)`` node counts :math:`N_b` of the batches.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = counts.size
    budget = budget or memory_budget()
    cap = distributed.block_rows(n, at_most)
    bounds, widths = [0], []
    start = 0
    while start < n:
        width = 1 + np.maximum.accumulate(np.maximum(counts[start:start + cap], 1))
        rows = np.arange(1, width.size + 1)
        fits = np.flatnonzero(rows * graph_bytes(width, num_parts, dim, hidden) <= budget)
        take = int(fits[-1]) + 1 if fits.size else 1   # one graph always runs
        start += take
        bounds.append(start)
        widths.append(int(width[take - 1]))
    return np.asarray(bounds, dtype=np.int64), np.asarray(widths, dtype=np.int64)


def map_dense_batches(fn: Callable[..., Tensor], target: np.ndarray, gallery: np.ndarray,
                      index: np.ndarray, batch_size: int = 2048,
                      device: str | torch.device = "cpu",
                      target_visible: np.ndarray | None = None, desc: str | None = None,
                      progress: bool = False,
                      node_weight: np.ndarray | None = None,
                      out: np.ndarray | None = None,
                      bounds: np.ndarray | None = None) -> np.ndarray:
    """``fn(x, mask[, target_visible=...])`` over the dense neighbourhood batches of every
    ``target`` image, ``batch_size`` graphs at a time (or the batches ``bounds`` cut, see
    :func:`plan_graph_batches`); the outputs concatenated as float32. Each batch is padded
    to its own widest neighbourhood (valid neighbours come first in ``index``), not to
    ``K``.

    Args:
        fn: maps a batch ``(B, M, 1 + K, D)`` and its mask ``(B, 1 + K)`` to ``(B, M, F)``.
        target, gallery, index: as in :func:`dense_neighbourhood_batch`.
        target_visible: ``(N, M)`` visibility (or booleans) of the targets; when given, the
            parts at or above the visibility threshold reach ``fn`` as ``target_visible``.
        desc, progress: the progress bar's label, and whether to show it.
        node_weight: ``(N, 1 + K)`` or ``(N, M, 1 + K)`` prior weight of every node of every
            graph (the target first); when given it reaches ``fn`` as ``node_weight``.
        out: ``(N, M, F)`` array (a writable memory map, say) that receives each batch's
            output as it is computed, cast to its dtype; it is returned instead of a new
            float32 array.
        bounds: ``(B + 1,)`` batch boundaries from 0 to ``N``; overrides ``batch_size``.
    """
    if out is not None and out.shape[0] != target.shape[0]:
        raise ValueError(f"out has {out.shape[0]} rows for {target.shape[0]} targets")
    n = target.shape[0]
    if bounds is None:
        bounds = np.append(np.arange(0, n, batch_size), n) if n else np.zeros(1, np.int64)
    elif len(bounds) < 1 or bounds[0] != 0 or bounds[-1] != n or np.any(np.diff(bounds) < 0):
        raise ValueError(f"bounds must rise from 0 to {n}, got {np.asarray(bounds)[:8]}...")
    chunks = []
    for start, stop in tqdm(zip(bounds[:-1], bounds[1:]), total=len(bounds) - 1, desc=desc,
                            disable=not progress, unit="batch", leave=False):
        sl = slice(int(start), int(stop))
        rows_index = np.asarray(index[sl])
        width = used_width(rows_index)
        x, mask = dense_neighbourhood_batch(target[sl], gallery, rows_index[:, :width], device)
        extra = {} if target_visible is None else {
            "target_visible": torch.as_tensor(
                np.asarray(target_visible[sl]) >= VISIBLE_THRESHOLD, device=x.device)}
        if node_weight is not None:
            weight = torch.as_tensor(np.asarray(node_weight[sl], dtype=np.float32),
                                     device=x.device)
            extra["node_weight"] = weight[..., :x.size(2)]     # an empty row grew to width 1
        result = fn(x, mask, **extra).float().cpu().numpy()
        # a mapped target (the gallery reconstructing itself) or output keeps no pages
        # of finished batches in the resident set
        release_rows(target, sl.start, sl.stop)
        if out is None:
            chunks.append(result)
        else:
            out[sl] = result
            release_rows(out, sl.start, sl.stop)
    if out is not None:
        return out
    return np.concatenate(chunks) if chunks else np.empty((0,) + target.shape[1:], np.float32)
