"""The documentation builds with warnings as errors, as in CI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx", reason="sphinx is not installed (pip install -e '.[docs]')")
pytest.importorskip("furo", reason="the furo theme is not installed (pip install -e '.[docs]')")
pytest.importorskip("myst_parser",
                    reason="myst-parser is not installed (pip install -e '.[docs]')")

REPO = Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path):
    out = tmp_path / "html"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(REPO / "docs"), str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    pages = {p.stem for p in out.glob("*.html")}
    assert {"index", "getting_started", "method", "figures", "results", "choices", "scale",
            "examples", "api", "cli"} <= pages
    api = (out / "api.html").read_text()
    for name in ("orgnn.ORGNNConv", "orgnn.DenseORGNNConv", "orgnn.ORGNN",
                 "orgnn.retrieval.search.search_neighbourhoods", "orgnn.retrieval.metrics.evaluate",
                 "orgnn.datasets.synthetic", "orgnn.reconstruction.pipeline.run_ablation",
                 "orgnn.viz.plot_ranks",
                 "orgnn.io.features.load_part_features_mapped", "orgnn.distributed.setup",
                 "orgnn.reconstruction.training.train_orgnn_once"):
        assert f'id="{name}"' in api, name
    cli = (out / "cli.html").read_text()
    for command in ("show-ranks", "show-graph", "plot-cmc", "demo", "ablation"):
        assert f"orgnn {command}" in cli, command
    for image in ("show_ranks_demo.png", "show_graph_demo.png", "cmc_demo.png"):
        assert (out / "_images" / image).is_file(), image
