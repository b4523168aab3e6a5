"""ORGNNConv and DenseORGNNConv against the plain-loop reference of Eq. 4-6."""
from __future__ import annotations

import pytest
import torch
from torch_geometric import EdgeIndex
from torch_geometric.explain.algorithm.utils import clear_masks, set_masks
from torch_geometric.utils import to_torch_coo_tensor

from orgnn import DenseORGNNConv, ORGNNConv
from tests.nn.loop_reference import complete_edge_index, orgnn_layer_loop, pad

SIZES = [2, 5, 31, 3, 17, 8]


def _params(conv):
    return (conv.lin.weight, conv.lin.bias, conv.att.weight, conv.att.bias)


def _random_conv(cls, f_in, f_out, seed=0, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    conv = cls(f_in, f_out, **kwargs).to(dtype)
    with torch.no_grad():  # non-trivial affinities: V small and of both signs, b non-zero
        conv.att.weight.mul_(0.5)
        conv.att.bias.fill_(0.3)
        conv.lin.bias.uniform_(-0.1, 0.1)
    return conv


def _graphs(sizes, f, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, f, generator=g, dtype=dtype) for n in sizes]


def test_repr():
    assert str(ORGNNConv(256, 256)) == "ORGNNConv(256, 256)"
    assert str(DenseORGNNConv(16, 32)) == "DenseORGNNConv(16, 32)"
    assert str(ORGNNConv(8, 8, outlier_aware=False)) == "ORGNNConv(8, 8, outlier_aware=False)"


@pytest.mark.parametrize("grad", [False, True])   # without autograd: the CSR rendering
@pytest.mark.parametrize("outlier_aware", [True, False])
def test_sparse_equals_loop_reference(outlier_aware, grad):
    conv = _random_conv(ORGNNConv, 12, 7, outlier_aware=outlier_aware)
    graphs = _graphs(SIZES, 12)
    with torch.set_grad_enabled(grad):
        out = conv(torch.cat(graphs), complete_edge_index(SIZES))
    expected = torch.cat([orgnn_layer_loop(g, *_params(conv), outlier_aware) for g in graphs])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("outlier_aware", [True, False])
def test_dense_equals_loop_reference(outlier_aware):
    conv = _random_conv(DenseORGNNConv, 12, 7, outlier_aware=outlier_aware)
    graphs = _graphs(SIZES, 12)
    x, mask = pad(graphs)
    out = conv(x, mask=mask)
    for b, g in enumerate(graphs):
        expected = orgnn_layer_loop(g, *_params(conv), outlier_aware)
        torch.testing.assert_close(out[b, : g.shape[0]], expected, atol=1e-5, rtol=1e-4)
    assert out[~mask].abs().sum() == 0 and (~mask).any()   # padded rows are zero


def test_gradients_equal_loop_reference():
    sizes = [2, 6, 4]
    for cls in (ORGNNConv, DenseORGNNConv):
        conv = _random_conv(cls, 6, 5, dtype=torch.float64)
        graphs = [g.requires_grad_() for g in _graphs(sizes, 6, dtype=torch.float64)]
        if cls is ORGNNConv:
            out = conv(torch.cat(graphs), complete_edge_index(sizes))
        else:
            x, mask = pad(graphs)
            out = conv(x, mask=mask)[mask]
        weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        grads = torch.autograd.grad((out * weights).sum(), [*graphs, *_params(conv)])
        expected = torch.cat([orgnn_layer_loop(g, *_params(conv)) for g in graphs])
        ref_grads = torch.autograd.grad((expected * weights).sum(), [*graphs, *_params(conv)])
        for got, ref in zip(grads, ref_grads):
            torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-7)


def test_gradcheck_float64():
    sizes = [3, 2]
    conv = _random_conv(ORGNNConv, 4, 3, dtype=torch.float64)
    x = torch.rand(5, 4, dtype=torch.float64, requires_grad=True)
    ei = complete_edge_index(sizes)
    assert torch.autograd.gradcheck(lambda x_: conv(x_, ei), (x,))
    dense = _random_conv(DenseORGNNConv, 4, 3, dtype=torch.float64)
    xd = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert torch.autograd.gradcheck(lambda x_: dense(x_, mask=mask), (xd,))


def test_sparse_equals_dense_and_state_dicts_interchange():
    sparse = _random_conv(ORGNNConv, 16, 8)
    dense = DenseORGNNConv(16, 8)
    dense.load_state_dict(sparse.state_dict())
    graphs = _graphs([3, 2], 16)
    x, mask = pad(graphs)
    out_dense = dense(x, mask=mask)
    out_sparse = sparse(torch.cat(graphs), complete_edge_index([3, 2]))
    assert out_dense[1, 2].abs().sum() == 0          # padded row
    torch.testing.assert_close(out_dense[mask], out_sparse, atol=1e-5, rtol=1e-4)
    back = ORGNNConv(16, 8)
    back.load_state_dict(dense.state_dict())
    torch.testing.assert_close(back(torch.cat(graphs), complete_edge_index([3, 2])), out_sparse)


def test_dense_accepts_2d_input_and_no_mask():
    conv = _random_conv(DenseORGNNConv, 8, 8)
    g = _graphs([5], 8)[0]
    assert conv(g).shape == (1, 5, 8)                  # one graph, batched (as PyG)
    torch.testing.assert_close(conv(g), conv(g.unsqueeze(0)))
    torch.testing.assert_close(conv(g)[0], orgnn_layer_loop(g, *_params(conv)), atol=1e-5,
                               rtol=1e-4)


def test_self_loops_option_matches_between_layers_and_reference():
    sparse = _random_conv(ORGNNConv, 8, 8, add_self_loops=True)
    dense = DenseORGNNConv(8, 8, add_self_loops=True)
    dense.load_state_dict(sparse.state_dict())
    graphs = _graphs([1, 4], 8)
    out = sparse(torch.cat(graphs), complete_edge_index([1, 4]))  # self-loops added inside
    expected = torch.cat([orgnn_layer_loop(g, *_params(sparse), self_loops=True)
                          for g in graphs])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    x, mask = pad(graphs)
    torch.testing.assert_close(dense(x, mask=mask)[mask], expected, atol=1e-5, rtol=1e-4)
    # A lone node with a self-loop transforms its own feature.
    lone = torch.relu(sparse.lin(graphs[0]))
    torch.testing.assert_close(out[:1], lone)


def test_permuting_nodes_permutes_output():
    conv = _random_conv(DenseORGNNConv, 8, 6)
    x = _graphs([9], 8)[0]
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(conv(x[perm])[0], conv(x)[0, perm], atol=1e-6, rtol=1e-5)
    sparse = _random_conv(ORGNNConv, 8, 6)
    ei = complete_edge_index([9])
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(9)
    torch.testing.assert_close(sparse(x[perm], inverse[ei]), sparse(x, ei)[perm], atol=1e-6,
                               rtol=1e-5)


@pytest.mark.parametrize("case", ["isolated", "two_nodes", "zeros", "identical", "huge",
                                  "tiny"])
def test_degenerate_inputs_give_finite_outputs(case):
    sparse = _random_conv(ORGNNConv, 8, 4)
    dense = DenseORGNNConv(8, 4)
    dense.load_state_dict(sparse.state_dict())
    base = _graphs([4], 8)[0]
    x = {"isolated": base, "two_nodes": base[:2], "zeros": torch.zeros(4, 8),
         "identical": base[:1].repeat(4, 1), "huge": base * 1e15, "tiny": base * 1e-15}[case]
    if case == "isolated":  # node 3 receives nothing and sends nothing
        ei = complete_edge_index([3])
        out = sparse(x, ei)
        assert torch.equal(out[3], torch.relu(sparse.lin.bias))
    else:
        ei = complete_edge_index([x.shape[0]])
        out = sparse(x, ei)
        torch.testing.assert_close(dense(x)[0], out, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(out).all()
    if case == "identical":  # every affinity and confidence equal: the mean is the node
        torch.testing.assert_close(out, torch.relu(sparse.lin(x)), atol=1e-5, rtol=1e-5)
    if case == "zeros":
        torch.testing.assert_close(out, torch.relu(sparse.lin(x)))


def test_saturated_affinities_match_float64_reference_with_finite_gradients():
    # V . d^2 of -60 to -660: every float32 sigmoid underflows (to 0 or a denormal whose
    # reciprocal overflows), so a naive c * sigmoid / sum gives NaN or the plain-mean
    # fallback. The float64 loop reference still resolves the weights (e^-600 ~ 1e-261).
    sizes = [5, 3, 8]
    graphs64 = [g * 12 for g in _graphs(sizes, 6, dtype=torch.float64)]
    sparse = _random_conv(ORGNNConv, 6, 4)
    with torch.no_grad():
        sparse.att.weight.fill_(-2.0)
        sparse.att.bias.fill_(0.0)
    ref = torch.cat([orgnn_layer_loop(g, *(p.double() for p in _params(sparse)))
                     for g in graphs64])
    logits = [-2.0 * torch.cdist(g, g).square() for g in graphs64]
    off_diagonal = torch.cat([l[~torch.eye(len(l), dtype=torch.bool)] for l in logits])
    assert -700 < off_diagonal.min() and off_diagonal.max() < -50
    dense = DenseORGNNConv(6, 4)
    dense.load_state_dict(sparse.state_dict())
    graphs = [g.float().requires_grad_() for g in graphs64]
    x, mask = pad(graphs)
    out_sparse = sparse(torch.cat(graphs), complete_edge_index(sizes))
    out_dense = dense(x, mask=mask)[mask]
    for out in (out_sparse, out_dense):
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
        grads = torch.autograd.grad(out.square().sum(), [*graphs, *_params(sparse)],
                                    allow_unused=True)
        assert all(torch.isfinite(g).all() for g in grads if g is not None)


def test_return_attention_weights_and_other_adjacency_forms():
    conv = _random_conv(ORGNNConv, 8, 8)
    graphs = _graphs([4, 3], 8)
    x, ei = torch.cat(graphs), complete_edge_index([4, 3])
    out, (ei_out, alpha) = conv(x, ei, return_attention_weights=True)
    assert torch.equal(ei_out, ei) and alpha.shape == (ei.size(1),)
    sums = torch.zeros(7).index_add_(0, ei[1], alpha)
    torch.testing.assert_close(sums, torch.ones(7))            # normalised per target
    # EdgeIndex
    edge_index = EdgeIndex(ei, sparse_size=(7, 7))
    torch.testing.assert_close(conv(x, edge_index), out)
    # torch sparse adj_t (rows are targets)
    adj_t = to_torch_coo_tensor(ei.flip(0), size=(7, 7))
    torch.testing.assert_close(conv(x, adj_t), out, atol=1e-6, rtol=1e-5)
    _, (adj_alpha, _) = conv(x, adj_t, return_attention_weights=True)
    assert adj_alpha.is_sparse
    dense_alpha = torch.zeros(7, 7)
    dense_alpha[ei[1], ei[0]] = alpha
    torch.testing.assert_close(adj_alpha.to_dense(), dense_alpha, atol=1e-6, rtol=1e-5)
    # the dense layer returns the same weights
    dense = DenseORGNNConv(8, 8)
    dense.load_state_dict(conv.state_dict())
    xd, mask = pad(graphs)
    _, dense_w = dense(xd, mask=mask, return_attention_weights=True)
    torch.testing.assert_close(dense_w[0, :4, :4], dense_alpha[:4, :4], atol=1e-6, rtol=1e-5)


def test_explain_edge_mask_changes_output():
    conv = _random_conv(ORGNNConv, 8, 8)
    x, ei = torch.cat(_graphs([5], 8)), complete_edge_index([5])
    before = conv(x, ei)
    mask = torch.nn.Parameter(torch.linspace(-4, 4, ei.size(1)))
    set_masks(conv, mask, ei, apply_sigmoid=True)
    masked = conv(x, ei)
    clear_masks(conv)
    assert not torch.allclose(before, masked, atol=1e-4)
    masked.sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0
    torch.testing.assert_close(conv(x, ei), before)


@pytest.mark.parametrize("cls", [ORGNNConv, DenseORGNNConv])
def test_torch_compile_matches_eager_without_graph_breaks(cls):
    conv = _random_conv(cls, 16, 16)
    graphs = _graphs([6, 6, 6], 16)
    if cls is ORGNNConv:
        args = (torch.cat(graphs), complete_edge_index([6, 6, 6]))
    else:
        args = (torch.stack(graphs),)
    explanation = torch._dynamo.explain(conv)(*args)
    assert explanation.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(conv)
    torch.testing.assert_close(compiled(*args), conv(*args), atol=1e-5, rtol=1e-4)


def test_bfloat16_dense_and_sparse():
    sparse = _random_conv(ORGNNConv, 16, 16)
    dense = DenseORGNNConv(16, 16)
    dense.load_state_dict(sparse.state_dict())
    graphs = _graphs([6, 4], 16)
    x, mask = pad(graphs)
    ref = dense(x, mask=mask)
    out = dense.to(torch.bfloat16)(x.bfloat16(), mask=mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    out_s = sparse.to(torch.bfloat16)(torch.cat(graphs).bfloat16(), complete_edge_index([6, 4]))
    torch.testing.assert_close(out_s.float(), ref[mask], atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    sparse = _random_conv(ORGNNConv, 16, 16)
    dense = DenseORGNNConv(16, 16)
    dense.load_state_dict(sparse.state_dict())
    graphs = _graphs([6, 4], 16)
    x, mask = pad(graphs)
    ref = dense(x, mask=mask)
    torch.testing.assert_close(dense.cuda()(x.cuda(), mask=mask.cuda()).cpu(), ref, atol=1e-4,
                               rtol=1e-4)
    ei = complete_edge_index([6, 4])
    torch.testing.assert_close(sparse.cuda()(torch.cat(graphs).cuda(), ei.cuda()).cpu(),
                               ref[mask], atol=1e-4, rtol=1e-4)
    out = dense.to(torch.bfloat16)(x.cuda().bfloat16(), mask=mask.cuda())
    torch.testing.assert_close(out.float().cpu(), ref, atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
def test_errors_name_the_problem():
    conv = ORGNNConv(8, 4)
    dense = DenseORGNNConv(8, 4)
    x = torch.rand(3, 8)
    ei = complete_edge_index([3])
    with pytest.raises(ValueError, match="expected 8 features.*got 5"):
        conv(torch.rand(3, 5), ei)
    with pytest.raises(ValueError, match="expected 8 features.*got 5"):
        dense(torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="refers to node 7, but x has 3 nodes"):
        conv(x, torch.tensor([[0, 7], [1, 2]]))
    with pytest.raises(ValueError, match="refers to node -1"):
        conv(x, torch.tensor([[0, -1], [1, 2]]))
    with pytest.raises(TypeError, match="edge_index must hold integers"):
        conv(x, ei.float())
    with pytest.raises(ValueError, match=r"shape \(2, num_edges\)"):
        conv(x, ei[0])
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 3\)"):
        dense(torch.rand(2, 3, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must hold only 0 and 1, found 0.5"):
        dense(torch.rand(2, 3, 8), mask=torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match=r"adj must have shape \(2, 3, 3\).*node mask goes in"):
        dense(torch.rand(2, 3, 8), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="adj contains 1 non-finite value"):
        dense(torch.rand(2, 3, 8), torch.eye(3).index_put_((torch.tensor(0),) * 2,
                                                            torch.tensor(float("nan"))))
    with pytest.raises(ValueError, match=r"in_channels \(8, 5\): senders and receivers"):
        ORGNNConv((8, 5), 4)
    with pytest.raises(TypeError, match="in_channels must be an int or a pair"):
        ORGNNConv((8, 8, 8), 4)
    bad = x.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite value.*nan at \(dim 0=2, dim 1=5\)"):
        conv(bad, ei)
    with pytest.raises(ValueError, match="non-finite"):
        dense(bad.unsqueeze(0))
    with pytest.raises(ValueError, match="must be 2-D or 3-D"):
        dense(torch.rand(8))
