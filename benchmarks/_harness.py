"""The one benchmark harness every sparseops op family uses.

What it gives a family script:

- ``Session``: one run on one device. It records the environment, measures the ceilings
  (large copy, large GEMM, a tiny op's per-call cost) once, times callables, derives
  GB/s, TFLOP/s, percent of the ceilings, the roofline floor and the speedup over every
  baseline, prints one flushed progress line per measurement and writes one CSV per family.
- ``time_cpu`` / ``time_cuda``: the timers (see their docstrings for the protocol).
- ``Result``: one CSV row.

Timing protocol
---------------
GPU, three numbers per measurement:
  * ``median_us`` / ``p20_us`` / ``p80_us``: ``triton.testing.do_bench`` with quantiles. It
    flushes L2 before every call and times each call with CUDA events, so it is device time
    (a host slower than the 256 MB L2 flush that precedes each call would show up, a faster
    one does not).
  * ``eager_us``: wall time of many back-to-back calls with one synchronize at the end,
    divided by the count. Host overhead (Python, dispatcher, launches, host syncs) is
    included; this is what an un-captured decode step pays.
  * ``graph_us``: the call captured ``GRAPH_CALLS`` times in one ``torch.cuda.CUDAGraph``,
    replayed back to back, timed with events, divided by the call count: device time with
    launch overhead removed, what a CUDA-graph-captured decode step pays. Only for
    callables declared capturable; a capture that fails leaves the column empty.
CPU (``time_cpu_interleaved``): the implementations being compared are timed in
alternation, one ``time.perf_counter``-timed call of each per round (the order rotating
from round to round), so a burst of load from other processes lands on all of them alike.
After the base budget the spread of every implementation is checked over the latest window
of rounds; while some p80/p20 exceeds ``SPREAD_TARGET`` rounds continue (the window slides)
up to the maximum budget. The window reported is the first tight one, or, when the budget
ran out, the tightest one seen, and its rows are flagged ``noisy`` (p80/p20 >
``SPREAD_TARGET``). Ratios between two implementations are the median over the window's
rounds of the per-round ratio (both calls ran within microseconds of each other), which a
burst of load shifts far less than a ratio of medians.
Implementations in another interpreter (a peer pinned to another torch, the "before" build
of sparseops) are timed by a worker process (``benchmarks/_worker.py``) in chunks that
alternate with the in-process rounds; their ratios are medians of per-chunk ratios.

Everything is timed under ``torch.inference_mode()``: the serving setting in which small
calls matter, and it is applied to every implementation alike.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import importlib
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# Calls captured per CUDA graph. One call per graph would time cudaGraphLaunch (a few µs
# of host time) rather than the op; ten amortise it to well under a microsecond per call.
GRAPH_CALLS = 10

# p80/p20 above which a measurement is called noisy. CPU timing repeats (up to its maximum
# budget) until every implementation of a group is at or below it. Override with
# SPARSEOPS_BENCH_SPREAD. A 2-core CPU next to a compiler gives 1.5-10 at first.
SPREAD_TARGET = float(os.environ.get("SPARSEOPS_BENCH_SPREAD", "1.2"))


# --------------------------------------------------------------------------- environment


def import_sparseops() -> Any:
    """Import ``sparseops``; from this checkout's ``python/`` folder when it is not installed.

    The fallback lets ``python -m benchmarks.demo`` run from the repository root of a
    checkout that was built in place but not pip-installed. The path used is printed.
    """
    first = "sparseops" not in sys.modules
    try:
        mod = importlib.import_module("sparseops")
    except ImportError:
        local = REPO_ROOT / "python"
        if not (local / "sparseops" / "__init__.py").exists():
            raise
        sys.path.insert(0, str(local))
        mod = importlib.import_module("sparseops")
    if first:
        print(f"sparseops {getattr(mod, '__version__', '?')} from {Path(mod.__file__).parent}", flush=True)
    return mod


THREADS_HELP = (
    "torch CPU threads (default: torch's choice). On a small CPU shared with other work, --threads 1 "
    "avoids the ~10 ms stalls of a parallel region whose second thread is descheduled; the results "
    "folder name carries the count (-1t)"
)


def set_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` when ``n`` is given (before any timing, before the slug is taken)."""
    if n:
        torch.set_num_threads(n)


def pick_device(name: str | None = None) -> torch.device:
    """``name`` ("cpu", "cuda", "cuda:1") or, when None, cuda if available else cpu."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """Human-readable device: GPU name with arch and SM count, or CPU model with threads."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs)"
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


def _slugify(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def device_slug(device: torch.device) -> str:
    """Folder name for a device's results, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-…-2t``.

    The CPU slug carries the thread count because CPU numbers scale with it.
    """
    if device.type == "cuda":
        return _slugify(torch.cuda.get_device_name(device))
    return f"cpu-{_slugify(_cpu_model())}-{torch.get_num_threads()}t"


def git_commit() -> str:
    """Short commit of the checkout, ``-dirty`` when tracked files changed; env override.

    ``SPARSEOPS_GIT_COMMIT`` wins, for copies of the tree that carry no ``.git``.
    """
    if os.environ.get("SPARSEOPS_GIT_COMMIT"):
        return os.environ["SPARSEOPS_GIT_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = False
    return commit + ("-dirty" if dirty else "")


def environment(device: torch.device, sparseops_version: str = "") -> dict[str, str]:
    """Facts that make a result reproducible. No hostname, no user name."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_slug(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "cpu_threads": str(torch.get_num_threads()),
        "sparseops": sparseops_version,
        "git_commit": git_commit(),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # Load before the run starts: other processes on a small CPU machine distort its
        # numbers (a 2-core run next to a compiler showed 10-100x outliers).
        "load_1m": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "",
    }


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """One measurement in microseconds. eager/graph are GPU-only (None on CPU)."""

    median_us: float
    p20_us: float
    p80_us: float
    samples: int = 0  # 0 where the timer does not report it (do_bench with quantiles)
    eager_us: float | None = None
    graph_us: float | None = None
    note: str = ""
    rounds: int = 0  # interleaved rounds in the reported window (CPU)
    budget_s: float = 0.0  # wall time spent timing (CPU, the whole group)

    @property
    def spread(self) -> float:
        """p80 / p20: 1.0 is perfectly steady."""
        return self.p80_us / self.p20_us if self.p20_us > 0 else math.inf

    @property
    def noisy(self) -> bool:
        """True when p80/p20 exceeds SPREAD_TARGET."""
        return self.spread > SPREAD_TARGET


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending sequence (same rule as numpy/torch)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_cpu(fn: Callable[[], Any], budget_s: float = 0.25, min_samples: int = 5) -> Timing:
    """Median, p20 and p80 of single ``fn()`` calls timed with ``time.perf_counter``.

    Warm-up: at least two calls and 10 % of the budget (the caller has already made the
    first call, which may compile). Then single calls until ``budget_s`` has passed and at least
    ``min_samples`` were taken. The garbage collector is paused so a collection does not
    land inside a sample.

    Why not ``torch.utils.benchmark.Timer.blocked_autorange``: it times blocks of
    back-to-back calls and reports block means. The block size is chosen per callable, so
    two implementations are averaged over different amounts of amortised work (allocator
    reuse, warm caches, asynchronous work spilling past the block end); it hides the spread;
    and ANCHORS.md records it producing fake speedups (pytorch#115154). One call per sample
    with the median is simple and honest; timer overhead (~0.1 µs) is negligible here.
    """
    warm_end = time.perf_counter() + 0.1 * budget_s
    warm_calls = 0
    # At least two calls: the first large allocations after the probe call still fault pages
    # in (glibc raises its mmap threshold only after freeing a mapped block); measured 2x
    # slower first samples at T=4096 on the 2-core CPU.
    while warm_calls < 2 or time.perf_counter() < warm_end:
        fn()
        warm_calls += 1
    samples: list[float] = []
    gc_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        deadline = time.perf_counter() + budget_s
        while True:
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            samples.append(t1 - t0)
            if (t1 >= deadline and len(samples) >= min_samples) or len(samples) >= 1_000_000:
                break
    finally:
        if gc_enabled:
            gc.enable()
    samples.sort()
    us = [s * 1e6 for s in samples]
    return Timing(_quantile(us, 0.5), _quantile(us, 0.2), _quantile(us, 0.8), samples=len(us))


class External:
    """An implementation timed in another process (see ``benchmarks/_worker.py``).

    ``chunk(seconds)`` times single calls in that process for about ``seconds`` and returns
    the per-call times in seconds. While it runs, this process only waits on the pipe, so
    the two never compete for the CPU.
    """

    def chunk(self, seconds: float) -> list[float]:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Interleaved:
    """What ``time_cpu_interleaved`` measured: one Timing per implementation plus pair ratios.

    ``ratios[(i, j)]`` = (median, p20, p80) over the window's rounds of time_j / time_i
    (> 1: i is faster). A p20 above 1 means i was faster in at least 80 % of the rounds,
    which decides "faster" even when both times are noisy.
    """

    timings: list[Timing]
    ratios: dict[tuple[int, int], tuple[float, float, float]]
    converged: bool
    spent_s: float


def _ratio_stats(values: Iterable[float]) -> tuple[float, float, float]:
    v = sorted(values)
    return _quantile(v, 0.5), _quantile(v, 0.2), _quantile(v, 0.8)


def _stats(samples_s: Sequence[float]) -> tuple[float, float, float]:
    us = sorted(x * 1e6 for x in samples_s)
    return _quantile(us, 0.5), _quantile(us, 0.2), _quantile(us, 0.8)


def _window_spread(cols: Sequence[Sequence[float]], start: int, end: int) -> float:
    worst = 1.0
    for col in cols:
        w = sorted(col[start:end])
        lo = _quantile(w, 0.2)
        worst = max(worst, _quantile(w, 0.8) / lo if lo > 0 else math.inf)
    return worst


def time_cpu_interleaved(
    fns: Sequence[Callable[[], Any]],
    *,
    budget_s: float = 0.25,
    max_budget_s: float = 1.0,
    min_rounds: int = 7,
    target: float | None = None,
    externals: Sequence[External] = (),
) -> Interleaved:
    """Time ``fns`` (and ``externals``) in alternation until steady or ``max_budget_s`` runs out.

    Warm-up: two rounds and 10 % of ``budget_s`` (the caller made the first call of each,
    which may compile). Then rounds, each calling every fn once (the starting fn rotates,
    so none always runs right after another's cache damage), each call timed alone with
    ``perf_counter``; the garbage collector is paused. From ``budget_s`` on, the latest
    window of rounds (as many as the base budget held, at least ``min_rounds``) is checked
    every quarter budget: when every fn's p80/p20 in it is <= ``target`` it is the result;
    otherwise rounds go on, and at ``max_budget_s`` the tightest window seen is reported
    (``converged`` False). Externals get their own chunks, alternating with blocks of
    in-process rounds, and are only run for the base budget (a chunk of a foreign process
    cannot be paired call by call).
    """
    target = SPREAD_TARGET if target is None else target
    n = len(fns)
    if externals:
        return _time_with_externals(fns, externals, budget_s, min_rounds)
    warm_end = time.perf_counter() + 0.1 * budget_s
    rounds = 0
    while rounds < 2 or time.perf_counter() < warm_end:
        for fn in fns:
            fn()
        rounds += 1
    cols: list[list[float]] = [[] for _ in fns]
    clock = time.perf_counter
    gc_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    start = clock()
    window = 0
    best: tuple[float, int, int] | None = None  # (spread, start, end)
    converged = False
    try:
        next_check = start + budget_s
        r = 0
        while True:
            for j in range(n):
                i = (r + j) % n
                t0 = clock()
                fns[i]()
                cols[i].append(clock() - t0)
            r += 1
            now = clock()
            if (now >= next_check and r >= min_rounds) or r >= 1_000_000:
                if not window:
                    window = r
                lo, hi = r - window, r
                spread = _window_spread(cols, lo, hi)
                if best is None or spread < best[0]:
                    best = (spread, lo, hi)
                if spread <= target:
                    converged = True
                    break
                if now - start >= max_budget_s or r >= 1_000_000:
                    break
                next_check = now + budget_s / 4
    finally:
        if gc_enabled:
            gc.enable()
    spent = clock() - start
    assert best is not None
    _, lo, hi = best
    timings = []
    for col in cols:
        med, p20, p80 = _stats(col[lo:hi])
        timings.append(Timing(med, p20, p80, samples=hi - lo, rounds=hi - lo, budget_s=spent))
    ratios = {}
    for i in range(n):
        for j in range(n):
            if i != j:
                ratios[(i, j)] = _ratio_stats(cols[j][k] / cols[i][k] for k in range(lo, hi))
    return Interleaved(timings, ratios, converged, spent)


def _time_with_externals(
    fns: Sequence[Callable[[], Any]], externals: Sequence[External], budget_s: float, min_rounds: int
) -> Interleaved:
    """Alternate blocks of in-process rounds with one chunk per external, ``CHUNKS`` times."""
    chunks = 4
    n, m = len(fns), len(externals)
    per = budget_s / chunks / (1 + m)  # seconds per block / per external chunk
    for _ in range(2):
        for fn in fns:
            fn()
    local: list[list[float]] = [[] for _ in fns]
    ext: list[list[float]] = [[] for _ in externals]
    # chunk medians: [chunk][impl index over fns + externals]
    chunk_meds: list[list[float]] = []
    clock = time.perf_counter
    start = clock()
    r = 0
    gc_enabled = gc.isenabled()
    for _c in range(chunks):
        gc.collect()
        gc.disable()
        try:
            block_start = len(local[0]) if n else 0
            end = clock() + per
            while n and (clock() < end or len(local[0]) - block_start < max(2, min_rounds // chunks)):
                for j in range(n):
                    i = (r + j) % n
                    t0 = clock()
                    fns[i]()
                    local[i].append(clock() - t0)
                r += 1
        finally:
            if gc_enabled:
                gc.enable()
        meds = [statistics.median(col[block_start:]) for col in local]
        for e, x in enumerate(externals):
            got = x.chunk(per)
            ext[e].extend(got)
            meds.append(statistics.median(got) if got else math.nan)
        chunk_meds.append(meds)
    spent = clock() - start
    cols = local + ext
    timings = []
    for col in cols:
        med, p20, p80 = _stats(col) if col else (math.nan, math.nan, math.nan)
        timings.append(Timing(med, p20, p80, samples=len(col), rounds=chunks, budget_s=spent))
    ratios: dict[tuple[int, int], tuple[float, float, float]] = {}
    for i in range(n + m):
        for j in range(n + m):
            if i == j:
                continue
            if i < n and j < n:
                ratios[(i, j)] = _ratio_stats(local[j][k] / local[i][k] for k in range(len(local[0])))
            else:
                per_chunk = [c[j] / c[i] for c in chunk_meds if c[i] > 0 and math.isfinite(c[j] / c[i])]
                if per_chunk:
                    ratios[(i, j)] = _ratio_stats(per_chunk)
    converged = all(math.isfinite(t.spread) and not t.noisy for t in timings)
    return Interleaved(timings, ratios, converged, spent)


def _cuda_eager_us(fn: Callable[[], Any], budget_s: float, repeats: int = 5) -> float:
    """Per-call wall time of back-to-back calls, one synchronize per batch (median of batches)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = max(time.perf_counter() - t0, 1e-6)
    n = int(min(max(budget_s / repeats / est, 10), 10_000))
    per_call = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        per_call.append((time.perf_counter() - t0) / n)
    return statistics.median(per_call) * 1e6


def _cuda_graph_us(fn: Callable[[], Any], budget_s: float, repeats: int = 5) -> tuple[float | None, str]:
    """Per-call time of ``GRAPH_CALLS`` captured calls replayed back to back; (None, why) on failure."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # Warm up on a side stream before capture, as torch's CUDA-graph docs require (lazy
    # initialisation such as cuBLAS workspaces or Triton compilation must not be captured).
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
    except Exception as exc:  # any capture failure means "not capturable"
        del graph
        # An invalidated capture may report its error once more at the next synchronize.
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        return None, f"graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    est = max(time.perf_counter() - t0, 1e-6)
    n = int(min(max(budget_s / repeats / est, 5), 5_000))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per_call = []
    for _ in range(repeats):
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1e3 / (n * GRAPH_CALLS))
    del graph
    return statistics.median(per_call), ""


def time_cuda(fn: Callable[[], Any], *, quick: bool = False, graph: bool = True) -> Timing:
    """do_bench median/p20/p80, plus eager per-call wall time and (when ``graph``) graph replay time."""
    from triton.testing import do_bench

    warmup_ms, rep_ms, budget_s = (10, 30, 0.05) if quick else (25, 100, 0.15)
    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    eager = _cuda_eager_us(fn, budget_s)
    graph_us, note = _cuda_graph_us(fn, budget_s) if graph else (None, "")
    return Timing(median * 1e3, p20 * 1e3, p80 * 1e3, eager_us=eager, graph_us=graph_us, note=note)


def synchronize(device: torch.device) -> None:
    """Wait for the device (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- ceilings


@dataclass
class Ceilings:
    """Measured in the same process as the results, because runs vary ~20 % (ANCHORS)."""

    copy_gbps: float  # large device copy, read + write bytes counted
    gemm_tflops: float  # large GEMM, bf16 on GPU, fp32 on CPU
    gemm_desc: str
    tiny_op_us: float  # per-call cost of torch.add on one element (eager on GPU)
    tiny_op_graph_us: float | None  # same inside a CUDA graph (GPU only)


def _copy_gbps(device: torch.device, numel: int, timer: Callable[[Callable[[], Any]], float]) -> float:
    """Read+write GB/s of ``dst.copy_(src)`` for two fp32 buffers of ``numel`` elements."""
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in (CPU) / warm the allocator before timing
    seconds = timer(lambda: dst.copy_(src))
    return 2 * numel * 4 / seconds / 1e9


def _gemm_tflops(
    device: torch.device, m: int, dtype: torch.dtype, timer: Callable[[Callable[[], Any]], float]
) -> float:
    """TFLOP/s of ``torch.mm`` on two m x m matrices."""
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    torch.mm(a, b)
    return 2 * m**3 / timer(lambda: torch.mm(a, b)) / 1e12


def measure_ceilings(device: torch.device, *, quick: bool = False) -> Ceilings:
    """Copy bandwidth, GEMM throughput and a tiny op's per-call cost on ``device``."""
    with torch.inference_mode():
        x = torch.zeros(1, device=device)
        if device.type == "cuda":
            from triton.testing import do_bench

            rep = 50 if quick else 200

            def gpu_timer(fn: Callable[[], Any]) -> float:
                return do_bench(fn, rep=rep, quantiles=[0.5]) * 1e-3

            # 512 MiB of fp32 each way: far past the 50 MB L2.
            copy_gbps = _copy_gbps(device, 128 * 1024 * 1024, gpu_timer)
            m = 8192
            gemm_tflops = _gemm_tflops(device, m, torch.bfloat16, gpu_timer)
            torch.cuda.empty_cache()
            tiny = _cuda_eager_us(lambda: torch.add(x, 1), 0.1)
            tiny_graph, _ = _cuda_graph_us(lambda: torch.add(x, 1), 0.1)
            return Ceilings(copy_gbps, gemm_tflops, f"bf16 mm {m}^3", tiny, tiny_graph)

        budget = 0.15 if quick else 0.4

        def cpu_timer(fn: Callable[[], Any]) -> float:
            return time_cpu(fn, budget, min_samples=3).median_us * 1e-6

        # 128 MiB each way: past any CPU last-level cache.
        copy_gbps = _copy_gbps(device, 32 * 1024 * 1024, cpu_timer)
        m = 1024 if quick else 2048
        gemm_tflops = _gemm_tflops(device, m, torch.float32, cpu_timer)
        tiny = time_cpu(lambda: torch.add(x, 1), 0.05).median_us
        return Ceilings(copy_gbps, gemm_tflops, f"fp32 mm {m}^3", tiny, None)


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    """One CSV row: one implementation of one op at one shape on one device.

    ``shape`` names a group of measurements that differ only in ``size`` (the swept
    dimension, named by ``size_name``); plots draw time against ``size`` per shape.
    ``kind`` is "sparseops" or "baseline"; ``speedups`` holds "baseline=x" pairs
    (baseline median / this median, >1 means faster), ``headline`` marks the rows the
    summary table shows. Times are microseconds; floor_us = max(bytes / copy bandwidth,
    flops / GEMM peak); x_floor = median_us / floor_us. ``spread`` = p80/p20 and ``noisy``
    = spread > SPREAD_TARGET; on CPU the speedups are medians of per-round ratios of the
    interleaved calls (see ``time_cpu_interleaved``), ``rounds`` how many, and
    ``speedup_bands`` "baseline=p20:p80" of those per-round ratios.
    """

    family: str
    op: str
    shape: str
    params: str
    size_name: str
    size: int
    dtype: str
    impl: str
    kind: str
    headline: bool = False
    median_us: float | None = None
    p20_us: float | None = None
    p80_us: float | None = None
    samples: int = 0
    spread: float | None = None
    noisy: bool = False
    rounds: int = 0
    eager_us: float | None = None
    graph_us: float | None = None
    bytes: int = 0
    flops: int = 0
    gbps: float | None = None
    tflops: float | None = None
    pct_bw: float | None = None
    pct_gemm: float | None = None
    floor_us: float | None = None
    x_floor: float | None = None
    speedups: str = ""
    speedup_bands: str = ""
    check: str = ""
    note: str = ""

    def group(self) -> tuple[str, str, str, str, int]:
        """Rows with the same group are the same problem: their times are comparable."""
        return (self.family, self.op, self.shape, self.dtype, self.size)


RESULT_FIELDS = [f.name for f in dataclasses.fields(Result)]
ENV_FIELDS = [
    "device",
    "device_name",
    "torch",
    "triton",
    "cuda",
    "python",
    "cpu_threads",
    "sparseops",
    "git_commit",
    "date_utc",
    "load_1m",
    "quick",
    "timer",
    "copy_gbps",
    "gemm_tflops",
    "gemm",
    "tiny_op_us",
    "tiny_op_graph_us",
]
CSV_FIELDS = RESULT_FIELDS + ENV_FIELDS


def fmt_num(v: float | None, digits: int = 4) -> str:
    """Compact number for CSV/markdown: ``digits`` significant digits, '' for None/NaN."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, bool | int):
        return str(int(v))
    if v != 0 and abs(v) >= 10 ** (digits + 2):
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def fill_speedups(results: Iterable[Result]) -> None:
    """Where a row has no ``speedups`` yet: baseline median / its median, for each other baseline.

    The interleaved CPU timer sets paired ratios itself; this fills the rest (GPU rows).
    """
    results = list(results)
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault(r.group(), []).append(r)
    for rows in groups.values():
        baselines = [b for b in rows if b.kind == "baseline" and b.median_us]
        for r in rows:
            if not r.median_us or r.speedups:
                continue
            others = [b for b in baselines if b is not r]
            r.speedups = ";".join(f"{b.impl}={b.median_us / r.median_us:.3f}" for b in others)


def write_csv(results: Sequence[Result], path: Path, env: dict[str, str]) -> Path:
    """Write rows plus the environment columns (the same on every row) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            row = {k: fmt_num(v, 6) if isinstance(v, float) else v for k, v in dataclasses.asdict(r).items()}
            row.update({k: env.get(k, "") for k in ENV_FIELDS})
            w.writerow(row)
    tmp.replace(path)  # a reader (or a killed run) never sees half a file
    return path


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a results CSV with numeric columns converted (None where empty)."""
    ints = {"size", "samples", "bytes", "flops", "rounds"}
    floats = {f.name for f in dataclasses.fields(Result) if "float" in str(f.type)}
    rows = []
    with Path(path).open(newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = dict(raw)
            for k in ints:
                row[k] = int(raw[k]) if raw.get(k) else 0
            for k in floats:
                row[k] = float(raw[k]) if raw.get(k) else None
            row["headline"] = raw.get("headline") == "True"
            row["noisy"] = raw.get("noisy") == "True"
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- session


def worker_error_check(tol: float) -> Callable[[str], str]:
    """The check of an out-of-process case: its worker's own error report in the note ("max rel
    err 1.2e-03 vs ...") judged with the tolerance of the in-process rows. zentorch 2.13.0.1's
    unpacked bf16 linear returned 0.5-0.8 relative error on 1:4 and 2:8 N:M weights
    (2026-12-07): such a row must show as a failed check, not count as a baseline."""

    def check(note: str) -> str:
        m = re.search(r"max rel err ([0-9.eE+-]+)", note)
        if m is None:
            return ""  # no error figure: unchecked, like an in-process case without a check
        err = float(m.group(1))
        return "ok" if err <= tol else f"max rel err {err:.2e} (the worker's own check)"

    return check


@dataclass
class Case:
    """One implementation of a problem for ``Session.measure_group``.

    ``fn`` is called with no arguments (in-process), or ``external`` times it in another
    process. ``graph``: may ``fn`` be captured in a CUDA graph (False for callables with host
    syncs). ``check(output)`` returns "ok" or what is wrong; for an external case it is given
    the case's ``note``, where the worker reports its own error against the reference.
    """

    impl: str
    kind: str
    fn: Callable[[], Any] | None = None
    graph: bool = True
    check: Callable[[Any], str] | None = None
    external: External | None = None
    note: str = ""


@dataclass
class Session:
    """One benchmark run on one device, shared by every family a demo runs.

    Families call ``plan`` with their number of problems (for the progress counter and its
    time estimate), ``measure_group`` once per problem (op, shape, dtype, size) with all its
    implementations, and ``write_csv`` as they go.
    """

    device: torch.device
    quick: bool = False
    cpu_budget_s: float | None = None  # base CPU timing budget per implementation of a group
    cpu_max_factor: float | None = None  # a group may run to this many times its base budget
    sparseops_version: str = ""
    results: list[Result] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    _ceilings: Ceilings | None = None
    _planned: int = 0
    _done: int = 0
    _t0: float = field(default_factory=time.perf_counter)
    _first_group_t: float = 0.0

    def __post_init__(self) -> None:
        if self.cpu_budget_s is None:
            self.cpu_budget_s = 0.03 if self.quick else 0.1
        if self.cpu_max_factor is None:
            self.cpu_max_factor = 3.0 if self.quick else 5.0
        self.env = environment(self.device, self.sparseops_version)
        self.env["quick"] = str(self.quick)
        self.env["timer"] = (
            "do_bench median (L2 flushed) + eager wall + CUDA-graph replay; inference_mode"
            if self.device.type == "cuda"
            else (
                f"perf_counter per call, implementations interleaved; {self.cpu_budget_s:g} s per implementation, "
                f"up to {self.cpu_max_factor:g}x until p80/p20 <= {SPREAD_TARGET:g}; inference_mode"
            )
        )

    # ---- ceilings and header

    @property
    def ceilings(self) -> Ceilings:
        """Measured on first use, once per session."""
        if self._ceilings is None:
            self.log("measuring ceilings (large copy, large GEMM, tiny op) ...")
            c = measure_ceilings(self.device, quick=self.quick)
            self._ceilings = c
            self.env.update(
                copy_gbps=fmt_num(c.copy_gbps),
                gemm_tflops=fmt_num(c.gemm_tflops),
                gemm=c.gemm_desc,
                tiny_op_us=fmt_num(c.tiny_op_us),
                tiny_op_graph_us=fmt_num(c.tiny_op_graph_us),
            )
            graph = f", {c.tiny_op_graph_us:.2f} µs in a CUDA graph" if c.tiny_op_graph_us else ""
            self.log(
                f"ceilings: copy {c.copy_gbps:.1f} GB/s (read+write), GEMM {c.gemm_tflops:.3g} TFLOP/s "
                f"({c.gemm_desc}), tiny op {c.tiny_op_us:.2f} µs/call{graph}"
            )
        return self._ceilings

    def header(self) -> str:
        """The environment as a few printable lines (plus a warning when the CPU is busy)."""
        e = self.env
        text = (
            f"device: {e['device_name']}  [{e['device']}]\n"
            f"torch {e['torch']}  triton {e['triton']}  CUDA {e['cuda']}  python {e['python']}  "
            f"sparseops {e['sparseops']}  commit {e['git_commit']}  {e['date_utc']}\n"
            f"timer: {e['timer']}{'  (--quick)' if self.quick else ''}"
        )
        load = float(e["load_1m"] or 0)
        if self.device.type == "cpu" and load > 0.5 * (os.cpu_count() or 1):
            text += (
                f"\nWARNING: load average {load:.2f} before the run: other processes share the CPU, "
                "expect noisy numbers (see the p20/p80 columns)"
            )
        return text

    def log(self, msg: str) -> None:
        """Print with the elapsed time, flushed so a person watching sees progress."""
        print(f"[{time.perf_counter() - self._t0:7.1f}s] {msg}", flush=True)

    def plan(self, n: int) -> None:
        """Add ``n`` to the number of measurements the progress counter expects."""
        self._planned += n

    # ---- measuring

    def measure_group(
        self,
        cases: Sequence[Case],
        *,
        family: str,
        op: str,
        shape: str,
        params: str,
        size: int,
        dtype: str,
        bytes: int,
        flops: int = 0,
        size_name: str = "T",
        headline: bool = False,
    ) -> list[Result]:
        """Time every implementation of one problem together; one Result per case.

        Each case's first call is made here, outside the timer: it may compile (its duration
        is noted when above a second) and its output goes to ``check``, which returns "ok"
        or what is wrong. A case whose first call raises gets a row noting why and is left
        out of the timing. The rest are timed together: on CPU interleaved (see
        ``time_cpu_interleaved``; speedups are paired per-round ratios), on GPU one after
        another with ``time_cuda`` (speedups from the medians).
        """
        ceil = self.ceilings
        eta = ""
        if self._done == 0:
            self._first_group_t = time.perf_counter()
        elif self._planned > self._done:
            per = (time.perf_counter() - self._first_group_t) / self._done
            eta = f", ~{per * (self._planned - self._done):.0f} s left"
        self._done += 1
        counter = f"{family} {self._done:>3}/{max(self._planned, self._done)}{eta}"
        what = f"{op} {shape} {size_name}={size} {dtype}"
        rows: list[Result] = []
        live: list[tuple[Case, Result]] = []
        for case in cases:
            assert case.kind in ("sparseops", "baseline"), case.kind
            res = Result(family, op, shape, params, size_name, size, dtype, case.impl, case.kind, headline)
            res.bytes, res.flops = bytes, flops
            rows.append(res)
            if case.external is not None:
                if self.device.type == "cuda":
                    res.note = "skipped: out-of-process implementations are CPU-only"
                    continue
                res.note = case.note
                if case.check is not None:
                    res.check = case.check(case.note)
                live.append((case, res))
                continue
            try:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    out = case.fn()
                    synchronize(self.device)
                    first_s = time.perf_counter() - t0
                    if case.check is not None:
                        try:
                            res.check = case.check(out)
                        except Exception as exc:  # a broken checker must not stop the run
                            res.check = f"check error: {type(exc).__name__}: {exc}"[:200]
                    del out
            except Exception as exc:  # a failing implementation is reported, not fatal
                first_line = str(exc).splitlines()[0][:160] if str(exc) else ""
                res.note = f"skipped (first call failed): {type(exc).__name__}: {first_line}"
                continue
            notes = [case.note] if case.note else []
            if first_s > 1.0:
                notes.append(f"first call {first_s:.1f} s")
            res.note = "; ".join(notes)
            live.append((case, res))

        timings: list[Timing | None] = [None] * len(live)
        ratios: dict[tuple[int, int], tuple[float, float, float]] = {}
        steady = ""
        try:
            with torch.inference_mode():
                if self.device.type == "cuda":
                    for n, (case, res) in enumerate(live):
                        try:
                            timings[n] = time_cuda(case.fn, quick=self.quick, graph=case.graph)
                        except Exception as exc:
                            res.note = f"skipped (timing failed): {type(exc).__name__}: {str(exc)[:160]}"
                elif live:
                    local = [n for n, (c, _) in enumerate(live) if c.external is None]
                    ext = [n for n, (c, _) in enumerate(live) if c.external is not None]
                    order = local + ext
                    base = self.cpu_budget_s * len(live)
                    got = time_cpu_interleaved(
                        [live[n][0].fn for n in local],
                        budget_s=base,
                        max_budget_s=base * self.cpu_max_factor,
                        min_rounds=5 if self.quick else 7,
                        externals=[live[n][0].external for n in ext],
                    )
                    for pos, n in enumerate(order):
                        timings[n] = got.timings[pos]
                    for (a, b), v in got.ratios.items():
                        ratios[(order[a], order[b])] = v
                    if not got.converged:
                        worst = max(t.spread for t in got.timings)
                        steady = (
                            f"NOT STEADY after {got.spent_s:.1f} s: worst p80/p20 {worst:.2f} > "
                            f"{SPREAD_TARGET:g} (rows flagged noisy)"
                        )
        except Exception as exc:  # e.g. a call that worked once and fails later
            for _, res in live:
                res.note = f"skipped (timing failed): {type(exc).__name__}: {str(exc)[:160]}"
            timings = [None] * len(live)

        timed: list[tuple[int, Result]] = []
        for n, ((_, res), t) in enumerate(zip(live, timings, strict=True)):
            if t is None or not math.isfinite(t.median_us) or t.median_us <= 0:
                if t is not None:
                    res.note = "; ".join(filter(None, [res.note, "no samples"]))
                continue
            notes = [res.note] if res.note else []
            if t.note:
                notes.append(t.note)
            res.note = "; ".join(notes)
            res.median_us, res.p20_us, res.p80_us, res.samples = t.median_us, t.p20_us, t.p80_us, t.samples
            res.spread, res.noisy, res.rounds = t.spread, t.noisy, t.rounds
            res.eager_us, res.graph_us = t.eager_us, t.graph_us
            secs = t.median_us * 1e-6
            res.gbps = bytes / secs / 1e9
            res.pct_bw = 100 * res.gbps / ceil.copy_gbps
            if flops:
                res.tflops = flops / secs / 1e12
                res.pct_gemm = 100 * res.tflops / ceil.gemm_tflops
            res.floor_us = max(bytes / (ceil.copy_gbps * 1e9), flops / (ceil.gemm_tflops * 1e12)) * 1e6
            res.x_floor = t.median_us / res.floor_us if res.floor_us > 0 else None
            timed.append((n, res))
        for n, res in timed:
            pairs, bands = [], []
            for m, base in timed:
                if m == n or base.kind != "baseline":
                    continue
                if ratios:
                    v = ratios.get((n, m))
                else:  # GPU: ratio of medians, band from the crossed quantiles (conservative)
                    v = (base.median_us / res.median_us, base.p20_us / res.p80_us, base.p80_us / res.p20_us)
                if v is not None:
                    pairs.append(f"{base.impl}={v[0]:.3f}")
                    bands.append(f"{base.impl}={v[1]:.3f}:{v[2]:.3f}")
            res.speedups, res.speedup_bands = ";".join(pairs), ";".join(bands)
        self.results.extend(rows)
        self.log(f"{counter} {what}: {len(timed)} of {len(rows)} timed" + (f"  {steady}" if steady else ""))
        for res in rows:
            label = f"    {res.impl:<26}"
            if res.median_us is None:
                self.log(f"{label} {res.note}")
            else:
                self.log(f"{label} {self._progress_text(res)}")
        return rows

    def measure(
        self,
        fn: Callable[[], Any],
        *,
        impl: str,
        kind: str,
        graph: bool = True,
        check: Callable[[Any], str] | None = None,
        **problem: Any,
    ) -> Result | None:
        """One implementation alone (a group of one); None when it could not be timed."""
        (res,) = self.measure_group([Case(impl, kind, fn, graph=graph, check=check)], **problem)
        return res if res.median_us is not None else None

    def _progress_text(self, r: Result) -> str:
        parts = [f"{r.median_us:9.2f} µs [{r.p20_us:.2f}-{r.p80_us:.2f}]"]
        if r.spread is not None:
            parts.append(f"p80/p20 {r.spread:.2f}{' NOISY' if r.noisy else ''}")
        if r.eager_us is not None:
            parts.append(f"eager {r.eager_us:8.2f}")
        if self.device.type == "cuda":
            parts.append(f"graph {r.graph_us:8.2f}" if r.graph_us is not None else "graph        -")
        parts.append(f"{r.gbps:7.2f} GB/s  x{r.x_floor:.3g} floor")
        if r.speedups:
            parts.append(" ".join(f"{s.split('=')[1]}x vs {s.split('=')[0]}" for s in r.speedups.split(";")))
        if r.check and r.check != "ok":
            parts.append(f"CHECK: {r.check}")
        if r.note:
            parts.append(f"({r.note})")
        return "  ".join(parts)

    # ---- output

    def family_results(self, family: str) -> list[Result]:
        """This session's rows of one family."""
        return [r for r in self.results if r.family == family]

    def write_csv(self, family: str, out_dir: Path) -> Path:
        """(Re)write ``out_dir/<family>.csv`` with this session's rows of that family."""
        rows = self.family_results(family)
        fill_speedups(rows)
        return write_csv(rows, Path(out_dir) / f"{family}.csv", self.env)


def default_out_dir(device: torch.device, quick: bool) -> Path:
    """benchmarks/results/<device-slug>, or <device-slug>-quick for --quick runs.

    Quick runs get their own folder so they never overwrite a recorded full run.
    """
    return RESULTS_DIR / (device_slug(device) + ("-quick" if quick else ""))


def open_session(args: Any, device: torch.device | None = None) -> tuple[Session, Path]:
    """The start of every benchmark script's main: threads (--threads), device (--device, or
    ``device``), a Session with the environment header printed, and the results folder (--out,
    else the device's default)."""
    set_threads(args.threads)
    device = device if device is not None else pick_device(args.device)
    so = import_sparseops()
    session = Session(device, quick=args.quick, sparseops_version=getattr(so, "__version__", ""))
    print(session.header(), flush=True)
    return session, args.out or default_out_dir(device, args.quick)
