r"""The learned part of outlier removal: small MLPs that score "does neighbour :math:`j`
share the target's identity?" from edge features (:mod:`orgnn.reconstruction.outliers` computes
them).

Stage :math:`s` maps the standardised features :math:`\mathbf{e}_{tj}` (and, from stage 2
on, what stage :math:`s-1` believed, :math:`\mathbf{c}^{(s-1)}_{tj}`) to

.. math::
    p^{(s)}_{tj} = \sigma\big(\mathrm{MLP}_s\big((\mathbf{e}_{tj} \,\|\,
    \mathbf{c}^{(s-1)}_{tj} - \boldsymbol{\mu}_s) / \boldsymbol{\sigma}_s\big)\big)

and the OR-GNN receives the prior :math:`w_j = (p_{tj})^\gamma`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

#: Names of the columns of :func:`edge_features`, in order.
EDGE_FEATURES = ("score_mutual", "visible_j", "score", "gap_best", "gap_mean", "worst_part",
                 "hidden_parts", "density", "score_minus_density", "closer_than_target",
                 "score_minus_kth", "kth", "rank", "searched_parts", "part_spread")
#: Names of the columns :func:`context_features` adds from the previous stage.
CONTEXT_FEATURES = ("p_prev", "p_ratio", "consensus", "consensus_gap", "overlap",
                    "overlap_weighted")


class NeighbourScorer(torch.nn.Module):
    r"""``stages`` small MLPs, each mapping standardised edge features to the logit of
    "this neighbour shares the target's identity". The standardisation (mean, std of the
    training edges) is stored in buffers, so a state dict carries everything.

    Args:
        stages (int): refinement stages (one MLP each). (default: :obj:`3`)
        hidden (int): MLP width. (default: :obj:`32`)
        gamma (float): exponent of the prior :math:`w = p^\gamma`. (default: :obj:`4.0`)
        self_weight (float): weight of the target's own visible parts in the reconstruction
            the context features compare with. (default: :obj:`1.0`)
        kth (int): the :math:`k` of the global-reciprocity feature. (default: :obj:`20`)
    """

    def __init__(self, stages: int = 3, hidden: int = 32, gamma: float = 4.0,
                 self_weight: float = 1.0, kth: int = 20) -> None:
        super().__init__()
        self.stages, self.hidden, self.kth = stages, hidden, kth
        self.gamma, self.self_weight = float(gamma), float(self_weight)
        self.mlps = torch.nn.ModuleList()
        for s in range(stages):
            width = len(EDGE_FEATURES) + (len(CONTEXT_FEATURES) if s else 0)
            self.mlps.append(torch.nn.Sequential(
                torch.nn.Linear(width, hidden), torch.nn.ReLU(),
                torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                torch.nn.Linear(hidden, 1)))
            self.register_buffer(f"mean{s}", torch.zeros(width))
            self.register_buffer(f"std{s}", torch.ones(width))

    def logits(self, stage: int, features: Tensor) -> Tensor:
        """Logits ``(...,)`` of stage ``stage`` for features ``(..., E_s)``."""
        mean, std = getattr(self, f"mean{stage}"), getattr(self, f"std{stage}")
        return self.mlps[stage]((features - mean) / std).squeeze(-1)

    @torch.no_grad()
    def probability(self, stage: int, features: np.ndarray) -> np.ndarray:
        """Probabilities ``(...,)`` float32 for numpy features ``(..., E_s)``."""
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        return torch.sigmoid(self.logits(stage, x)).numpy()

    def config(self) -> dict[str, Any]:
        """The constructor arguments (what a checkpoint stores besides the weights)."""
        return {"stages": self.stages, "hidden": self.hidden, "gamma": self.gamma,
                "self_weight": self.self_weight, "kth": self.kth}

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(stages={self.stages}, hidden={self.hidden}, "
                f"gamma={self.gamma:g})")
