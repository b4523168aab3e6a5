"""One OR-GNN layer against PyG's layers and a naive dense reference, on batched complete graphs.

Candidates (all ``F -> F``, every node transformed by a ``F x F`` weight):

* ``dense``: :class:`orgnn.DenseORGNNConv` on ``(B, N, F)`` (``adj=None``: the
  complete-graph route);
* ``dense_adj``: the same layer given the complete graphs as an explicit ``(N, N)``
  adjacency (the general-graph route, Eq. 4 per edge: two more batched products);
* ``naive``: the same rule written as a plain reading of Eq. 6, materialising the
  ``B x N x N x F`` tensor of differences (Eq. 4 and 5 as in the spec, Eq. 5's sum as a
  batched matrix product);
* ``sparse``: :class:`orgnn.ORGNNConv` on the equivalent ``edge_index`` (``B`` complete
  graphs of ``N`` nodes, no self-loops: ``B N (N - 1)`` edges);
* ``gat``: PyG ``GATConv(F, F, heads=1, add_self_loops=False)`` on the same edges;
* ``graphconv``: PyG ``GraphConv(F, F)`` (sum aggregation) on the same edges;
* ``matmul``: the bare ``(B N, F) @ (F, F)`` product every candidate contains: the machine's
  own matmul GFLOP/s, measured in the same run, interleaved with the rest.

For every configuration ``B:N:F`` the script checks that ``dense``, ``dense_adj``, ``naive``
and ``sparse`` agree (same weights), then times forward (under ``torch.inference_mode``) and
forward+backward (``out.sum().backward()``, parameters requiring grad) interleaved, eager and
(unless ``--no-compile``) ``torch.compile``, and measures each candidate's peak memory in a
child process (see ``benchmarks/_common.py`` for how). GFLOP/s count each candidate's own
matrix-product FLOPs (``torch.utils.flop_counter``); "% matmul" divides them by the
``matmul`` row's rate of the same run. bf16 runs only on CUDA.

Usage::

    python benchmarks/layer.py                # B=4096 N=11 and B=1024 N=31, F=256
    python benchmarks/layer.py --quick        # small sizes, eager only, < 1 minute
"""
from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import _common
from benchmarks._common import MiB

CANDIDATES = ("dense", "dense_adj", "naive", "sparse", "gat", "graphconv")
DEFAULT_CONFIGS = ("4096:11:256", "1024:31:256")
QUICK_CONFIGS = ("512:11:64",)


# --------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------
class NaiveDense(torch.nn.Module):
    """Eq. 4-6 read literally: the ``(B, N, N, F)`` differences of Eq. 6 are materialised."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(channels, channels)
        self.att = torch.nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(1)
        diff = x.unsqueeze(2) - x.unsqueeze(1)                          # (B, N, N, F)
        affinity = torch.sigmoid((diff * diff * self.att.weight.view(-1)).sum(-1)
                                 + self.att.bias)                       # Eq. 6
        others = (x.sum(1, keepdim=True) - x) / max(n - 1, 1)           # mean over l != j
        conf = F.cosine_similarity(x, others, dim=-1, eps=1e-12).clamp_min(0)  # Eq. 4
        off = 1 - torch.eye(n, dtype=x.dtype, device=x.device)
        weight = affinity * conf.unsqueeze(1) * off
        denom = weight.sum(-1, keepdim=True)
        alpha = torch.where(denom > 0, weight / denom.clamp_min(1e-30), off / max(n - 1, 1))
        return F.relu(self.lin(alpha @ x))                              # Eq. 5


def complete_edge_index(b: int, n: int, device: torch.device) -> torch.Tensor:
    idx = torch.arange(n, device=device)
    src, dst = torch.meshgrid(idx, idx, indexing="ij")
    keep = src != dst
    src, dst = src[keep], dst[keep]
    off = (torch.arange(b, device=device) * n).view(-1, 1)
    return torch.stack([(src.view(1, -1) + off).reshape(-1), (dst.view(1, -1) + off).reshape(-1)])


def build(b: int, n: int, f: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Inputs and modules of one configuration; the OR-GNN candidates share weights."""
    from torch_geometric.nn import GATConv, GraphConv

    from orgnn.nn import DenseORGNNConv, ORGNNConv

    gen = torch.Generator().manual_seed(seed)
    # Non-negative features with a shared component, like pooled CNN part features.
    x = (torch.rand(b, n, f, generator=gen) + 0.5 * torch.randn(b, n, f, generator=gen)).relu()
    x = x.to(device=device, dtype=dtype)
    torch.manual_seed(seed)
    dense = DenseORGNNConv(f, f)
    with torch.no_grad():  # a non-trivial V, b so that Eq. 6 matters
        dense.att.weight.normal_(0, 0.05)
        dense.att.bias.fill_(0.5)
    sparse = ORGNNConv(f, f)
    sparse.load_state_dict(dense.state_dict())
    dense_adj = DenseORGNNConv(f, f)
    dense_adj.load_state_dict(dense.state_dict())
    naive = NaiveDense(f)
    naive.load_state_dict({"lin.weight": dense.lin.weight, "lin.bias": dense.lin.bias,
                           "att.weight": dense.att.weight, "att.bias": dense.att.bias})
    modules = {
        "dense": dense, "dense_adj": dense_adj, "naive": naive, "sparse": sparse,
        "gat": GATConv(f, f, heads=1, add_self_loops=False),
        "graphconv": GraphConv(f, f),
    }
    modules = {k: m.to(device=device, dtype=dtype) for k, m in modules.items()}
    edge_index = complete_edge_index(b, n, device)
    return x, edge_index, modules


def callers(x: torch.Tensor, edge_index: torch.Tensor, modules: dict[str, torch.nn.Module]):
    """``{name: fn}`` with ``fn()`` the candidate's forward on its own input form."""
    flat = x.reshape(-1, x.size(-1))
    n = x.size(1)
    complete = torch.ones(n, n, device=x.device) - torch.eye(n, device=x.device)
    fns = {}
    for name, mod in modules.items():
        if name in ("dense", "naive"):
            fns[name] = (lambda m: lambda: m(x))(mod)
        elif name == "dense_adj":
            fns[name] = (lambda m: lambda: m(x, complete))(mod)
        else:
            fns[name] = (lambda m: lambda: m(flat, edge_index))(mod)
    weight = modules["dense"].lin.weight.detach()
    fns["matmul"] = lambda: flat @ weight.T
    return fns


def check_agreement(b: int, n: int, f: int, device: torch.device) -> dict[str, float]:
    """Max abs difference of ``dense_adj``, ``naive`` and ``sparse`` from ``dense`` (same
    weights)."""
    x, edge_index, modules = build(min(b, 64), n, f, device, torch.float32, seed=1)
    complete = torch.ones(n, n, device=device) - torch.eye(n, device=device)
    with torch.inference_mode():
        ref = modules["dense"](x)
        out = {"naive": modules["naive"](x), "dense_adj": modules["dense_adj"](x, complete),
               "sparse": modules["sparse"](x.reshape(-1, f), edge_index).view_as(ref)}
    diffs = {k: float((v - ref).abs().max()) for k, v in out.items()}
    for k, d in diffs.items():
        if not d < 1e-3 * max(1.0, float(ref.abs().max())):
            raise AssertionError(f"{k} disagrees with dense by {d}")
    return diffs


def matmul_flops(fn, backward: bool = False) -> int:
    with FlopCounterMode(display=False) as counter:
        out = fn()
        if backward:
            out.float().sum().backward()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------
# Timing of one configuration
# --------------------------------------------------------------------------------------
def time_config(b: int, n: int, f: int, device: torch.device, dtype: torch.dtype,
                compile_mode: bool, repeats: int, budget_s: float,
                skip: set[str]) -> dict[str, Any]:
    x, edge_index, modules = build(b, n, f, device, dtype)
    modules = {k: m for k, m in modules.items() if k not in skip}
    if compile_mode:
        torch._dynamo.reset()
        modules = {k: torch.compile(m, dynamic=False) for k, m in modules.items()}
    fns = callers(x, edge_index, modules)
    if compile_mode:  # compile-time is not run time: trigger every compilation first
        compile_s = {}
        for name, fn in fns.items():
            if name == "matmul":
                continue
            with torch.inference_mode():
                _, compile_s[name] = _common.timed(fn, device)
            _, extra = _common.timed(lambda fn=fn, m=modules[name]: _fwd_bwd(fn, m), device)
            compile_s[name] += extra
    result: dict[str, Any] = {"B": b, "N": n, "F": f, "dtype": str(dtype).replace("torch.", ""),
                              "mode": "compile" if compile_mode else "eager",
                              "edges": int(edge_index.size(1))}
    if compile_mode:
        result["compile_s"] = compile_s

    # forward, inference mode
    with torch.inference_mode():
        fwd = _common.interleaved(fns, repeats=repeats, warmup=1, device=device,
                                  budget_s=budget_s)
    # forward + backward (parameters require grad; the input does not)
    train_fns = {k: _trainer(fn, modules.get(k)) for k, fn in fns.items() if k != "matmul"}
    w = modules["dense"].lin.weight.detach().clone().requires_grad_(True) \
        if "dense" in modules else None
    flat = x.reshape(-1, f)
    if w is not None:
        def mm_train() -> None:
            (flat @ w.T).sum().backward()
            w.grad = None
        train_fns["matmul"] = mm_train
    bwd = _common.interleaved(train_fns, repeats=repeats, warmup=1, device=device,
                              budget_s=budget_s)

    # FLOPs of each candidate's own matrix products (eager modules, same inputs)
    _, _, eager_modules = build(b, n, f, device, dtype)
    eager_fns = callers(x, edge_index, eager_modules)
    rows = {}
    for name in fns:
        with torch.inference_mode():
            flops = matmul_flops(eager_fns[name])
        if name == "matmul":
            flops_bwd = 2 * flops  # forward + the weight's gradient (the input needs none)
        else:
            flops_bwd = matmul_flops(eager_fns[name], backward=True)
            _zero_grad(eager_modules[name])
        rows[name] = {"forward_s": fwd[name]["median_s"], "forward_times_s": fwd[name]["times_s"],
                      "flops_forward": flops, "flops_forward_backward": flops_bwd}
        if name in bwd:
            rows[name]["forward_backward_s"] = bwd[name]["median_s"]
            rows[name]["forward_backward_times_s"] = bwd[name]["times_s"]
    mm_fwd = rows["matmul"]["flops_forward"] / rows["matmul"]["forward_s"]
    mm_bwd = (2 * rows["matmul"]["flops_forward"] / rows["matmul"]["forward_backward_s"]
              if "forward_backward_s" in rows["matmul"] else None)
    for row in rows.values():
        row["gflops_forward"] = row["flops_forward"] / row["forward_s"] / 1e9
        row["pct_matmul_forward"] = 100 * row["flops_forward"] / row["forward_s"] / mm_fwd
        if "forward_backward_s" in row and mm_bwd:
            fb = row["flops_forward_backward"]
            row["gflops_forward_backward"] = fb / row["forward_backward_s"] / 1e9
            row["pct_matmul_forward_backward"] = 100 * fb / row["forward_backward_s"] / mm_bwd
    if "dense" in rows:
        for row in rows.values():
            row["forward_vs_dense"] = row["forward_s"] / rows["dense"]["forward_s"]
            if "forward_backward_s" in row and "forward_backward_s" in rows["dense"]:
                row["forward_backward_vs_dense"] = (row["forward_backward_s"]
                                                    / rows["dense"]["forward_backward_s"])
    result["candidates"] = rows
    return result


def _zero_grad(module: torch.nn.Module | None) -> None:
    if module is not None:
        for p in module.parameters():
            p.grad = None


def _trainer(fn, module: torch.nn.Module | None):
    return lambda: _fwd_bwd(fn, module)


def _fwd_bwd(fn, module: torch.nn.Module | None) -> None:
    out = fn()
    out.float().sum().backward()
    _zero_grad(module)


# --------------------------------------------------------------------------------------
# Peak memory, in a child process per configuration
# --------------------------------------------------------------------------------------
def _pin_mmap_threshold() -> None:
    """Make glibc mmap every block >= 128 KiB and unmap it on free (no dynamic threshold),
    so the resident set falls back after each candidate and its peak is its own."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except OSError:
        pass


def memory_child(b: int, n: int, f: int, device: torch.device, skip: set[str]) -> dict:
    _pin_mmap_threshold()
    x, edge_index, modules = build(b, n, f, device, torch.float32)
    fns = callers(x, edge_index, modules)
    out: dict[str, dict[str, float]] = {}
    method = ""
    for name, fn in fns.items():
        if name in skip:
            continue
        out[name] = {}
        with torch.inference_mode():
            fn()  # warm-up (lazy initialisation, thread pools)
            _pin_mmap_threshold()
            with _common.PeakMemory(device) as mem:
                res = fn()
                del res
        out[name]["forward_mib"] = mem.peak_bytes / MiB
        method = mem.method
        if name == "matmul":
            continue
        _fwd_bwd(fn, modules[name])
        _pin_mmap_threshold()
        with _common.PeakMemory(device) as mem:
            _fwd_bwd(fn, modules[name])
        out[name]["forward_backward_mib"] = mem.peak_bytes / MiB
    return {"method": method + ", one child process per configuration, glibc "
                               "M_MMAP_THRESHOLD pinned to 128 KiB", "peak": out}


def run_memory_child(b: int, n: int, f: int, device: str, skip: set[str],
                     threads: int | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", f"{b}:{n}:{f}",
           "--device", device]
    if skip:
        cmd += ["--skip", *sorted(skip)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return {"error": f"memory child exited with {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
def targets(results: list[dict]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on the first eager float32 configuration."""
    eager = [r for r in results if r["mode"] == "eager" and r["dtype"] == "float32"]
    if not eager:
        return []
    r = eager[0]
    c = r["candidates"]
    mem = r.get("memory", {}).get("peak", {})
    out = []

    def add(name: str, value: float | None, goal: str, met: bool | None) -> None:
        out.append({"target": name, "config": f"B={r['B']} N={r['N']} F={r['F']}",
                    "measured": value, "goal": goal, "met": met})

    if "gat" in c and "dense" in c:
        v = c["gat"]["forward_s"] / c["dense"]["forward_s"]
        add("dense forward speed-up over GATConv", v, ">= 6x", v >= 6)
    if "naive" in c and "dense" in c:
        v = c["naive"]["forward_s"] / c["dense"]["forward_s"]
        add("dense forward speed-up over naive dense", v, ">= 3x", v >= 3)
        if "dense" in mem and "naive" in mem:
            m = mem["dense"]["forward_mib"] / max(mem["naive"]["forward_mib"], 1e-9)
            add("dense / naive forward peak memory", m, "<= 1/3", m <= 1 / 3)
    if "dense" in c:
        v = c["dense"]["pct_matmul_forward"]
        add("dense forward % of matmul GFLOP/s", v, ">= 30%", v >= 30)
    if "sparse" in c and "gat" in c:
        v = c["sparse"]["forward_s"] / c["gat"]["forward_s"]
        add("sparse ORGNNConv forward time / GATConv", v, "<= 1.5x", v <= 1.5)
    return out


def report(results: list[dict]) -> str:
    lines = []
    for r in results:
        mem = r.get("memory", {}).get("peak", {})
        title = (f"B={r['B']} N={r['N']} F={r['F']} ({r['edges']} edges), {r['mode']}, "
                 f"{r['dtype']}")
        rows = []
        for name, c in r["candidates"].items():
            m = mem.get(name, {}) if r["mode"] == "eager" else {}
            rows.append([
                name, 1e3 * c["forward_s"], c.get("forward_vs_dense", float("nan")),
                c["gflops_forward"], c["pct_matmul_forward"],
                1e3 * c.get("forward_backward_s", float("nan")),
                c.get("forward_backward_vs_dense", float("nan")),
                m.get("forward_mib", float("nan")), m.get("forward_backward_mib", float("nan")),
            ])
        lines.append(title)
        lines.append(_common.fmt_table(
            ["candidate", "fwd ms", "fwd / dense", "fwd GFLOP/s", "% matmul", "fwd+bwd ms",
             "fwd+bwd / dense", "fwd peak MiB", "fwd+bwd peak MiB"], rows))
        if "compile_s" in r:
            lines.append("compile time (s): " + ", ".join(
                f"{k} {v:.1f}" for k, v in r["compile_s"].items()))
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    _common.agg_backend()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = []
    series: dict[str, list[float]] = {}
    mem_series: dict[str, list[float]] = {}
    for r in results:
        labels.append(f"N={r['N']} B={r['B']}\n{r['mode']}")
        for name in (*CANDIDATES, "matmul"):
            c = r["candidates"].get(name)
            series.setdefault(name, []).append(1e3 * c["forward_s"] if c else float("nan"))
            m = r.get("memory", {}).get("peak", {}).get(name, {})
            mem_series.setdefault(name, []).append(m.get("forward_mib", float("nan"))
                                                   if r["mode"] == "eager" else float("nan"))
    width = 0.8 / len(series)
    for i, (name, vals) in enumerate(series.items()):
        pos = [j + i * width for j in range(len(labels))]
        axes[0].bar(pos, vals, width, label=name)
        axes[1].bar(pos, mem_series[name], width, label=name)
    for ax, ylabel, vals in zip(axes, ("forward time (ms, median)",
                                       "forward peak memory growth (MiB)"),
                                (series, mem_series)):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=8)
        if any(v > 0 for vs in vals.values() for v in vs):  # NaN compares False
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    fig.suptitle("OR-GNN layer vs PyG layers on batched complete graphs (F=256)")
    _common.save_figure(fig, path)


def profile(b: int, n: int, f: int, device: torch.device, names: list[str],
            rows: int = 12) -> dict[str, str]:
    """``torch.profiler`` tables (self time per op and input shape) of each candidate's
    forward, three calls under ``torch.inference_mode`` after one warm-up."""
    x, edge_index, modules = build(b, n, f, device, torch.float32)
    fns = callers(x, edge_index, modules)
    tables = {}
    for name in names:
        with torch.inference_mode():
            fns[name]()
            with torch.profiler.profile(record_shapes=True) as prof:
                for _ in range(3):
                    fns[name]()
        tables[name] = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=24,
            max_shapes_column_width=60)
        print(f"profile of {name} forward, B={b} N={n} F={f} (3 calls):")
        print(tables[name])
    return tables


# --------------------------------------------------------------------------------------
def parse_config(text: str) -> tuple[int, int, int]:
    b, n, f = (int(v) for v in text.split(":"))
    return b, n, f


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, eager only")
    parser.add_argument("--configs", nargs="+", help=f"B:N:F (default {DEFAULT_CONFIGS})")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds of timing per configuration and pass before the "
                             "number of repeats is cut (at least 3 rounds)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[], choices=CANDIDATES,
                        help="candidates to leave out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    _common.add_common_args(parser)
    parser.add_argument("--output", default=None,
                        help="JSON path (default benchmarks/results/layer.json; with "
                             "--quick: benchmarks/results/quick/)")
    parser.add_argument("--plot", default=None,
                        help="PNG path (default docs/_static/bench_layer.png; with "
                             "--quick: benchmarks/results/quick/)")
    parser.add_argument("--profile", nargs="*", default=None, choices=(*CANDIDATES, "matmul"),
                        help="only print torch.profiler tables of these candidates' forward "
                             "on the first configuration (no timing)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _common.default_paths(args, "layer", plot=True)
    settings = _common.apply_common_args(args)
    device = torch.device(args.device)
    skip = set(args.skip)

    if args.memory_child:
        res = memory_child(*parse_config(args.memory_child), device, skip)
        print(json.dumps(res))
        return res

    meta = _common.header(argv, "layer.py", settings)
    configs = [parse_config(c) for c in (args.configs or
                                         (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS))]
    if args.profile is not None:
        tables = profile(*configs[0], device, args.profile or ["dense", "sparse", "gat"])
        payload = {**meta, "profiles": tables}
        if args.output:
            _common.write_json(args.output, payload)
        return payload
    repeats = args.repeats or (3 if args.quick else 7)
    use_compile = not (args.no_compile or args.quick)
    dtypes = [torch.float32]
    notes = []
    if device.type == "cuda":
        dtypes.append(torch.bfloat16)
    else:
        notes.append("bf16 skipped: it is measured on CUDA only (no CUDA device in this run)")
    if not use_compile:
        notes.append("torch.compile skipped (--quick or --no-compile)")
    for note in notes:
        print(f"note: {note}")

    results = []
    for b, n, f in configs:
        agreement = check_agreement(b, n, f, device)
        print(f"B={b} N={n} F={f}: dense_adj/naive/sparse agree with dense "
              f"(max abs diff {max(agreement.values()):.2e})")
        memory = None if args.no_memory else run_memory_child(b, n, f, args.device, skip,
                                                              args.threads)
        for dtype in dtypes:
            for compiled in ([False, True] if use_compile else [False]):
                if dtype == torch.bfloat16 and compiled:
                    continue
                r = time_config(b, n, f, device, dtype, compiled, repeats, args.budget,
                                skip | ({"naive"} if dtype == torch.bfloat16 else set()))
                r["agreement_max_abs_diff"] = agreement
                if memory is not None and dtype == torch.float32:
                    r["memory"] = memory
                results.append(r)
                print(report([r]))
    goals = targets(results)
    print("targets:")
    for g in goals:
        status = "met" if g["met"] else "NOT met"
        print(f"  {g['target']} ({g['config']}): {g['measured']:.3g} (goal {g['goal']}) "
              f"{status}")
    payload = {**meta, "notes": notes, "results": results, "targets": goals}
    if args.output:
        _common.write_json(args.output, payload)
    if args.plot:
        plot(results, Path(args.plot))
    return payload


if __name__ == "__main__":
    main()
