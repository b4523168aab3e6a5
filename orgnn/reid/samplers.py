"""PK batch samplers: P identities × K images per batch (single process and torchrun)."""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch

__all__ = ["PKSampler", "DistributedPKSampler", "RandomBatchSampler"]


class PKSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler of P identities × K images (pass it as ``DataLoader(batch_sampler=...)``).

    Each epoch, every identity's images are shuffled and cut into chunks of K; an identity with
    fewer than K images gets one chunk drawn with replacement. Batches are then formed by drawing
    P *distinct* identities that still have chunks (so no identity appears twice in a batch),
    until fewer than P identities remain (torchreid's ``RandomIdentitySampler`` scheme). The
    order depends only on ``(seed, epoch)``: call :meth:`set_epoch` before each epoch, and a
    resumed run sees the same batches.

    With ``world_size > 1`` (torchrun), all ranks build the same epoch and rank ``r`` takes
    batches ``r, r + world_size, ...``, truncated to the same count on every rank; each rank's
    batch is P×K, so the global batch is ``world_size × P × K``.

    Args:
        pids (sequence of int): identity of each dataset item.
        P (int): identities per batch (default 8). K (int): images per identity (default 4).
        seed (int): base seed. rank, world_size (int): distributed split (default 0, 1).
    """

    def __init__(self, pids: Sequence[int], P: int = 8, K: int = 4, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if P < 1 or K < 1:
            raise ValueError(f"P and K must be positive, got P={P}, K={K}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.index: dict[int, list[int]] = defaultdict(list)
        for i, pid in enumerate(pids):
            self.index[int(pid)].append(i)
        if len(self.index) < P:
            raise ValueError(
                f"PK sampling needs at least P={P} identities, the dataset has {len(self.index)}")
        self.pids = sorted(self.index)
        self.P, self.K, self.seed = P, K, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = self.start = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's batches; ``start`` skips the first batches (mid-epoch resume)."""
        self.epoch, self.start = epoch, start

    def _global_batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        chunks: dict[int, list[list[int]]] = {}
        for pid in self.pids:
            idx = self.index[pid]
            if len(idx) < self.K:
                pick = torch.randint(len(idx), (self.K,), generator=g).tolist()
                chunks[pid] = [[idx[j] for j in pick]]
            else:
                order = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
                chunks[pid] = [order[j:j + self.K]
                               for j in range(0, len(order) - self.K + 1, self.K)]
        batches = []
        available = [pid for pid in self.pids if chunks[pid]]
        while len(available) >= self.P:
            chosen = [available[j] for j in
                      torch.randperm(len(available), generator=g)[:self.P].tolist()]
            batches.append([i for pid in chosen for i in chunks[pid].pop()])
            available = [pid for pid in available if chunks[pid]]
        self._cache = (self.epoch, batches)
        return batches

    def _batches(self) -> list[list[int]]:
        batches = self._global_batches()
        per_rank = len(batches) // self.world_size
        return batches[self.rank::self.world_size][:per_rank][self.start:]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())

    def __repr__(self) -> str:
        extra = f", rank={self.rank}, world_size={self.world_size}" if self.world_size > 1 else ""
        return f"{self.__class__.__name__}(P={self.P}, K={self.K}{extra})"


class DistributedPKSampler(PKSampler):
    """:class:`PKSampler` whose rank and world size default to torchrun's (``RANK``,
    ``WORLD_SIZE`` or the initialised process group)."""

    def __init__(self, pids: Sequence[int], P: int = 8, K: int = 4, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        rank, world_size = _world(rank, world_size)
        super().__init__(pids, P, K, seed, rank, world_size)


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    ready = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if ready else int(os.environ.get("WORLD_SIZE", 1))
    if rank is None:
        rank = dist.get_rank() if ready else int(os.environ.get("RANK", 0))
    return rank, world_size


class RandomBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches of ``batch_size`` items (last incomplete batch dropped), the order a
    function of ``(seed, epoch)``; with ``world_size > 1`` rank ``r`` takes batches
    ``r, r + world_size, ...`` (same count on every rank). Used for OAN training, which needs no
    identities.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int | None = 0,
                 world_size: int | None = 1):
        rank, world_size = _world(rank, world_size)
        if n < batch_size:
            raise ValueError(f"{n} item(s) cannot fill one batch of {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.epoch, self.start = rank, world_size, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        batches = [order[i:i + self.batch_size]
                   for i in range(0, self.n - self.batch_size + 1, self.batch_size)]
        per_rank = (self.n // self.batch_size) // self.world_size
        return iter(batches[self.rank::self.world_size][:per_rank][self.start:])

    def __len__(self) -> int:
        return max(0, (self.n // self.batch_size) // self.world_size - self.start)
