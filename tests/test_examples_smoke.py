"""Every example runs end to end with tiny sizes (each is also runnable by hand, full size)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reid_reconstruction_tiny(capsys):
    results = _load("reid_reconstruction").main(["--tiny"])
    assert set(results) == {"baseline", "oan", "avg", "orgnn"}
    for row in results.values():
        assert all(0 <= v <= 100 and math.isfinite(v) for v in row.values())
    out = capsys.readouterr().out
    assert "synthetic world 'tiny'" in out and "orgnn" in out


def test_reid_reconstruction_finds_real_data(monkeypatch, shared_data):
    module = _load("reid_reconstruction")
    monkeypatch.setenv("ORGNN_SHARED_DATA", str(shared_data))
    assert module.find_real_data() == shared_data / "mini-mars-parts" / "occluded"


def test_orgnn_in_pyg_tiny(capsys):
    results = _load("orgnn_in_pyg").main(["--tiny"])
    assert {"GATConv", "ORGNNConv", "ORGNNConv(outlier_aware=False)", "neighbour mean",
            "confidence-weighted mean"} <= set(results)
    assert all(math.isfinite(v) for v in results.values())
    # the confidence does its job with nothing learned: outliers get down-weighted
    assert results["confidence-weighted mean"] < results["neighbour mean"]
    out = capsys.readouterr().out
    conf = out.split("confidence c_j (Eq. 4): inliers ")[1].split()
    assert float(conf[0].rstrip(",")) > float(conf[2])


def test_image_pipeline_tiny(tmp_path, capsys):
    pytest.importorskip("torchvision", reason="the image side needs torchvision")
    pytest.importorskip("PIL", reason="the image side needs pillow")
    from orgnn.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    missing = {"train-oan", "train-fen", "extract"} - set(commands)
    if missing:
        pytest.skip(f"image-side commands not available yet: {sorted(missing)}")
    work = _load("image_pipeline").main(["--tiny", "--work-dir", str(tmp_path)])
    for split in ("train", "query", "gallery"):
        assert (work / "parts" / f"{split}.npz").is_file()
    assert (work / "ablation.json").is_file()
    assert "orgnn" in capsys.readouterr().out
