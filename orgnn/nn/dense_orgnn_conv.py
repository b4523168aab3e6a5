from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn.dense.linear import Linear

from orgnn.nn import _checks
from orgnn.nn.functional import dense_orgnn_aggregate


class DenseORGNNConv(torch.nn.Module):
    r"""The dense twin of :class:`orgnn.ORGNNConv` on padded batches of complete graphs:
    every valid node of a graph sends a message to every other valid node of that graph.

    .. math::
        \mathbf{x}^{\prime}_i = \mathrm{ReLU}\Big(\mathbf{W}
            \frac{\sum_{j \ne i} c_j a_{ij} \mathbf{x}_j}{\sum_{j \ne i} c_j a_{ij}}\Big)

    with :math:`c_j` (Eq. 4) and :math:`a_{ij}` (Eq. 6) as in :class:`ORGNNConv`. The
    affinities come from one batched matrix product through

    .. math::
        V \cdot (\mathbf{d}_{ij} \circ \mathbf{d}_{ij})
        = s_i + s_j - 2 \langle V \circ \mathbf{x}_i, \mathbf{x}_j \rangle,
        \qquad s_i = (\mathbf{x}_i \circ \mathbf{x}_i) \cdot V,

    and the confidences from the Gram matrix, so no :math:`B \times N \times N \times F`
    tensor is formed. Parameter names equal :class:`ORGNNConv`'s, so either layer's
    ``state_dict`` loads into the other.

    Args:
        in_channels (int): Size of each input sample.
        out_channels (int): Size of each output sample.
        bias (bool, optional): If set to :obj:`False`, :math:`\mathbf{W}` has no additive
            bias. (default: :obj:`True`)
        outlier_aware (bool, optional): If set to :obj:`False`, every :math:`c_j = 1`.
            (default: :obj:`True`)
        add_self_loops (bool, optional): If set to :obj:`True`, each node also receives its
            own message. (default: :obj:`False`)

    Shapes:
        - **input:** node features :math:`(B, N, F_{in})` (or :math:`(N, F_{in})`),
          mask :math:`(B, N)` bool, :obj:`True` for real nodes (optional)
        - **output:** node features :math:`(B, N, F_{out})`, zero on padded nodes
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bias: bool = True,
        outlier_aware: bool = True,
        add_self_loops: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.outlier_aware = outlier_aware
        self.add_self_loops = add_self_loops
        self.lin = Linear(in_channels, out_channels, bias=bias, weight_initializer="glorot",
                          bias_initializer="zeros")
        self.att = Linear(in_channels, 1, bias=True, weight_initializer="glorot",
                          bias_initializer="zeros")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.lin.reset_parameters()
        self.att.reset_parameters()

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        return_attention_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        r"""Runs the forward pass of the module.

        Args:
            x (torch.Tensor): Node features :math:`(B, N, F)`; a 2-D input is one graph.
            mask (torch.Tensor, optional): :math:`(B, N)` bool, :obj:`True` for real nodes.
            return_attention_weights (bool, optional): Also return the :math:`(B, N, N)`
                normalised edge weights (row :math:`i` holds node :math:`i`'s incoming ones).
        """
        if _checks.checks_enabled():
            _checks.check_features(x, self.in_channels, "DenseORGNNConv", rank=(2, 3))
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(0)
            mask = None if mask is None else mask.view(1, -1)
        batch_size, num_nodes, _ = x.shape
        padded = mask is not None
        if mask is None:
            mask = torch.ones(batch_size, num_nodes, dtype=torch.bool, device=x.device)
        elif _checks.checks_enabled():
            _checks.check_mask(mask, (batch_size, num_nodes), "DenseORGNNConv")

        h, alpha = dense_orgnn_aggregate(
            x, mask, self.att.weight.view(-1), self.att.bias, outlier_aware=self.outlier_aware,
            add_self_loops=self.add_self_loops)
        # In place where autograd allows: the linear layer's backward does not need its output.
        out = F.relu(self.lin(h), inplace=True)
        if padded:  # zero the padded rows (without a mask there are none)
            keep = mask.unsqueeze(-1).to(x.dtype)
            out = out * keep if torch.is_grad_enabled() else out.mul_(keep)
        if squeeze:
            out, alpha = out.squeeze(0), alpha.squeeze(0)
        return (out, alpha) if return_attention_weights else out

    def __repr__(self) -> str:
        extra = "" if self.outlier_aware else ", outlier_aware=False"
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}{extra})"
