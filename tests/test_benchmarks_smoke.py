"""The benchmark scripts run end to end on tiny sizes, so they cannot rot (no timing asserts)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

pytest.importorskip("matplotlib")


def test_layer_smoke(tmp_path):
    from benchmarks import layer

    out = layer.main(["--configs", "8:5:16", "--repeats", "1", "--no-compile",
                      "--output", str(tmp_path / "layer.json"),
                      "--plot", str(tmp_path / "layer.png")])
    payload = json.loads((tmp_path / "layer.json").read_text())
    assert (tmp_path / "layer.png").stat().st_size > 0
    cands = payload["results"][0]["candidates"]
    assert set(cands) == {"dense", "dense_adj", "naive", "sparse", "gat", "graphconv", "matmul"}
    assert all(c["forward_s"] > 0 for c in cands.values())
    assert "peak" in payload["results"][0]["memory"]
    assert {t["target"] for t in out["targets"]} >= {"dense forward speed-up over GATConv"}
    assert payload["machine"]["torch"]


def test_pipeline_smoke(tmp_path):
    from benchmarks import pipeline

    world = ["num_train_ids=4", "num_train=40", "num_test_ids=30", "num_query_ids=15",
             "num_query=30", "num_gallery=150", "dim=32"]
    pipeline.main(["--quick", "--presets", "occluded_duke", "--loop-timeout", "60",
                   "--world", *world, "--output", str(tmp_path / "pipe.json"),
                   "--plot", str(tmp_path / "p.png")])
    payload = json.loads((tmp_path / "pipe.json").read_text())
    r = payload["results"][0]
    assert set(r["stage_s"]) == {"search", "graphs", "reconstruct", "evaluate"}
    assert r["rerank"]["loop"]["full_size"]
    assert r["rerank"]["loop"]["max_abs_diff"] < 1e-4
    assert (tmp_path / "p.png").stat().st_size > 0


def test_scaling_smoke(tmp_path):
    from benchmarks import scaling

    scaling.main(["--sizes", "300", "1000", "--queries", "40", "--output",
                  str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png"), "--workdir",
                  str(tmp_path / "work"), "--pq-m", "16", "--nprobes", "4"])
    payload = json.loads((tmp_path / "s.json").read_text())
    rows = payload["rows"]
    assert [r["gallery"] for r in rows] == [300, 1000]
    assert all(0.0 <= r["ivf_recall"] <= 1.0 and 0.0 <= r["ivfpq_recall"] <= 1.0
               for r in rows)
    assert rows[0]["flat_recall"] == 1.0
    assert (tmp_path / "s.png").stat().st_size > 0
