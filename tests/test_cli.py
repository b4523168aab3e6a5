"""The `orgnn` command line, end to end on small data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orgnn.cli import main
from orgnn.datasets import synthetic_preset
from orgnn.io.features import load_part_features, save_split_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_split_dir(path, synthetic_preset("tiny", seed=0))
    return path


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "orgnn.cli", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0
    for command in ("demo", "ablation", "train", "reconstruct", "evaluate"):
        assert command in out.stdout


def test_demo_runs_every_row(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--preset", "tiny", "--epochs", "1", "--quiet", "--json",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "synthetic world 'tiny'" in printed and "upper_bound" in printed
    payload = json.loads(out.read_text())
    assert set(payload["orgnn"]) == {"mAP", "rank1", "rank5", "rank10", "mINP"}


def test_ablation_train_reconstruct_evaluate(data_dir, tmp_path, capsys):
    out = tmp_path / "ab.json"
    assert main(["ablation", "--data", str(data_dir), "--epochs", "1", "--quiet",
                 "--rows", "baseline,oan,orgnn", "--json", str(out)]) == 0
    assert list(json.loads(out.read_text()))[:3] == ["baseline", "oan", "orgnn"]
    ckpt = tmp_path / "m.pt"
    assert main(["train", "--data", str(data_dir), "--out", str(ckpt), "--epochs", "1"]) == 0
    rec = tmp_path / "rec"
    assert main(["reconstruct", "--data", str(data_dir), "--checkpoint", str(ckpt),
                 "--out", str(rec)]) == 0
    query = load_part_features(rec / "query.npz")
    assert query.features.shape[0] == len(synthetic_preset("tiny")["query"])
    assert np.all(query.visibility == 1)
    capsys.readouterr()
    assert main(["evaluate", "--data", str(rec), "--json", str(tmp_path / "ev.json")]) == 0
    assert "mAP" in capsys.readouterr().out


def test_training_options_reach_the_checkpoint(data_dir, tmp_path):
    from orgnn.reconstruction.training import load_checkpoint

    ckpt = tmp_path / "random-head.pt"
    assert main(["train", "--data", str(data_dir), "--out", str(ckpt), "--epochs", "1",
                 "--classifier-init", "random", "--target-init", "mean", "--quiet"]) == 0
    model, config = load_checkpoint(ckpt)
    assert (config.classifier_init, config.target_init) == ("random", "mean")
    assert model.classifier.abs().max() < 1e-2                 # not imprinted
    default = tmp_path / "default.pt"
    assert main(["train", "--data", str(data_dir), "--out", str(default), "--epochs", "1",
                 "--quiet"]) == 0
    assert load_checkpoint(default)[1].classifier_init == "imprint"


def test_bad_inputs_give_clear_errors_and_keep_outputs(data_dir, tmp_path, capsys):
    out = tmp_path / "keep.json"
    out.write_text("{\"previous\": true}")
    assert main(["ablation", "--data", str(tmp_path / "nowhere"), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orgnn: error:") and "nowhere" in err
    assert json.loads(out.read_text()) == {"previous": True}
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("train", "query", "gallery"):
        (broken / f"{name}.npz").write_bytes((data_dir / f"{name}.npz").read_bytes())
    (broken / "query.npz").write_bytes(b"PK\x03\x04 truncated")
    assert main(["ablation", "--data", str(broken), "--json", str(out)]) == 2
    assert "query.npz" in capsys.readouterr().err
    assert json.loads(out.read_text()) == {"previous": True}
    assert main(["reconstruct", "--data", str(data_dir), "--checkpoint",
                 str(tmp_path / "none.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "none.pt: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_reconstruct_from_memory_maps_writes_the_same_files(data_dir, tmp_path, monkeypatch):
    """``--map always`` reads both inputs as memory maps and writes the reconstructions
    through mapped scratch files (the path of galleries too large to hold), and must write
    exactly what reading them gives; the gallery's index is built once for the query and
    gallery searches."""
    import orgnn.io.features
    import orgnn.io.storage
    import orgnn.retrieval.search

    ckpt = tmp_path / "m.pt"
    assert main(["train", "--data", str(data_dir), "--out", str(ckpt), "--quiet"]) == 0
    mapped_loads, builds, streamed = [], [], []
    real_load = orgnn.io.features.load_part_features_mapped
    real_build = orgnn.retrieval.search._faiss_index
    real_open = orgnn.io.storage.open_npy
    monkeypatch.setattr(orgnn.io.features, "load_part_features_mapped",
                        lambda path: mapped_loads.append(path) or real_load(path))
    monkeypatch.setattr(orgnn.io.storage, "open_npy",
                        lambda path, *a: streamed.append(Path(path).name) or real_open(path, *a))
    monkeypatch.setattr(orgnn.retrieval.search, "_faiss_index",
                        lambda *a: builds.append(a[1]) or real_build(*a))
    outs = {}
    for how in ("never", "always"):
        outs[how] = tmp_path / how
        assert main(["reconstruct", "--data", str(data_dir), "--checkpoint", str(ckpt),
                     "--out", str(outs[how]), "--map", how, "--quiet"]) == 0
    assert sorted(p.name for p in mapped_loads) == ["gallery.npz", "query.npz"]
    # mapped inputs are reconstructed into mapped scratch files, removed afterwards
    assert streamed == ["query.npy", "gallery.npy"]
    assert not [p for p in tmp_path.iterdir() if "scratch" in p.name]
    assert builds == [None, None]  # one visible-mean index per run, not one per search
    for name in ("query.npz", "gallery.npz"):
        assert (outs["never"] / name).read_bytes() == (outs["always"] / name).read_bytes()


def test_reconstruct_keeps_float16_features_float16(data_dir, tmp_path):
    from orgnn.io.features import PartFeatures, load_split_dir

    half = tmp_path / "half"
    splits = load_split_dir(data_dir)
    save_split_dir(half, {name: PartFeatures(pf.features.astype(np.float16), pf.visibility,
                                             pf.pids, pf.camids, pf.paths)
                          for name, pf in splits.items()})
    ckpt = tmp_path / "m.pt"
    assert main(["train", "--data", str(half), "--out", str(ckpt), "--quiet"]) == 0
    assert main(["reconstruct", "--data", str(half), "--checkpoint", str(ckpt), "--out",
                 str(tmp_path / "rec"), "--quiet"]) == 0
    for name in ("query", "gallery"):
        rec = load_part_features(tmp_path / "rec" / f"{name}.npz")
        assert rec.features.dtype == np.float16 and np.isfinite(rec.features).all()
        assert rec.features.shape[0] == len(splits[name])


def test_evaluate_visible_global_and_aqe_equal_the_ablations_peer_rows(data_dir, tmp_path,
                                                                       capsys):
    from orgnn.reconstruction.pipeline import run_ablation

    rows = run_ablation(synthetic_preset("tiny", seed=0),
                        rows=("vis_global", "vis_global_rr", "aqe", "aqe_rr"),
                        progress=False).rows
    for flags, row in ((["--distance", "visible-global"], "vis_global"),
                       (["--distance", "visible-global", "--rerank"], "vis_global_rr"),
                       (["--distance", "visible-global", "--aqe"], "aqe"),
                       (["--distance", "visible-global", "--aqe", "--rerank"], "aqe_rr")):
        out = tmp_path / f"{row}.json"
        assert main(["evaluate", "--data", str(data_dir), *flags, "--json", str(out)]) == 0
        got = json.loads(out.read_text())
        assert (got["mAP"], got["rank1"]) == (rows[row]["mAP"], rows[row]["rank1"]), row
    capsys.readouterr()
    assert main(["evaluate", "--data", str(data_dir), "--aqe"]) == 2
    assert "--aqe expands the visible-part global feature" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(data_dir), "--oan", "--distance",
                 "visible-global"]) == 2
