"""Two-step FEN / OAN training on tiny generated images, checkpoints, resume, extraction, CLI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orgnn.cli import main
from orgnn.io.features import load_part_features
from orgnn.reid import TrainConfig, build_dataset, extract, load_checkpoint, train
from orgnn.reid.engine import CHECKPOINT_FORMAT

from .conftest import make_market, person_image, save

REPO = Path(__file__).resolve().parents[2]
TINY = ["--height", "64", "--width", "32", "--workers", "0", "--device", "cpu",
        "--no-progress"]
# training plumbing does not depend on depth: ResNet-18 keeps checkpoints small; the ResNet-50
# architecture itself is checked in test_models.py
R18 = ["--arch", "resnet18"]
NO_AUG = ["--flip-prob", "0", "--erasing-prob", "0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 2-identity Market-style folder with masks, and FEN / OAN runs of two steps each."""
    base = tmp_path_factory.mktemp("reid")
    data = make_market(base / "market", ids=(1, 2), per_id=2, masks=base / "masks")
    fen_out, oan_out = base / "fen", base / "oan"
    assert main(["train-fen", "--dataset", "market1501", "--dataset-dir", str(data),
                 "--out", str(fen_out), "--epochs", "2", "--P", "2", "--K", "2", "--seed", "1",
                 "--checkpoint-every", "2", *R18, *TINY, *NO_AUG]) == 0
    assert main(["train-oan", "--dataset", "market1501", "--dataset-dir", str(data),
                 "--mask-dir", str(base / "masks"), "--out", str(oan_out), "--epochs", "2",
                 "--batch-size", "4", "--occlude-prob", "0", "--checkpoint-every", "2", *R18,
                 *TINY, *NO_AUG]) == 0
    return {"base": base, "data": data, "masks": base / "masks", "fen": fen_out / "last.pt",
            "oan": oan_out / "last.pt"}


def test_fen_two_steps_lower_the_loss(world):
    ckpt = torch.load(world["fen"], map_location="cpu", weights_only=True)  # plain contents
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["task"] == "fen"
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 and ckpt["pids"] == [1, 2]
    assert ckpt["model_args"]["num_classes"] == 2
    first, second = ckpt["history"]
    assert second < first, ckpt["history"]
    assert not list(world["fen"].parent.glob("*.tmp"))


def test_oan_two_steps_lower_the_loss(world):
    ckpt = load_checkpoint(world["oan"], "oan")
    assert ckpt["step"] == 2
    first, second = ckpt["history"]
    assert second < first, ckpt["history"]
    with pytest.raises(ValueError, match="is a OAN checkpoint, a FEN checkpoint is needed"):
        load_checkpoint(world["oan"], "fen")


def test_resume_continues_exactly(world, tmp_path):
    data = world["data"]
    common = dict(task="fen", dataset="market1501", dataset_dir=str(data), P=2, K=2,
                  height=64, width=32, workers=0, device="cpu", progress=False, seed=3,
                  erasing_prob=0.5, flip_prob=0.5, lr=1e-3, arch="resnet18",
                  checkpoint_every=10)
    straight = train(TrainConfig(out=str(tmp_path / "a"), epochs=2, **common), log=lambda *a: 0)
    train(TrainConfig(out=str(tmp_path / "b"), epochs=2, max_steps=1, **common),
          log=lambda *a: 0)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 1
    resumed = train(TrainConfig(out=str(tmp_path / "b"), epochs=2, resume=True, **common),
                    log=lambda *a: 0)
    assert resumed["steps"] == straight["steps"] == 2
    assert resumed["history"] == pytest.approx(straight["history"], rel=1e-5)
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_cli_resume_and_refusals(world, capsys):
    data, out = world["data"], world["fen"].parent
    args = ["train-fen", "--dataset", "market1501", "--dataset-dir", str(data), "--out",
            str(out), "--P", "2", "--K", "2", *R18, *TINY, *NO_AUG]
    assert main(args + ["--epochs", "2"]) == 2  # a run is there and --resume is not given
    assert "last.pt exists: pass --resume" in capsys.readouterr().err
    # the checkpoint of the fixture run (2 epochs) continues to epoch 3
    resumed_dir = world["base"] / "fen_resumed"
    resumed_dir.mkdir()
    (resumed_dir / "last.pt").write_bytes(world["fen"].read_bytes())
    args[args.index(str(out))] = str(resumed_dir)
    assert main(args + ["--epochs", "3", "--resume"]) == 0
    ckpt = load_checkpoint(resumed_dir / "last.pt", "fen")
    assert ckpt["epoch"] == 3 and ckpt["step"] == 3 and len(ckpt["history"]) == 3
    assert "resuming from" in capsys.readouterr().out
    # a wrong --resume file, and an OAN run without masks
    junk = world["base"] / "junk.pt"
    junk.write_bytes(b"nope")
    assert main(args + ["--epochs", "3", "--resume", str(junk)]) == 2
    assert "junk.pt: cannot be read as an orgnn checkpoint" in capsys.readouterr().err
    assert main(["train-oan", "--dataset", "market1501", "--dataset-dir", str(data), "--out",
                 str(world["base"] / "o2"), "--mask-dir", str(world["base"] / "none"),
                 "--epochs", "1", "--batch-size", "2", *R18, *TINY]) == 2
    assert "mask folder" in capsys.readouterr().err


def test_empty_training_sets(tmp_path, capsys):
    root = tmp_path / "or"
    for folder in ("occluded_body_images", "whole_body_images"):
        save(root / folder / "001_01.jpg", person_image(1, 0))
    assert main(["train-fen", "--dataset", "occluded_reid", "--dataset-dir", str(root),
                 "--out", str(tmp_path / "o"), *R18, *TINY]) == 2
    assert "no training images" in capsys.readouterr().err
    market = make_market(tmp_path / "m", ids=(1,))
    assert main(["train-fen", "--dataset", "market1501", "--dataset-dir", str(market),
                 "--out", str(tmp_path / "o2"), *R18, *TINY]) == 2
    assert "needs at least P=8 identities" in capsys.readouterr().err


def test_extract_writes_part_feature_files(world, tmp_path, capsys):
    out = tmp_path / "parts"
    assert main(["extract", "--dataset", "market1501", "--dataset-dir", str(world["data"]),
                 "--fen", str(world["fen"]), "--oan", str(world["oan"]), "--mask-dir",
                 str(world["masks"]), "--out", str(out), "--batch-size", "3", *TINY]) == 0
    ds = build_dataset("market1501", world["data"])
    for split in ("train", "query", "gallery"):
        pf = load_part_features(out / f"{split}.npz")
        records = ds.split(split)
        assert pf.features.shape == (len(records), 6, 256)
        assert pf.visibility.shape == (len(records), 6)
        assert ((pf.visibility >= 0) & (pf.visibility <= 1)).all()
        assert pf.pids.tolist() == [pid for _, pid, _ in records]
        assert pf.camids.tolist() == [cam for _, _, cam in records]
        assert pf.paths[0] == str(Path(records[0][0]).relative_to(world["data"]))
        assert pf.clean_features is None
    assert "query: 4 images" in capsys.readouterr().out


def test_extract_matches_eval_forward(world, tmp_path):
    from orgnn.reid import load_model
    from orgnn.reid.data import ImageSet

    summary = extract("market1501", world["data"], world["fen"], tmp_path, splits=["query"],
                      height=64, width=32, workers=0, device="cpu", progress=False,
                      log=lambda *a: 0)
    assert set(summary) == {"query"}
    pf = load_part_features(tmp_path / "query.npz")
    assert (pf.visibility == 1).all()  # no OAN: every part visible
    fen = load_model(world["fen"], "fen")
    ds = ImageSet(build_dataset("market1501", world["data"]).query, 64, 32)
    with torch.no_grad():
        expected = fen(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    np.testing.assert_allclose(pf.features, expected.numpy(), atol=1e-4)


def test_extract_synthetic_occlusion(world, tmp_path):
    extract("market1501", world["data"], world["fen"], tmp_path, splits=["query", "gallery"],
            visibility="occluder", occlude_prob=1.0, occlude_splits=["query"], height=64,
            width=32, workers=0, device="cpu", progress=False, log=lambda *a: 0)
    q = load_part_features(tmp_path / "query.npz")
    g = load_part_features(tmp_path / "gallery.npz")
    assert q.clean_features is not None and q.clean_features.shape == q.features.shape
    assert (q.visibility < 1).any(axis=1).all()  # every query image lost part of itself
    assert not np.allclose(q.features, q.clean_features)
    assert (g.visibility == 1).all() and g.clean_features is None
    again = tmp_path / "again"
    extract("market1501", world["data"], world["fen"], again, splits=["query"],
            visibility="occluder", occlude_prob=1.0, height=64, width=32, workers=0,
            device="cpu", progress=False, log=lambda *a: 0)
    np.testing.assert_array_equal(load_part_features(again / "query.npz").visibility,
                                  q.visibility)  # the same occluders on a rerun


def test_bad_images_skip_or_refuse(world, tmp_path, capsys):
    data = make_market(tmp_path / "m", ids=(1, 2), per_id=2)
    bad = sorted((data / "query").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:150])  # truncated JPEG
    notimg = data / "bounding_box_test" / "0102_c3s1_000009_01.jpg"
    notimg.write_text("definitely not a jpeg")
    args = ["extract", "--dataset", "market1501", "--dataset-dir", str(data), "--fen",
            str(world["fen"]), "--out", str(tmp_path / "p"), "--splits", "query", "gallery",
            *TINY]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"bad image {bad}" in err and "truncated" in err.lower()
    assert not (tmp_path / "p" / "query.npz").exists()  # nothing half-written
    assert main(args + ["--on-bad-image", "skip", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"skipped bad image {bad}" in out and f"skipped bad image {notimg}" in out
    q = load_part_features(tmp_path / "p" / "query.npz")
    g = load_part_features(tmp_path / "p" / "gallery.npz")
    assert len(q) == 3 and bad.name not in q.paths.tolist()
    assert len(g) == 4 and notimg.name not in [Path(p).name for p in g.paths]
    # the same refusal from a DataLoader worker process: the same one line
    assert main(args + ["--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"orgnn: error: bad image {bad}: ") and "\n" not in err
    assert "--on-bad-image skip" in err
    # training with a bad image: skipped and reported too
    assert main(["train-fen", "--dataset", "market1501", "--dataset-dir", str(data), "--out",
                 str(tmp_path / "t"), "--P", "2", "--K", "2", "--epochs", "1",
                 "--on-bad-image", "skip", "--max-steps", "1", *R18, *TINY]) == 0
    for path in (data / "bounding_box_train").iterdir():
        path.write_bytes(b"")
    assert main(["extract", "--dataset", "market1501", "--dataset-dir", str(data), "--fen",
                 str(world["fen"]), "--out", str(tmp_path / "p2"), "--splits", "train",
                 "--on-bad-image", "skip", *TINY]) == 2
    assert "every image was unreadable" in capsys.readouterr().err


def test_extract_refusals(world, tmp_path, capsys):
    base = ["extract", "--dataset", "market1501", "--dataset-dir", str(world["data"]),
            "--out", str(tmp_path / "x"), *TINY]
    assert main(base + ["--fen", str(world["oan"])]) == 2
    assert "is a OAN checkpoint" in capsys.readouterr().err
    assert main(base + ["--fen", str(world["fen"]), "--oan", str(world["oan"])]) == 2
    assert "--oan needs --mask-dir" in capsys.readouterr().err
    assert main(base + ["--fen", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_cli_masks_random_weights(tmp_path, capsys):
    data = make_market(tmp_path / "m", ids=(1,), per_id=1)
    assert main(["masks", "--dataset-dir", str(data), "--out", str(tmp_path / "masks"),
                 "--random-weights", "--min-size", "64", "--max-size", "96",
                 "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "3 mask(s) written" in captured.out
    assert "--random-weights: an untrained Mask R-CNN finds no one" in captured.err
    assert "meaningless" in captured.err.splitlines()[0]  # said first, before any work
    assert len(list((tmp_path / "masks").rglob("*.png"))) == 3
    # ... and train-oan refuses those masks before it trains
    assert main(["train-oan", "--dataset", "market1501", "--dataset-dir", str(data),
                 "--mask-dir", str(tmp_path / "masks"), "--out", str(tmp_path / "oan"),
                 "--epochs", "1", *R18, *TINY]) == 2
    assert "100.0 % of the masks are empty" in capsys.readouterr().err
    assert main(["masks", "--dataset-dir", str(data), "--out", str(tmp_path / "m2"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "needs weights" in err and "`orgnn extract --visibility ones`" in err


def test_commands_import_without_torchvision():
    code = ("import sys; sys.modules['torchvision'] = None\n"
            "import orgnn.reid.commands as c, argparse\n"
            "p = argparse.ArgumentParser(); c.register(p.add_subparsers())\n"
            "a = p.parse_args(['train-fen', '--dataset', 'market1501', '--dataset-dir', 'x',"
            " '--out', 'y'])\n"
            "assert a.epochs == 120 and a.lr == 3.5e-4 and a.milestones == [40, 70]\n"
            "assert (a.P, a.K, a.height, a.width) == (8, 4, 384, 128)\n"
            "assert 'torchvision' not in [m for m in sys.modules if sys.modules[m]]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    """DistributedDataParallel through torchrun (gloo on CPU): no flag, no code change.

    Run as documented, ``torchrun --no-python orgnn train-fen ...``, from a folder holding an
    ``orgnn`` folder that is not the package (as the folder above a clone named ``orgnn``
    does): ``-m orgnn.cli`` would import that folder, the installed command does not."""
    orgnn = shutil.which("orgnn")
    if orgnn is None:
        pytest.skip("the `orgnn` command is not installed (pip install -e .)")
    data = make_market(tmp_path / "m", ids=(1, 2, 3, 4), per_id=2)
    (tmp_path / "orgnn").mkdir()  # the trap
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--no-python", orgnn, "train-fen", "--dataset", "market1501", "--dataset-dir",
           str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--P", "2", "--K", "2",
           *R18, *TINY]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": os.pathsep.join(filter(None, [
                                   str(REPO), os.environ.get("PYTHONPATH")]))})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "x2 (DDP)" in proc.stdout and proc.stdout.count("FEN checkpoint ->") == 1
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt", "fen")
    assert ckpt["step"] == 1  # 2 global batches of P x K split over 2 ranks
