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


def test_rerank_scale_smoke(tmp_path):
    from benchmarks import rerank_scale

    out = rerank_scale.main(["--quick", "--queries", "80", "--gallery", "400", "--dim", "16",
                             "--subset", "40", "200", "--oan", "--index", "ivf",
                             "--output", str(tmp_path / "r.json")])
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["full"]["stages"].keys() == {"distance", "evaluate", "rerank",
                                                "evaluate_rr"}
    assert payload["subset"]["max_abs_diff_flat_vs_dense"] < 1e-5
    assert 0 < out["full"]["peak_rss_gib"] < 8


def test_gpu_check_smoke(tmp_path):
    """The GPU script's every section on CPU, tiny sizes (one thread: an oversubscribed
    machine makes OpenMP's two-thread regions wait for each other)."""
    import faiss
    import torch

    from benchmarks import gpu_check

    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        gpu_check.main(["--device", "cpu", "--quick", "--threads", "1", "--output",
                        str(tmp_path / "g.json")])
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(faiss_threads)
    payload = json.loads((tmp_path / "g.json").read_text())
    assert set(payload["section_wall_s"]) == {"layer", "pipeline", "fen", "rerank"}
    assert {"gat", "dense"} <= set(payload["layer"]["results"][0]["candidates"])
    assert payload["pipeline"]["results"][0]["preset"] == "occluded_duke"
    assert payload["fen"]["inference_float32"]["images_per_s"] > 0
    assert payload["fen"]["train_float32"]["images_per_s"] > 0
    assert payload["rerank"]["subset"]["max_abs_diff_flat_vs_dense"] < 1e-5


def test_gpu_check_needs_cuda(capsys):
    import torch

    from benchmarks import gpu_check

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--output", "unused.json"])
    assert exc.value.code == 2
    assert "no CUDA device here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu"])  # a CPU run must say --quick
    assert "only with --quick" in capsys.readouterr().err
