"""What a new user sees (issue 21): the checkpoint's feature-space fingerprint and
`reconstruct`'s warnings, training progress and the theta/K it carries, figure notes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orgnn.cli import main
from orgnn.datasets import synthetic_preset
from orgnn.io.features import PartFeatures, save_split_dir
from orgnn.reconstruction.training import (
    FINGERPRINT_LEVELS,
    describe_file,
    feature_fingerprint,
    fingerprint_mismatch,
    load_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world, the same world in another feature space (a shared offset: every
    pair of images looks alike, as on another network's features), and a checkpoint."""
    base = tmp_path_factory.mktemp("feedback")
    splits = synthetic_preset("tiny", seed=0)
    data, foreign = base / "data", base / "foreign"
    save_split_dir(data, splits)
    offset = 4.0 * np.abs(np.random.default_rng(1).standard_normal(splits["train"].dim))
    save_split_dir(foreign, {k: PartFeatures((v.features + offset).astype(np.float32),
                                             v.visibility, v.pids, v.camids)
                             for k, v in splits.items()})
    ckpt = base / "model.pt"
    proc = subprocess.run([sys.executable, "-m", "orgnn.cli", "train", "--data", str(data),
                           "--out", str(ckpt), "--epochs", "0"], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {"base": base, "data": data, "foreign": foreign, "ckpt": ckpt, "train": proc,
            "splits": splits}


def test_fingerprint_is_the_random_pair_cosine_quantiles():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3, 8)).astype(np.float32)
    got = feature_fingerprint(x, pairs=4000, seed=0)
    # reference: the same seeded pairs, cosines by a plain loop
    draw = np.random.default_rng(0)
    a = draw.integers(0, 50, 4000)
    b = (a + draw.integers(1, 50, 4000)) % 50
    cos = [np.mean([x[i, k] @ x[j, k] / np.linalg.norm(x[i, k]) / np.linalg.norm(x[j, k])
                    for k in range(3)]) for i, j in zip(a, b)]
    assert np.all(a != b)
    np.testing.assert_allclose(got, np.quantile(cos, FINGERPRINT_LEVELS), atol=1e-4)
    assert fingerprint_mismatch(got, got) is False
    assert fingerprint_mismatch(got, [q + 0.9 for q in got]) is True
    assert fingerprint_mismatch([], got) is False                  # nothing to compare


def test_train_prints_stages_theta_and_k_without_empty_epoch_bars(world):
    proc = world["train"]
    assert "OR-GNN training" in proc.stderr and "scorer stage 3 of 3" in proc.stderr
    assert "epoch" not in proc.stderr                               # --epochs 0: no bar
    model, config = load_checkpoint(world["ckpt"])
    assert f"theta {config.theta:.3f} (calibrated on the training split" in proc.stdout
    assert f"K {config.k}, visible-mean search" in proc.stdout
    space = model.feature_space
    assert space["source"] == f"{world['data']}/train.npz"
    assert space["pair_cosine_quantiles"] == feature_fingerprint(
        world["splits"]["train"].features)


def test_reconstruct_warns_on_foreign_features_naming_both_files(world, tmp_path, capsys):
    assert main(["reconstruct", "--data", str(world["data"]), "--checkpoint",
                 str(world["ckpt"]), "--out", str(tmp_path / "same"), "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err                # its own data: quiet
    assert main(["reconstruct", "--data", str(world["foreign"]), "--checkpoint",
                 str(world["ckpt"]), "--out", str(tmp_path / "other"), "--quiet"]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "does not look like" in x)
    assert f"{world['foreign']}/gallery.npz" in line and str(world["ckpt"]) in line
    assert f"{world['data']}/train.npz" in line and "orgnn train" in line


def test_reconstruct_warns_when_most_targets_have_no_neighbour(world, tmp_path, capsys):
    assert main(["reconstruct", "--data", str(world["data"]), "--checkpoint",
                 str(world["ckpt"]), "--out", str(tmp_path / "rec"), "--theta", "1",
                 "--quiet"]) == 0
    captured = capsys.readouterr()
    n = len(world["splits"]["query"])
    assert f"query: {n} images, {n} without neighbours" in captured.out
    warning = next(x for x in captured.err.splitlines() if "have no neighbour" in x)
    assert f"{n} of {n} images of {world['data']}/query.npz" in warning
    assert "theta=1.000 (given by --theta)" in warning and "lower --theta" in warning


def test_old_checkpoint_without_fingerprint_still_loads(world, tmp_path, capsys):
    payload = torch.load(world["ckpt"], weights_only=True)
    del payload["feature_space"]                                    # as written before
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    model, _ = load_checkpoint(old)
    assert model.feature_space is None
    assert main(["reconstruct", "--data", str(world["foreign"]), "--checkpoint", str(old),
                 "--out", str(tmp_path / "rec"), "--quiet"]) == 0
    assert "does not look like" not in capsys.readouterr().err


def test_describe_file_names_what_a_wrong_checkpoint_is(tmp_path):
    files = {"a.npz": lambda p: np.savez(p, x=np.zeros(2)),
             "a.npy": lambda p: np.save(p, np.zeros(2)),
             "a.json": lambda p: p.write_text('{"a": 1}'),
             "a.txt": lambda p: p.write_text("hello"),
             "empty": lambda p: p.write_bytes(b""),
             "random": lambda p: p.write_bytes(np.random.default_rng(0).bytes(64)),
             "state.pt": lambda p: torch.save({"w": torch.zeros(1)}, p)}
    expected = {"a.npz": "a NumPy .npz archive", "a.npy": "a NumPy .npy array",
                "a.json": "a JSON text file", "a.txt": "a text file",
                "empty": "an empty file", "random": "64 bytes of unrecognised binary data",
                "state.pt": "a torch.save file"}
    for name, write in files.items():
        write(tmp_path / name)
        assert describe_file(tmp_path / name) == expected[name], name
    with pytest.raises(ValueError, match=r"a torch.save file of a dict with keys \['w'\], "
                                         r"not an orgnn checkpoint"):
        load_checkpoint(tmp_path / "state.pt")


def test_demo_shows_stage_progress_and_no_empty_epoch_bar(capsys):
    assert main(["demo", "--preset", "tiny", "--epochs", "0", "--rows", "orgnn"]) == 0
    captured = capsys.readouterr()
    assert "OR-GNN training" in captured.err and "stages" in captured.err
    assert "epoch" not in captured.err
    assert "search: visible-mean, K=30, theta=" in captured.out      # what the model used


@pytest.mark.parametrize("theta, total", [(None, 8), (0.3, 7)])
def test_stage_bar_counts_every_stage_once(world, capsys, theta, total):
    from orgnn.reconstruction.training import TrainConfig, train_orgnn

    train_orgnn(world["splits"]["train"], TrainConfig(epochs=0, theta=theta, k=10,
                                                  classifier_init="imprint"),
                progress=True)
    err = capsys.readouterr().err
    assert f"{total}/{total} stages" in err and f"{total + 1}/{total}" not in err
    assert ("calibrate theta" in err) == (theta is None)
