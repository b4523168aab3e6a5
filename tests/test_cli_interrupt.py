"""Interrupting a real ``orgnn`` process while it writes leaves a complete output set.

Each run is started as a subprocess, interrupted with SIGINT at one of many points of its
write phase (``ORGNN_TEST_WRITE_PAUSE`` makes each step of that phase last a moment, so
the points land between the files of the set, inside the swap and after it), and then the
outputs are checked: the old set or the new set, never a mixture; an exit status of 0 or
130 only, with no traceback; and a last line that tells the truth about what was written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from orgnn.cli import main
from orgnn.datasets import synthetic_preset
from orgnn.io.features import load_part_features, save_split_dir

PAUSE = 0.25  # seconds per write step in the interrupted runs
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "ORGNN_TEST_WRITE_PAUSE": str(PAUSE),
            "OMP_NUM_THREADS": "1"}


def _interrupt(cmd: list[str], marker: str, delay: float) -> tuple[int, str, str]:
    """Run ``cmd``, wait for ``marker`` on its stdout, sleep ``delay``, send SIGINT."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + out, err


def _arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    return (load_part_features(folder / "query.npz").features,
            load_part_features(folder / "gallery.npz").features)


def _which(folder: Path, old, new) -> str:
    q, g = _arrays(folder)
    for name, (rq, rg) in (("old", old), ("new", new)):
        if np.array_equal(q, rq) and np.array_equal(g, rg):
            return name
    return "mixed"


def _no_crash(code: int, err: str) -> None:
    assert code in (0, 130), (code, err[-2000:])
    for bad in ("Traceback", "Exception ignored", "Fatal Python error"):
        assert bad not in err, err[-2000:]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("interrupt")
    data = base / "data"
    save_split_dir(data, synthetic_preset("tiny", seed=0))
    ckpt = base / "m.pt"
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--epochs", "1",
                 "--quiet"]) == 0
    sets = {}
    for name, k in (("old", "3"), ("new", "6")):
        assert main(["reconstruct", "--data", str(data), "--checkpoint", str(ckpt),
                     "--out", str(base / name), "--k", k, "--quiet"]) == 0
        sets[name] = _arrays(base / name)
    assert not np.array_equal(sets["old"][0], sets["new"][0])
    return {"base": base, "data": data, "ckpt": ckpt, **sets}


def test_reconstruct_interrupted_anywhere_leaves_old_or_new_set(world):
    base = world["base"]
    out = base / "out"
    cmd = [sys.executable, "-m", "orgnn.cli", "reconstruct", "--data", str(world["data"]),
           "--checkpoint", str(world["ckpt"]), "--out", str(out), "--k", "6", "--quiet"]
    # Write phase after the marker: query.npz, PAUSE, gallery.npz, PAUSE ("built"), the
    # swap (signals held), PAUSE, then the final lines and the exit.
    delays = np.linspace(0.02, 1.0, 8) * 4 * PAUSE  # spread evenly over the write phase
    seen = []
    for delay in delays:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(base / "old", out)
        code, stdout, err = _interrupt(cmd, "gallery:", float(delay))
        _no_crash(code, err)
        state = _which(out, world["old"], world["new"])
        assert state in ("old", "new"), (delay, code, err)
        if code == 0:
            assert state == "new" and "wrote" in stdout
        elif "no output was written or changed" in err:
            assert state == "old", err
        else:
            assert f"each complete: {out}" in err and state == "new", err
        leftovers = [p.name for p in base.iterdir() if p.name.startswith(".out.")]
        assert not leftovers, leftovers
        seen.append((state, code))
    # the delays reached both sides of the swap while the process was still running
    assert ("old", 130) in seen and ("new", 130) in seen, seen


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_plot_cmc_figure_and_json_change_together(tmp_path):
    png, js = tmp_path / "cmc.png", tmp_path / "cmc.json"
    png.write_bytes(b"old figure")
    js.write_text(json.dumps({"old": True}))
    old = (_sha(png), _sha(js))
    cmd = [sys.executable, "-m", "orgnn.cli", "plot-cmc", "--synthetic", "tiny", "--rows",
           "baseline,oan", "--epochs", "0", "--max-rank", "5", "--quiet", "--out", str(png),
           "--json", str(js)]
    # after the marker (the figure is drawn): JSON staged, PAUSE, rename PNG, PAUSE (held),
    # rename JSON, PAUSE (held), the final lines
    seen = []
    for delay in (0.5 * PAUSE, 1.5 * PAUSE, 2.5 * PAUSE, 5 * PAUSE):
        png.write_bytes(b"old figure")
        js.write_text(json.dumps({"old": True}))
        code, stdout, err = _interrupt(cmd, "writing", delay)
        _no_crash(code, err)
        if (_sha(png), _sha(js)) == old:
            state = "old"
            assert code == 130 and "no output was written or changed" in err, err
        else:
            state = "new"
            payload = json.loads(js.read_text())
            assert payload["figure"]["sha256"] == _sha(png)
            assert code == 0 or f"each complete: {png}, {js}" in err, err
        assert not [p.name for p in tmp_path.iterdir() if ".orgnn-new-" in p.name]
        seen.append(state)
    assert "old" in seen and "new" in seen, seen
