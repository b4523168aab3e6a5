"""Input checks shared by the layers: clear messages instead of tracebacks from deep inside.

The checks that read tensor values (NaN, index range, 0/1 masks) are skipped while
``torch.compile`` traces (they would break the graph) and on the ``meta`` device (there are
no values: shape inference and ``to_empty`` flows run the forward there); shapes and dtypes
are still checked there. Otherwise they cost one pass.
"""
from __future__ import annotations

import torch
from torch import Tensor


def checks_enabled() -> bool:
    return not (torch.compiler.is_compiling() or torch.jit.is_scripting())


def has_values(t: Tensor) -> bool:
    """:obj:`False` for tensors without data (the ``meta`` device)."""
    return t.device.type != "meta"


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


def check_finite(x: Tensor, name: str, label: str = "x") -> None:
    if not has_values(x) or not x.is_floating_point():
        return
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
    raise ValueError(f"{name}: {label} contains {count} non-finite value(s); first is {value} at "
                     f"({where})")


def check_edge_index(edge_index: Tensor, num_nodes: int | tuple[int, int], name: str) -> None:
    """``num_nodes``: one node count, or ``(num_src, num_dst)`` for a bipartite graph."""
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"{name}: edge_index must be a torch.Tensor, got "
                        f"{type(edge_index).__name__}")
    if edge_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: edge_index must hold integers (torch.long), got "
                        f"{edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"{name}: edge_index must have shape (2, num_edges), got "
                         f"{tuple(edge_index.shape)}")
    if edge_index.numel() == 0 or not has_values(edge_index):
        return
    if isinstance(num_nodes, int):
        _check_range(edge_index, num_nodes, name, "x")
    else:
        _check_range(edge_index[0], num_nodes[0], name, "the source x", "edge_index[0]")
        _check_range(edge_index[1], num_nodes[1], name, "the target x", "edge_index[1]")


def _check_range(index: Tensor, num_nodes: int, name: str, what: str,
                 label: str = "edge_index") -> None:
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= num_nodes:
        bad = low if low < 0 else high
        raise ValueError(f"{name}: {label} refers to node {bad}, but {what} has {num_nodes} "
                         f"nodes (valid indices are 0..{num_nodes - 1})")


def check_mask(mask: Tensor, expected: tuple[int, ...], name: str,
               what: str = "x") -> None:
    """``expected``: the accepted shapes (the first one is named in the error)."""
    if not (mask.dtype == torch.bool or mask.is_floating_point()
            or mask.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{name}: mask must be a bool or 0/1 tensor, got {mask.dtype}")
    shapes = expected if isinstance(expected[0], tuple) else (expected,)
    if tuple(mask.shape) not in shapes:
        raise ValueError(f"{name}: mask must have shape {shapes[0]} to match {what}, got "
                         f"{tuple(mask.shape)}")
    check_binary(mask, name, "mask")


def check_binary(t: Tensor, name: str, label: str) -> None:
    """Refuse entries other than 0 and 1 (bool tensors pass without a look)."""
    if t.dtype == torch.bool or not has_values(t) or t.numel() == 0:
        return
    bad = (t != 0) & (t != 1)
    if bool(bad.any()):
        value = t[bad][0].item()
        raise ValueError(f"{name}: {label} must hold only 0 and 1, found {value}")
