r"""Training the per-part OR-GNN on a training split (Eq. 7), and its checkpoints.

Neighbourhoods are searched within the training split (each image excluded from its own),
batches hold ``P`` identities x ``K`` neighbourhood sets, and the loss is

.. math::
    \mathcal{L} = \frac{1}{M} \sum_{k=1}^{M} \mathrm{CE}\big(\mathbf{x}_k^T(I_a), y_a\big)
    \;+\; \lambda_{rec} \frac{1}{M} \sum_{k=1}^{M}
        \big(1 - \cos(\mathbf{x}_k^T(I_a), \mathbf{x}_k^{clean}(I_a))\big)

where the second term (off by default, ``recon_weight``) needs the clean features of the
training images (``clean_features`` in the part-feature file).

Before that, with ``outlier_scorer="learned"`` (the default), a
:class:`~orgnn.nn.neighbour_scorer.NeighbourScorer` learns which training neighbours share
their target's identity (:mod:`orgnn.reconstruction.outliers`); its probabilities become the
OR-GNN's prior node weights, in training as at inference, and the scorer travels with the model
(``model.scorer``). Training neighbourhoods are drawn as test ones are: the inference
``K`` and a threshold calibrated on the training split (:mod:`orgnn.reconstruction.calibration`)
unless ``theta`` is given.

Before the first step the classifier is imprinted (``classifier_init="imprint"``, the
default): it starts as the nearest-class-mean classifier of the untrained network's outputs
(:meth:`~orgnn.ORGNN.imprint_classifier`), so the first gradients refine the reconstruction
for classes it already separates instead of pulling it towards a random head.
``"random"`` keeps the small random start.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from orgnn.io.atomic import atomic_write
from orgnn.io.features import PartFeatures
from orgnn.nn import ORGNN
from orgnn.nn.neighbour_scorer import NeighbourScorer
from orgnn.reconstruction.calibration import DEFAULT_QUANTILE, calibrate_theta
from orgnn.reconstruction.graphs import dense_neighbourhood_batch, map_dense_batches
from orgnn.reconstruction.outliers import ScorerConfig, fit_scorer, prior_weights, score_split
from orgnn.retrieval.search import Neighbourhoods, search_neighbourhoods

CHECKPOINT_FORMAT = "orgnn-checkpoint-v1"
#: How the Eq. 7 classifier starts: the class means of the untrained outputs, or random.
CLASSIFIER_INITS = ("imprint", "random")
#: Where the OR-GNN's prior node weights come from: a learned scorer, or none (Eq. 4 only).
OUTLIER_SCORERS = ("learned", "none")


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; nothing is saved."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


@dataclass
class SearchConfig:
    """How neighbourhoods are searched (SPEC §3). ``theta=None``: the threshold calibrated
    on the training split (the one the model was trained with)."""

    k: int = 30
    theta: float | None = None
    mode: str = "visible-mean"
    upper_body_parts: tuple[int, ...] | None = (0, 1)
    index: str = "flat"
    nprobe: int | None = None                 # None: search.resolve_nprobe (measured)
    device: str | None = None                 # None: faiss on the CPU; else torch search there


@dataclass
class TrainConfig:
    """OR-GNN training settings; defaults follow the paper (SPEC §4) unless noted."""

    epochs: int = 120
    lr: float = 3.5e-4
    milestones: tuple[int, ...] = (40, 70)    # of the paper's 120 epochs; scaled to `epochs`
    gamma: float = 0.1
    weight_decay: float = 5e-4
    ids_per_batch: int = 16
    sets_per_id: int = 4
    k: int = 30                               # the inference K (validation; the paper's)
    theta: float | None = None                # None: calibrated on the training split
    theta_quantile: float = DEFAULT_QUANTILE
    mode: str = "visible-mean"
    hidden_channels: int | None = None        # None: the part dimension
    num_layers: int = 2
    outlier_aware: bool = True
    target_init: str = "visible"              # measured best; "mean" is the paper's
    init: str = "identity"
    classifier_init: str = "imprint"          # measured best; "random" is the usual start
    recon_weight: float = 0.0
    ce_weight: float = 1.0
    triplet_weight: float = 0.0               # batch-hard triplet on the retrieval distance
    triplet_margin: float = 0.3
    transform_lr: float = 1.0                 # lr multiplier of W (and its bias)
    output_bn: bool = False                   # retrieve on BN(x^T), the BNNeck feature
    train_transform: bool = True              # False: W stays fixed, only V and b learn
    act: str = "none"                         # measured best; "relu" is the paper's Eq. 5
    outlier_scorer: str = "learned"           # measured best; "none": Eq. 4 alone
    scorer_stages: int = 3
    scorer_steps: int = 150
    scorer_gamma: float = 4.0
    seed: int = 0

    def scaled_milestones(self) -> list[int]:
        """The paper's step epochs scaled from 120 epochs to ``epochs``."""
        return [max(1, round(m * self.epochs / 120)) for m in self.milestones]


def resolve_theta(train: PartFeatures, config: TrainConfig) -> TrainConfig:
    """``config`` with ``theta`` calibrated on ``train`` when it is ``None``."""
    if config.theta is not None:
        return config
    theta = calibrate_theta(train, config.k, config.mode, config.theta_quantile)
    return dataclasses.replace(config, theta=theta)


def train_neighbourhoods(train: PartFeatures, config: TrainConfig) -> Neighbourhoods:
    """Neighbourhoods of every training image within the training split (self excluded)."""
    config = resolve_theta(train, config)
    return search_neighbourhoods(
        train.features, train.visible, train.features, k=config.k, theta=config.theta,
        mode=config.mode, exclude=np.arange(train.num_images))


def pk_batches(labels: np.ndarray, ids_per_batch: int, sets_per_id: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of ``P x K`` batches of image indices, as torchreid's
    ``RandomIdentitySampler`` builds them: each identity's images are shuffled and cut into
    chunks of ``K`` (an identity with fewer than ``K`` images is drawn with replacement), and
    each batch takes one chunk from each of ``P`` distinct identities until fewer than ``P``
    identities have chunks left. So an epoch sees every image about once, and no identity
    appears twice in a batch.
    """
    labels = np.asarray(labels)
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]         # grouped, shuffled within
    counts = np.bincount(labels)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    chunks: dict[int, list[np.ndarray]] = {}
    for pid in np.flatnonzero(counts):                               # per identity, not image
        images = order[starts[pid]:starts[pid] + counts[pid]]
        if len(images) < sets_per_id:
            images = rng.choice(images, size=sets_per_id, replace=True)
        usable = len(images) - len(images) % sets_per_id
        chunks[int(pid)] = list(images[:usable].reshape(-1, sets_per_id))
    p = min(ids_per_batch, len(chunks))
    batches = []
    while sum(1 for c in chunks.values() if c) >= p:
        available = [pid for pid, c in chunks.items() if c]
        chosen = rng.choice(available, size=p, replace=False)
        batches.append(np.concatenate([chunks[int(pid)].pop() for pid in chosen]))
    return batches


def train_orgnn(train: PartFeatures, config: TrainConfig | None = None,
                neighbourhoods: Neighbourhoods | None = None, progress: bool = True,
                device: str | torch.device = "cpu",
                scorer: NeighbourScorer | None = None) -> ORGNN:
    """Train an :class:`~orgnn.ORGNN` on ``train`` with Eq. 7 (seeded, reproducible).

    ``scorer``: an outlier scorer already fitted on ``train``'s neighbourhoods (with the same
    search settings) to reuse instead of fitting one. The per-step training losses are kept
    in ``model.loss_history`` (the first one before any step)."""
    config = resolve_theta(train, config or TrainConfig())
    if config.classifier_init not in CLASSIFIER_INITS:
        raise ValueError(f"classifier_init must be one of {CLASSIFIER_INITS}, got "
                         f"{config.classifier_init!r}")
    if config.outlier_scorer not in OUTLIER_SCORERS:
        raise ValueError(f"outlier_scorer must be one of {OUTLIER_SCORERS}, got "
                         f"{config.outlier_scorer!r}")
    if config.recon_weight > 0 and train.clean_features is None:
        raise ValueError("recon_weight > 0 needs clean_features in the training split")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if neighbourhoods is None:
        neighbourhoods = train_neighbourhoods(train, config)
    _, labels = np.unique(train.pids, return_inverse=True)
    weights = None
    if not (config.outlier_aware and config.outlier_scorer == "learned"):
        scorer = None
    elif scorer is None:
        scorer = fit_scorer(train, neighbourhoods, ScorerConfig(
            stages=config.scorer_stages, steps=config.scorer_steps, gamma=config.scorer_gamma,
            seed=config.seed))
    if scorer is not None:
        prob, _ = score_split(scorer, train, neighbourhoods)
        weights = prior_weights(prob, scorer.gamma)
    model = ORGNN(train.dim, config.hidden_channels or train.dim, train.num_parts,
                  config.num_layers, num_classes=int(labels.max()) + 1,
                  outlier_aware=config.outlier_aware, target_init=config.target_init,
                  init=config.init, act=config.act, scorer=scorer,
                  output_bn=config.output_bn).to(device)
    model.train_config = config
    if not config.train_transform:
        for layer in model.layers:
            layer.weight.requires_grad_(False)
            layer.bias.requires_grad_(False)
    transform = {id(p) for layer in model.layers for p in (layer.weight, layer.bias)}
    groups = [{"params": [p for p in model.parameters()
                          if p.requires_grad and (id(p) in transform) == is_w],
               "lr": config.lr * (config.transform_lr if is_w else 1.0)}
              for is_w in (True, False)]
    optimiser = torch.optim.Adam([g for g in groups if g["params"]], lr=config.lr,
                                 weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, config.scaled_milestones(),
                                                     config.gamma)
    features = np.asarray(train.features, dtype=np.float32)
    clean = None if train.clean_features is None else torch.from_numpy(
        np.asarray(train.clean_features, dtype=np.float32))
    label_t = torch.from_numpy(labels.astype(np.int64))
    visible = torch.from_numpy(np.asarray(train.visible, dtype=bool))
    if config.classifier_init == "imprint":
        imprint_classifier(model, features, neighbourhoods, train.visible, label_t, device,
                           node_weight=weights)
    model.train()
    model.loss_history = []
    bar = tqdm(range(config.epochs), desc="train OR-GNN", disable=not progress, unit="epoch")
    for epoch in bar:
        total, count = 0.0, 0
        for batch in pk_batches(labels, config.ids_per_batch, config.sets_per_id, rng):
            x, mask = dense_neighbourhood_batch(features[batch], features,
                                                neighbourhoods.index[batch], device)
            prior = None if weights is None else torch.from_numpy(weights[batch]).to(device)
            out = model(x, mask, target_visible=visible[batch].to(device), node_weight=prior)
            loss = config.ce_weight * model.loss(out, label_t[batch].to(device))
            if config.triplet_weight > 0:
                loss = loss + config.triplet_weight * batch_hard_triplet(
                    out, label_t[batch].to(device), config.triplet_margin)
            if config.recon_weight > 0:
                target = clean[batch].to(device)
                loss = loss + config.recon_weight * (
                    1 - F.cosine_similarity(out, target, dim=-1)).mean()
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"OR-GNN training diverged in epoch {epoch + 1} (loss {loss.item()}); "
                    f"try a lower learning rate than {config.lr:g}")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total, count = total + loss.item() * len(batch), count + len(batch)
            model.loss_history.append(loss.item())
        scheduler.step()
        bar.set_postfix(loss=f"{total / max(count, 1):.3f}")
    return model.eval()


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor,
                       margin: float) -> torch.Tensor:
    r"""Batch-hard triplet loss (Hermans et al.) on the retrieval distance of SPEC §5,
    :math:`d(a, b) = 1 - \frac{1}{M}\sum_k \cos(\mathbf{x}_k(a), \mathbf{x}_k(b))`:

    .. math::
        \mathcal{L}_{tri} = \frac{1}{B} \sum_a \big[\max_{p: y_p = y_a} d(a, p)
            - \min_{n: y_n \ne y_a} d(a, n) + m\big]_+

    Args:
        features: ``(B, M, F)`` reconstructed targets.
        labels: ``(B,)`` identities.
        margin: :math:`m`.
    """
    unit = F.normalize(features, dim=-1).flatten(1) / features.size(1) ** 0.5
    dist = 1 - unit @ unit.T
    same = labels[:, None] == labels[None, :]
    hardest_pos = dist.masked_fill(~same, float("-inf")).max(1).values
    hardest_neg = dist.masked_fill(same, float("inf")).min(1).values
    usable = torch.isfinite(hardest_neg)
    return F.relu(hardest_pos - hardest_neg + margin)[usable].mean() if usable.any() \
        else features.sum() * 0


def imprint_classifier(model: ORGNN, features: np.ndarray, neighbourhoods: Neighbourhoods,
                       visible: np.ndarray, labels: torch.Tensor,
                       device: str | torch.device = "cpu", chunk: int = 1024,
                       node_weight: np.ndarray | None = None) -> None:
    """Imprint ``model``'s classifier from its outputs on every training neighbourhood
    (computed ``chunk`` graphs at a time, in eval mode)."""
    model.eval()
    output_bn, model.output_bn = model.output_bn, False   # the head sees raw outputs
    try:
        with torch.no_grad():
            outputs = map_dense_batches(model, features, features, neighbourhoods.index,
                                        chunk, device, target_visible=visible,
                                        node_weight=node_weight)
    finally:
        model.output_bn = output_bn
    model.imprint_classifier(torch.from_numpy(outputs).to(device), labels.to(device))


# --------------------------------------------------------------------------------------
# Checkpoints: tensors and plain values only, so torch.load(weights_only=True) reads them.
# --------------------------------------------------------------------------------------
def _config_dict(config: TrainConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(config).items()}


def save_checkpoint(path: str | os.PathLike, model: ORGNN, config: TrainConfig) -> Path:
    """Write ``model`` and its training config atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _checkpoint_payload(model, config)
    atomic_write(path, lambda handle: torch.save(payload, handle))  # mode 0o666 & ~umask
    return path


def _checkpoint_payload(model: ORGNN, config: TrainConfig) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {"in_channels": model.in_channels, "hidden_channels": model.hidden_channels,
                  "num_parts": model.num_parts, "num_layers": model.num_layers,
                  "num_classes": model.num_classes, "outlier_aware": model.outlier_aware,
                  "target_init": model.target_init, "init": model.init,
                  "add_self_loops": model.add_self_loops, "act": model.act,
                  "output_bn": model.output_bn},
        "scorer": None if model.scorer is None else model.scorer.config(),
        "config": _config_dict(config),
        "state_dict": model.state_dict(),
    }


def load_checkpoint(path: str | os.PathLike,
                    device: str | torch.device = "cpu") -> tuple[ORGNN, TrainConfig]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: corrupted or truncated, cannot be read "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:120]})"
                              ) from None
    except Exception as err:  # unpickling refused: not a plain-tensor checkpoint
        raise CheckpointError(f"checkpoint {path}: not an orgnn checkpoint "
                              f"({type(err).__name__})") from None
    return _model_from_payload(payload, str(path), device)


def _model_from_payload(payload: Any, path: str, device: str | torch.device = "cpu"
                        ) -> tuple[ORGNN, TrainConfig]:
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path}: not an orgnn checkpoint (expected format "
                              f"{CHECKPOINT_FORMAT!r})")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in payload["config"].items()
           if k in fields}
    scorer_args = payload.get("scorer")
    scorer = None if scorer_args is None else NeighbourScorer(**scorer_args)
    model = ORGNN(**payload["model"], scorer=scorer).to(device)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the model "
                              f"({str(err).splitlines()[0][:160]})") from None
    config = TrainConfig(**raw)
    model.train_config = config                   # its calibrated theta guides the search
    return model.eval(), config


def train_orgnn_once(train: PartFeatures, config: TrainConfig | None = None,
                     progress: bool = True) -> ORGNN:
    """:func:`train_orgnn`, run by rank 0 alone under ``torchrun``: the other ranks receive
    its model as an in-memory checkpoint (tensors only, read with ``weights_only=True``)
    instead of training the same model again. In a single process, :func:`train_orgnn`."""
    import io

    from orgnn import distributed

    if distributed.world_size() == 1:
        return train_orgnn(train, config, progress=progress)
    model, blob = None, None
    if distributed.is_main():
        model = train_orgnn(train, config, progress=progress)
        buffer = io.BytesIO()
        torch.save(_checkpoint_payload(model, model.train_config), buffer)
        blob = buffer.getvalue()
    blob = distributed.broadcast_bytes(blob)
    if model is not None:
        return model
    payload = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    return _model_from_payload(payload, "<rank 0's model>")[0]
