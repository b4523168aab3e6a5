"""FEN and OAN: a ResNet-50 split into a horizontal-stripe and a vertical-half branch (SPEC §2).

Both networks share the trunk ``conv1 .. layer3[0]``; after it, each branch owns its own deep
copy of ``layer3[1:]`` and ``layer4`` (the first block of ``layer4`` with stride 1, so a 384×128
input gives a 24×8 map). Branch 1 pools 4 horizontal stripes, branch 2 pools 2 vertical halves,
and every part has its own ``1×1 conv → BN (→ ReLU)`` reduction and its own classifier.
"""
from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PartPooling",
    "PartHead",
    "TwoBranchResNet",
    "FEN",
    "OAN",
    "build_resnet",
    "load_backbone_state_dict",
    "RANDOM_INIT_MESSAGE",
]

log = logging.getLogger("orgnn.reid")

RANDOM_INIT_MESSAGE = (
    "backbone is randomly initialised (no --backbone-weights file and no --pretrained): "
    "expect far lower accuracy than with ImageNet weights"
)

_ARCHS = ("resnet50", "resnet34", "resnet18")


def load_backbone_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a backbone state dict saved with ``torch.save(model.state_dict(), path)``.

    The file is read with ``torch.load(weights_only=True)`` (no code is executed). A dict nested
    under ``"state_dict"`` or ``"model"`` and a ``"module."`` prefix (DataParallel) are accepted.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a state dict of tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, zip errors, unsafe globals ...
        raise ValueError(
            f"{path}: cannot be read as a weights file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); expected a state dict saved with "
            f"torch.save(model.state_dict(), path)") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ValueError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def build_resnet(arch: str = "resnet50", weights: str | os.PathLike | None = None,
                 pretrained: bool = False, warn: bool = True) -> nn.Module:
    """A torchvision ResNet, from a local state-dict file, torchvision's named ImageNet weights
    (``pretrained=True``: downloads on first use) or random initialisation (with a warning)."""
    import torchvision

    if arch not in _ARCHS:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {', '.join(_ARCHS)}")
    if weights is not None and pretrained:
        raise ValueError("give either a backbone weights file or pretrained=True, not both")
    factory = getattr(torchvision.models, arch)
    if pretrained:
        net = factory(weights="DEFAULT")
        log.info("backbone: torchvision %s ImageNet weights", arch)
        return net
    net = factory(weights=None)
    if weights is not None:
        state = load_backbone_state_dict(weights)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(
                f"{os.fspath(weights)}: not a torchvision {arch} state dict: {len(missing)} "
                f"parameter(s) missing, e.g. {', '.join(missing[:3])}")
        bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
        if bad:
            k = bad[0]
            raise ValueError(
                f"{os.fspath(weights)}: shape mismatch for {k}: file has "
                f"{tuple(state[k].shape)}, {arch} expects {tuple(own[k].shape)}")
        net.load_state_dict({k: state[k] for k in own}, strict=False)
        log.info("backbone: %s weights from %s", arch, os.fspath(weights))
    elif warn:
        log.warning(RANDOM_INIT_MESSAGE)
    return net


def _last_stride_one(layer4: nn.Sequential) -> None:
    block = layer4[0]
    for conv in (getattr(block, "conv1", None), getattr(block, "conv2", None)):
        if conv is not None and conv.stride != (1, 1):
            conv.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)


class PartPooling(nn.Module):
    r"""Pools a feature map into parts: ``stripes`` horizontal bands (``axis="h"``) or vertical
    bands (``axis="v"``).

    Part :math:`i` of :math:`n` along an axis of length :math:`L` covers the indices
    :math:`[\lfloor iL/n \rfloor, \lceil (i+1)L/n \rceil)`: the bins of ``adaptive_*_pool2d``,
    equal and disjoint when :math:`n` divides :math:`L` (24 rows / 4 stripes = 6 rows each at
    384×128 input; 8 columns / 2 halves = 4 each), overlapping by one row otherwise.

    Args:
        parts (int): number of parts.
        axis (str): ``"h"`` (stripes stacked top to bottom) or ``"v"`` (halves left to right).
        mode (str): ``"avg"`` (default, PCB's choice) or ``"max"``.

    Shapes:
        input ``(B, C, H, W)``; output ``(B, C, parts)``, part 0 at the top / on the left.
    """

    def __init__(self, parts: int, axis: str = "h", mode: str = "avg"):
        super().__init__()
        if axis not in ("h", "v"):
            raise ValueError(f"axis must be 'h' or 'v', got {axis!r}")
        if mode not in ("avg", "max"):
            raise ValueError(f"pooling mode must be 'avg' or 'max', got {mode!r}")
        self.parts, self.axis, self.mode = parts, axis, mode

    def forward(self, x: Tensor) -> Tensor:
        size = (self.parts, 1) if self.axis == "h" else (1, self.parts)
        pool = F.adaptive_avg_pool2d if self.mode == "avg" else F.adaptive_max_pool2d
        return pool(x, size).flatten(2)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.parts}, axis={self.axis!r}, mode={self.mode!r})"


class PartHead(nn.Module):
    """One part's reduction ``1×1 conv (in→dim) → BN (→ ReLU)`` and its classifier.

    Args:
        in_channels (int): channels of the pooled feature (2048 for ResNet-50).
        dim (int): reduced feature size (default 256).
        num_classes (int): classifier outputs.
        relu (bool): apply ReLU after BN (default ``True``, as in PCB).

    Shapes:
        input ``(B, in_channels)``; output ``(feature (B, dim), logits (B, num_classes))``.
    """

    def __init__(self, in_channels: int, dim: int, num_classes: int, relu: bool = True):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, dim, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.relu = relu
        self.classifier = nn.Linear(dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.reduce.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.bn.reset_running_stats()
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.bn(self.reduce(x[:, :, None, None])).flatten(1)
        if self.relu:
            f = F.relu(f)
        return f, self.classifier(f)


class TwoBranchResNet(nn.Module):
    """The shared architecture of FEN and OAN (SPEC §2).

    Args:
        num_classes (int): outputs of each part's classifier.
        num_parts (int): total parts; must be 6 (4 stripes + 2 halves), the paper's geometry.
        dim (int): part feature size (default 256).
        in_channels (int): 3 for images; 1 for masks (repeated to 3 so that ImageNet weights
            apply).
        pool (str): per-part pooling, ``"avg"`` (default) or ``"max"``.
        relu (bool): ReLU after each part's BN (default ``True``).
        arch (str): ``"resnet50"`` (default, the paper); ``resnet18``/``resnet34`` for quick runs.
        backbone_weights (path, optional): local state-dict file of the torchvision backbone.
        pretrained (bool): torchvision's ImageNet weights (downloads on first use).

    Shapes:
        input ``(B, in_channels, H, W)``; ``parts(x)`` returns pooled maps ``(B, C, 6)`` with the
        4 stripes (top to bottom) then the 2 halves (left, right).
    """

    horizontal_parts = 4
    vertical_parts = 2

    def __init__(self, num_classes: int, num_parts: int = 6, dim: int = 256,
                 in_channels: int = 3, pool: str = "avg", relu: bool = True,
                 arch: str = "resnet50", backbone_weights: str | os.PathLike | None = None,
                 pretrained: bool = False, _warn: bool = True):
        super().__init__()
        if num_parts != self.horizontal_parts + self.vertical_parts:
            raise ValueError(
                f"num_parts must be {self.horizontal_parts + self.vertical_parts} "
                f"(4 horizontal stripes + 2 vertical halves), got {num_parts}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        self.num_classes, self.num_parts, self.dim = num_classes, num_parts, dim
        self.in_channels, self.pool, self.arch = in_channels, pool, arch
        net = build_resnet(arch, backbone_weights, pretrained, warn=_warn)
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                   net.layer1, net.layer2, net.layer3[0])
        _last_stride_one(net.layer4)
        branch = nn.Sequential(*net.layer3[1:], net.layer4)
        self.branch_h = copy.deepcopy(branch)
        self.branch_v = copy.deepcopy(branch)
        channels = net.fc.in_features
        self.pool_h = PartPooling(self.horizontal_parts, "h", pool)
        self.pool_v = PartPooling(self.vertical_parts, "v", pool)
        self.heads = nn.ModuleList(
            PartHead(channels, dim, num_classes, relu) for _ in range(num_parts))

    def parts(self, x: Tensor) -> Tensor:
        if x.size(1) != self.in_channels:
            raise ValueError(f"expected {self.in_channels}-channel input, got {x.size(1)}")
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        shared = self.trunk(x)
        return torch.cat([self.pool_h(self.branch_h(shared)),
                          self.pool_v(self.branch_v(shared))], dim=2)

    def heads_forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """Per-part heads on pooled maps ``(B, C, 6)`` → ``(features (B, 6, dim),
        logits (B, 6, num_classes))``."""
        outs = [head(pooled[:, :, k]) for k, head in enumerate(self.heads)]
        return (torch.stack([f for f, _ in outs], 1), torch.stack([z for _, z in outs], 1))

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.num_classes}, num_parts={self.num_parts}, "
                f"dim={self.dim}, pool={self.pool!r}, arch={self.arch!r})")


class FEN(TwoBranchResNet):
    r"""Feature extraction network (paper §3.1, SPEC §2): 6 part features per image.

    Trained with Eq. 1, :math:`\mathcal{L} = \frac{1}{M}\sum_k \big(\mathrm{CE}(W_k x_k, y) +
    \mathrm{Triplet}_{0.3}(x_k)\big)` (:func:`orgnn.reid.losses.fen_loss`).

    Args:
        num_classes (int): training identities.
        num_parts (int): 6. dim (int): 256. pool (str): ``"avg"``. relu (bool): ``True``.
        arch, backbone_weights, pretrained: see :class:`TwoBranchResNet`.

    Shapes:
        input images ``(B, 3, H, W)`` (384×128 in the paper). Eval mode returns features
        ``(B, 6, dim)``; train mode returns ``(logits (B, 6, num_classes), features (B, 6, dim))``.
    """

    def __init__(self, num_classes: int, num_parts: int = 6, dim: int = 256,
                 backbone_weights: str | os.PathLike | None = None, pretrained: bool = False,
                 pool: str = "avg", relu: bool = True, arch: str = "resnet50", _warn: bool = True):
        super().__init__(num_classes, num_parts, dim, 3, pool, relu, arch, backbone_weights,
                         pretrained, _warn)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        features, logits = self.heads_forward(self.parts(x))
        return (logits, features) if self.training else features


class OAN(TwoBranchResNet):
    r"""Occlusion-aware network (paper §3.1, Eq. 2): person mask → 6 part visibilities.

    The same architecture as :class:`FEN` with a single output per part. ``forward`` returns the
    logits :math:`z_k`; :meth:`visibility` returns :math:`y_k = \sigma(z_k)` (1 = visible). Eq. 2
    is :func:`orgnn.reid.losses.oan_loss` (binary cross-entropy on the logits, which equals BCE on
    :math:`y_k` and is numerically stable).

    Args:
        num_parts (int): 6. dim (int): 256. in_channels (int): 1 (masks; repeated to 3 inside).
        pool, relu, arch, backbone_weights, pretrained: see :class:`TwoBranchResNet`.

    Shapes:
        input masks ``(B, 1, H, W)`` in [0, 1]; output logits ``(B, 6)``.
    """

    def __init__(self, num_parts: int = 6, dim: int = 256, in_channels: int = 1,
                 backbone_weights: str | os.PathLike | None = None, pretrained: bool = False,
                 pool: str = "avg", relu: bool = True, arch: str = "resnet50", _warn: bool = True):
        super().__init__(1, num_parts, dim, in_channels, pool, relu, arch, backbone_weights,
                         pretrained, _warn)

    def forward(self, x: Tensor) -> Tensor:
        return self.heads_forward(self.parts(x))[1].squeeze(-1)

    @torch.no_grad()
    def visibility(self, x: Tensor) -> Tensor:
        """Part visibility probabilities ``(B, 6)`` in [0, 1] (a part is visible when >= 0.5)."""
        return torch.sigmoid(self.forward(x))

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(num_parts={self.num_parts}, dim={self.dim}, "
                f"in_channels={self.in_channels}, pool={self.pool!r}, arch={self.arch!r})")
