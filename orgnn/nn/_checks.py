"""Input checks shared by the layers: clear messages instead of tracebacks from deep inside.

The checks read tensor values (NaN, index range), so they are skipped while
``torch.compile`` traces (they would break the graph) and cost one pass otherwise.
"""
from __future__ import annotations

import torch
from torch import Tensor


def checks_enabled() -> bool:
    return not (torch.compiler.is_compiling() or torch.jit.is_scripting())


def check_features(x: Tensor, in_channels: int, name: str, rank: tuple[int, ...]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in rank:
        shapes = " or ".join(f"{r}-D" for r in rank)
        raise ValueError(f"{name}: x must be {shapes}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must be a floating-point tensor, got {x.dtype}")
    if in_channels > 0 and x.size(-1) != in_channels:
        raise ValueError(
            f"{name}: expected {in_channels} features in the last dimension of x, "
            f"got {x.size(-1)} (x has shape {tuple(x.shape)})")
    check_finite(x, name)


def check_finite(x: Tensor, name: str) -> None:
    # A sum is one cheap pass and is non-finite whenever any entry is (or on overflow,
    # in which case the exact check below finds nothing and passes).
    if bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()[0].tolist()
    value = x[tuple(bad)].item()
    where = ", ".join(f"dim {d}={i}" for d, i in enumerate(bad))
    count = int((~finite).sum())
    raise ValueError(f"{name}: x contains {count} non-finite value(s); first is {value} at "
                     f"({where})")


def check_edge_index(edge_index: Tensor, num_nodes: int, name: str) -> None:
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"{name}: edge_index must be a torch.Tensor, got "
                        f"{type(edge_index).__name__}")
    if edge_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: edge_index must hold integers (torch.long), got "
                        f"{edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"{name}: edge_index must have shape (2, num_edges), got "
                         f"{tuple(edge_index.shape)}")
    if edge_index.numel() == 0:
        return
    low, high = int(edge_index.min()), int(edge_index.max())
    if low < 0 or high >= num_nodes:
        bad = low if low < 0 else high
        raise ValueError(f"{name}: edge_index refers to node {bad}, but x has {num_nodes} "
                         f"nodes (valid indices are 0..{num_nodes - 1})")


def check_mask(mask: Tensor, expected: tuple[int, ...], name: str) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: mask must be a bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name}: mask must have shape {expected} to match x, got "
                         f"{tuple(mask.shape)}")
