"""Eq. 4-6 written as plain loops over nodes, straight from the paper (test reference only)."""
from __future__ import annotations

import torch


def orgnn_layer_loop(x, lin_weight, lin_bias, att_weight, att_bias, outlier_aware=True,
                     self_loops=False):
    """One OR-GNN layer on one complete graph ``x`` (n, F); parameters as in ORGNNConv."""
    n = x.shape[0]
    v = att_weight.reshape(-1)
    b = att_bias.reshape(())
    confidence = []
    for j in range(n):
        others = [x[l] for l in range(n) if l != j]
        if not others or not outlier_aware:
            confidence.append(torch.ones((), dtype=x.dtype))
            continue
        mean = sum(others) / len(others)
        cos = torch.dot(x[j], mean) / (torch.linalg.norm(x[j]) * torch.linalg.norm(mean))
        confidence.append(torch.clamp(cos, min=0))
    rows = []
    for i in range(n):
        senders = [j for j in range(n) if j != i or self_loops]
        numerator = torch.zeros_like(x[i])
        denominator = torch.zeros((), dtype=x.dtype)
        for j in senders:
            d = x[i] - x[j]
            affinity = torch.sigmoid(torch.dot(v, d * d) + b)
            numerator = numerator + confidence[j] * affinity * x[j]
            denominator = denominator + confidence[j] * affinity
        if not senders:
            h = torch.zeros_like(x[i])
        elif denominator > 0:
            h = numerator / denominator
        else:
            h = sum(x[j] for j in senders) / len(senders)
        rows.append(torch.relu(lin_weight @ h + (0 if lin_bias is None else lin_bias)))
    return torch.stack(rows)


def complete_edge_index(sizes, self_loops=False):
    """Edges (src -> dst) of disjoint complete graphs with the given node counts."""
    edges, offset = [], 0
    for n in sizes:
        for i in range(n):
            for j in range(n):
                if i != j or self_loops:
                    edges.append((offset + j, offset + i))
        offset += n
    if not edges:
        return torch.empty(2, 0, dtype=torch.long)
    return torch.tensor(edges, dtype=torch.long).t().contiguous()


def pad(graphs, num_nodes=None):
    """List of (n_g, F) -> padded (B, N, F) and mask (B, N)."""
    n_max = num_nodes or max(g.shape[0] for g in graphs)
    x = torch.zeros(len(graphs), n_max, graphs[0].shape[1], dtype=graphs[0].dtype)
    mask = torch.zeros(len(graphs), n_max, dtype=torch.bool)
    for b, g in enumerate(graphs):
        x[b, : g.shape[0]] = g
        mask[b, : g.shape[0]] = True
    return x, mask


def orgnn_general_loop(x_src, x_dst, edges, lin_weight, lin_bias, att_weight, att_bias,
                       outlier_aware=True, bipartite=False, act=torch.relu):
    """One OR-GNN layer on a general graph, edge by edge, from the layer's definition of Eq. 4:
    the sender j of an edge j -> i is compared with the mean of the other members of i's
    closed neighbourhood (the receiver i and its other senders; a self-loop's own sender is
    i itself). ``edges`` is a list of (src, dst) pairs; with ``bipartite=False`` the node
    sets coincide (``x_src is x_dst``) and (i, i) is a self-loop."""
    v = att_weight.reshape(-1)
    b = att_bias.reshape(())
    rows = []
    for i in range(x_dst.shape[0]):
        incoming = [e for e, (_, d) in enumerate(edges) if d == i]
        if not incoming:
            h = torch.zeros_like(x_dst[i])
        else:
            weights = []
            for e in incoming:
                j = edges[e][0]
                is_loop = not bipartite and j == i
                if is_loop:   # the other members: every other (non-loop) sender
                    others = [x_src[edges[f][0]] for f in incoming
                              if bipartite or edges[f][0] != i]
                else:         # the receiver and the senders of the other non-loop edges
                    others = [x_dst[i]] + [x_src[edges[f][0]] for f in incoming
                                           if f != e and (bipartite or edges[f][0] != i)]
                if not outlier_aware or not others:
                    c = torch.ones((), dtype=x_src.dtype)
                else:
                    mean = sum(others) / len(others)
                    c = torch.clamp(torch.dot(x_src[j], mean) / (
                        torch.linalg.norm(x_src[j]) * torch.linalg.norm(mean)), min=0)
                d = x_dst[i] - x_src[j]
                weights.append(c * torch.sigmoid(torch.dot(v, d * d) + b))
            denominator = sum(weights)
            if denominator > 0:
                h = sum(w * x_src[edges[e][0]] for w, e in zip(weights, incoming)) / denominator
            else:
                h = sum(x_src[edges[e][0]] for e in incoming) / len(incoming)
        out = lin_weight @ h + (0 if lin_bias is None else lin_bias)
        rows.append(out if act is None else act(out))
    return torch.stack(rows)


def edge_confidence_loop(x_src, x_dst, edges, bipartite=False):
    """c_ij of every edge (j, i) in ``edges`` (Eq. 4 as the layers define it on general
    graphs), by the same plain reading as :func:`orgnn_general_loop`."""
    out = []
    for e, (j, i) in enumerate(edges):
        incoming = [f for f, (_, d) in enumerate(edges) if d == i]
        if not bipartite and j == i:
            others = [x_src[edges[f][0]] for f in incoming if edges[f][0] != i]
        else:
            others = [x_dst[i]] + [x_src[edges[f][0]] for f in incoming
                                   if f != e and (bipartite or edges[f][0] != i)]
        if not others:
            out.append(torch.ones((), dtype=x_src.dtype))
            continue
        mean = sum(others) / len(others)
        out.append(torch.clamp(torch.dot(x_src[j], mean) / (
            torch.linalg.norm(x_src[j]) * torch.linalg.norm(mean)), min=0))
    return torch.stack(out)
