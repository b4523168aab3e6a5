"""OR-GNN training: PK batches, reproducibility, checkpoints that round-trip or fail clearly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from orgnn.datasets import synthetic_preset
from orgnn.reconstruction.training import (
    CheckpointError,
    TrainConfig,
    TrainingDivergedError,
    load_checkpoint,
    pk_batches,
    save_checkpoint,
    train_orgnn,
)


@pytest.fixture(scope="module")
def tiny():
    return synthetic_preset("tiny", seed=0)


def test_pk_batches_follow_torchreid_epochs():
    labels = np.array([0] * 9 + [1] * 2 + [2] * 5 + [3] * 8 + [4] * 4)
    batches = pk_batches(labels, ids_per_batch=2, sets_per_id=4,
                         rng=np.random.default_rng(0))
    # chunks of 4: id0 2, id1 1 (resampled), id2 1, id3 2, id4 1 -> 7 chunks -> 3 batches of 2
    assert len(batches) == 3 and all(len(b) == 8 for b in batches)
    used = np.concatenate(batches)
    for batch in batches:
        ids = labels[batch].reshape(-1, 4)
        assert (ids == ids[:, :1]).all()                   # K images of one identity each
        assert len(set(ids[:, 0])) == len(ids)             # no identity twice in a batch
    for pid, n in [(0, 9), (3, 8), (2, 5)]:                # no image twice where n >= K
        mine = used[labels[used] == pid]
        assert len(mine) == len(set(mine.tolist())) <= n
    # An epoch sees about every image once.
    big = np.repeat(np.arange(20), 12)
    epoch = np.concatenate(pk_batches(big, 16, 4, np.random.default_rng(1)))
    assert len(epoch) >= 0.75 * len(big)


def test_milestones_scale_with_epochs():
    assert TrainConfig(epochs=120).scaled_milestones() == [40, 70]
    assert TrainConfig(epochs=12).scaled_milestones() == [4, 7]


def test_training_is_seeded(tiny):
    cfg = TrainConfig(epochs=3, init="glorot", lr=1e-2, seed=3)
    a = train_orgnn(tiny["train"], cfg, progress=False)
    b = train_orgnn(tiny["train"], cfg, progress=False)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, msg=name)
    other = train_orgnn(tiny["train"], TrainConfig(epochs=3, init="glorot", lr=1e-2, seed=4),
                        progress=False)
    assert not torch.equal(other.layers[0].weight, a.layers[0].weight)


def test_recon_loss_needs_clean_features(tiny):
    train = tiny["train"]
    no_clean = type(train)(train.features, train.visibility, train.pids, train.camids)
    with pytest.raises(ValueError, match="clean_features"):
        train_orgnn(no_clean, TrainConfig(epochs=1, recon_weight=1.0), progress=False)
    model = train_orgnn(train, TrainConfig(epochs=1, recon_weight=1.0), progress=False)
    assert model.num_classes == len(np.unique(train.pids))


def test_checkpoint_round_trip_and_weights_only(tiny, tmp_path):
    cfg = TrainConfig(epochs=1, seed=1, target_init="self")
    model = train_orgnn(tiny["train"], cfg, progress=False)
    path = save_checkpoint(tmp_path / "m.pt", model, cfg)
    raw = torch.load(path, weights_only=True)              # plain tensors and values only
    assert raw["format"] == "orgnn-checkpoint-v1"
    loaded, loaded_cfg = load_checkpoint(path)
    assert loaded_cfg == cfg and loaded.target_init == "self"
    x = torch.rand(2, 6, 5, tiny["train"].dim)
    torch.testing.assert_close(loaded(x), model(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left


def test_bad_checkpoints_fail_clearly_and_leave_files_untouched(tiny, tmp_path):
    cfg = TrainConfig(epochs=1)
    model = train_orgnn(tiny["train"], cfg, progress=False)
    good = save_checkpoint(tmp_path / "good.pt", model, cfg)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt: corrupted or truncated"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not an orgnn checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    # A save that fails midway leaves the previous checkpoint intact and no temp file.
    before = good.read_bytes()

    class Boom(RuntimeError):
        pass

    def failing_save(*args, **kwargs):
        raise Boom("disk full")

    original = torch.save
    torch.save = failing_save
    try:
        with pytest.raises(Boom):
            save_checkpoint(good, model, cfg)
    finally:
        torch.save = original
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "garbage.pt", "good.pt", "other.pt", "truncated.pt"]


def test_fixed_transform_learns_only_the_outlier_module(tiny):
    # Eq. 4 alone: with the learned scorer the tiny world's neighbourhoods are all right, the
    # imprinted head is exact and Eq. 7's gradient vanishes in float32.
    cfg = TrainConfig(epochs=2, train_transform=False, lr=1e-2, outlier_scorer="none")
    model = train_orgnn(tiny["train"], cfg, progress=False)
    for layer in model.layers:
        torch.testing.assert_close(layer.weight, torch.eye(layer.out_channels)
                                   .expand_as(layer.weight))
        assert layer.bias.abs().sum() == 0
    assert any(layer.att_weight.abs().sum() > 0 for layer in model.layers)


def test_diverging_training_stops_with_a_clear_error(tiny):
    with pytest.raises(TrainingDivergedError, match="diverged in epoch .* learning rate"):
        train_orgnn(tiny["train"], TrainConfig(epochs=3, lr=1e12, weight_decay=0,
                                               outlier_scorer="none"),
                    progress=False)



def test_classifier_starts_imprinted_or_random(tiny):
    from orgnn.reconstruction.graphs import dense_neighbourhood_batch
    from orgnn.reconstruction.training import train_neighbourhoods

    train = tiny["train"]
    imprinted = train_orgnn(train, TrainConfig(epochs=0, outlier_scorer="none",
                                               classifier_init="imprint"), progress=False)
    random = train_orgnn(train, TrainConfig(epochs=0, classifier_init="random",
                                            outlier_scorer="none"), progress=False)
    assert random.classifier.abs().max() < 1e-2                # the small random start
    # imprinted: each class's weight is its images' mean BN-normalised output (by a loop)
    nbrs = train_neighbourhoods(train, TrainConfig())
    with torch.no_grad():
        out = random(*dense_neighbourhood_batch(train.features, train.features, nbrs.index),
                     target_visible=torch.from_numpy(train.visible))
    flat = out.reshape(len(out), -1)
    normed = ((flat - flat.mean(0)) / (flat.var(0) + 1e-5).sqrt()).view_as(out)
    for label, pid in enumerate(np.unique(train.pids)):
        expected = normed[torch.from_numpy(train.pids == pid)].mean(0)
        torch.testing.assert_close(imprinted.classifier[:, label], expected, atol=1e-5,
                                   rtol=1e-4)
    with pytest.raises(ValueError, match=r"classifier_init must be one of \('imprint', "
                                         r"'random'\), got 'zeros'"):
        train_orgnn(train, TrainConfig(epochs=1, classifier_init="zeros"), progress=False)


def test_random_head_starts_near_chance_and_its_loss_falls(tiny):
    """The default head starts at a loss of about ln(C) (not above it, as an imprinted head
    of unnormalised class means did) and the loss falls within the first epoch."""
    train = tiny["train"]
    cfg = TrainConfig(epochs=1, classifier_init="random", outlier_scorer="none",
                      ids_per_batch=4, sets_per_id=4)
    model = train_orgnn(train, cfg, progress=False)
    classes = len(np.unique(train.pids))
    history = model.loss_history
    assert len(history) >= 4
    assert history[0] <= np.log(classes) + 0.5
    half = len(history) // 2
    assert np.mean(history[half:]) < np.mean(history[:half])


def test_batch_hard_triplet_by_a_loop():
    from orgnn.reconstruction.training import batch_hard_triplet

    rng = np.random.default_rng(0)
    feats = torch.from_numpy(rng.normal(size=(6, 2, 3)).astype(np.float32))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])

    def dist(a, b):     # SPEC §5: 1 - mean part cosine
        return 1 - np.mean([np.dot(a[k], b[k]) / np.linalg.norm(a[k]) / np.linalg.norm(b[k])
                            for k in range(a.shape[0])])

    x = feats.numpy()
    terms = []
    for a in range(6):
        pos = max(dist(x[a], x[p]) for p in range(6) if labels[p] == labels[a])
        neg = min(dist(x[a], x[n]) for n in range(6) if labels[n] != labels[a])
        terms.append(max(0.0, pos - neg + 0.3))
    assert batch_hard_triplet(feats, labels, 0.3).item() == pytest.approx(np.mean(terms),
                                                                          abs=1e-5)


def test_output_bn_returns_the_heads_normalised_feature(tiny):
    train = tiny["train"]
    model = train_orgnn(train, TrainConfig(epochs=1, classifier_init="random",
                                           outlier_scorer="none", output_bn=True),
                        progress=False)
    from orgnn.reconstruction.graphs import dense_neighbourhood_batch
    from orgnn.reconstruction.training import train_neighbourhoods

    nbrs = train_neighbourhoods(train, model.train_config)
    x, mask = dense_neighbourhood_batch(train.features[:5], train.features, nbrs.index[:5])
    vis = torch.from_numpy(train.visible[:5])
    with torch.no_grad():
        bn_out = model(x, mask, target_visible=vis)
        model.output_bn = False
        raw = model(x, mask, target_visible=vis)
    bn = model.bn
    expected = ((raw.reshape(5, -1) - bn.running_mean) / (bn.running_var + bn.eps).sqrt()
                * bn.weight + bn.bias).view_as(raw)
    torch.testing.assert_close(bn_out, expected, atol=1e-5, rtol=1e-4)
