"""The image side (SPEC §2): FEN and OAN on torchvision, person masks, the five Re-ID datasets,
training and part-feature extraction. The only part of ``orgnn`` that imports torchvision.

Layout (torchreid's split): :mod:`~orgnn.reid.datasets` (layouts), :mod:`~orgnn.reid.data`
(loading, transforms), :mod:`~orgnn.reid.samplers` (PK), :mod:`~orgnn.reid.models` (FEN, OAN),
:mod:`~orgnn.reid.losses` (Eq. 1, Eq. 2), :mod:`~orgnn.reid.masks` (Mask R-CNN, part labels,
synthetic occlusion), :mod:`~orgnn.reid.mask_checks` (a mask folder checked before training),
:mod:`~orgnn.reid.engine` (training), :mod:`~orgnn.reid.extract`
(part-feature files), :mod:`~orgnn.reid.commands` (CLI).
"""
from orgnn.reid.data import ImageSet, collate
from orgnn.reid.datasets import (
    DATASETS,
    DukeMTMC,
    Market1501,
    OccludedDuke,
    OccludedREID,
    PartialREID,
    build_dataset,
)
from orgnn.reid.engine import TrainConfig, load_checkpoint, load_model, train
from orgnn.reid.extract import extract, extract_split
from orgnn.reid.io import BadImageError, read_image
from orgnn.reid.losses import batch_hard_triplet_loss, fen_loss, oan_loss
from orgnn.reid.masks import (
    build_mask_rcnn,
    part_coverage,
    part_labels_from_mask,
    select_person,
    synthetic_occlusion,
    write_masks,
)
from orgnn.reid.models import FEN, OAN, PartHead, PartPooling, TwoBranchResNet
from orgnn.reid.samplers import DistributedPKSampler, PKSampler, RandomBatchSampler

__all__ = [
    "FEN", "OAN", "PartPooling", "PartHead", "TwoBranchResNet",
    "batch_hard_triplet_loss", "fen_loss", "oan_loss",
    "PKSampler", "DistributedPKSampler", "RandomBatchSampler",
    "DATASETS", "Market1501", "DukeMTMC", "OccludedDuke", "OccludedREID", "PartialREID",
    "build_dataset", "ImageSet", "collate", "BadImageError", "read_image",
    "part_coverage", "part_labels_from_mask", "select_person", "build_mask_rcnn",
    "write_masks", "synthetic_occlusion",
    "TrainConfig", "train", "load_checkpoint", "load_model", "extract", "extract_split",
]
