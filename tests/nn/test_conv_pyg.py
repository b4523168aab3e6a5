"""ORGNNConv and DenseORGNNConv as PyG layers: every input form, bipartite and general graphs,
dense adjacencies, to_hetero, lazy sizes, act and the meta device (in the spirit of PyG's
test_gat_conv.py and test_dense_gat_conv.py), each against an independent reference: the
edge-by-edge loop of tests/nn/loop_reference.py or the paper's complete-graph loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch_geometric import EdgeIndex
from torch_geometric.testing import assert_module
from torch_geometric.utils import (
    to_torch_coo_tensor,
    to_torch_csc_tensor,
    to_torch_csr_tensor,
)

from orgnn import ORGNN, DenseORGNNConv, ORGNNConv
from orgnn.nn.functional import CSRPattern, sparse_confidence, sparse_edge_confidence
from tests.nn.loop_reference import (
    complete_edge_index,
    edge_confidence_loop,
    orgnn_general_loop,
    orgnn_layer_loop,
    pad,
)

LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)
TO_SPARSE = {torch.sparse_coo: to_torch_coo_tensor, torch.sparse_csr: to_torch_csr_tensor,
             torch.sparse_csc: to_torch_csc_tensor}


def _conv(cls=ORGNNConv, f_in=8, f_out=6, seed=0, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    conv = cls(f_in, f_out, **kwargs).to(dtype)
    with torch.no_grad():  # non-trivial affinities and a bias that shows in empty rows
        conv.att.weight.mul_(0.5)
        conv.att.bias.fill_(0.3)
        conv.lin.bias.uniform_(-0.5, 0.5)
    return conv


def _gather_rendering(conv):
    """The same layer forced onto its per-edge (gather/scatter, message()) rendering: a
    registered message hook makes the messages visible."""
    conv.register_message_forward_hook(lambda module, inputs, out: None)
    return conv


def _csr_rendering(conv):
    """The layer run without autograd, where it takes its CSR rendering (checked: the fused
    ``message_and_aggregate`` must run)."""
    calls = []
    conv.register_message_and_aggregate_forward_hook(lambda *args: calls.append(1))

    def run(*args, **kwargs):
        before = len(calls)
        with torch.no_grad():
            out = conv(*args, **kwargs)
        assert len(calls) == before + 1, "the CSR rendering did not run"
        return out
    return run


def _params(conv):
    return (conv.lin.weight, conv.lin.bias, conv.att.weight, conv.att.bias)


def _adj_t(edge_index, size, layout):
    """PyG's transposed sparse adjacency (rows are receivers) of ``edge_index``."""
    return TO_SPARSE[layout](edge_index.flip(0), size=(size[1], size[0]))


def _rand(*shape, seed=1, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _edges(edge_index):
    return [tuple(e) for e in edge_index.t().tolist()]


# ---------------------------------------------------------------------------------------
# Input forms (PyG's test_gat_conv)
# ---------------------------------------------------------------------------------------
def test_every_input_form_gives_the_same_output():
    x = _rand(4, 8)
    edge_index = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 1]])   # a self-loop 0 -> 0
    layer = _conv(ORGNNConv, 8, 32)
    assert str(layer) == "ORGNNConv(8, 32)"
    conv = _csr_rendering(layer)
    out = conv(x, edge_index)
    assert out.size() == (4, 32)
    expected = orgnn_general_loop(x, x, _edges(edge_index), *_params(layer))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(conv(x, edge_index, size=(4, 4)), out)
    torch.testing.assert_close(conv((x, x), edge_index), out)            # one node set
    for layout in LAYOUTS:
        torch.testing.assert_close(conv(x, _adj_t(edge_index, (4, 4), layout)), out,
                                   atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(conv(x, edge_index.int()), out)              # int32 indices
    for order in (None, "row", "col"):
        ei = EdgeIndex(edge_index, sparse_size=(4, 4))
        if order is not None:
            ei = ei.sort_by(order)[0]
        torch.testing.assert_close(conv(x, ei), out, atol=1e-6, rtol=1e-5)
    # the other rendering, and the layer under autograd
    torch.testing.assert_close(_gather_rendering(_conv(ORGNNConv, 8, 32))(x, edge_index), out,
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer(x, edge_index), out, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_return_attention_weights_in_every_form(grad):
    with torch.set_grad_enabled(grad):   # False: the CSR rendering
        x = _rand(4, 8)
        edge_index = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 1]])
        conv = _conv(ORGNNConv, 8, 32)
        out, (ei, alpha) = conv(x, edge_index, return_attention_weights=True)
        torch.testing.assert_close(out, conv(x, edge_index))
        assert ei is edge_index and alpha.size() == (4,)
        assert alpha.min() >= 0 and alpha.max() <= 1
        torch.testing.assert_close(torch.zeros(4).index_add_(0, edge_index[1], alpha),
                                   torch.tensor([1.0, 1.0, 0.0, 0.0]))
        for layout in LAYOUTS:
            adj_t = _adj_t(edge_index, (4, 4), layout)
            out_s, (adj, alpha_s) = conv(x, adj_t, return_attention_weights=True)
            torch.testing.assert_close(out_s, out, atol=1e-6, rtol=1e-5)
            assert adj.layout == layout and adj.size() == (4, 4) and adj._nnz() == 4
            dense = torch.zeros(4, 4)
            dense[edge_index[1], edge_index[0]] = alpha
            torch.testing.assert_close(adj.to_dense(), dense, atol=1e-6, rtol=1e-5)
            assert alpha_s.size() == (4,)
        ei_sorted = EdgeIndex(edge_index, sparse_size=(4, 4)).sort_by("col")[0]
        _, (ei_back, alpha_e) = conv(x, ei_sorted, return_attention_weights=True)
        assert isinstance(ei_back, EdgeIndex) and ei_back is ei_sorted
        dense_e = torch.zeros(4, 4)
        dense_e[ei_sorted[1], ei_sorted[0]] = alpha_e
        torch.testing.assert_close(dense_e, dense, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", [None, "edge_index", *LAYOUTS])
@pytest.mark.parametrize("grad", [False, True])
def test_returned_adjacency_follows_the_input_with_added_self_loops(layout, grad):
    with torch.set_grad_enabled(grad):   # False: the CSR rendering
        x = _rand(5, 8)
        edge_index = torch.tensor([[0, 1, 2, 3, 4, 2], [1, 0, 1, 1, 3, 2]])   # has a loop 2 -> 2
        conv = _conv(ORGNNConv, 8, 4, add_self_loops=True)
        ref_out, (ref_ei, ref_alpha) = conv(x, edge_index, return_attention_weights=True)
        assert ref_ei.size(1) == 5 + 5   # the old loop replaced, one loop per node
        expected = orgnn_general_loop(x, x, _edges(ref_ei), *_params(conv))
        torch.testing.assert_close(ref_out, expected, atol=1e-5, rtol=1e-4)
        dense = torch.zeros(5, 5)
        dense[ref_ei[1], ref_ei[0]] = ref_alpha
        if layout is None:
            return
        if layout == "edge_index":
            inp = EdgeIndex(edge_index, sparse_size=(5, 5))
        else:
            inp = _adj_t(edge_index, (5, 5), layout)
        out, (adj, alpha) = conv(x, inp, return_attention_weights=True)
        torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
        if layout == "edge_index":
            assert isinstance(adj, torch.Tensor) and adj.size() == (2, 10)
            got = torch.zeros(5, 5)
            got[adj[1], adj[0]] = alpha
        else:
            assert adj.layout == layout and adj._nnz() == 10
            got = adj.to_dense()
        torch.testing.assert_close(got, dense, atol=1e-6, rtol=1e-5)


def test_assert_module_edge_permutation_and_sparse_layouts():
    x = _rand(6, 8)
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 5, 1, 0], [1, 2, 3, 4, 5, 0, 0, 2]])
    conv = _conv(ORGNNConv, 8, 8)
    assert_module(conv, x, edge_index, expected_size=(6, 8), atol=1e-6)
    bip = _conv(ORGNNConv, 8, 8)
    x_dst = _rand(3, 8, seed=2)
    bip_index = torch.tensor([[0, 1, 2, 3, 4, 5, 5], [0, 0, 1, 1, 2, 2, 0]])
    assert_module(bip, (x, x_dst), bip_index, expected_size=(3, 8), atol=1e-6)


def test_empty_graph_and_nodes_without_edges():
    conv = _conv(ORGNNConv, 8, 6)
    assert conv(torch.rand(0, 8), torch.empty(2, 0, dtype=torch.long)).size() == (0, 6)
    out = conv(_rand(3, 8), torch.empty(2, 0, dtype=torch.long))
    torch.testing.assert_close(out, F.relu(conv.lin.bias).expand(3, 6))
    # bipartite: no edges at all, and a target without senders
    out = conv((_rand(4, 8), _rand(2, 8, seed=2)), torch.empty(2, 0, dtype=torch.long))
    assert out.size() == (2, 6)
    x_src, x_dst = _rand(4, 8), _rand(3, 8, seed=2)
    ei = torch.tensor([[0, 1, 3], [0, 0, 2]])                 # target 1 receives nothing
    out = conv((x_src, x_dst), ei)
    torch.testing.assert_close(out[1], F.relu(conv.lin.bias))
    torch.testing.assert_close(out, orgnn_general_loop(x_src, x_dst, _edges(ei), *_params(conv),
                                                       bipartite=True), atol=1e-5, rtol=1e-4)
    dense = _conv(DenseORGNNConv, 8, 6)
    assert dense(torch.rand(2, 0, 8)).size() == (2, 0, 6)
    out = dense(_rand(3, 8), torch.zeros(3, 3))                 # unbatched: (1, N, F)
    torch.testing.assert_close(out, F.relu(dense.lin.bias).expand(1, 3, 6))


# ---------------------------------------------------------------------------------------
# Eq. 4 on bipartite and general graphs
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_k_neighbours_into_one_target_equal_the_complete_graph_target_row(k):
    x = _rand(k + 1, 16, seed=k)
    target, nbrs = x[:1], x[1:]
    conv = _conv(ORGNNConv, 16, 16)
    complete = orgnn_layer_loop(x, *_params(conv))[0]          # the paper's Eq. 4-6
    star = torch.stack([torch.arange(k), torch.zeros(k, dtype=torch.long)])
    for layer in (_csr_rendering(conv), _gather_rendering(_conv(ORGNNConv, 16, 16)), conv):
        out = layer((nbrs, target), star)
        assert out.size() == (1, 16)
        torch.testing.assert_close(out[0], complete, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out[0], layer(x, complete_edge_index([k + 1]))[0],
                                   atol=1e-6, rtol=1e-5)
    # the target's row of the dense layer on the complete graph, too
    dense = DenseORGNNConv(16, 16)
    dense.load_state_dict(conv.state_dict())
    torch.testing.assert_close(dense(x)[0, 0], complete, atol=1e-6, rtol=1e-5)


def _random_graph(num_src, num_dst, num_edges, seed, bipartite):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, num_src, (num_edges,), generator=g)
    dst = torch.randint(0, num_dst, (num_edges,), generator=g)
    pairs = sorted(set(zip(src.tolist(), dst.tolist())))        # a simple graph
    ei = torch.tensor(pairs, dtype=torch.long).t()
    return ei[:, torch.randperm(ei.size(1), generator=g)]


@pytest.mark.parametrize("bipartite", [False, True])
@pytest.mark.parametrize("outlier_aware", [True, False])
def test_general_graphs_equal_the_edge_by_edge_reference(bipartite, outlier_aware):
    num_src, num_dst = (9, 5) if bipartite else (9, 9)
    ei = _random_graph(num_src, num_dst, 30, seed=3, bipartite=bipartite)
    x_src = _rand(num_src, 8) - 0.3                            # some negative cosines
    x_dst = _rand(num_dst, 8, seed=5) - 0.3 if bipartite else x_src
    if not bipartite:
        assert (ei[0] == ei[1]).any()                          # self-loops are in play
    x = (x_src, x_dst) if bipartite else x_src
    expected = orgnn_general_loop(x_src, x_dst, _edges(ei),
                                  *_params(_conv(outlier_aware=outlier_aware)),
                                  outlier_aware=outlier_aware, bipartite=bipartite)
    for layer in (_csr_rendering(_conv(outlier_aware=outlier_aware)),
                  _gather_rendering(_conv(outlier_aware=outlier_aware))):
        torch.testing.assert_close(layer(x, ei), expected, atol=1e-5, rtol=1e-4)
        adj_t = _adj_t(ei, (num_src, num_dst), torch.sparse_csr)
        torch.testing.assert_close(layer(x, adj_t), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bipartite", [False, True])
def test_edge_confidence_function(bipartite):
    num_src, num_dst = (7, 4) if bipartite else (7, 7)
    ei = _random_graph(num_src, num_dst, 20, seed=11, bipartite=bipartite)
    x_src = _rand(num_src, 6) - 0.3
    x_dst = _rand(num_dst, 6, seed=4) - 0.3 if bipartite else x_src
    c = sparse_edge_confidence(x_src, x_dst, ei[0], ei[1], bipartite=bipartite)
    torch.testing.assert_close(c, edge_confidence_loop(x_src, x_dst, _edges(ei), bipartite),
                               atol=1e-6, rtol=1e-5)
    # on a complete graph it is the per-node c_j of the paper, for every edge leaving j
    x = _rand(6, 6, seed=9) - 0.2
    full = complete_edge_index([6])
    torch.testing.assert_close(sparse_edge_confidence(x, x, *full),
                               sparse_confidence(x, *full)[full[0]], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bipartite", [False, True])
def test_gradients_equal_the_reference(bipartite):
    num_src, num_dst = (6, 4) if bipartite else (6, 6)
    ei = _random_graph(num_src, num_dst, 16, seed=7, bipartite=bipartite)
    x_src = _rand(num_src, 5, dtype=torch.float64).requires_grad_()
    x_dst = _rand(num_dst, 5, seed=2, dtype=torch.float64).requires_grad_() if bipartite \
        else x_src
    inputs = [x_src, x_dst] if bipartite else [x_src]
    x = (x_src, x_dst) if bipartite else x_src
    ref_conv = _conv(dtype=torch.float64, f_in=5, f_out=3)
    ref = orgnn_general_loop(x_src, x_dst, _edges(ei), *_params(ref_conv), bipartite=bipartite)
    weights = torch.linspace(-1, 1, ref.numel(), dtype=torch.float64).view_as(ref)
    ref_grads = torch.autograd.grad((ref * weights).sum(), [*inputs, *_params(ref_conv)])
    for conv in (_conv(dtype=torch.float64, f_in=5, f_out=3),
                 _gather_rendering(_conv(dtype=torch.float64, f_in=5, f_out=3))):
        out = conv(x, ei)
        grads = torch.autograd.grad((out * weights).sum(), [*inputs, *_params(conv)])
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7)
    assert torch.autograd.gradcheck(lambda *xs: ref_conv(tuple(xs) if bipartite else xs[0], ei),
                                    tuple(inputs))


def test_csr_products_gradcheck():
    # 4 receivers (one without entries) x 3 senders, senders ascending within each row
    crow, col = torch.tensor([0, 2, 3, 3, 6]), torch.tensor([0, 2, 1, 0, 1, 2])
    pattern = CSRPattern(crow, col, 3)
    values = torch.rand(6, dtype=torch.float64, requires_grad=True)
    x = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    a = torch.rand(4, 5, dtype=torch.float64, requires_grad=True)
    dense = torch.zeros(4, 3, dtype=torch.float64)
    dense[pattern.row, col] = 1
    torch.testing.assert_close(pattern.spmm(values.detach(), x.detach()),
                               (dense.index_put((pattern.row, col), values.detach()))
                               @ x.detach())
    torch.testing.assert_close(pattern.sddmm(a.detach(), x.detach()),
                               (a.detach() @ x.detach().t())[pattern.row, col])
    assert torch.autograd.gradcheck(pattern.spmm, (values, x))
    assert torch.autograd.gradcheck(pattern.sddmm, (a, x))
    assert torch.autograd.gradcheck(lambda a_: pattern.sddmm(a_, a_[:3]), (a,))


def test_bipartite_input_errors():
    conv = ORGNNConv(8, 4)
    x_src, x_dst = torch.rand(4, 8), torch.rand(2, 8)
    ei = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match="x_dst are needed"):
        conv((x_src, None), ei, size=(4, 2))
    with pytest.raises(ValueError, match="same size.*got 8 and 5"):
        ORGNNConv(-1, 4)((x_src, torch.rand(2, 5)), ei)
    with pytest.raises(ValueError, match=r"edge_index\[1\] refers to node 2.*target x has 2"):
        conv((x_src, x_dst), torch.tensor([[0], [2]]))
    with pytest.raises(ValueError, match=r"size \(4, 3\) does not match"):
        conv((x_src, x_dst), ei, size=(4, 3))
    with pytest.raises(ValueError, match="add_self_loops=True needs one node set"):
        ORGNNConv(8, 4, add_self_loops=True)((x_src, x_dst), ei)
    with pytest.raises(ValueError, match=r"adj_t has shape \(4, 4\).*expected \(2, 4\)"):
        conv((x_src, x_dst), _adj_t(ei, (4, 4), torch.sparse_csr))


# ---------------------------------------------------------------------------------------
# DenseORGNNConv(x, adj, mask) (PyG's test_dense_gat_conv)
# ---------------------------------------------------------------------------------------
def test_dense_adjacency_equals_sparse_on_padded_batches_with_garbage():
    sparse = _conv(ORGNNConv, 8, 8)
    dense = DenseORGNNConv(8, 8)
    dense.load_state_dict(sparse.state_dict())
    # graph 0: a directed path 0 -> 1 -> 2 -> 3 with a self-loop at 3; graph 1: 1 <-> 0 -> 2
    ei0 = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 3]])
    ei1 = torch.tensor([[1, 0, 0], [0, 1, 2]])
    x0, x1 = _rand(4, 8), _rand(3, 8, seed=2)
    sparse_out = sparse(torch.cat([x0, x1]), torch.cat([ei0, ei1 + 4], 1))
    expected = torch.cat([orgnn_general_loop(x0, x0, _edges(ei0), *_params(sparse)),
                          orgnn_general_loop(x1, x1, _edges(ei1), *_params(sparse))])
    torch.testing.assert_close(sparse_out, expected, atol=1e-5, rtol=1e-4)

    x = torch.randn(2, 4, 8) * 30                          # garbage in the padding
    x[0], x[1, :3] = x0, x1
    adj = torch.zeros(2, 4, 4)
    adj[0, ei0[1], ei0[0]] = 1                              # adj[b, i, j]: j sends to i
    adj[1, ei1[1], ei1[0]] = 1
    adj[1, 3, :] = adj[1, :, 3] = 1                         # edges of the padded node
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    out, alpha = dense(x, adj, mask, return_attention_weights=True)
    assert out[1, 3].abs().sum() == 0 and alpha[1, 3].abs().sum() == 0
    assert alpha[1, :, 3].abs().sum() == 0
    torch.testing.assert_close(out[mask], sparse_out, atol=1e-5, rtol=1e-4)
    # the same with a float 0/1 mask and a bool adjacency
    torch.testing.assert_close(dense(x, adj.bool(), mask.float()), out)
    # the attention weights agree with the sparse layer's
    _, (ei, alpha_s) = sparse(x0, ei0, return_attention_weights=True)
    torch.testing.assert_close(alpha[0, ei[1], ei[0]], alpha_s, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("add_self_loops", [False, True])
@pytest.mark.parametrize("outlier_aware", [True, False])
def test_dense_complete_adjacency_equals_the_complete_graph_route(add_self_loops,
                                                                  outlier_aware):
    dense = _conv(DenseORGNNConv, 8, 8, add_self_loops=add_self_loops,
                  outlier_aware=outlier_aware)
    x, mask = pad([_rand(n, 8, seed=n) for n in (5, 2, 4)])
    n = x.size(1)
    complete = torch.ones(n, n) - torch.eye(n)
    ref, ref_alpha = dense(x, mask=mask, return_attention_weights=True)
    out, alpha = dense(x, complete, mask, return_attention_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alpha, ref_alpha, atol=1e-6, rtol=1e-5)
    for b, g in enumerate((5, 2, 4)):
        expected = orgnn_layer_loop(x[b, :g], *_params(dense), outlier_aware,
                                    self_loops=add_self_loops)
        torch.testing.assert_close(out[b, :g], expected, atol=1e-5, rtol=1e-4)


def test_dense_broadcasting_of_adjacency_and_mask():
    conv = _conv(DenseORGNNConv, 16, 16)
    x = _rand(8, 3, 16)
    adj = torch.tensor([[0, 1, 1], [1, 0, 1], [1, 1, 0]])
    out = conv(x, adj)
    assert out.size() == (8, 3, 16)
    torch.testing.assert_close(out, conv(x))                            # complete graph
    torch.testing.assert_close(conv(x, adj, torch.tensor([1, 1, 1], dtype=torch.bool)), out)
    path = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    masked = conv(x, path, torch.tensor([1.0, 1.0, 0.0]))               # (N,) float mask
    for b in range(8):
        torch.testing.assert_close(masked[b], conv(x[b], path, torch.tensor([1, 1, 0]))[0])
    assert masked[:, 2].abs().sum() == 0
    torch.testing.assert_close(conv(x, mask=torch.tensor([1, 1, 0])), conv(x, path.new_ones(
        3, 3) - torch.eye(3, dtype=path.dtype), torch.tensor([True, True, False])))
    # a 2-D input is one graph, with a (N, N) adjacency and an (N,) mask: (1, N, F) out,
    # as PyG's DenseGATConv
    torch.testing.assert_close(conv(x[0], path), conv(x[:1], path[None]))


def test_dense_without_adjacency_forms_no_pairwise_feature_tensor():
    # adj=None keeps the complete-graph route: no (B, N, N, F) tensor, the same as before
    conv = DenseORGNNConv(32, 32)
    x = torch.rand(64, 9, 32)
    with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as prof:
        conv(x)
    largest = max((torch.Size(s).numel() for e in prof.events() for s in e.input_shapes
                   if isinstance(s, list) and all(isinstance(v, int) for v in s)), default=0)
    assert largest <= 64 * 9 * 32


# ---------------------------------------------------------------------------------------
# act, lazy sizes, to_hetero, meta
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ORGNNConv, DenseORGNNConv])
def test_act_none_gives_the_pre_activation_output(cls):
    x = _rand(6, 8) - 0.5
    args = (complete_edge_index([6]),) if cls is ORGNNConv else ()
    default = _conv(cls, 8, 8)
    pre = _conv(cls, 8, 8, act=None)
    leaky = _conv(cls, 8, 8, act="leaky_relu", act_kwargs={"negative_slope": 0.2})
    module = _conv(cls, 8, 8, act=torch.nn.Tanh())
    h = pre(x, *args)
    assert (h < 0).any()                                   # outputs a ReLU would kill
    expected = orgnn_layer_loop(x, *_params(pre)).view_as(h)  # the loop applies ReLU
    torch.testing.assert_close(F.relu(h), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(default(x, *args), F.relu(h))
    torch.testing.assert_close(leaky(x, *args), F.leaky_relu(h, 0.2))
    torch.testing.assert_close(module(x, *args), torch.tanh(h))
    assert str(pre) == f"{cls.__name__}(8, 8, act=None)"
    assert str(leaky) == f"{cls.__name__}(8, 8, act=LeakyReLU(negative_slope=0.2))"
    assert str(default) == f"{cls.__name__}(8, 8)"


def test_orgnn_model_keeps_the_papers_relu():
    torch.manual_seed(0)
    model = ORGNN(8, 8, num_parts=2, num_layers=2, init="glorot")
    x = torch.randn(4, 2, 5, 8)
    assert (model(x) >= 0).all() and (model(x) == 0).any()


@pytest.mark.parametrize("cls", [ORGNNConv, DenseORGNNConv])
def test_lazy_in_channels(cls):
    lazy = cls(-1, 6)
    x = _rand(5, 8)
    args = (complete_edge_index([5]),) if cls is ORGNNConv else ()
    out = lazy(x, *args)
    assert out.size() == ((5, 6) if cls is ORGNNConv else (1, 5, 6))
    assert lazy.lin.in_channels == 8 and lazy.att.in_channels == 8
    eager = cls(8, 6)
    eager.load_state_dict(lazy.state_dict())
    torch.testing.assert_close(eager(x, *args), out)
    if cls is ORGNNConv:   # bipartite, lazily
        bip = cls(-1, 6)
        assert bip((x, _rand(2, 8, seed=3)), torch.tensor([[0, 1, 4], [0, 1, 1]])).size() == (
            2, 6)


@pytest.mark.parametrize("in_channels", [-1, (-1, -1)])   # (-1, -1): the GATConv habit
def test_to_hetero_with_edges_between_node_types(in_channels):
    from torch_geometric.nn import to_hetero

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = ORGNNConv(in_channels, 6, act=None)

        def forward(self, x, edge_index):
            return self.conv(x, edge_index)

    metadata = (["a", "b"], [("a", "to", "b"), ("b", "to", "a"), ("b", "near", "b")])
    x_dict = {"a": _rand(4, 8), "b": _rand(3, 8, seed=2)}
    ei_dict = {("a", "to", "b"): torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]]),
               ("b", "to", "a"): torch.tensor([[0, 1, 2], [1, 2, 3]]),
               ("b", "near", "b"): torch.tensor([[0, 1, 2], [1, 2, 2]])}
    torch.manual_seed(0)
    model = to_hetero(Net(), metadata, aggr="sum")
    out = model(x_dict, ei_dict)
    assert out["a"].size() == (4, 6) and out["b"].size() == (3, 6)
    convs = model.conv
    ab, ba, bb = convs["a__to__b"], convs["b__to__a"], convs["b__near__b"]
    for conv in (ab, ba, bb):
        assert conv.lin.in_channels == 8
    expected_b = (orgnn_general_loop(x_dict["a"], x_dict["b"], _edges(ei_dict[metadata[1][0]]),
                                     *_params(ab), bipartite=True, act=None)
                  + orgnn_general_loop(x_dict["b"], x_dict["b"],
                                       _edges(ei_dict[metadata[1][2]]), *_params(bb), act=None))
    expected_a = orgnn_general_loop(x_dict["b"], x_dict["a"], _edges(ei_dict[metadata[1][1]]),
                                    *_params(ba), bipartite=True, act=None)
    torch.testing.assert_close(out["b"], expected_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["a"], expected_a, atol=1e-5, rtol=1e-4)


def test_meta_device_forward():
    with torch.device("meta"):
        conv = ORGNNConv(8, 16)
        dense = DenseORGNNConv(8, 16)
        model = ORGNN(8, 8, num_parts=3, num_layers=2)
        x = torch.empty(5, 8)
        ei = torch.empty(2, 12, dtype=torch.long)
        assert conv(x, ei).shape == (5, 16) and conv(x, ei).is_meta
        assert conv((x, torch.empty(2, 8)), ei).shape == (2, 16)
        out, (_, alpha) = conv(x, ei, return_attention_weights=True)
        assert out.is_meta and alpha.shape == (12,)
        assert dense(torch.empty(4, 5, 8)).shape == (4, 5, 16)
        assert dense(torch.empty(4, 5, 8), torch.empty(5, 5),
                     torch.empty(4, 5, dtype=torch.bool)).shape == (4, 5, 16)
        assert dense(torch.empty(4, 5, 8), mask=torch.empty(5)).shape == (4, 5, 16)
        assert model(torch.empty(2, 3, 6, 8), torch.empty(2, 6, dtype=torch.bool)).shape == (
            2, 3, 8)
        # the sparse route, on a batch built by hand (PyG's collate reads values)
        from torch_geometric.data import Data
        batch = Data(x=torch.empty(12, 3, 8), edge_index=torch.empty(2, 60, dtype=torch.long),
                     batch=torch.empty(12, dtype=torch.long), ptr=torch.empty(3, dtype=torch.long))
        assert model(batch).shape == (2, 3, 8)
        # lazy sizes on meta (built there: moving an uninitialised parameter empties it)
        assert ORGNNConv(-1, 4)(x, ei).shape == (5, 4)
        assert DenseORGNNConv(-1, 4)(torch.empty(2, 5, 8)).shape == (2, 5, 4)


# ---------------------------------------------------------------------------------------
# torch.compile (few: they are slow on CPU)
# ---------------------------------------------------------------------------------------
def test_torch_compile_bipartite_and_dense_adjacency_without_graph_breaks():
    conv = _conv(ORGNNConv, 16, 16)
    x_src, x_dst = _rand(7, 16), _rand(3, 16, seed=2)
    ei = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 2, 2, 2]])
    dense = _conv(DenseORGNNConv, 16, 16)
    xd, mask = pad([_rand(4, 16), _rand(3, 16, seed=3)])
    adj = torch.tensor([[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0]])
    for module, args in ((conv, ((x_src, x_dst), ei)), (dense, (xd, adj, mask))):
        explanation = torch._dynamo.explain(module)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(module)(*args), module(*args), atol=1e-5,
                                   rtol=1e-4)


# ---------------------------------------------------------------------------------------
# PyG habits (issue 21): (in_src, in_dst) pairs, weighted dense adjacencies, unbatched
# dense input, no CSR beta warning
# ---------------------------------------------------------------------------------------
def test_in_channels_pair_as_gatconv():
    from torch_geometric.nn import GATConv

    x_src, x_dst = _rand(6, 8) - 0.3, _rand(3, 8, seed=2) - 0.3
    ei = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 2, 2]])
    eager = _conv(ORGNNConv, 8, 6)
    expected = orgnn_general_loop(x_src, x_dst, _edges(ei), *_params(eager), bipartite=True)
    for in_channels in ((8, 8), (-1, -1), (-1, 8), (8, -1)):
        GATConv(in_channels, 6, add_self_loops=False)((x_src, x_dst), ei)  # what PyG takes
        conv = ORGNNConv(in_channels, 6)
        assert str(conv) == f"ORGNNConv({in_channels}, 6)"
        out = conv((x_src, x_dst), ei)                                  # lazy ones build here
        assert out.shape == (3, 6) and conv.att.in_channels == 8
        conv.load_state_dict(eager.state_dict())
        torch.testing.assert_close(conv((x_src, x_dst), ei), expected, atol=1e-5, rtol=1e-4)
    lazy = ORGNNConv((-1, -1), 64)                                      # one node set too
    assert lazy(x_src, complete_edge_index([6])).shape == (6, 64)
    # different widths: Eq. 4 and Eq. 6 are undefined; refused when built, and when fed
    with pytest.raises(ValueError, match=r"in_channels \(8, 5\).*same width"):
        ORGNNConv((8, 5), 6)
    with pytest.raises(ValueError, match="same size.*got 8 and 5"):
        ORGNNConv((-1, -1), 6)((x_src, _rand(3, 5)), ei)


@pytest.mark.parametrize("outlier_aware", [True, False])
def test_dense_weighted_adjacency_is_its_pattern_as_densegatconv(outlier_aware):
    """Non-zero = edge, whatever the value (DenseGATConv's rule); equal to the binary
    adjacency and to ORGNNConv on the same edges (whose sparse adj_t values are ignored
    alike), on a padded batch of two graphs."""
    from torch_geometric.utils import to_dense_adj

    sparse = _conv(ORGNNConv, 8, 6, outlier_aware=outlier_aware)
    dense = DenseORGNNConv(8, 6, outlier_aware=outlier_aware)
    dense.load_state_dict(sparse.state_dict())
    graphs = [_rand(5, 8, seed=1) - 0.3, _rand(3, 8, seed=2) - 0.3]
    eis = [_random_graph(5, 5, 12, seed=7, bipartite=False),
           _random_graph(3, 3, 5, seed=8, bipartite=False)]
    x, mask = pad(graphs)
    binary = torch.zeros(2, 5, 5)
    weighted = torch.zeros(2, 5, 5)
    for b, ei in enumerate(eis):
        w = torch.linspace(-3.0, 5.0, ei.size(1)) + 0.01            # negative, large, never 0
        n = len(graphs[b])
        binary[b, :n, :n] = to_dense_adj(ei.flip(0), max_num_nodes=n)[0]
        weighted[b, ei[1], ei[0]] = w
    assert set(weighted.unique().tolist()) - {0.0, 1.0}                # truly weighted
    out = dense(x, weighted, mask)
    torch.testing.assert_close(out, dense(x, binary, mask))
    for b, (g, ei) in enumerate(zip(graphs, eis)):
        expected = sparse(g, ei)
        torch.testing.assert_close(out[b, :len(g)], expected, atol=1e-5, rtol=1e-4)
        adj_t = torch.sparse_coo_tensor(ei.flip(0), torch.linspace(-3.0, 5.0, ei.size(1))
                                        + 0.01, (len(g), len(g)))
        torch.testing.assert_close(sparse(g, adj_t), expected, atol=1e-5, rtol=1e-4)
    assert out[1, 3:].abs().sum() == 0                                # padded rows


def test_dense_unbatched_input_gives_one_graph_batch_as_pyg():
    from torch_geometric.nn import DenseGATConv

    x, adj = _rand(4, 8), torch.ones(4, 4)
    ours = _conv(DenseORGNNConv, 8, 6)
    assert DenseGATConv(8, 6)(x, adj).shape == (1, 4, 6)
    out, alpha = ours(x, adj, return_attention_weights=True)
    assert out.shape == (1, 4, 6) and alpha.shape == (1, 4, 4)
    torch.testing.assert_close(out, ours(x[None], adj[None]))
    assert ours(x).shape == (1, 4, 6)                                 # complete-graph route


def test_no_csr_beta_warning_from_the_layer_and_no_global_filter():
    import subprocess
    import sys
    from pathlib import Path

    code = """
import warnings, torch
warnings.simplefilter("always")
from orgnn import ORGNNConv
csr_filters = [f for f in warnings.filters if f[1] is not None and "CSR" in f[1].pattern]
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    with torch.no_grad():                               # the CSR rendering
        ORGNNConv(8, 8)(torch.rand(4, 8), torch.tensor([[0, 1, 2], [1, 2, 3]]))
print(len(csr_filters), [str(w.message) for w in seen if "CSR" in str(w.message)])
"""
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=repo, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout
    assert "Sparse CSR tensor support is in beta" not in proc.stderr
