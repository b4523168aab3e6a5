"""A bad image-side set-up is refused before training, in one line; doubtful masks are named.

Missing, foreign and partial mask folders; empty masks (refused, or trained on with
``--allow-bad-masks`` and a warning); a corrupt image read in a DataLoader worker; the file
modes of checkpoints and mask PNGs.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from orgnn.cli import main
from orgnn.reid import BadImageError, ImageSet, Market1501, collate
from orgnn.reid.io import atomic_torch_save
from orgnn.reid.mask_checks import MaskStats, check_mask_folder, mask_statistics

from .conftest import make_market, person_mask, save

TINY = ["--height", "64", "--width", "32", "--workers", "0", "--device", "cpu",
        "--no-progress", "--arch", "resnet18"]


def _train_oan(data: Path, masks: Path, out: Path, *extra: str) -> list[str]:
    return ["train-oan", "--dataset", "market1501", "--dataset-dir", str(data), "--mask-dir",
            str(masks), "--out", str(out), "--epochs", "1", "--batch-size", "4", *TINY, *extra]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("orgnn: error: "), err
    return lines[0]


@pytest.fixture
def market(tmp_path) -> tuple[Path, Path]:
    """2 identities x 2 images per split, with a full set of masks."""
    return make_market(tmp_path / "m", ids=(1, 2), per_id=2, masks=tmp_path / "masks"), \
        tmp_path / "masks"


def test_missing_and_foreign_mask_folder(market, tmp_path, capsys):
    data, _ = market
    out = tmp_path / "oan"
    # the command line (--workers 2): refused before any worker or model starts
    assert main(_train_oan(data, tmp_path / "nonexistent", out, "--workers", "2")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"mask folder {tmp_path / 'nonexistent'} not found" in line
    assert "orgnn masks --dataset-dir" in line
    (tmp_path / "foreign").mkdir()
    save(tmp_path / "foreign" / "other.png", person_mask())
    assert main(_train_oan(data, tmp_path / "foreign", out)) == 2
    captured = capsys.readouterr()
    assert "holds none of the masks of the 4 training images" in _one_error_line(captured.err)
    assert "OAN:" not in captured.out and not out.exists()  # nothing started, nothing written


def test_partial_mask_folder(market, tmp_path, capsys):
    data, masks = market
    gone = sorted((masks / "bounding_box_train").iterdir())[:3]
    for path in gone:
        path.unlink()
    out = tmp_path / "oan"
    assert main(_train_oan(data, masks, out)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "lacks the masks of 3 of the 4 training images" in line
    assert f"(first: {gone[0]})" in line and "--on-bad-image skip" in line
    assert not out.exists()
    # FEN with --mask-dir checks the same way (extract: test_extract_checks_every_split_first)
    fen = ["train-fen", "--dataset", "market1501", "--dataset-dir", str(data), "--mask-dir",
           str(masks), "--out", str(out), "--P", "2", "--K", "2", *TINY]
    assert main(fen) == 2
    assert "lacks the masks of 3 of the 4" in _one_error_line(capsys.readouterr().err)
    # skip: the missing ones are returned (the loader leaves them out, reporting each)
    records = Market1501(data).train
    missing = check_mask_folder(records, data, masks, on_missing="skip")
    assert missing == gone


def test_extract_checks_every_split_first(market, tmp_path, capsys):
    data, masks = market
    (masks / "bounding_box_test" / sorted(os.listdir(masks / "bounding_box_test"))[0]).unlink()
    args = ["extract", "--dataset", "market1501", "--dataset-dir", str(data), "--fen",
            str(tmp_path / "fen.pt"), "--oan", str(tmp_path / "oan.pt"), "--mask-dir",
            str(masks), "--out", str(tmp_path / "p"), *TINY[:-2]]
    assert main(args) == 2  # refused before the (absent) checkpoints are even opened
    line = _one_error_line(capsys.readouterr().err)
    assert "lacks the masks of 1 of the 4 gallery images" in line
    assert not (tmp_path / "p").exists()


def test_mask_statistics_hand_counted(tmp_path):
    """8 masks: 2 empty, 2 upper body only, 4 whole persons (64 x 32)."""
    data, masks = tmp_path / "d", tmp_path / "masks"
    records = []
    upper = person_mask()
    upper[32:] = 0  # rows 4..31 of 64: stripes 2, 3 empty; halves covered in 28/64 < 0.5 rows
    for i, mask in enumerate([np.zeros((64, 32), np.uint8)] * 2 + [upper] * 2
                             + [person_mask()] * 4):
        image = save(data / f"{i}.png", np.zeros((64, 32, 3), np.uint8))
        save(masks / f"{i}.png", mask)
        records.append((str(image), i, 0))
    stats = mask_statistics(records, data, masks, height=64, width=32)
    assert stats.checked == 8 and stats.unreadable == 0
    assert stats.empty == pytest.approx(2 / 8)
    torch.testing.assert_close(stats.visible, torch.tensor([6, 6, 4, 4, 4, 4]) / 8)
    problem, refuse = stats.verdict()  # 25 % empty: a warning, not a refusal
    assert "25.0 % of the masks are empty" in problem and not refuse
    few = mask_statistics(records, data, masks, height=64, width=32, sample=3)
    assert few.checked == 3  # records 0, 4 (round(3.5)), 7: one empty, two whole
    assert few.empty == pytest.approx(1 / 3)


def test_verdict_thresholds():
    ok = MaskStats(100, 0.02, torch.full((6,), 0.9))
    assert ok.verdict() == (None, False)
    low_part = MaskStats(100, 0.0, torch.tensor([0.9, 0.9, 0.9, 0.2, 0.9, 0.9]))
    problem, refuse = low_part.verdict()
    assert "part 3 is visible in only 20.0 %" in problem and not refuse
    assert MaskStats(100, 0.0, torch.tensor([0.9, 0.9, 0.9, 0.04, 0.9, 0.9])).verdict()[1]
    assert MaskStats(100, 0.6, torch.full((6,), 0.4)).verdict()[1]
    assert MaskStats(0, 0.0, torch.zeros(6)).verdict() == ("no mask could be read", True)
    assert str(low_part) == ("100 masks checked: 0.0 % empty; share in which each part is "
                             "visible: [0.90 0.90 0.90 0.20 0.90 0.90]")


def test_interrupt_report_stays_short():
    """What an interrupted command lists as written: each checkpoint once, masks counted."""
    from orgnn.io.atomic import committed
    from orgnn.reid.commands import _compact_committed

    saved = list(committed)
    try:
        committed[:] = ["before.json"]
        committed.extend(["run/last.pt"] * 3)
        _compact_committed(1)
        assert committed == ["before.json", "run/last.pt"]
        committed.extend([f"m/{i}.png" for i in range(5)])
        _compact_committed(2, "mask PNGs under m")
        assert committed == ["before.json", "run/last.pt", "5 mask PNGs under m"]
    finally:
        committed[:] = saved


def test_empty_masks_refused_unless_allowed(market, tmp_path, capsys):
    data, masks = market
    for path in (masks / "bounding_box_train").iterdir():
        save(path, np.zeros((64, 32), np.uint8))  # what `orgnn masks --random-weights` writes
    out = tmp_path / "oan"
    assert main(_train_oan(data, masks, out)) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert "100.0 % of the masks are empty" in line and "--allow-bad-masks" in line
    assert "4 masks checked: 100.0 % empty" in captured.out and not out.exists()
    assert main(_train_oan(data, masks, out, "--allow-bad-masks", "--max-steps", "1")) == 0
    captured = capsys.readouterr()
    assert "orgnn: warning: masks in" in captured.err and "100.0 % of the masks" in captured.err
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "last.pt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_corrupt_image_in_a_worker_is_one_line(market, tmp_path, capsys):
    data, _ = market
    bad = sorted((data / "bounding_box_train").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:150])  # truncated JPEG
    # the library: the worker's error comes back as ours, message and path intact
    loader = torch.utils.data.DataLoader(ImageSet(Market1501(data).train, 64, 32),
                                         batch_size=4, num_workers=1, collate_fn=collate)
    with pytest.raises(BadImageError) as info:
        next(iter(loader))
    assert str(info.value).startswith(f"bad image {bad}: ") and "\n" not in str(info.value)
    assert info.value.path == str(bad) and "truncated" in info.value.reason.lower()
    # the command: one line, naming the way around it
    fen = ["train-fen", "--dataset", "market1501", "--dataset-dir", str(data), "--out",
           str(tmp_path / "fen"), "--P", "2", "--K", "2", "--epochs", "1", *TINY,
           "--workers", "1"]
    assert main(fen) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"bad image {bad}" in line and "--on-bad-image skip" in line


def test_file_modes_follow_umask(tmp_path):
    """Checkpoints and mask PNGs get 0o666 & ~umask, like the graph side's outputs (they
    were 0o600: a mkstemp file renamed into place)."""
    from orgnn.reid.masks import _save_mask_png

    old = os.umask(0o027)
    try:
        atomic_torch_save({"x": torch.zeros(2)}, tmp_path / "ck" / "last.pt")
        _save_mask_png(torch.ones(8, 4, dtype=torch.bool), tmp_path / "masks" / "a.png")
    finally:
        os.umask(old)
    assert (tmp_path / "ck" / "last.pt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "masks" / "a.png").stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path / "masks")) == ["a.png"]  # no temporary file left
