"""The five image datasets: a folder layout, a file-name regex and lists of ``(path, pid, camid)``.

========================  ==========================================  ===========================
dataset (``--dataset``)   layout under ``--dataset-dir``               camera rule
========================  ==========================================  ===========================
``market1501``            ``bounding_box_train/ query/                ``c1``..``c6`` → 0..5
                          bounding_box_test/``, ``0002_c1s1_000451_03
                          .jpg``
``dukemtmc``              same folders, ``0001_c2_f0046182.jpg``      ``c1``..``c8`` → 0..7
``occluded_duke``         same as ``dukemtmc``                        ``c1``..``c8`` → 0..7
``occluded_reid``         ``occluded_body_images/`` (query),          query 0, gallery 1
                          ``whole_body_images/`` (gallery),
                          ``001_01.tif``/``.jpg``, flat or in
                          per-identity folders
``partial_reid``          ``partial_body_images/`` or                 query 0, gallery 1
                          ``occluded_body_images/`` (query),
                          ``whole_body_images/`` (gallery)
========================  ==========================================  ===========================

Identity rules follow torchreid: in the Market/Duke layouts pid ``-1`` (junk) is dropped and pid
``0`` (Market's distractors) is kept in the gallery; pids are kept as written (training relabels
them to ``0..C-1`` itself). Occluded-REID and Partial-REID are test-only (``train`` is empty).
A missing folder, an empty split or a file whose name does not match the layout raises an error
that names the folder or file and the expected layout.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "Record",
    "ReIDImageDataset",
    "Market1501",
    "DukeMTMC",
    "OccludedDuke",
    "OccludedREID",
    "PartialREID",
    "DATASETS",
    "build_dataset",
    "IMAGE_EXTENSIONS",
    "list_images",
]

Record = tuple[str, int, int]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def list_images(folder: str | os.PathLike, extensions=IMAGE_EXTENSIONS,
                recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted; hidden files skipped)."""
    folder = Path(folder)
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in extensions)


class ReIDImageDataset:
    """Base class: subclasses set ``name``, ``layout`` and implement :meth:`_load`.

    Attributes:
        root (Path): the dataset folder as given (mask paths are relative to it).
        data_dir (Path): where the split folders are (``root`` or its single archive folder).
        train, query, gallery (list of ``(path, pid, camid)``).
    """

    name = ""
    layout = ""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.data_dir = self.root
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{self.name}: dataset folder {self.root} not found; expected {self.layout}")
        self.train, self.query, self.gallery = self._load()

    def _load(self) -> tuple[list[Record], list[Record], list[Record]]:
        raise NotImplementedError

    def _require(self, *names: str) -> Path:
        """The first existing sub-folder among ``names`` (alternatives), or a clear error."""
        for name in names:
            if (self.data_dir / name).is_dir():
                return self.data_dir / name
        which = " or ".join(repr(n) for n in names)
        raise FileNotFoundError(
            f"{self.name}: folder {which} not found in {self.data_dir}; expected {self.layout}")

    def split(self, name: str) -> list[Record]:
        if name not in ("train", "query", "gallery"):
            raise ValueError(f"unknown split {name!r}; choose train, query or gallery")
        return getattr(self, name)

    @property
    def num_train_pids(self) -> int:
        return len({pid for _, pid, _ in self.train})

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({str(self.root)!r}, train={len(self.train)}, "
                f"query={len(self.query)}, gallery={len(self.gallery)})")


class _BoundingBoxLayout(ReIDImageDataset):
    """Market-1501 / DukeMTMC-reID layout: ``{pid}_c{cam}...jpg`` in three folders."""

    pattern = re.compile(r"^([-\d]+)_c(\d+)")
    num_cameras = 6
    example = ""

    @property
    def layout(self) -> str:  # type: ignore[override]
        return (f"the {self.name} layout: bounding_box_train/, query/, bounding_box_test/ "
                f"holding .jpg files named like {self.example} (pid_c<camera>...)")

    def _resolve(self) -> None:
        # allow the archive's own top folder (e.g. Market-1501-v15.09.15/) under --dataset-dir
        if not (self.root / "bounding_box_train").is_dir():
            subs = [p for p in self.root.iterdir()
                    if p.is_dir() and (p / "bounding_box_train").is_dir()]
            if len(subs) == 1:
                self.data_dir = subs[0]

    def _load(self):
        self._resolve()
        folders = [self._require(n) for n in ("bounding_box_train", "query", "bounding_box_test")]
        return tuple(self._parse(folder) for folder in folders)

    def _parse(self, folder: Path) -> list[Record]:
        files = list_images(folder, (".jpg", ".jpeg", ".png"))
        if not files:
            raise ValueError(f"{self.name}: no images in {folder}; expected {self.layout}")
        records = []
        for path in files:
            match = self.pattern.match(path.name)
            if match is None:
                raise ValueError(f"{self.name}: file name {path} does not match "
                                 f"'<pid>_c<camera>...'; expected {self.layout}")
            pid, cam = int(match.group(1)), int(match.group(2))
            if pid == -1:
                continue  # junk images are ignored (torchreid)
            if pid < 0 or not 1 <= cam <= self.num_cameras:
                raise ValueError(f"{self.name}: {path}: pid {pid} or camera {cam} out of range "
                                 f"(pid >= 0, camera 1..{self.num_cameras})")
            records.append((str(path), pid, cam - 1))  # pid 0 = distractor, kept (torchreid)
        if not records:
            raise ValueError(f"{self.name}: {folder} holds only junk images (pid -1)")
        return records


class Market1501(_BoundingBoxLayout):
    """Market-1501 (Zheng et al., ICCV 2015): 6 cameras, ``0002_c1s1_000451_03.jpg``."""

    name = "market1501"
    num_cameras = 6
    example = "0002_c1s1_000451_03.jpg"


class DukeMTMC(_BoundingBoxLayout):
    """DukeMTMC-reID (Zheng et al., ICCV 2017): 8 cameras, ``0001_c2_f0046182.jpg``."""

    name = "dukemtmc"
    num_cameras = 8
    example = "0001_c2_f0046182.jpg"


class OccludedDuke(DukeMTMC):
    """Occluded-DukeMTMC (Miao et al., ICCV 2019): the DukeMTMC-reID layout and names."""

    name = "occluded_duke"


class _QueryGalleryLayout(ReIDImageDataset):
    """Occluded-REID / Partial-REID: query folder (camera 0) and gallery folder (camera 1)."""

    query_folders: tuple[str, ...] = ()
    gallery_folder = "whole_body_images"
    pattern = re.compile(r"^(\d+)_\d+")

    @property
    def layout(self) -> str:  # type: ignore[override]
        q = " or ".join(f"{n}/" for n in self.query_folders)
        return (f"the {self.name} layout: {q} (query) and {self.gallery_folder}/ (gallery) "
                f"holding images named like 001_01.tif or 001_01.jpg, flat or in per-identity "
                f"folders")

    def _load(self):
        query = self._parse(self._require(*self.query_folders), camid=0)
        gallery = self._parse(self._require(self.gallery_folder), camid=1)
        return [], query, gallery

    def _parse(self, folder: Path, camid: int) -> list[Record]:
        files = list_images(folder, recursive=True)
        if not files:
            raise ValueError(f"{self.name}: no images in {folder}; expected {self.layout}")
        records = []
        for path in files:
            match = self.pattern.match(path.name)
            if match is not None:
                pid = int(match.group(1))
            elif path.parent != folder and path.parent.name.isdigit():
                pid = int(path.parent.name)  # per-identity folder, free-form file name
            else:
                raise ValueError(f"{self.name}: cannot read an identity from {path}; "
                                 f"expected {self.layout}")
            records.append((str(path), pid, camid))
        return records


class OccludedREID(_QueryGalleryLayout):
    """Occluded-REID (Zhuo et al., ICME 2018): test only; query camera 0, gallery camera 1."""

    name = "occluded_reid"
    query_folders = ("occluded_body_images",)


class PartialREID(_QueryGalleryLayout):
    """Partial-REID (Zheng et al., ICCV 2015): test only; query camera 0, gallery camera 1."""

    name = "partial_reid"
    query_folders = ("partial_body_images", "occluded_body_images")


DATASETS: dict[str, type[ReIDImageDataset]] = {
    cls.name: cls for cls in (Market1501, DukeMTMC, OccludedDuke, OccludedREID, PartialREID)
}


def build_dataset(name: str, root: str | os.PathLike) -> ReIDImageDataset:
    """The dataset called ``name`` (one of :data:`DATASETS`) read from ``root``."""
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[key](root)
