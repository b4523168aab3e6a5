from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.data import Batch, Data
from torch_geometric.utils import scatter

from orgnn.nn import _checks
from orgnn.nn.dense_orgnn_conv import DenseORGNNConv
from orgnn.nn.functional import (
    dense_orgnn_aggregate,
    sparse_affinity_logits,
    sparse_confidence,
    sparse_edge_weights,
)
from orgnn.nn.neighbour_scorer import NeighbourScorer

INITS = ("identity", "glorot")
#: The activation of Eq. 5: the paper's ReLU, or none (features with negative entries).
ACTS = ("relu", "none")
TARGET_INITS = ("mean", "self", "visible")


class PartwiseORGNNConv(torch.nn.Module):
    r"""``M`` independent :class:`DenseORGNNConv` layers (one per part) run in one call.

    The weights of all parts are stacked (``weight`` :math:`(M, F_{out}, F_{in})`,
    ``att_weight`` :math:`(M, F_{in})`, ...), so the per-part transforms are one grouped
    matrix product instead of a Python loop over parts. :meth:`part` returns part ``k`` as an
    ordinary :class:`DenseORGNNConv`.

    Args:
        num_parts (int): Number of parts :math:`M`.
        in_channels (int): Input size per part.
        out_channels (int): Output size per part.
        outlier_aware (bool, optional): Use Eq. 4's confidence. (default: :obj:`True`)
        init (str, optional): ``"identity"`` (:math:`\mathbf{W} = I`, :math:`V = 0`,
            :math:`b = 0`: the untrained layer is the confidence-weighted mean) or
            ``"glorot"`` (PyG's default). (default: :obj:`"identity"`)
        add_self_loops (bool, optional): let each node also receive its own message.
            (default: :obj:`False`)
        act (str, optional): ``"relu"`` (Eq. 5's :math:`\phi`) or ``"none"``.
            (default: :obj:`"relu"`)

    Shapes:
        - **dense input:** :math:`(M, B, N, F_{in})`, valid :math:`(M \text{ or } 1, B, N)`
        - **sparse input:** :math:`(|\mathcal{V}|, M, F_{in})`, edge indices
          :math:`(2, |\mathcal{E}|)`
    """

    def __init__(self, num_parts: int, in_channels: int, out_channels: int,
                 outlier_aware: bool = True, init: str = "identity",
                 add_self_loops: bool = False, act: str = "relu") -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if act not in ACTS:
            raise ValueError(f"act must be one of {ACTS}, got {act!r}")
        self.act = act
        if init == "identity" and in_channels != out_channels:
            raise ValueError("init='identity' needs in_channels == out_channels, got "
                             f"{in_channels} and {out_channels}")
        self.num_parts, self.in_channels, self.out_channels = num_parts, in_channels, out_channels
        self.outlier_aware = outlier_aware
        self.init = init
        self.add_self_loops = add_self_loops
        self.weight = torch.nn.Parameter(torch.empty(num_parts, out_channels, in_channels))
        self.bias = torch.nn.Parameter(torch.empty(num_parts, out_channels))
        self.att_weight = torch.nn.Parameter(torch.empty(num_parts, in_channels))
        self.att_bias = torch.nn.Parameter(torch.empty(num_parts))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.bias.zero_()
        self.att_bias.zero_()
        if self.init == "identity":
            self.weight.copy_(torch.eye(self.out_channels, self.in_channels)
                              .expand_as(self.weight))
            self.att_weight.zero_()
        else:
            bound = math.sqrt(6.0 / (self.in_channels + self.out_channels))
            self.weight.uniform_(-bound, bound)
            att_bound = math.sqrt(6.0 / (self.in_channels + 1))
            self.att_weight.uniform_(-att_bound, att_bound)

    def _transform(self, h: Tensor) -> Tensor:
        """``act(W_k h + bias_k)`` for ``h`` of shape ``(M, ..., F_in)``."""
        lead = h.shape[1:-1]
        flat = h.reshape(self.num_parts, -1, self.in_channels)
        out = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight.transpose(1, 2))
        if self.act == "relu":
            out = F.relu(out, inplace=not torch.is_grad_enabled())
        return out.view(self.num_parts, *lead, self.out_channels)

    def dense(self, x: Tensor, valid: Tensor, rows: int | None = None,
              zero_padded: bool = True, node_weight: Tensor | None = None) -> Tensor:
        """Dense forward on ``(M, B, N, F)``; returns ``(M, B, R, F_out)`` (``R = rows``).
        ``zero_padded=False`` leaves padded rows unspecified (finite): a following layer
        ignores them anyway, and skipping the mask saves a full pass. ``node_weight``
        ``(M or 1, B, N)`` is a prior per sender that multiplies :math:`c_j a_{ij}`."""
        m = self.num_parts
        h, _ = dense_orgnn_aggregate(
            x, valid, self.att_weight.view(m, 1, 1, -1), self.att_bias.view(m, 1, 1, 1),
            outlier_aware=self.outlier_aware, add_self_loops=self.add_self_loops, rows=rows,
            node_weight=node_weight)
        out = self._transform(h)
        if zero_padded:
            out = out * valid[..., :h.size(-2)].unsqueeze(-1).to(x.dtype)
        return out

    def sparse(self, x: Tensor, edge_index: Tensor, rows: Tensor | None = None) -> Tensor:
        """Sparse forward on ``(|V|, M, F)``; returns ``(|V|, M, F_out)`` (or the ``rows``)."""
        src, dst = edge_index
        num_nodes = x.size(0)
        if self.outlier_aware:
            confidence = sparse_confidence(x, src, dst)
        else:
            confidence = x.new_ones(x.shape[:-1])
        x_src = x.index_select(0, src)
        logits = sparse_affinity_logits(x.index_select(0, dst), x_src, self.att_weight,
                                        self.att_bias)
        alpha = sparse_edge_weights(confidence.index_select(0, src), logits, dst, num_nodes)
        h = scatter(alpha.unsqueeze(-1) * x_src, dst, dim=0, dim_size=num_nodes, reduce="sum")
        if rows is not None:
            h = h.index_select(0, rows)
        return self._transform(h.transpose(0, 1)).transpose(0, 1)

    def part(self, k: int) -> DenseORGNNConv:
        """Part ``k`` as a stand-alone :class:`DenseORGNNConv` (a copy of its weights)."""
        conv = DenseORGNNConv(self.in_channels, self.out_channels,
                              outlier_aware=self.outlier_aware,
                              add_self_loops=self.add_self_loops,
                              act=None if self.act == "none" else "relu")
        conv.load_state_dict({"lin.weight": self.weight[k], "lin.bias": self.bias[k],
                              "att.weight": self.att_weight[k].view(1, -1),
                              "att.bias": self.att_bias[k].view(1)})
        return conv

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"num_parts={self.num_parts})")


class ORGNN(torch.nn.Module):
    r"""The per-part OR-GNN: ``M`` independent stacks of ``T`` OR-GNN layers, one per part,
    reading out the target node (Alg. 1), with a per-part classifier for Eq. 7:

    .. math::
        \mathcal{L} = \frac{1}{M} \sum_{k=1}^{M}
            \mathrm{CE}\big(\mathrm{FC}_k(\mathrm{BN}_k(\mathbf{x}_k^T(I_a))), y_a\big)

    A neighbourhood graph is complete over the target (node 0) and its neighbours. The
    target starts as the mean of its neighbours (``target_init="mean"``, the paper), as the
    image's own feature (``"self"``), or as its own feature on its visible parts and the
    neighbours' mean on the hidden ones (``"visible"``). The last layer computes only the
    target's row, so :math:`\mathbf{W}` is applied to one row per graph instead of ``N``.

    A ``node_weight`` :math:`w_j` per node (for instance the learned probability that
    neighbour :math:`j` shares the target's identity, :mod:`orgnn.reconstruction.outliers`)
    multiplies the outlier confidence in every layer, :math:`c_j a_{ij} \to w_j c_j a_{ij}`, and
    weights the neighbours' mean the target starts from. With ``outlier_aware=False`` it is ignored,
    as Eq. 4 is (the ``oan_gnn`` row).

    Args:
        in_channels (int): Part feature size. (default: :obj:`256`)
        hidden_channels (int): Size after each layer. (default: :obj:`256`)
        num_parts (int): :math:`M`. (default: :obj:`6`)
        num_layers (int): :math:`T`. (default: :obj:`2`)
        num_classes (int, optional): Training identities; adds the Eq. 7 head.
        outlier_aware (bool): Use Eq. 4's confidence. (default: :obj:`True`)
        target_init (str): ``"mean"``, ``"self"`` or ``"visible"``. (default: :obj:`"mean"`)
        init (str): ``"identity"`` or ``"glorot"``, see :class:`PartwiseORGNNConv`.
            (default: :obj:`"identity"`)
        add_self_loops (bool): every node also receives its own message, so the target's
            own (weighted) feature takes part in its read-out. (default: :obj:`False`)
        act (str): ``"relu"`` (the paper's Eq. 5) or ``"none"``, for features with negative
            entries, which a ReLU would halve. (default: :obj:`"relu"`)
        scorer (NeighbourScorer, optional): the learned outlier scorer that goes with this
            model (:mod:`orgnn.reconstruction.outliers`); kept here so that one checkpoint carries
            both.
        output_bn (bool): in eval mode, return the Eq. 7 head's batch-normalised feature
            :math:`\mathrm{BN}(\mathbf{x}^T)` (the BNNeck retrieval feature: the one the
            classifier was trained on) instead of :math:`\mathbf{x}^T`; needs
            ``num_classes``. (default: :obj:`False`)

    Shapes:
        - **input:** dense neighbourhoods :math:`(B, M, N, F)` with node 0 the target and a
          mask :math:`(B, N)` or :math:`(B, M, N)`; or a PyG :class:`~torch_geometric.data.Batch`
          whose graphs have ``x`` :math:`(n_g, M, F)`, the target first
        - **output:** reconstructed parts :math:`(B, M, F_{hid})`
    """

    def __init__(
        self,
        in_channels: int = 256,
        hidden_channels: int = 256,
        num_parts: int = 6,
        num_layers: int = 2,
        num_classes: int | None = None,
        outlier_aware: bool = True,
        target_init: str = "mean",
        init: str = "identity",
        add_self_loops: bool = False,
        act: str = "relu",
        scorer: NeighbourScorer | None = None,
        output_bn: bool = False,
    ) -> None:
        super().__init__()
        if output_bn and num_classes is None:
            raise ValueError("ORGNN(output_bn=True) needs num_classes: the batch norm is the "
                             "Eq. 7 head's")
        if target_init not in TARGET_INITS:
            raise ValueError(f"target_init must be one of {TARGET_INITS}, got {target_init!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.in_channels, self.hidden_channels = in_channels, hidden_channels
        self.num_parts, self.num_layers = num_parts, num_layers
        self.num_classes = num_classes
        self.outlier_aware, self.target_init, self.init = outlier_aware, target_init, init
        self.add_self_loops, self.act = add_self_loops, act
        dims = [in_channels] + [hidden_channels] * num_layers
        self.layers = torch.nn.ModuleList(
            PartwiseORGNNConv(num_parts, dims[t], dims[t + 1], outlier_aware, init,
                              add_self_loops, act)
            for t in range(num_layers))
        self.scorer = scorer
        self.output_bn = output_bn
        if num_classes is not None:
            self.bn = torch.nn.BatchNorm1d(num_parts * hidden_channels)
            self.bn.bias.requires_grad_(False)  # BNNeck
            self.classifier = torch.nn.Parameter(
                torch.randn(num_parts, num_classes, hidden_channels) * 1e-3)

    def forward(self, x: Tensor | Batch, mask: Tensor | None = None,
                target_visible: Tensor | None = None,
                node_weight: Tensor | None = None) -> Tensor:
        r"""Reconstruct each graph's target. ``node_weight`` ``(B, N)`` or ``(B, M, N)``
        (dense input only) is the prior :math:`w_j \ge 0` of each node."""
        if self.target_init == "visible" and target_visible is None:
            target_visible = getattr(x, "target_visible", None) if isinstance(x, Data) else None
            if target_visible is None:
                raise ValueError("ORGNN(target_init='visible') needs target_visible, the (B, M) "
                                 "bool visibility of each graph's target")
        if isinstance(x, Data):
            if node_weight is not None or self.add_self_loops:
                raise ValueError("ORGNN: node_weight and add_self_loops=True take dense "
                                 "neighbourhood batches (B, M, N, F), not a PyG Batch")
            out = self._forward_sparse(x, target_visible)
        else:
            out = self._forward_dense(x, mask, target_visible, node_weight)
        return self.retrieval_feature(out) if self.output_bn and not self.training else out

    def retrieval_feature(self, features: Tensor) -> Tensor:
        """``BN(features)`` with the head's running statistics (eval-mode batch norm),
        shape kept: ``(B, M, F_hid)``."""
        b = features.size(0)
        flat = F.batch_norm(features.reshape(b, -1), self.bn.running_mean,
                            self.bn.running_var, self.bn.weight, self.bn.bias,
                            training=False, eps=self.bn.eps)
        return flat.view_as(features)

    # ----------------------------------------------------------------------------------
    def _forward_dense(self, x: Tensor, mask: Tensor | None,
                       target_visible: Tensor | None = None,
                       node_weight: Tensor | None = None) -> Tensor:
        if _checks.checks_enabled():
            _checks.check_features(x, self.in_channels, "ORGNN", rank=(4,))
            if x.size(1) != self.num_parts:
                raise ValueError(f"ORGNN: x must have shape (B, M={self.num_parts}, N, F), "
                                 f"got {tuple(x.shape)}")
        b, m, n, _ = x.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
        if _checks.checks_enabled() and tuple(mask.shape) not in ((b, n), (b, m, n)):
            raise ValueError(f"ORGNN: mask must have shape {(b, n)} or {(b, m, n)} to match "
                             f"x, got {tuple(mask.shape)}")
        valid = mask if mask.dim() == 3 else mask.unsqueeze(1)
        valid = valid.transpose(0, 1).to(x.dtype)                     # (M or 1, B, N)
        valid = torch.cat([torch.ones_like(valid[..., :1]), valid[..., 1:]], dim=-1)
        prior = None
        if node_weight is not None and self.outlier_aware:
            if _checks.checks_enabled() and tuple(node_weight.shape) not in ((b, n), (b, m, n)):
                raise ValueError(f"ORGNN: node_weight must have shape {(b, n)} or {(b, m, n)} "
                                 f"to match x, got {tuple(node_weight.shape)}")
            prior = node_weight if node_weight.dim() == 3 else node_weight.unsqueeze(1)
            prior = prior.transpose(0, 1).to(x.dtype).clamp_min(0)     # (M or 1, B, N)
        # (M, B, N, F); free when x is a transposed view of an (M, B, N, F) buffer, as the
        # batches of orgnn.reconstruction.graphs are.
        h = self.start_targets(x.transpose(0, 1), valid, target_visible, prior)
        for layer in self.layers[:-1]:
            h = layer.dense(h, valid, zero_padded=False, node_weight=prior)
        out = self.layers[-1].dense(h, valid, rows=1, node_weight=prior)  # target row only
        return out.squeeze(2).transpose(0, 1)                         # (B, M, F)

    def start_targets(self, h: Tensor, valid: Tensor,
                      target_visible: Tensor | None = None,
                      node_weight: Tensor | None = None) -> Tensor:
        """The graphs with each target (node 0) started as ``target_init`` says.

        Args:
            h: part-major graphs ``(M, B, N, F)``, node 0 holding the image's own feature.
            valid: ``(M or 1, B, N)`` 0/1 node mask.
            target_visible: ``(B, M)`` bool, for ``target_init="visible"``.
            node_weight: ``(M or 1, B, N)`` prior weights of the neighbours' mean.
        """
        if self.target_init == "self":
            return h
        h = h.clone(memory_format=torch.contiguous_format)
        weights = valid if node_weight is None else valid * node_weight
        start = self._neighbour_mean(h, weights)
        if self.target_init == "visible":
            keep = target_visible.to(torch.bool).transpose(0, 1).unsqueeze(-1)  # (M, B, 1)
            start = torch.where(keep, h[:, :, 0], start)
        h[:, :, 0] = start
        return h

    @staticmethod
    def _neighbour_mean(h: Tensor, valid: Tensor) -> Tensor:
        """(Weighted) mean of the valid neighbours (nodes 1..), or the node itself when
        their weights sum to zero."""
        weights = valid[..., 1:].unsqueeze(-2)                        # (M|1, B, 1, N-1)
        count = weights.sum(-1)
        mean = (weights @ h[:, :, 1:]).squeeze(-2) / torch.where(count > 0, count, 1)
        return torch.where(count > 0, mean, h[:, :, 0])

    def _forward_sparse(self, batch: Data, target_visible: Tensor | None = None) -> Tensor:
        x, edge_index = batch.x, batch.edge_index
        if _checks.checks_enabled():
            _checks.check_features(x, self.in_channels, "ORGNN", rank=(3,))
            _checks.check_edge_index(edge_index, x.size(0), "ORGNN")
        ptr = getattr(batch, "ptr", None)
        if ptr is None:  # a single graph
            ptr = torch.tensor([0, x.size(0)], device=x.device)
            node_batch = torch.zeros(x.size(0), dtype=torch.long, device=x.device)
        else:
            node_batch = batch.batch
        targets = ptr[:-1]
        if self.target_init != "self":
            totals = scatter(x, node_batch, dim=0, dim_size=targets.numel(), reduce="sum")
            counts = (ptr[1:] - ptr[:-1] - 1).view(-1, 1, 1).to(x.dtype)
            own = x.index_select(0, targets)
            mean = torch.where(counts > 0, (totals - own) / counts.clamp_min(1), own)
            if self.target_init == "visible":
                mean = torch.where(target_visible.to(torch.bool).unsqueeze(-1), own, mean)
            x = x.index_copy(0, targets, mean)
        for layer in self.layers[:-1]:
            x = layer.sparse(x, edge_index)
        return self.layers[-1].sparse(x, edge_index, rows=targets)

    # ----------------------------------------------------------------------------------
    def classify(self, features: Tensor) -> Tensor:
        """Per-part logits ``(B, M, C)`` for Eq. 7 (BN then a bias-free linear layer)."""
        if self.num_classes is None:
            raise RuntimeError("ORGNN was built without num_classes: it has no classifier")
        b = features.size(0)
        normed = self.bn(features.reshape(b, -1)).view(b, self.num_parts, -1)
        return torch.einsum("bmf,mcf->bmc", normed, self.classifier)

    @torch.no_grad()
    def imprint_classifier(self, features: Tensor, labels: Tensor) -> None:
        r"""Start the Eq. 7 head as the nearest-class-mean classifier of ``features``
        (weight imprinting): BN's running statistics become those of ``features`` and

        .. math::
            \mathbf{w}_{k,c} = \frac{1}{|\mathcal{I}_c|} \sum_{a \in \mathcal{I}_c}
                \mathrm{BN}_k\big(\mathbf{x}_k^T(I_a)\big)

        for every class :math:`c` present in ``labels``; absent classes keep their weights.

        Args:
            features: target outputs :math:`(B, M, F_{hid})` of the training images.
            labels: their class indices :math:`(B,)`, in ``[0, num_classes)``.
        """
        if self.num_classes is None:
            raise RuntimeError("ORGNN was built without num_classes: it has no classifier")
        if features.dim() != 3 or features.shape[1:] != (self.num_parts, self.hidden_channels):
            raise ValueError(f"imprint_classifier: features must have shape (B, "
                             f"{self.num_parts}, {self.hidden_channels}), got "
                             f"{tuple(features.shape)}")
        if labels.shape != features.shape[:1]:
            raise ValueError(f"imprint_classifier: labels must have shape "
                             f"({features.size(0)},), got {tuple(labels.shape)}")
        if features.size(0) < 2:
            raise ValueError("imprint_classifier: needs at least two images")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"imprint_classifier: labels must lie in [0, {self.num_classes})")
        flat = features.reshape(features.size(0), -1)
        self.bn.running_mean.copy_(flat.mean(0))
        self.bn.running_var.copy_(flat.var(0))
        normed = F.batch_norm(flat, self.bn.running_mean, self.bn.running_var, self.bn.weight,
                              self.bn.bias, training=False, eps=self.bn.eps)
        normed = normed.view_as(features).transpose(0, 1)               # (M, B, F)
        sums = normed.new_zeros(self.classifier.shape).index_add_(1, labels, normed)
        counts = torch.bincount(labels, minlength=self.num_classes)
        present = counts > 0
        self.classifier[:, present] = sums[:, present] / counts[present].view(1, -1, 1)

    def loss(self, features: Tensor, pids: Tensor) -> Tensor:
        """Eq. 7: cross-entropy of each part's logits, averaged over parts."""
        logits = self.classify(features)
        return F.cross_entropy(logits.permute(0, 2, 1), pids.unsqueeze(1).expand(-1,
                               self.num_parts))

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, "
                f"num_parts={self.num_parts}, num_layers={self.num_layers})")
