"""Shared helpers of the benchmark scripts: the machine header, interleaved timing, peak memory.

Timing rules (every script follows them):

* candidates are timed **interleaved** (round robin: A, B, C, A, B, C, ...) after a warm-up,
  so that load from other processes hits all of them alike; each figure is the **median** of
  the repeats, and comparisons are **ratios** of medians taken in the same run;
* on CUDA every timed call ends with ``torch.cuda.synchronize()``.

Peak memory on CPU is the growth of the process' resident-set high-water mark while a
candidate runs: the mark is reset through ``/proc/self/clear_refs`` (Linux >= 4.0) right
before the call and read from ``VmHWM`` in ``/proc/self/status`` right after, minus the
resident size before the call. It counts every byte the call touches (torch, numpy, faiss,
the allocator's own slack), not only torch tensors. Where ``clear_refs`` is not available the
reading falls back to a psutil RSS sampler thread (every 1 ms), which can miss short peaks;
the JSON says which method was used. On CUDA the figure is
``torch.cuda.max_memory_allocated`` growth.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))

MiB = 1024 * 1024


# --------------------------------------------------------------------------------------
# The header: command, machine, versions
# --------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Cores, memory, load, GPU and library versions, as printed at the top of every run."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    try:
        import psutil
        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gib"] = round(psutil.virtual_memory().total / 1024 ** 3, 1)
    except ImportError:
        pass
    try:
        info["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    for name in ("torch_geometric", "faiss", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                       "THP_MEM_ALLOC_ENABLE") if k in os.environ}
    if env:
        info["env"] = env
    return info


def header(argv: list[str] | None, script: str,
           settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Print (and return) the command line and the machine, so every log is reproducible."""
    args = sys.argv[1:] if argv is None else argv
    command = "python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{script}", *args])
    info = machine_info()
    print(f"$ {command}")
    gpu = f", GPU {info['gpu']}" if info.get("cuda") else ", no GPU"
    print(f"machine: {info['cpu']}, {info['logical_cores']} logical cores "
          f"({info.get('physical_cores', '?')} physical), {info.get('memory_gib', '?')} GiB"
          f"{gpu}; torch threads {info['torch_threads']}; load average "
          f"{info.get('load_average_1_5_15')}")
    print(f"versions: python {info['python']}, torch {info['torch']}, torch_geometric "
          f"{info['torch_geometric']}, faiss {info['faiss']}, numpy {info['numpy']}")
    if settings:
        print("settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    return {"command": command, "machine": info, "settings": settings or {}}


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
        try:
            import faiss
            faiss.omp_set_num_threads(threads)
        except ImportError:
            pass


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning every large block to
    the OS (``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` = 1 GiB), as a long-running server
    process would be tuned. A process-wide setting: every candidate of a run gets it. Where
    page faults are expensive (a VM that zeroes each fresh 4 KiB page on first touch), it
    takes the cost of *fresh* buffers out of the timings, leaving the compute."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(-3, 1 << 30) == 1 and libc.mallopt(-1, 1 << 30) == 1
    return bool(ok)


def add_common_args(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and faiss threads (default: torch's default)")
    parser.add_argument("--malloc", choices=("default", "retain"), default="default",
                        help="'retain': keep freed memory for reuse (see "
                             "_common.retain_freed_memory); 'default': glibc as started")


def apply_common_args(args) -> dict[str, Any]:
    set_threads(args.threads)
    settings = {"threads": torch.get_num_threads(), "malloc": args.malloc}
    if args.malloc == "retain":
        settings["malloc_applied"] = retain_freed_memory()
    return settings


def default_paths(args, name: str, plot: bool = True) -> None:
    """Fill ``args.output`` (and ``args.plot``) when not given: the published paths, or
    ``benchmarks/results/quick/`` for ``--quick`` runs so they never overwrite the figures
    the docs quote."""
    quick = getattr(args, "quick", False)
    base = REPO / "benchmarks" / "results"
    if args.output is None:
        args.output = str((base / "quick" if quick else base) / f"{name}.json")
    if plot and args.plot is None:
        args.plot = str(base / "quick" / f"bench_{name}.png" if quick
                        else REPO / "docs" / "_static" / f"bench_{name}.png")


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_plain))
    print(f"wrote {path}")
    return path


def _plain(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def agg_backend() -> None:
    import matplotlib
    matplotlib.use("Agg")


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------
def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(candidates: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1,
                device: torch.device | str | None = None,
                budget_s: float | None = None) -> dict[str, dict[str, Any]]:
    """Time ``candidates`` round robin; returns ``{name: {"median_s", "times_s"}}``.

    ``budget_s`` stops adding rounds once that much time is spent (at least 3 rounds when
    ``repeats >= 3``), so a slow candidate cannot hold a run hostage.
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
            _sync(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    start = time.perf_counter()
    for r in range(repeats):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        if budget_s is not None and r >= min(2, repeats - 1) and \
                time.perf_counter() - start > budget_s:
            break
    return {name: {"median_s": statistics.median(ts), "times_s": ts}
            for name, ts in times.items()}


def timed(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[Any, float]:
    """``(fn(), seconds)`` for one call."""
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------
def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring peak memory growth (bytes) of the code inside it.

    ``.peak_bytes`` after exit; ``.method`` names how it was measured (see module docs).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.peak_bytes = 0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self._base = _status_kib("VmRSS")
        if self._base is not None and _reset_hwm():
            self.method = "VmHWM after clear_refs"
            return self
        import psutil
        proc = psutil.Process()
        self._base = proc.memory_info().rss // 1024
        self._stop = threading.Event()
        self._max = self._base

        def sample() -> None:
            while not self._stop.is_set():
                self._max = max(self._max, proc.memory_info().rss // 1024)
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        self.method = "psutil RSS sampler (1 ms)"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
        elif self.method.startswith("VmHWM"):
            self.peak_bytes = max(0, (_status_kib("VmHWM") or 0) - self._base) * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(0, self._max - self._base) * 1024


@contextmanager
def stage(timings: dict[str, float], memory: dict[str, float], name: str,
          device: torch.device | str | None = None):
    """Time a pipeline stage and record its peak memory growth (MiB); accumulates."""
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        yield
        _sync(device)
        elapsed = time.perf_counter() - t0
    timings[name] = timings.get(name, 0.0) + elapsed
    memory[name] = max(memory.get(name, 0.0), mem.peak_bytes / MiB)


def fmt_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-markdown table (also readable on a terminal)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
