"""Images -> masks -> OAN -> FEN -> part-feature files -> the ablation, with ``orgnn`` commands.

The full method from a folder of person crops (SPEC §1):

1. person masks (``orgnn masks``: Mask R-CNN; the generated dataset brings its own);
2. OAN, trained on the masks (``orgnn train-oan``, Eq. 2);
3. FEN (``orgnn train-fen``, Eq. 1);
4. part features with OAN visibility (``orgnn extract``), the queries covered by synthetic
   occluders as in Occluded-Duke;
5. the paper's ablation (``orgnn ablation``, Table 4).

By default it generates a tiny Market-1501-style dataset of coloured "persons" (with exact
masks) in a temporary folder, and trains small networks for a few steps: the numbers
say the plumbing works, not how good the method is. On real data::

    python examples/image_pipeline.py --dataset-dir /data/Market-1501 --dataset market1501 \\
        --mask-weights maskrcnn.pth --arch resnet50 --epochs 120 --height 384 --width 128

Every step is printed as the ``orgnn`` command it runs, so it can be copied to a shell.

    python examples/image_pipeline.py --tiny     # the CI smoke test (a minute on a CPU)
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np


def person_image(pid: int, variant: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A ``(H, W, 3)`` 'person' (identity-coloured body and shirt on a noisy background) and
    its ``(H, W)`` mask."""
    rng = np.random.default_rng(pid * 101 + variant)
    h, w = size
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    body = np.array([(pid * 67) % 256, (pid * 151) % 256, (pid * 29 + 90) % 256], np.uint8)
    shirt = np.array([(pid * 37 + 50) % 256, (pid * 91) % 256, (pid * 13) % 256], np.uint8)
    top, bottom = h // 16 + variant % 3, h - h // 16 - variant % 2
    left, right = w // 4 + variant % 2, w - w // 4
    img[top:bottom, left:right] = body
    img[top:(top + bottom) // 2, left:right] = shirt
    img = np.clip(img.astype(np.int16) + rng.integers(-20, 20, img.shape), 0, 255)
    mask = np.zeros((h, w), np.uint8)
    mask[top:bottom, left:right] = 255
    return img.astype(np.uint8), mask


def make_dataset(root: Path, masks: Path, num_ids: int, per_id: int,
                 size: tuple[int, int] = (128, 64), cams: int = 4) -> Path:
    """A Market-1501 folder (``bounding_box_train``, ``query``, ``bounding_box_test``) and
    the matching masks (``MASKS/<same path>.png``, as ``orgnn masks`` writes them)."""
    from PIL import Image

    layout = (("bounding_box_train", 1, per_id), ("query", 501, 1),
              ("bounding_box_test", 501, per_id))
    for folder, first_pid, count in layout:
        for pid in range(first_pid, first_pid + num_ids):
            for v in range(count):
                cam = 1 + (v + (folder == "query") * (cams - 1)) % cams
                name = f"{pid:04d}_c{cam}s1_{v:06d}_01.jpg"
                img, mask = person_image(pid, v + 7 * (folder == "query"), size)
                (root / folder).mkdir(parents=True, exist_ok=True)
                (masks / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(root / folder / name, quality=95)
                Image.fromarray(mask).save(masks / folder / f"{name[:-4]}.png")
    return root


def orgnn(*argv: str) -> None:
    """Run one ``orgnn`` command in this process, printing it first."""
    from orgnn.cli import main

    print("\n$ orgnn " + " ".join(shlex.quote(a) for a in argv), flush=True)
    code = main(list(argv))
    if code:
        sys.exit(f"`orgnn {argv[0]}` failed with exit status {code}")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-dir", help="a dataset folder (default: generate one)")
    parser.add_argument("--dataset", default="market1501", help="its layout (market1501, "
                        "dukemtmc, occluded_duke, occluded_reid, partial_reid)")
    parser.add_argument("--mask-dir", help="existing masks (default: run `orgnn masks`)")
    parser.add_argument("--mask-weights", help="Mask R-CNN weights for `orgnn masks`")
    parser.add_argument("--work-dir", help="where runs and features go (default: a "
                        "temporary folder)")
    parser.add_argument("--arch", default="resnet18", help="backbone (default resnet18)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--ids", type=int, default=8, help="generated identities per split")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs, args.max_steps, args.height, args.width = 1, 2, 64, 32
        args.ids = 4

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="orgnn-images-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.dataset_dir:
        data = Path(args.dataset_dir)
        masks = Path(args.mask_dir) if args.mask_dir else work / "masks"
        if not args.mask_dir:
            src = ["--weights", args.mask_weights] if args.mask_weights else ["--pretrained"]
            orgnn("masks", "--dataset-dir", str(data), "--out", str(masks), *src,
                  "--device", args.device)
    else:
        data, masks = work / "dataset", work / "masks"
        make_dataset(data, masks, num_ids=args.ids, per_id=4)
        print(f"generated a Market-1501-style dataset under {data} with exact masks under "
              f"{masks} (on real images: `orgnn masks --pretrained` or --weights)")

    common = ["--dataset", args.dataset, "--dataset-dir", str(data), "--arch", args.arch,
              "--height", str(args.height), "--width", str(args.width), "--epochs",
              str(args.epochs), "--milestones", "--workers", "0", "--device", args.device,
              "--no-progress"]
    if args.max_steps:
        common += ["--max-steps", str(args.max_steps)]
    orgnn("train-oan", *common, "--mask-dir", str(masks), "--out", str(work / "oan"),
          "--batch-size", "8")
    orgnn("train-fen", *common, "--out", str(work / "fen"), "-P", "4", "-K", "2")
    parts = work / "parts"
    orgnn("extract", "--dataset", args.dataset, "--dataset-dir", str(data),
          "--fen", str(work / "fen" / "last.pt"), "--oan", str(work / "oan" / "last.pt"),
          "--mask-dir", str(masks), "--out", str(parts), "--occlude-prob", "1.0",
          "--occlude-splits", "query", "--height", str(args.height), "--width",
          str(args.width), "--workers", "0", "--device", args.device, "--no-progress")
    rows = "baseline,oan,avg,orgnn" if args.tiny else "baseline,oan,gnn,avg,oan_gnn,orgnn"
    orgnn("ablation", "--data", str(parts), "--epochs", "2" if args.tiny else "20",
          "--k", "4", "--theta", "0.5", "--train-k", "8", "--train-theta", "0.5",
          "--rows", rows, "--json", str(work / "ablation.json"), "--quiet")
    print(f"\neverything is under {work}")
    return work


if __name__ == "__main__":
    main()
