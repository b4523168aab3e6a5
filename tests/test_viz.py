"""The figures: each command writes a non-empty PNG of the expected size and content."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")
PIL = pytest.importorskip("PIL.Image")

from orgnn import viz  # noqa: E402
from orgnn.cli import main  # noqa: E402
from orgnn.datasets import band_visibility, synthetic_preset  # noqa: E402
from orgnn.io.features import PartFeatures, save_split_dir  # noqa: E402
from orgnn.reconstruction.training import SearchConfig, TrainConfig  # noqa: E402

FAST = ["--epochs", "1", "--quiet"]


@pytest.fixture(scope="module")
def tiny():
    return synthetic_preset("tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny):
    """The tiny world as part-feature files, with `paths` naming generated JPEGs under
    DIR/../images (the mini-mars-parts layout); gallery image 0 is missing on purpose."""
    root = tmp_path_factory.mktemp("world")
    data, images = root / "parts", root / "images"
    splits = {}
    for name, split in tiny.items():
        paths = np.array([f"{name}/{i:04d}.jpg" for i in range(len(split))])
        splits[name] = PartFeatures(split.features, split.visibility, split.pids,
                                    split.camids, paths)
        (images / name).mkdir(parents=True)
        for i, path in enumerate(paths):
            if name == "gallery" and i == 0:
                continue
            colour = tuple(int(c) for c in (37 * split.pids[i] % 255, 90, 160))
            PIL.new("RGB", (32, 64), colour).save(images / path)
    save_split_dir(data, splits)
    return data


def _png(path):
    assert path.is_file() and path.stat().st_size > 1000
    with PIL.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_fit_occluder_band_inverts_band_visibility():
    for code, side in enumerate(("bottom", "top", "left", "right")):
        vis = band_visibility(code, 0.37)[0]
        fitted = viz.fit_occluder_band(vis)
        assert fitted is not None and fitted[0] == side and abs(fitted[1] - 0.37) < 0.011
    assert viz.fit_occluder_band(np.ones(6)) is None
    assert viz.fit_occluder_band(np.array([0.0, 1, 0, 1, 0.5, 0.5])) is None  # no band


def test_plot_ranks_tiles_and_borders(tmp_path, tiny):
    q, g = tiny["query"], tiny["gallery"]
    dists = viz.row_distances(q, g, ["baseline", "oan"])
    info = viz.plot_ranks(tmp_path / "ranks.png", q, g, dists, [0, 3], top=5)
    assert info["num_queries"] == 2 and info["num_rows"] == 4
    assert info["num_tiles"] == 2 * (1 + 2 * 5)
    assert info["num_image_tiles"] == 0 and info["num_id_tiles"] == info["num_tiles"]
    assert _png(tmp_path / "ranks.png") == tuple(info["size"])
    for r in info["rankings"]:
        qi = r["query"]
        assert len(r["gallery"]) == 5
        assert r["correct"] == [bool(g.pids[j] == q.pids[qi]) for j in r["gallery"]]
        # the protocol's junk (same identity, same camera) never shows
        assert not any(g.pids[j] == q.pids[qi] and g.camids[j] == q.camids[qi]
                       for j in r["gallery"])
        d = dists[r["row"]][qi, r["gallery"]]
        assert np.all(np.diff(d) >= 0)
    with pytest.raises(ValueError, match="out of range"):
        viz.plot_ranks(tmp_path / "x.png", q, g, dists, [len(q)])


def test_show_ranks_command_reads_images(tmp_path, tiny_dir, capsys):
    out = tmp_path / "ranks.png"
    assert main(["show-ranks", "--data", str(tiny_dir), "--query-index", "0", "1", "2",
                 "--top", "4", "--out", str(out), *FAST]) == 0
    width, height = _png(out)
    assert width > 400 and height > 3 * 2 * 80
    text = capsys.readouterr().out
    assert "3 queries x 2 rankings, 27 tiles" in text
    shown = int(text.split("tiles (")[1].split()[0])
    assert 24 <= shown <= 27  # every tile from its image, but the missing gallery image 0


def test_show_ranks_picks_queries_and_falls_back_to_ids(tmp_path, tiny_dir, capsys):
    out = tmp_path / "ranks.png"
    assert main(["show-ranks", "--data", str(tiny_dir), "--rows", "baseline,avg,orgnn",
                 "--images-root", str(tmp_path), "--top", "3", "--out", str(out),
                 *FAST]) == 0
    _png(out)
    text = capsys.readouterr().out
    assert "3 queries x 3 rankings, 30 tiles (0 from images)" in text


def test_plot_graph_panels_and_confidence(tmp_path, tiny):
    q, g = tiny["query"], tiny["gallery"]
    model = viz.prepare_model(tiny["train"], config=TrainConfig(epochs=0))
    search = SearchConfig(k=6, theta=0.0)
    info = viz.plot_graph(tmp_path / "graph.png", q, g, 1, model, search)
    assert _png(tmp_path / "graph.png") == tuple(info["size"])
    assert info["num_panels"] == 6
    n = info["num_nodes"]
    assert n == 1 + info["num_neighbours"] and 1 <= info["num_neighbours"] <= 6
    conf = np.asarray(info["confidence"])
    assert conf.shape == (6, n) and np.all((conf >= 0) & (conf <= 1 + 1e-5))
    wrong = sum(g.pids[j] != q.pids[1] for j in info["neighbours"])
    assert info["num_wrong"] == wrong
    # the untrained identity-initialised layer weighs messages by confidence alone
    att = np.asarray(info["edge_weights"])
    if n > 2:
        expected = conf[:, 1:] / conf[:, 1:].sum(1, keepdims=True)
        assert np.allclose(att[:, 0, 1:], expected, atol=1e-5)


def test_plot_graph_without_neighbours(tmp_path, tiny):
    q, g = tiny["query"], tiny["gallery"]
    model = viz.prepare_model(tiny["train"], config=TrainConfig(epochs=0))
    info = viz.plot_graph(tmp_path / "g.png", q, g, 0, model, SearchConfig(theta=1.0))
    _png(tmp_path / "g.png")
    assert info["num_nodes"] == 1 and info["num_neighbours"] == 0 and info["num_panels"] == 6


def test_show_graph_command(tmp_path, tiny_dir, capsys):
    out = tmp_path / "graph.png"
    assert main(["show-graph", "--data", str(tiny_dir), "--query-index", "2",
                 "--edge-weight", "affinity", "--theta", "0", "--k", "5", "--out", str(out),
                 *FAST]) == 0
    width, height = _png(out)
    assert width > 800 and height > 500
    assert "query 2, 5 neighbours" in capsys.readouterr().out


def test_plot_cmc_and_json_round_trip(tmp_path, capsys):
    out, saved = tmp_path / "cmc.png", tmp_path / "cmc.json"
    assert main(["plot-cmc", "--synthetic", "tiny", "--rows", "baseline,oan,orgnn",
                 "--max-rank", "10", "--out", str(out), "--json", str(saved), *FAST]) == 0
    _png(out)
    payload = json.loads(saved.read_text())
    assert list(payload["rows"]) == ["baseline", "oan", "orgnn"]
    for row in payload["rows"].values():
        cmc = np.asarray(row["cmc"])
        assert cmc.shape == (10,) and np.all(np.diff(cmc) >= 0)
        assert cmc[0] == pytest.approx(row["rank1"], abs=0.01)
    again = tmp_path / "again.png"
    assert main(["plot-cmc", "--from-json", str(saved), "--out", str(again)]) == 0
    assert "3 curves" in capsys.readouterr().out
    info = viz.plot_cmc(tmp_path / "direct.png", payload["rows"])
    assert info["num_curves"] == 3 and info["max_rank"] == 10
    assert _png(tmp_path / "direct.png") == tuple(info["size"])


def test_user_errors(tmp_path, tiny_dir, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["plot-cmc", "--from-json", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert main(["show-ranks", "--data", str(tiny_dir), "--rows", "nope",
                 "--out", str(tmp_path / "x.png"), *FAST]) == 2
    assert main(["show-graph", "--data", str(tiny_dir), "--query-index", "9999",
                 "--out", str(tmp_path / "x.png"), "--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert "not a CMC file" in err and "unknown rows" in err and "out of range" in err
    assert not (tmp_path / "x.png").exists()


def test_real_mini_mars_ranks(tmp_path, shared_data, capsys):
    data = shared_data / "mini-mars-parts" / "occluded"
    out = tmp_path / "mars.png"
    assert main(["show-ranks", "--data", str(data), "--query-index", "7", "--top", "5",
                 "--out", str(out), "--epochs", "0", "--quiet"]) == 0
    _png(out)
    assert "11 tiles (11 from images)" in capsys.readouterr().out


def test_edge_widths_span_a_few_points_and_tell_weights_apart():
    weights = np.array([[0.0294, 0.0334, 0.034], [0.031, 0.0335, 0.0339]])
    width = viz._edge_widths(weights)
    assert width(weights.max()) == pytest.approx(viz.MAX_EDGE_WIDTH)
    assert viz.MAX_EDGE_WIDTH <= 5                         # a few points, not a grey disc
    assert width(weights.min()) == pytest.approx(viz.MIN_EDGE_WIDTH)
    w = width(np.sort(weights.ravel()))
    assert np.all(np.diff(w) > 0)                          # larger weight, thicker line
    assert width(0.0334) - width(0.0294) > 2.0             # near-uniform weights still apart
    same = viz._edge_widths(np.full((2, 3), 0.25))
    assert same(0.25) == pytest.approx((viz.MIN_EDGE_WIDTH + viz.MAX_EDGE_WIDTH) / 2)


def test_graph_draws_read_out_edges_only_and_tiles_keep_aspect(tmp_path, tiny, monkeypatch):
    """show-graph: one line per neighbour and part (not n(n-1)/2), none wider than the
    maximum; every image tile (also the tall query one) drawn at the crop's 1:2."""
    figures = []
    save = viz._save
    monkeypatch.setattr(viz, "_save", lambda fig, out, dpi: (figures.append(fig),
                                                             save(fig, out, dpi))[1])
    q, g = tiny["query"], tiny["gallery"]
    model = viz.prepare_model(tiny["train"], config=TrainConfig(epochs=0))
    info = viz.plot_graph(tmp_path / "graph.png", q, g, 1, model, SearchConfig(k=6, theta=0.0))
    dists = viz.row_distances(q, g, ["baseline", "oan"])
    viz.plot_ranks(tmp_path / "ranks.png", q, g, dists, [0, 3], top=5)
    graph, ranks = figures
    panels = [ax for ax in graph.axes if ax.get_title().split("\n")[0] in viz.PART_NAMES]
    assert len(panels) == 6
    for ax in panels:
        assert len(ax.lines) == info["num_neighbours"]
        assert max(line.get_linewidth() for line in ax.lines) <= viz.MAX_EDGE_WIDTH + 1e-6
    for fig in (graph, ranks):
        fig.canvas.draw()
        tiles = [ax for ax in fig.axes if ax.get_ylim() == (2.0, 0.0)]
        assert tiles
        for ax in tiles:
            box = ax.get_window_extent()
            assert box.height / box.width == pytest.approx(2.0, rel=0.03)


def test_show_ranks_says_when_no_image_was_found(tmp_path, tiny_dir, capsys):
    out = tmp_path / "ranks.png"
    assert main(["show-ranks", "--data", str(tiny_dir), "--rows", "baseline",
                 "--images-root", str(tmp_path), "--top", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"no image was found under {tmp_path}" in err and "--images-root" in err
    assert main(["show-ranks", "--data", str(tiny_dir), "--rows", "baseline", "--top", "2",
                 "--out", str(out)]) == 0
    assert "no image" not in capsys.readouterr().err         # DIR/../images has them
