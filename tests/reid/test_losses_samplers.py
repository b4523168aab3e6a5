"""Eq. 1 / Eq. 2 losses against loop implementations; PK and distributed PK samplers."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from orgnn.reid import PKSampler, RandomBatchSampler, batch_hard_triplet_loss, fen_loss, oan_loss
from orgnn.reid.samplers import DistributedPKSampler


def triplet_loop(x: torch.Tensor, y: torch.Tensor, margin: float) -> float:
    n, total = len(y), 0.0
    for a in range(n):
        pos = [torch.dist(x[a], x[p]).item() for p in range(n) if y[p] == y[a]]
        neg = [torch.dist(x[a], x[q]).item() for q in range(n) if y[q] != y[a]]
        total += max(0.0, max(pos) - min(neg) + margin) if neg else 0.0
    return total / n


def test_triplet_equals_loop():
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    for margin in (0.3, 2.0, 10.0):
        assert batch_hard_triplet_loss(x, y, margin).item() == pytest.approx(
            triplet_loop(x, y, margin), abs=1e-5)


def test_triplet_per_part_and_gradient():
    torch.manual_seed(1)
    x = torch.randn(6, 3, 4, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = batch_hard_triplet_loss(x, y)
    expected = sum(triplet_loop(x[:, k].detach(), y, 0.3) for k in range(3)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    # identical features (zero distances) keep finite gradients; one identity: no negatives
    z = torch.zeros(4, 2, 3, requires_grad=True)
    batch_hard_triplet_loss(z, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(z.grad).all()
    assert batch_hard_triplet_loss(torch.randn(3, 4), torch.zeros(3, dtype=torch.long)) == 0


def test_fen_loss_is_eq1():
    torch.manual_seed(2)
    logits, feats = torch.randn(4, 6, 3), torch.randn(4, 6, 8)
    y = torch.tensor([0, 0, 2, 2])
    loss, parts = fen_loss(logits, feats, y)
    per_part = [F.cross_entropy(logits[:, k], y) + triplet_loop(feats[:, k], y, 0.3)
                for k in range(6)]
    assert loss.item() == pytest.approx(float(sum(per_part) / 6), abs=1e-5)
    assert parts["ce"] + parts["triplet"] == pytest.approx(loss.item(), abs=1e-5)


def test_oan_loss_is_eq2():
    z = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.sigmoid(z)
    expected = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    assert oan_loss(z, t).item() == pytest.approx(expected.item(), abs=1e-6)


PIDS = [0] * 9 + [1] * 4 + [2] * 2 + [3] * 1 + [4] * 6 + [5] * 5


def test_pk_sampler_batches():
    sampler = PKSampler(PIDS, P=3, K=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    used = Counter()
    for batch in batches:
        assert len(batch) == 3 * 4
        ids = [PIDS[i] for i in batch]
        counts = Counter(ids)
        assert len(counts) == 3 and set(counts.values()) == {4}  # P identities × K, no repeat
        used.update(i for i in set(batch) if len(set(j for j in batch if PIDS[j] == PIDS[i]))
                    == 4)
    # identities with >= K images are drawn without replacement inside a chunk
    for batch in batches:
        for pid in {PIDS[i] for i in batch}:
            chunk = [i for i in batch if PIDS[i] == pid]
            if PIDS.count(pid) >= 4:
                assert len(set(chunk)) == 4
    # identities with fewer than K images (2: two images, 3: one) still give K samples
    few = [b for b in batches if any(PIDS[i] in (2, 3) for i in b)]
    assert few, "identities with < K images are sampled (with replacement)"


def test_pk_sampler_deterministic_and_epochs():
    a, b = PKSampler(PIDS, 2, 2, seed=3), PKSampler(PIDS, 2, 2, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1, start=2)
    assert list(b) == list(a)[2:]
    with pytest.raises(ValueError, match="at least P=7 identities"):
        PKSampler(PIDS, P=7, K=2)


def test_distributed_pk_split():
    full = PKSampler(PIDS, 2, 2, seed=5)
    ranks = [DistributedPKSampler(PIDS, 2, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    parts = [list(s) for s in ranks]
    assert len(parts[0]) == len(parts[1]) == len(full) // 2
    assert parts[0] == list(full)[0::2][:len(parts[0])]
    assert parts[1] == list(full)[1::2][:len(parts[1])]
    for batch in parts[0] + parts[1]:
        assert len({PIDS[i] for i in batch}) == 2 and len(batch) == 4
    assert repr(ranks[1]) == "DistributedPKSampler(P=2, K=2, rank=1, world_size=2)"


def test_random_batch_sampler():
    s = RandomBatchSampler(10, 3, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == 3 and all(len(b) == 3 for b in batches)
    assert len({i for b in batches for i in b}) == 9
    r0, r1 = (list(RandomBatchSampler(10, 2, 0, rank=r, world_size=2)) for r in range(2))
    assert len(r0) == len(r1) == 2 and not {i for b in r0 for i in b} & {i for b in r1 for i in b}
