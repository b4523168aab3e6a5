"""ORGNN: grouped parts equal independent per-part layers; dense equals PyG Batch."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch_geometric.data import Batch, Data

from orgnn import ORGNN, DenseORGNNConv, ORGNNConv
from orgnn.nn import PartwiseORGNNConv
from tests.nn.loop_reference import complete_edge_index, orgnn_layer_loop


def _model(init="glorot", seed=0, **kwargs):
    torch.manual_seed(seed)
    model = ORGNN(8, 8, num_parts=3, num_layers=2, init=init, **kwargs)
    with torch.no_grad():
        for layer in model.layers:
            layer.att_bias.uniform_(-0.5, 0.5)
            layer.bias.uniform_(-0.1, 0.1)
    return model


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, 6, 8, generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 2:] = False  # target + one neighbour
    return x, mask


VISIBLE = torch.tensor([[True, False, True], [False, False, False], [True, True, True],
                        [False, True, False]])


def _reference(model, x, mask, target_visible=None):
    """Per graph and per part: T loop layers, the target initialised as the neighbours' mean
    (for "visible": only where the target's part is hidden)."""
    out = torch.zeros(x.shape[0], x.shape[1], model.hidden_channels)
    for b in range(x.shape[0]):
        n = int(mask[b].sum())
        for k in range(x.shape[1]):
            h = x[b, k, :n].clone()
            hidden = model.target_init == "visible" and not target_visible[b, k]
            if model.target_init == "mean" or hidden:
                h[0] = h[1:].mean(0)
            for layer in model.layers:
                conv = layer.part(k)
                h = orgnn_layer_loop(h, conv.lin.weight, conv.lin.bias, conv.att.weight,
                                     conv.att.bias, model.outlier_aware)
            out[b, k] = h[0]
    return out


def test_repr_and_defaults():
    model = ORGNN()
    assert str(model) == "ORGNN(256, 256, num_parts=6, num_layers=2)"
    assert str(model.layers[0]) == "PartwiseORGNNConv(256, 256, num_parts=6)"
    assert model.target_init == "mean" and model.init == "identity"


@pytest.mark.parametrize("target_init", ["mean", "self", "visible"])
@pytest.mark.parametrize("outlier_aware", [True, False])
def test_dense_forward_equals_per_part_loop(target_init, outlier_aware):
    model = _model(target_init=target_init, outlier_aware=outlier_aware)
    x, mask = _batch()
    out = model(x, mask, target_visible=VISIBLE)
    assert out.shape == (4, 3, 8)
    torch.testing.assert_close(out, _reference(model, x, mask, VISIBLE), atol=1e-5, rtol=1e-4)


def test_visible_target_init_interpolates_mean_and_self():
    x, mask = _batch()
    outs = {init: _model(target_init=init)(x, mask) for init in ("mean", "self")}
    visible = _model(target_init="visible")
    torch.testing.assert_close(visible(x, mask, torch.ones(4, 3, dtype=torch.bool)),
                               outs["self"])
    torch.testing.assert_close(visible(x, mask, torch.zeros(4, 3, dtype=torch.bool)),
                               outs["mean"])
    assert not torch.allclose(outs["self"], outs["mean"])
    with pytest.raises(ValueError, match="target_visible"):
        visible(x, mask)


@pytest.mark.parametrize("target_init", ["mean", "visible"])
def test_batch_input_equals_dense_input(target_init):
    model = _model(target_init=target_init)
    x, mask = _batch()
    graphs = [Data(x=x[b, :, : int(mask[b].sum())].transpose(0, 1).contiguous(),
                   edge_index=complete_edge_index([int(mask[b].sum())]),
                   target_visible=VISIBLE[b:b + 1])
              for b in range(x.shape[0])]
    out_sparse = model(Batch.from_data_list(graphs))
    torch.testing.assert_close(out_sparse, model(x, mask, VISIBLE), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model(graphs[0])[0], model(x[:1], mask[:1], VISIBLE[:1])[0],
                               atol=1e-5, rtol=1e-4)


def test_part_layer_equals_dense_and_sparse_conv():
    layer = PartwiseORGNNConv(3, 8, 8, init="glorot")
    x, mask = _batch()
    out = layer.dense(x.transpose(0, 1), mask.unsqueeze(0).float())
    for k in range(3):
        dense = layer.part(k)
        torch.testing.assert_close(out[k], dense(x[:, k], mask=mask), atol=1e-5, rtol=1e-4)
        sparse = ORGNNConv(8, 8)
        sparse.load_state_dict(dense.state_dict())
        torch.testing.assert_close(out[k][mask], sparse(x[:, k][mask], _edges(mask)),
                                   atol=1e-5, rtol=1e-4)


def _edges(mask):
    return complete_edge_index(mask.sum(1).tolist())


def test_identity_init_is_confidence_weighted_mean():
    model = ORGNN(8, 8, num_parts=3, num_layers=1, init="identity")
    x, mask = _batch()
    out = model(x, mask)
    conv = DenseORGNNConv(8, 8)
    conv.load_state_dict(model.layers[0].part(0).state_dict())
    assert torch.equal(conv.lin.weight, torch.eye(8)) and conv.att.weight.abs().sum() == 0
    # With V = 0 and b = 0 every affinity is 1/2: the target is the c-weighted neighbour mean.
    b, k = 0, 1
    nbrs = x[b, k, 1:]
    target = nbrs.mean(0)
    h = torch.cat([target[None], nbrs])
    c = torch.stack([torch.cosine_similarity(h[j], torch.cat([h[:j], h[j + 1:]]).mean(0), 0)
                     for j in range(1, 6)]).clamp_min(0)
    torch.testing.assert_close(out[b, k], (c[:, None] * nbrs).sum(0) / c.sum())


def test_target_only_readout_equals_full_last_layer():
    model = _model()
    x, mask = _batch()
    h = x.transpose(0, 1).clone()
    valid = mask.unsqueeze(0).float()
    h[:, :, 0] = (h[:, :, 1:] * valid[..., 1:, None]).sum(2) / valid[..., 1:].sum(-1)[..., None]
    h = model.layers[0].dense(h, valid)
    full = model.layers[1].dense(h, valid)[:, :, 0]
    torch.testing.assert_close(model(x, mask), full.transpose(0, 1), atol=1e-6, rtol=1e-5)


class _TwoLayerClassifier(torch.nn.Module):
    """ORGNNConv on the sparse graphs, then DenseORGNNConv on the padded batch, then a
    graph-level linear classifier: both layers in one trained model."""

    def __init__(self, f, num_classes):
        super().__init__()
        self.sparse = ORGNNConv(f, 16)
        self.dense = DenseORGNNConv(16, 16)
        self.head = torch.nn.Linear(16, num_classes)

    def forward(self, x, edge_index, batch):
        from torch_geometric.utils import to_dense_batch
        h = self.sparse(x, edge_index)
        h, mask = to_dense_batch(h, batch)
        h = self.dense(h, mask=mask)
        return self.head(h.sum(1) / mask.sum(1, keepdim=True))


def test_model_with_both_layers_trains_and_orgnn_trains():
    torch.manual_seed(0)
    num_classes, f, n = 4, 8, 6
    protos = torch.rand(num_classes, f) * 2
    labels = torch.arange(num_classes).repeat(12)
    x = protos[labels].unsqueeze(1) + 0.5 * torch.rand(len(labels), n, f)
    x[:, -1] = torch.rand(len(labels), f) * 2               # one outlier node per graph
    batch = torch.arange(len(labels)).repeat_interleave(n)
    ei = complete_edge_index([n] * len(labels))
    net = _TwoLayerClassifier(f, num_classes)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(net(x.reshape(-1, f), ei, batch), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]

    parts = x.view(len(labels), 1, n, f).expand(-1, 3, -1, -1)
    model = ORGNN(f, f, num_parts=3, num_classes=num_classes, init="glorot")
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model.loss(model(parts), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_model_compiles_without_graph_breaks():
    model = _model().eval()
    x, mask = _batch()
    assert torch._dynamo.explain(model)(x, mask).graph_break_count == 0
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model)(x, mask), model(x, mask), atol=1e-5,
                               rtol=1e-4)


def test_model_errors():
    model = ORGNN(8, 8, num_parts=3)
    x, mask = _batch()
    with pytest.raises(ValueError, match=r"M=3"):
        model(torch.rand(4, 2, 6, 8))
    with pytest.raises(ValueError, match="mask must have shape"):
        model(x, mask[:, :4])
    with pytest.raises(ValueError, match="init='identity' needs"):
        ORGNN(8, 16)
    with pytest.raises(ValueError, match="target_init"):
        ORGNN(target_init="median")
    with pytest.raises(RuntimeError, match="without num_classes"):
        model.loss(model(x, mask), torch.zeros(4, dtype=torch.long))


def test_imprinted_classifier_is_the_class_means_of_normalised_outputs():
    torch.manual_seed(0)
    model = ORGNN(4, 4, num_parts=2, num_classes=4)
    before = model.classifier.detach().clone()
    feats = torch.rand(7, 2, 4) * 3
    labels = torch.tensor([0, 2, 0, 1, 2, 2, 0])             # class 3 absent
    model.imprint_classifier(feats, labels)
    # reference written out: per feature, (x - mean) / sqrt(var + eps) with the unbiased
    # variance BN keeps as running_var, then a per-class average
    flat = feats.reshape(7, 8).double()
    mean, var = flat.mean(0), flat.var(0)
    normed = ((flat - mean) / (var + model.bn.eps).sqrt()).view(7, 2, 4)
    for c, rows in [(0, [0, 2, 6]), (1, [3]), (2, [1, 4, 5])]:
        for k in range(2):
            expected = sum(normed[i, k] for i in rows) / len(rows)
            torch.testing.assert_close(model.classifier[k, c].double(), expected, atol=1e-6,
                                       rtol=1e-5)
    torch.testing.assert_close(model.classifier[:, 3], before[:, 3])
    torch.testing.assert_close(model.bn.running_mean, mean.float())


def test_imprinted_head_classifies_separated_classes_before_training():
    torch.manual_seed(0)
    centres = torch.randn(5, 3, 16) * 3
    labels = torch.arange(5).repeat(6)
    feats = centres[labels] + 0.3 * torch.randn(30, 3, 16)
    model = ORGNN(16, 16, num_parts=3, num_classes=5).eval()
    assert (model.classify(feats).argmax(-1) == labels[:, None]).float().mean() < 0.6
    model.imprint_classifier(feats, labels)
    assert (model.classify(feats).argmax(-1) == labels[:, None]).all()


def test_imprint_classifier_errors():
    model = ORGNN(4, 4, num_parts=2, num_classes=3)
    with pytest.raises(ValueError, match=r"shape \(B, 2, 4\)"):
        model.imprint_classifier(torch.rand(5, 3, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have shape"):
        model.imprint_classifier(torch.rand(5, 2, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        model.imprint_classifier(torch.rand(5, 2, 4), torch.full((5,), 3))
    with pytest.raises(ValueError, match="at least two"):
        model.imprint_classifier(torch.rand(1, 2, 4), torch.zeros(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="without num_classes"):
        ORGNN(4, 4, num_parts=2).imprint_classifier(torch.rand(5, 2, 4),
                                                      torch.zeros(5, dtype=torch.long))


def test_graph_side_imports_without_torchvision():
    code = ("import sys; sys.modules['torchvision'] = None\n"
            "import orgnn, orgnn.nn, orgnn.cli\n"
            "orgnn.ORGNNConv(256, 256)\n"
            "assert 'torchvision' not in [m for m in sys.modules if sys.modules[m]]\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
