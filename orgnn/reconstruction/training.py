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

The Eq. 7 classifier starts small and random (``classifier_init="random"``, the default):
its starting loss is about :math:`\ln C`. ``"imprint"`` starts it as the nearest-class-mean
classifier of the untrained network's outputs (:meth:`~orgnn.ORGNN.imprint_classifier`);
on real features those class means are unnormalised and large (top-1 logit about 139 on
cuhk03-parts, a starting loss above :math:`\ln C`), and the first steps damage
:math:`\mathbf{W}` (see ``docs/results.md``).

By default a batch-hard triplet term on the retrieval distance (SPEC §5) joins Eq. 7
(``triplet_weight=1``, margin 0.3, as FEN's loss). ``output_bn=True`` retrieves with the
head's batch-normalised feature instead (the BNNeck convention: the classifier sees
:math:`\mathrm{BN}(\mathbf{x}^T)`, the triplet sees :math:`\mathbf{x}^T`); it helped
Eq. 7 alone and made no difference with the triplet term, so it is off.
The paper's literal configuration is ``triplet_weight=0`` with ``outlier_scorer="none"``,
``act="relu"`` and ``target_init="mean"``.
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
    index: str = "auto"                       # flat up to search.AUTO_EXACT_MAX, else ivfpq
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
    classifier_init: str = "random"           # measured best; "imprint": class means
    recon_weight: float = 0.0
    ce_weight: float = 1.0
    triplet_weight: float = 1.0               # batch-hard triplet on the retrieval distance
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
    in ``model.loss_history`` (the first one before any step). ``progress``: one bar over
    the stages that take seconds (threshold calibration, the search, the scorer's stages,
    imprinting), then one over the epochs (none for 0)."""
    config = config or TrainConfig()
    scoring = config.outlier_aware and config.outlier_scorer == "learned"
    stage = _StageBar(progress, calibrate=config.theta is None, search=neighbourhoods is None,
                      scorer_stages=config.scorer_stages if scoring and scorer is None else 0,
                      score=scoring, imprint=config.classifier_init == "imprint")
    if config.theta is None:
        stage("calibrate theta")
        config = resolve_theta(train, config)
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
        stage(f"search K={config.k}, theta={config.theta:.3f}")
        neighbourhoods = train_neighbourhoods(train, config)
    _, labels = np.unique(train.pids, return_inverse=True)
    weights = None
    if not (config.outlier_aware and config.outlier_scorer == "learned"):
        scorer = None
    elif scorer is None:
        scorer = fit_scorer(train, neighbourhoods, ScorerConfig(
            stages=config.scorer_stages, steps=config.scorer_steps, gamma=config.scorer_gamma,
            seed=config.seed), on_stage=lambda i: stage(
                f"scorer stage {i + 1} of {config.scorer_stages}" if i >= 0 else
                "scorer: edge features"))
    if scorer is not None:
        stage("scorer: weights")
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
        stage("imprint classifier")
        imprint_classifier(model, features, neighbourhoods, train.visible, label_t, device,
                           node_weight=weights)
    stage.close()
    model.train()
    model.loss_history = []
    bar = tqdm(range(config.epochs), desc="train OR-GNN", unit="epoch",
               disable=not progress or config.epochs == 0)
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
#: Levels of the feature-space fingerprint's quantiles (:func:`feature_fingerprint`).
FINGERPRINT_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)
#: Random image pairs the fingerprint samples.
FINGERPRINT_PAIRS = 4000


def feature_fingerprint(features: np.ndarray, pairs: int = FINGERPRINT_PAIRS,
                        seed: int = 0) -> list[float]:
    r"""Quantiles (:data:`FINGERPRINT_LEVELS`) of the part cosine between random image
    pairs,

    .. math::
        s(a, b) = \frac{1}{M} \sum_{k=1}^{M} \cos(\mathbf{x}_k(a), \mathbf{x}_k(b)),

    over ``pairs`` seeded pairs of distinct images of ``features`` ``(N, M, D)``. It is what
    a search threshold :math:`\theta` means in a feature space: on cuhk03-parts the median
    is 0.21, on mini-mars-parts 0.88 (train, query and gallery of one data set agree within
    0.02), so a :math:`\theta` calibrated on one is meaningless on the other. Reads only
    the sampled rows (a memory map stays on disk).
    """
    n = len(features)
    if n < 2:
        return []
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, pairs)
    b = (a + rng.integers(1, n, pairs)) % n                       # never a == b
    rows, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    x = np.asarray(features[rows], dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    ia, ib = inverse[:pairs], inverse[pairs:]
    cos = (x[ia] * x[ib]).sum(-1).mean(-1)
    return [round(float(q), 4) for q in np.quantile(cos, FINGERPRINT_LEVELS)]


def fingerprint_mismatch(checkpoint_quantiles: list[float], data_quantiles: list[float]
                         ) -> bool:
    """Whether the data's median pair cosine lies outside the checkpoint's 5-95% band
    (both from :func:`feature_fingerprint`). Within one data set the medians of its splits
    lie well inside each other's bands; across networks or data sets they do not."""
    if len(checkpoint_quantiles) != len(FINGERPRINT_LEVELS) or \
            len(data_quantiles) != len(FINGERPRINT_LEVELS):
        return False
    lo, hi = checkpoint_quantiles[0], checkpoint_quantiles[-1]
    return not lo <= data_quantiles[len(FINGERPRINT_LEVELS) // 2] <= hi


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(config).items()}


def save_checkpoint(path: str | os.PathLike, model: ORGNN, config: TrainConfig,
                    feature_space: dict[str, Any] | None = None) -> Path:
    """Write ``model`` and its training config atomically (temp file, then rename).

    ``feature_space``: what the features it was trained on look like, e.g.
    ``{"pair_cosine_quantiles": feature_fingerprint(train.features), "source": "train.npz"}``;
    ``orgnn reconstruct`` warns when the data it is given looks otherwise. Defaults to
    ``model.feature_space`` when the model has one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if feature_space is None:
        feature_space = getattr(model, "feature_space", None)
    payload = _checkpoint_payload(model, config, feature_space)
    atomic_write(path, lambda handle: torch.save(payload, handle))  # mode 0o666 & ~umask
    return path


def _checkpoint_payload(model: ORGNN, config: TrainConfig,
                        feature_space: dict[str, Any] | None = None) -> dict[str, Any]:
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
        "feature_space": feature_space,     # absent in older checkpoints: None on load
        "state_dict": model.state_dict(),
    }


def describe_file(path: str | os.PathLike) -> str:
    """What ``path`` holds, judged by its first bytes: "a NumPy .npz archive", "a PNG
    image", "empty", ... (for messages about files that are not what was expected)."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "a damaged zip archive"
        if names and all(n.endswith(".npy") for n in names):
            return "a NumPy .npz archive"
        if any(n.endswith("data.pkl") for n in names):
            return "a torch.save file"
        return "a zip archive"
    kinds = {b"\x93NUMPY": "a NumPy .npy array", b"\x89PNG": "a PNG image",
             b"\x1f\x8b": "a gzip file", b"\xff\xd8\xff": "a JPEG image",
             b"%PDF": "a PDF document", b"\x89HDF": "an HDF5 file"}
    for magic, kind in kinds.items():
        if head.startswith(magic):
            return kind
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"{path.stat().st_size} bytes of unrecognised binary data"
    return "a JSON text file" if text.lstrip().startswith(("{", "[")) else "a text file"


_EXPECTED = "expected a torch.save file from `orgnn train`"


def load_checkpoint(path: str | os.PathLike,
                    device: str | torch.device = "cpu") -> tuple[ORGNN, TrainConfig]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    The model carries ``train_config`` and ``feature_space`` (``None`` for checkpoints
    written before fingerprints existed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    what = describe_file(path)
    if what == "a damaged zip archive":  # torch.save writes zip archives: cut short?
        raise CheckpointError(f"checkpoint {path}: corrupted or truncated, cannot be read "
                              f"({what}; {_EXPECTED})")
    if what not in ("a torch.save file", "a pickle file"):
        raise CheckpointError(f"checkpoint {path}: {what}, not an orgnn checkpoint "
                              f"({_EXPECTED})")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: {what} but corrupted or truncated, cannot "
                              f"be read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:120]})") from None
    except Exception as err:  # unpickling refused: not a plain-tensor checkpoint
        raise CheckpointError(f"checkpoint {path}: {what} holding Python objects that "
                              f"weights_only=True refuses ({type(err).__name__}), not an "
                              f"orgnn checkpoint ({_EXPECTED})") from None
    return _model_from_payload(payload, str(path), device)


def _model_from_payload(payload: Any, path: str, device: str | torch.device = "cpu"
                        ) -> tuple[ORGNN, TrainConfig]:
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        kind = type(payload).__name__
        keys = f" with keys {sorted(map(str, payload))[:5]}" if isinstance(payload, dict) \
            else ""
        raise CheckpointError(f"checkpoint {path}: a torch.save file of a {kind}{keys}, not "
                              f"an orgnn checkpoint (expected format {CHECKPOINT_FORMAT!r}, "
                              f"written by `orgnn train`)")
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
    model.feature_space = payload.get("feature_space")  # None: an older checkpoint
    return model.eval(), config


class _StageBar:
    """One ``tqdm`` bar over :func:`train_orgnn`'s stages: ``stage(name)`` ends the running
    stage and shows ``name`` as the one now running. Stages not announced are skipped."""

    def __init__(self, progress: bool, calibrate: bool, search: bool, scorer_stages: int,
                 score: bool, imprint: bool) -> None:
        # stages to fit (and the edge features before them), then scoring the split
        total = int(calibrate) + int(search) + (scorer_stages + 1 if scorer_stages else 0) \
            + int(score) + int(imprint)
        self.bar = tqdm(total=total, desc="OR-GNN training", unit="stage",
                        disable=not progress or total == 0,
                        bar_format="{desc} {n_fmt}/{total_fmt} stages [{elapsed}]{postfix}")
        self.running = False

    def __call__(self, name: str) -> None:
        if self.running:
            self.bar.update()
        self.running = True
        self.bar.set_postfix_str(name)

    def close(self) -> None:
        if self.running:
            self.bar.update()
            self.bar.set_postfix_str("done")
        self.running = False
        self.bar.close()


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
        with distributed.local():  # the others wait: no collective inside
            model = train_orgnn(train, config, progress=progress)
        buffer = io.BytesIO()
        torch.save(_checkpoint_payload(model, model.train_config,
                                       getattr(model, "feature_space", None)), buffer)
        blob = buffer.getvalue()
    blob = distributed.broadcast_bytes(blob)
    if model is not None:
        return model
    payload = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    return _model_from_payload(payload, "<rank 0's model>")[0]
