"""Distances, reconstruction and the ablation on the synthetic world."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from orgnn import ORGNN
from orgnn.datasets import synthetic_preset
from orgnn.reconstruction.graphs import dense_neighbourhood_batch
from orgnn.reconstruction.pipeline import (
    ABLATION_ROWS,
    AblationConfig,
    average_reconstruct,
    format_table,
    oan_parts,
    part_distance,
    reconstruct,
    run_ablation,
)
from orgnn.reconstruction.training import SearchConfig, TrainConfig


def test_part_distance_by_hand():
    a = np.array([[[1, 0], [0, 1]]], dtype=np.float32)          # 1 image, 2 parts
    b = np.array([[[1, 0], [1, 0]], [[0, 2], [0, 3]]], dtype=np.float32)
    # part cosines with b0: (1, 0) -> mean 0.5; with b1: (0, 1) -> mean 0.5
    np.testing.assert_allclose(part_distance(a, b), [[0.5, 0.5]], atol=1e-6)
    # only part 0 visible: cosines 1 and 0
    np.testing.assert_allclose(part_distance(a, b, np.array([[True, False]])), [[0.0, 1.0]],
                               atol=1e-6)
    assert oan_parts(np.array([[False, False], [True, False]])).tolist() == [
        [True, True], [True, False]]


def test_part_distance_chunks_agree():
    rng = np.random.default_rng(0)
    a, b = rng.random((37, 3, 5)), rng.random((11, 3, 5))
    parts = rng.random((37, 3)) > 0.3
    np.testing.assert_allclose(part_distance(a, b, parts, chunk_size=4),
                               part_distance(a, b, parts), atol=1e-6)


def test_reconstruct_streams_in_batches_and_average_by_hand():
    rng = np.random.default_rng(1)
    gallery = rng.random((20, 2, 4)).astype(np.float32)
    target = rng.random((7, 2, 4)).astype(np.float32)
    index = rng.integers(-1, 20, size=(7, 3))
    torch.manual_seed(0)
    model = ORGNN(4, 4, num_parts=2, init="glorot")
    full = reconstruct(model, target, gallery, index, batch_size=100)
    np.testing.assert_allclose(reconstruct(model, target, gallery, index, batch_size=3), full,
                               atol=1e-6)
    avg = average_reconstruct(target, gallery, index)
    for i in range(7):
        nbrs = [j for j in index[i] if j >= 0]
        expected = gallery[nbrs].mean(0) if nbrs else target[i]
        np.testing.assert_allclose(avg[i], expected, atol=1e-6)


def test_empty_neighbourhood_goes_through_the_same_network():
    """An image without neighbours is the graph of itself (SPEC §3): its output is the
    network's transform of its own feature, not the raw feature in another space."""
    rng = np.random.default_rng(2)
    gallery = rng.random((10, 2, 4)).astype(np.float32)
    target = rng.random((2, 2, 4)).astype(np.float32)
    torch.manual_seed(1)
    model = ORGNN(4, 4, num_parts=2, init="glorot")
    out = reconstruct(model, target, gallery, np.array([[-1, -1], [3, -1]]))
    with torch.no_grad():
        own = torch.from_numpy(target[:1])
        x = torch.stack([own, own], dim=2)                     # target + itself as neighbour
        expected = model(x).numpy()
    np.testing.assert_allclose(out[:1], expected, atol=1e-6)
    assert not np.allclose(out[0], target[0], atol=1e-2)       # transformed like the others
    x, mask = dense_neighbourhood_batch(target, gallery, np.array([[-1, -1], [3, -1]]))
    assert mask.sum(1).tolist() == [2, 2]


@pytest.fixture(scope="module")
def demo_ablation():
    from orgnn.cli.commands import DEFAULT_EPOCHS

    splits = synthetic_preset("demo", seed=0)
    config = AblationConfig(train=TrainConfig(epochs=DEFAULT_EPOCHS, seed=0))
    return run_ablation(splits, config, progress=False)


def test_ablation_ordering_on_synthetic_world(demo_ablation):
    rows = demo_ablation.rows
    assert list(rows) == list(ABLATION_ROWS)
    m = {name: row["mAP"] for name, row in rows.items()}
    # Plain averaging is judged at its own best neighbourhood size (K=10; the default K=30
    # suits the learned scorer and dilutes a plain mean: 62.1 on this world).
    best_avg = run_ablation(synthetic_preset("demo", seed=0),
                            AblationConfig(search=SearchConfig(k=10)), rows=("avg",),
                            progress=False).rows["avg"]["mAP"]
    assert m["orgnn"] >= best_avg > m["oan"] > m["baseline"]   # the ordering
    assert m["orgnn"] >= m["avg"]
    assert m["orgnn"] > m["oan"] + 5                           # reconstruction helps a lot
    assert m["upper_bound"] > m["orgnn"] + 10                  # ground-truth neighbourhoods
    for row in rows.values():
        assert set(row) == {"mAP", "rank1", "rank5", "rank10", "mINP"}
        assert 0 <= row["mINP"] <= row["mAP"] <= 100 and row["rank1"] <= row["rank5"]


@pytest.mark.parametrize("variant, margin", [
    # seed 0, default 0 epochs: 77.6 against 72.1 at K=20 (docs/results.md)
    ({"outlier_scorer": "none"}, 3.0),
], ids=["learned-scorer-beats-eq4-alone"])
def test_default_starts_beat_the_alternatives(demo_ablation, variant, margin):
    from orgnn.cli.commands import DEFAULT_EPOCHS

    other = TrainConfig(epochs=DEFAULT_EPOCHS, seed=0, **variant)
    splits = synthetic_preset("demo", seed=0)
    alternative = run_ablation(splits, AblationConfig(train=other), rows=("orgnn",),
                               progress=False).rows["orgnn"]["mAP"]
    assert demo_ablation.rows["orgnn"]["mAP"] > alternative + margin


def test_ablation_json_and_table(demo_ablation):
    payload = demo_ablation.to_json()
    assert {"empty_neighbourhoods", "timings", "config"} <= set(payload)
    assert payload["empty_neighbourhoods"]["query"] >= 0
    assert payload["timings"]["search+reconstruct+evaluate"] > 0
    table = format_table(demo_ablation, "t")
    assert table.splitlines()[0] == "t" and "upper_bound" in table


def test_unknown_row_is_refused():
    with pytest.raises(ValueError, match="unknown ablation rows"):
        run_ablation(synthetic_preset("tiny"), rows=("baseline", "orgnnn"))
