"""The graph adapter: dense batches and PyG batches describe the same neighbourhood graphs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from orgnn import ORGNN
from orgnn.reconstruction.graphs import dense_neighbourhood_batch, pyg_neighbourhood_batch


def _data(seed=0):
    rng = np.random.default_rng(seed)
    gallery = rng.random((30, 3, 8)).astype(np.float32)
    target = rng.random((5, 3, 8)).astype(np.float32)
    index = np.array([[4, 9, 2], [7, -1, -1], [-1, -1, -1], [0, 1, 29], [3, 5, -1]])
    return target, gallery, index


def test_dense_batch_layout_by_hand():
    target, gallery, index = _data()
    x, mask = dense_neighbourhood_batch(target, gallery, index)
    assert x.shape == (5, 3, 4, 8) and mask.shape == (5, 4)
    assert mask.tolist()[1] == [True, True, False, False]
    np.testing.assert_array_equal(x[0, :, 0].numpy(), target[0])          # node 0 = target
    np.testing.assert_array_equal(x[0, :, 2].numpy(), gallery[9])         # order kept
    np.testing.assert_array_equal(x[3, :, 3].numpy(), gallery[29])
    assert x[1, :, 2:].abs().sum() == 0                                   # padding is zero
    # An empty neighbourhood becomes the image itself as its one neighbour.
    assert mask.tolist()[2] == [True, True, False, False]
    np.testing.assert_array_equal(x[2, :, 1].numpy(), target[2])


def test_pyg_batch_is_complete_graphs_without_self_loops():
    target, gallery, index = _data()
    x, mask = dense_neighbourhood_batch(target, gallery, index)
    batch = pyg_neighbourhood_batch(x, mask)
    sizes = mask.sum(1).tolist()
    assert batch.num_graphs == 5 and batch.x.shape == (sum(sizes), 3, 8)
    assert batch.edge_index.size(1) == sum(n * (n - 1) for n in sizes)
    src, dst = batch.edge_index
    assert bool((src != dst).all())
    assert torch.equal(batch.batch[src], batch.batch[dst])               # within graphs
    pairs = set(zip(src.tolist(), dst.tolist()))
    for g in range(5):
        nodes = range(int(batch.ptr[g]), int(batch.ptr[g + 1]))
        assert all((i, j) in pairs for i in nodes for j in nodes if i != j)
    torch.testing.assert_close(batch.x[batch.ptr[:-1]], x[:, :, 0])     # targets first


@pytest.mark.parametrize("outlier_aware", [True, False])
def test_dense_and_pyg_adapters_give_same_reconstructions(outlier_aware):
    target, gallery, index = _data(1)
    torch.manual_seed(0)
    model = ORGNN(8, 8, num_parts=3, init="glorot", outlier_aware=outlier_aware)
    x, mask = dense_neighbourhood_batch(target, gallery, index)
    torch.testing.assert_close(model(pyg_neighbourhood_batch(x, mask)), model(x, mask),
                               atol=1e-5, rtol=1e-4)


def test_bad_index_shape_and_gappy_mask():
    target, gallery, index = _data()
    with pytest.raises(ValueError, match=r"index must have shape \(B=5, K\)"):
        dense_neighbourhood_batch(target, gallery, index[:3])
    x, mask = dense_neighbourhood_batch(target, gallery, index)
    mask[0, 1] = False
    with pytest.raises(ValueError, match="valid nodes first"):
        pyg_neighbourhood_batch(x, mask)
