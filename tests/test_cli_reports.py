"""What the command line says: queries scored, warnings, help, a quiet start, file modes,
one rounding path; and the atomic-output module's folder swap and recovery."""
from __future__ import annotations

import argparse
import json
import os
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from orgnn.cli import build_parser, main, quiet_third_party_warnings
from orgnn.cli.commands import DEFAULT_EPOCHS, ROWS
from orgnn.datasets import synthetic_preset
from orgnn.io import atomic as io_atomic
from orgnn.io.features import PartFeatures, save_split_dir
from orgnn.retrieval import metrics

REPO = Path(__file__).resolve().parents[1]
PROGRESS_COMMANDS = ("demo", "ablation", "train", "reconstruct", "show-ranks", "show-graph",
                     "plot-cmc", "masks", "train-fen", "train-oan", "extract")


def _orgnn(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orgnn.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("reports")
    save_split_dir(path, synthetic_preset("tiny", seed=0))
    return path


def _subsets(world: dict, **index) -> dict:
    return {k: (v.subset(index[k]) if k in index else v) for k, v in world.items()}


# --------------------------------------------------------------------------------------
def test_scored_queries_in_text_and_json(tiny, tmp_path):
    world = synthetic_preset("tiny", seed=0)
    q, g = world["query"], world["gallery"]
    # a gallery of a few images: most queries have no true match
    small = tmp_path / "small"
    save_split_dir(small, _subsets(world, gallery=np.arange(0, len(g), 12)))
    out = tmp_path / "ev.json"
    proc = _orgnn("evaluate", "--data", str(small), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    valid = metrics.valid_queries(q.pids, g.pids[::12], q.camids, g.camids[::12])
    scored = int(valid.sum())
    assert 0 < 2 * scored < len(q)
    assert f"queries scored: {scored} of {len(q)} ({len(q) - scored} skipped" in proc.stdout
    assert f"only {scored} of {len(q)} queries have a true match" in proc.stderr
    assert "FutureWarning" not in proc.stderr
    payload = json.loads(out.read_text())
    assert payload["queries"] == {"total": len(q), "scored": scored,
                                  "skipped": len(q) - scored}
    # the same count as metrics.evaluate's own, on any distances
    gs = g.subset(np.arange(0, len(g), 12))
    res = metrics.evaluate(np.random.default_rng(0).random((len(q), len(gs))), q.pids,
                           gs.pids, q.camids, gs.camids)
    assert res["num_valid_queries"] == scored


def test_ablation_reports_queries(tiny, tmp_path, capsys):
    out = tmp_path / "ab.json"
    assert main(["ablation", "--data", str(tiny), "--rows", "baseline,oan", "--epochs", "1",
                 "--quiet", "--json", str(out)]) == 0
    world = synthetic_preset("tiny", seed=0)
    q, g = world["query"], world["gallery"]
    scored = int(metrics.valid_queries(q.pids, g.pids, q.camids, g.camids).sum())
    assert f"queries scored: {scored} of {len(q)}" in capsys.readouterr().out
    assert json.loads(out.read_text())["queries"]["scored"] == scored


def test_real_proxy_query_count(shared_data, tmp_path):
    data = shared_data / "mini-mars-parts" / "occluded"
    proc = _orgnn("evaluate", "--data", str(data), "--json", str(tmp_path / "ev.json"))
    assert proc.returncode == 0, proc.stderr
    assert "queries scored: 651 of 898 (247 skipped" in proc.stdout
    assert "rank10 64.7" in proc.stdout
    assert json.loads((tmp_path / "ev.json").read_text())["queries"]["scored"] == 651


def test_visibility_warnings(tmp_path, capsys):
    world = synthetic_preset("tiny", seed=0)
    q = world["query"]
    blind = tmp_path / "blind"
    save_split_dir(blind, {**world, "query": PartFeatures(q.features, np.zeros_like(
        q.visibility), q.pids, q.camids)})
    assert main(["evaluate", "--data", str(blind), "--oan"]) == 0
    err = capsys.readouterr().err
    assert "query.npz: no part of any image is visible" in err
    # most queries blind, a few not: --oan falls back to all parts for most of them
    vis = np.zeros_like(q.visibility)
    vis[: len(q) // 4] = q.visibility[: len(q) // 4]
    mostly = tmp_path / "mostly"
    save_split_dir(mostly, {**world, "query": PartFeatures(q.features, vis, q.pids,
                                                           q.camids)})
    assert main(["evaluate", "--data", str(mostly), "--oan"]) == 0
    blind_count = int((~(vis >= 0.5).any(1)).sum())
    assert f"{blind_count} of {len(q)} queries have no visible part" in \
        capsys.readouterr().err
    assert main(["evaluate", "--data", str(mostly)]) == 0  # without --oan: no warning
    assert "warning" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------
def test_quiet_start_no_future_warning():
    proc = _orgnn("--help")
    assert proc.returncode == 0 and "COMMAND" in proc.stdout
    assert proc.stderr == ""
    # the filter is narrow: the same message from another module, or another
    # FutureWarning from torch.jit._script, still shows
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party_warnings()
        message = "`torch.jit.script` is deprecated. Please switch to `torch.compile`."
        warnings.warn_explicit(message, FutureWarning, "_script.py", 1,
                               module="torch.jit._script")
        warnings.warn_explicit(message, FutureWarning, "mine.py", 1, module="mine")
        warnings.warn_explicit("something else", FutureWarning, "_script.py", 1,
                               module="torch.jit._script")
    assert [str(w.message) for w in caught] == [message, "something else"]


def test_every_option_has_help_and_every_command_a_description():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(PROGRESS_COMMANDS) <= set(sub.choices)
    for name, command in sub.choices.items():
        assert command.description, f"{name} has no description"
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
        options = {s for a in command._actions for s in a.option_strings}
        if name in PROGRESS_COMMANDS:
            assert "--quiet" in options, name
        assert "%%" not in command.format_help(), name
    train_help = sub.choices["train"].format_help()
    assert f"default {DEFAULT_EPOCHS}" in train_help
    for doc in ("docs/figures.md", "docs/getting_started.md"):
        for default in re.findall(r"`--epochs`, default (\d+)", (REPO / doc).read_text()):
            assert int(default) == DEFAULT_EPOCHS, doc


def test_rows_copy_matches_the_pipeline():
    from orgnn.reconstruction.pipeline import ABLATION_ROWS

    assert ROWS == ABLATION_ROWS


def test_one_rounding_path_for_printed_figures(tiny, tmp_path, capsys):
    assert main(["plot-cmc", "--data", str(tiny), "--rows", "baseline", "--epochs", "0",
                 "--quiet", "--out", str(tmp_path / "c.png"), "--json",
                 str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    row = json.loads((tmp_path / "c.json").read_text())["rows"]["baseline"]
    assert row["cmc"][0] == row["rank1"]
    assert main(["evaluate", "--data", str(tiny)]) == 0
    evaluated = capsys.readouterr().out
    rank1 = re.search(r"rank1 (\d+\.\d)", evaluated).group(1)
    assert re.search(r"baseline\s+rank1\s+(\d+\.\d)", printed).group(1) == rank1
    assert f"{row['rank1']:.1f}" == rank1


# --------------------------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_file_modes_follow_the_umask(tiny, tmp_path):
    ckpt, rec, js = tmp_path / "m.pt", tmp_path / "rec", tmp_path / "ev.json"
    old = os.umask(0o027)
    try:
        assert main(["train", "--data", str(tiny), "--out", str(ckpt), "--epochs", "1",
                     "--quiet"]) == 0
        assert main(["reconstruct", "--data", str(tiny), "--checkpoint", str(ckpt),
                     "--out", str(rec), "--quiet"]) == 0
    finally:
        os.umask(old)
    proc = _orgnn("evaluate", "--data", str(rec), "--json", str(js),
                  preexec_fn=lambda: os.umask(0o007))
    assert proc.returncode == 0, proc.stderr
    assert _mode(ckpt) == 0o640 and _mode(rec / "query.npz") == 0o640
    assert _mode(rec) == 0o750
    assert _mode(js) == 0o660


def test_folder_swap_fallback_keeps_other_files_and_recovers(tmp_path, monkeypatch):
    out = tmp_path / "set"
    out.mkdir()
    (out / "a.txt").write_text("old a")
    (out / "keep.txt").write_text("kept")

    def build(folder: Path) -> None:
        (folder / "a.txt").write_text("new a")
        (folder / "b.txt").write_text("new b")

    monkeypatch.setattr(io_atomic, "_exchange", lambda a, b: False)  # two-rename path
    io_atomic.replace_dir(out, build)
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "a.txt": "new a", "b.txt": "new b", "keep.txt": "kept"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    # a process killed between the two renames left the old set aside: it comes back
    backup = tmp_path / ".set.orgnn-old"
    out.rename(backup)
    dead = tmp_path / ".set.orgnn-new-999999999-abcd1234"
    dead.mkdir()
    io_atomic.recover_dir(out)
    assert (out / "a.txt").read_text() == "new a" and not backup.exists()
    assert not dead.exists()
    # a failing build leaves the folder as it was and no temporary folder behind
    with pytest.raises(RuntimeError):
        io_atomic.replace_dir(out, lambda folder: (_ for _ in ()).throw(RuntimeError("x")))
    assert (out / "a.txt").read_text() == "new a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_folder_swap_exchange(tmp_path):
    out = tmp_path / "set"
    io_atomic.replace_dir(out, lambda f: (f / "x").write_text("1"))
    io_atomic.replace_dir(out, lambda f: (f / "x").write_text("2"))
    assert (out / "x").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    assert str(out) in io_atomic.committed
