"""Bad arguments are refused before any work: exit status 2, ``orgnn: error: ...`` naming
the option (or the files), and every existing output byte-for-byte unchanged."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from orgnn.cli import main
from orgnn.datasets import synthetic_preset
from orgnn.io.features import PartFeatures, save_split_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data, a checkpoint and existing outputs of every kind (checksummed by the tests)."""
    base = tmp_path_factory.mktemp("checks")
    data = base / "data"
    save_split_dir(data, synthetic_preset("tiny", seed=0))
    outs = base / "outs"
    outs.mkdir()
    ckpt = outs / "model.pt"
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--epochs", "1",
                 "--quiet"]) == 0
    assert main(["reconstruct", "--data", str(data), "--checkpoint", str(ckpt), "--out",
                 str(outs / "rec"), "--quiet"]) == 0
    (outs / "ev.json").write_text('{"previous": true}')
    (outs / "fig.png").write_bytes(b"previous figure")
    (outs / "a_folder").mkdir()
    (outs / "a_file").write_text("not a folder")
    (base / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    np.savez(base / "features.npz", features=np.zeros((2, 6, 4), np.float32))
    return {"base": base, "data": data, "outs": outs, "ckpt": ckpt}


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


def _orgnn(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orgnn.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def _cases(s) -> list[tuple[list[str], list[str]]]:
    d, o, ck = str(s["data"]), s["outs"], str(s["ckpt"])
    rec = ["reconstruct", "--data", d, "--checkpoint", ck, "--out", str(o / "rec")]
    train = ["train", "--data", d, "--out", ck]
    ablation = ["ablation", "--data", d, "--json", str(o / "ev.json")]
    show = ["show-ranks", "--data", d, "--out", str(o / "fig.png")]
    return [
        (train + ["--epochs", "-1"], ["--epochs", ">= 0", "-1"]),
        (train + ["--scorer-stages", "0"], ["--scorer-stages"]),
        (ablation + ["--validation-split", "1"], ["--validation-split"]),
        (ablation + ["--train-k", "0"], ["--train-k"]),
        (rec + ["--k", "0"], ["--k"]),
        (ablation + ["--theta", "1.5"], ["--theta", "[-1.0, 1.0]"]),
        (ablation + ["--train-theta", "nan"], ["--train-theta"]),
        (train + ["--recon-weight", "-1"], ["--recon-weight"]),
        (train + ["--seed", "-3"], ["--seed"]),
        (ablation + ["--rows", "baseline,nope"], ["--rows", "nope"]),
        (["plot-cmc", "--data", d, "--max-rank", "0", "--out", str(o / "fig.png")],
         ["--max-rank"]),
        (show + ["--top", "0"], ["--top"]),
        (show + ["--query-index", "-1"], ["--query-index"]),
        (["train", "--data", d, "--out", str(o / "a_folder")], ["--out", "folder"]),
        (["reconstruct", "--data", d, "--checkpoint", ck, "--out", str(o / "a_file")],
         ["--out", "existing file"]),
        (["evaluate", "--data", d, "--json", str(o / "a_folder")], ["--json", "folder"]),
        (["ablation", "--data", str(o / "nowhere"), "--json", str(o / "ev.json")],
         ["--data", "no such folder", "nowhere"]),
        (["reconstruct", "--data", d, "--checkpoint", str(o / "none.pt"), "--out",
          str(o / "rec")], ["--checkpoint", "none.pt"]),
        (["plot-cmc", "--data", d, "--out", str(o / "fig.png"), "--json",
          str(o / "fig.png")], ["--json", "--out", "same file"]),
        (rec + ["--device", "gpu0"], ["--device", "gpu0", "cpu, cuda, cuda:N, mps"]),
        (show + ["--device", "cuda:x"], ["--device", "cuda:x", "accepted forms"]),
        (["reconstruct", "--data", d, "--checkpoint", str(s["base"] / "random.pt"), "--out",
          str(o / "rec")], ["random.pt", "unrecognised binary data, not an orgnn checkpoint",
                            "expected a torch.save file from `orgnn train`"]),
        (["reconstruct", "--data", d, "--checkpoint", str(s["base"] / "features.npz"),
          "--out", str(o / "rec")], ["features.npz", "a NumPy .npz archive, not an orgnn "
                                     "checkpoint (expected a torch.save file"]),
        (["train-fen", "--dataset", "market1501", "--dataset-dir", d, "--out",
          str(o / "fen"), "--epochs", "0"], ["--epochs"]),
        (["masks", "--dataset-dir", d, "--out", str(o / "m"), "--score-thresh", "2"],
         ["--score-thresh"]),
        (["extract", "--dataset", "market1501", "--dataset-dir", d, "--fen", ck, "--out",
          str(o / "p"), "--batch-size", "0"], ["--batch-size"]),
    ]


def test_bad_arguments_refused_before_any_output(setup, capsys):
    """Every case in process (fast), and every fourth as a real ``orgnn`` process."""
    before = _checksums(setup["outs"])
    cases = _cases(setup)
    for args, words in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("orgnn: error:") and "Traceback" not in err, (args, err)
        for word in words:
            assert word in err, (args, word, err)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: _orgnn(case[0]), cases[::4]))
    for (args, words), proc in zip(cases[::4], results):
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("orgnn: error:"), (args, proc.stderr)
        for word in words:
            assert word in proc.stderr, (args, word, proc.stderr)
    assert _checksums(setup["outs"]) == before


def test_data_dependent_refusals_name_option_and_files(setup):
    """Checked right after loading, before search or training: a checkpoint for other
    parts, --recon-weight without clean features, and data where no query can be scored."""
    base, outs = setup["base"], setup["outs"]
    world = synthetic_preset("tiny", seed=0)
    four = base / "four_parts"
    save_split_dir(four, {k: PartFeatures(v.features[:, :4], v.visibility[:, :4], v.pids,
                                          v.camids) for k, v in world.items()})
    no_match = base / "no_match"
    q = world["query"]
    one_camera = PartFeatures(q.features, q.visibility, q.pids, np.zeros_like(q.camids))
    save_split_dir(no_match, {"query": one_camera, "gallery": one_camera})
    before = _checksums(outs)
    proc = _orgnn(["reconstruct", "--data", str(four), "--checkpoint", str(setup["ckpt"]),
                   "--out", str(outs / "rec")])
    assert proc.returncode == 2 and proc.stderr.startswith("orgnn: error:"), proc.stderr
    assert str(setup["ckpt"]) in proc.stderr and f"{four}/query.npz" in proc.stderr
    assert "6 parts x 256-d" in proc.stderr and "4 parts x 256-d" in proc.stderr
    no_clean = base / "no_clean"
    t = world["train"]
    save_split_dir(no_clean, {"train": PartFeatures(t.features, t.visibility, t.pids,
                                                    t.camids)})
    proc = _orgnn(["train", "--data", str(no_clean), "--out", str(setup["ckpt"]),
                   "--recon-weight", "0.5"])
    assert proc.returncode == 2 and "--recon-weight 0.5" in proc.stderr, proc.stderr
    assert "clean_features" in proc.stderr
    # a query's only same-identity gallery images are itself (same camera): none is scored
    assert main(["evaluate", "--data", str(no_match), "--json", str(outs / "ev.json")]) == 2
    assert _checksums(outs) == before


def test_k_larger_than_gallery_is_lowered_with_a_note(setup, tmp_path, capsys):
    gallery_size = len(synthetic_preset("tiny", seed=0)["gallery"])
    assert main(["reconstruct", "--data", str(setup["data"]), "--checkpoint",
                 str(setup["ckpt"]), "--out", str(tmp_path / "rec"), "--k", "5000",
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"--k 5000 is more than the gallery's {gallery_size} images" in err
    assert f"using --k {gallery_size}" in err


def test_figure_commands_without_matplotlib_name_the_extra(setup, tmp_path):
    """matplotlib missing (simulated: ``sys.modules["matplotlib"] = None``): each figure
    command stops before loading data or training, naming the `viz` extra."""
    d = str(setup["data"])
    commands = [["show-ranks", "--data", d, "--out", str(tmp_path / "r.png")],
                ["show-graph", "--data", d, "--out", str(tmp_path / "g.png")],
                ["plot-cmc", "--data", d, "--out", str(tmp_path / "c.png")]]
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from orgnn.cli import main\n"
            f"for args in {commands!r}:\n"
            "    print(main(args))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = [line.split() for line in proc.stdout.split("\n") if line.strip()]
    assert [r[0] for r in results] == ["2", "2", "2"], proc.stdout
    assert "OR-GNN training" not in proc.stderr   # up front: nothing loaded or trained
    errors = [line for line in proc.stderr.splitlines() if line.startswith("orgnn: error:")]
    assert len(errors) == 3 and "Traceback" not in proc.stderr, proc.stderr
    for args, line in zip(commands, errors):
        assert f"`orgnn {args[0]}`" in line and 'pip install "orgnn[viz]"' in line, line
    assert not list(tmp_path.iterdir())
