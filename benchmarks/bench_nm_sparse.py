"""N:M sparse: sparseops.nm_linear against dense F.linear on the same (masked) weight, torch's
sparse paths, and the copy-bandwidth / GEMM floor; plus the prune-and-compress time.

Problem (issue 6 §4): LLaMA-style weights [out, in] 4096x4096 (q/o proj), 11008x4096
(gate/up), 4096x11008 (down), 28672x8192 (70B gate/up), x [batch, in], bf16 (fp32 on
request); patterns 2:4, 1:4, 2:8. Batch 1, 16, 128 on CPU; 1, 16, 128, 2048, 8192 on GPU.

Implementations:
  torch:F.linear            baseline: dense F.linear on the masked dense weight (what the
                            sparse kernels must beat).
  torch:csr                 baseline (CPU): F.linear with the weight as a torch CSR tensor,
                            the only sparse matmul torch has on CPU (skipped where torch has
                            no CSR kernel for the dtype).
  torch:semi-structured     baseline (GPU, 2:4 fp16/bf16): F.linear with
                            to_sparse_semi_structured(weight), as users call it (cuSPARSELt
                            where torch has it, else CUTLASS); the GPU timer also reports
                            its CUDA-graph replay.
  sparseops:<backend>       sparseops.nm_linear on the compressed weight (CPU: the C++
                            kernel; GPU: what auto picks).
  zentorch:linear, zentorch:linear(prepacked)
                            baseline (CPU, fp32 / bf16; optional, ANCHORS.md §4): AMD zentorch
                            2.13.0.1's dense zentorch_linear_unary on the masked weight, plain
                            and prepacked once (zentorch_weight_prepack_for_linear). In this
                            process when zentorch imports here, else in a worker process of
                            SPARSEOPS_ZENTORCH_PYTHON's venv; skipped with a note otherwise.
  deepsparse                baseline (CPU, fp32; optional): deepsparse 1.8.0, the one sparse CPU
                            engine, on an ONNX model of one MatMul whose initializer is the
                            pruned weight (compiled for the batch); out of process, in
                            SPARSEOPS_DEEPSPARSE_PYTHON's venv.
  onnxruntime               baseline (CPU, fp32; optional): dense onnxruntime on the same ONNX
                            model, in the same venv as deepsparse.
  Out-of-process peers run in benchmarks/_worker.py servers whose timing chunks alternate with
  this process's rounds, on the same masked weight and input (handed over in a temporary
  file); the venv recipes are in benchmarks/results/README.md.

Floor: max(bytes / copy bandwidth, kept FLOP / GEMM peak), with bytes = the compressed
weight (values + meta) + x + out: what an N:M kernel must move. The dense F.linear row's
x_floor therefore says how far dense is from the sparse floor (2:4 bf16 reads 0.5625x the
dense weight bytes, 1:4 0.3125x, 2:8 0.28x: the byte ceiling of the speedup at small batch).

Prune-and-compress (op "nm_prune"): 11008x4096, 2:4: torch's topk over the groups (the mask
as users compute it) against sparseops.nm_mask and the fused sparseops.nm_compress(prune=True)
(mask + values + meta in one pass); bytes = read w once + write the compressed weight.

Cold weights (--cold, extra rows beside the warm ones, never instead of them): in a model at
decode each layer's weight comes from DRAM, but a benchmark that calls one layer in a loop keeps
whatever fits in the L3 there (32 MB on the 2-core EPYC: the dense bf16 4096x4096 weight, 33.5 MB,
largely stays, and its warm rows measure the L3, not a weight stream). With --cold every
implementation (the in-process ones and the worker peers alike) rotates over enough copies of
its own weight (dense, CSR, compressed, prepacked, compiled engine) that the copies together
span at least 3x the L3 (cold_copies()): each call reads a weight last touched 2+ L3-sizes of
traffic ago. Weights of 2x the L3 or more get one copy (they stream from DRAM anyway). The rows
carry "cold" in their op name ("nm_linear 2:4 cold"). Batch-1 decode is the case this is for.

CLI: python -m benchmarks.bench_nm_sparse [--quick] [--batch R ...] [--patterns 2:4 ...]
     [--dtypes bf16 fp32] [--shapes NAME ...] [--out DIR] [--threads N] [--cold]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import _harness as H

FAMILY = "nm_sparse"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# name: (out, in)
SHAPES = {
    "llama-q/o 4096x4096": (4096, 4096),
    "llama-gate/up 11008x4096": (11008, 4096),
    "llama-down 4096x11008": (4096, 11008),
    "llama70b-gate/up 28672x8192": (28672, 8192),
}
QUICK_SHAPES = {"llama-q/o 4096x4096": (4096, 4096)}
PATTERNS = ("2:4", "1:4", "2:8")
QUICK_PATTERNS = ("2:4",)
CPU_BATCH = (1, 16, 128)
GPU_BATCH = (1, 16, 128, 2048, 8192)
QUICK_BATCH = (1, 16)
PRUNE_SHAPE = (11008, 4096)


def l3_bytes() -> int:
    """The last-level cache of CPU 0 (sysfs), 32 MiB when unknown."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        return int(text.rstrip("KM")) * scale
    except (OSError, ValueError, IndexError):
        return 32 << 20


def cold_copies(weight_bytes: int, l3: int) -> int:
    """Copies of a weight of weight_bytes that together span >= 3x the L3 (1 from 2x the L3)."""
    if weight_bytes >= 2 * l3:
        return 1
    return max(2, -(-3 * l3 // max(weight_bytes, 1)))


class _Rotate:
    """Calls fn on the next of its argument tuples at every call (the cold-weight rows)."""

    def __init__(self, fn: Any, args: list[tuple[Any, ...]]) -> None:
        self.fn, self.args, self.i = fn, args, 0

    def __call__(self) -> Any:
        self.i = (self.i + 1) % len(self.args)
        return self.fn(*self.args[self.i])


def _pattern(text: str) -> tuple[int, int]:
    n, m = (int(v) for v in text.split(":"))
    return n, m


def _csr_linear_runs(x: torch.Tensor, w_csr: torch.Tensor) -> bool:
    try:
        F.linear(x[:1], w_csr)
        return True
    except (RuntimeError, NotImplementedError):  # no CSR kernel for this dtype / device
        return False


def _csr_linear(x: torch.Tensor, w_csr: torch.Tensor) -> torch.Tensor:
    """F.linear with a CSR weight outside inference mode: torch's CSR matmul fails inside it
    ("Cannot set version_counter for inference tensor"), and the harness times under it."""
    with torch.inference_mode(False):
        return F.linear(x, w_csr)


def _semi_structured(w: torch.Tensor) -> Any | None:
    """torch's 2:4 semi-structured tensor of w, or None where torch cannot make one here."""
    try:
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(w)
    except Exception:  # noqa: BLE001 - any refusal (dtype, shape, GPU arch) means no baseline
        return None


def topk_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M mask as users write it in torch: topk of |w| over every group of m."""
    out, k = w.shape
    groups = w.abs().view(out, k // m, m)
    idx = groups.topk(n, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).view(out, k)


DEEPSPARSE_ENV = "SPARSEOPS_DEEPSPARSE_PYTHON"  # venv with deepsparse 1.8.0, onnxruntime, onnx
ZENTORCH_ENV = "SPARSEOPS_ZENTORCH_PYTHON"  # venv with zentorch 2.13.0.1 (when it does not import here)


def _zentorch_here() -> Any | None:
    """torch.ops.zentorch when zentorch imports in this process (None otherwise)."""
    try:
        import zentorch  # noqa: F401 - registers torch.ops.zentorch
    except Exception:  # noqa: BLE001 - ImportError, or a zentorch built for another torch
        return None
    return torch.ops.zentorch


class Peers:
    """The optional CPU peers: zentorch (here or in a worker), deepsparse + onnxruntime (worker)."""

    def __init__(self, session: H.Session) -> None:
        self.log = session.log
        self.zt = _zentorch_here()
        self.workers: dict[str, Any] = {}
        self.dir = tempfile.TemporaryDirectory(prefix="sparseops-bench-nm-")
        if self.zt is None:
            self._start("zentorch", ZENTORCH_ENV, "zentorch")
        else:
            self.log("zentorch: in this process")
        self._start("deepsparse", DEEPSPARSE_ENV, "deepsparse")

    def _start(self, name: str, env: str, module: str) -> None:
        py = os.environ.get(env)
        if not py:
            self.log(f"{name}: skipped ({env} is not set; venv recipe in benchmarks/results/README.md)")
            return
        from benchmarks import _worker

        try:
            self.workers[name] = _worker.Worker(py, imports=(module,))
        except _worker.WorkerError as exc:
            self.log(f"{name}: skipped: {py} did not start a worker importing {module}: {exc}")
            return
        self.log(f"{name} worker: {self.workers[name].info}")

    def cases(
        self, x: torch.Tensor, dense: torch.Tensor, dt: str, check: Any, copies: int = 1, sparse_copies: int = 1
    ) -> tuple[list[H.Case], list[Any]]:
        """This problem's peer cases, and the worker cases to drop after it. Cold rows: the dense
        peers rotate over `copies` copies of the weight, deepsparse (which keeps the pruned
        weight compressed) over `sparse_copies` engines."""
        cases: list[H.Case] = []
        live: list[Any] = []
        if self.zt is not None:
            zt = self.zt
            ws = [dense] + [dense.clone() for _ in range(copies - 1)]
            wps = [zt.zentorch_weight_prepack_for_linear(w) for w in ws]
            plain = _Rotate(zt.zentorch_linear_unary, [(x, w) for w in ws])
            cases.append(H.Case("zentorch:linear", "baseline", plain, check=check))
            prepacked = _Rotate(lambda a, w: zt.zentorch_linear_unary(a, w, is_weight_prepacked=True),
                                [(x, w) for w in wps])  # fmt: skip
            cases.append(H.Case("zentorch:linear(prepacked)", "baseline", prepacked, check=check))
        wanted = [("zentorch", "nm.zentorch", "zentorch:linear"),
                  ("zentorch", "nm.zentorch_prepacked", "zentorch:linear(prepacked)")]  # fmt: skip
        if dt == "fp32":
            wanted += [("deepsparse", "nm.deepsparse", "deepsparse"), ("deepsparse", "nm.onnxruntime", "onnxruntime")]
        wanted = [w for w in wanted if w[0] in self.workers]
        if not wanted:
            return cases, live
        from benchmarks import _worker

        path = os.path.join(self.dir.name, "problem.pt")
        torch.save({"w": dense.float(), "x": x.float()}, path)  # fp32 carries bf16 exactly
        for worker_name, op, impl in wanted:
            try:
                n_copies = sparse_copies if op == "nm.deepsparse" else copies
                ext = self.workers[worker_name].case({"op": op, "file": path, "dtype": dt, "copies": n_copies})
            except _worker.WorkerError as exc:
                self.log(f"{impl}: skipped for {dt}: {exc}")
                continue
            live.append(ext)
            cases.append(H.Case(impl, "baseline", external=ext, note=f"out of process; {ext.note}",
                                check=H.worker_error_check(1e-4 if dt == "fp32" else 3e-2)))
        return cases, live

    def close(self) -> None:
        for w in self.workers.values():
            w.close()
        with contextlib.suppress(OSError):
            self.dir.cleanup()


def _linear_groups(session: H.Session, so: Any, out_dir: Path, shapes, patterns, batches, dtypes, cold) -> None:
    gpu = session.device.type == "cuda"
    backend = "auto" if gpu else "cpu"
    peers = Peers(session) if not gpu else None
    try:
        _linear_problems(session, so, out_dir, shapes, patterns, batches, dtypes, backend, peers, cold)
    finally:
        if peers is not None:
            peers.close()


def _linear_problems(session, so, out_dir, shapes, patterns, batches, dtypes, backend, peers, cold) -> None:
    from sparseops.testing import nm_weight

    gpu = session.device.type == "cuda"
    l3 = l3_bytes()
    for dt in dtypes:
        dtype = DTYPES[dt]
        for name, (NO, K) in shapes.items():
            for pat in patterns:
                n, m = _pattern(pat)
                dense, nmw = nm_weight(NO, K, n, m, dtype=dtype, device=session.device, seed=NO + K, scale=K**-0.5)
                w_csr = dense.to_sparse_csr() if not gpu else None
                w_semi = _semi_structured(dense) if gpu and (n, m) == (2, 4) and dtype != torch.float32 else None
                weight_bytes = nmw.values.numel() * nmw.values.element_size() + nmw.meta.numel()
                for R, temp in [(R, t) for R in batches for t in (("warm", "cold") if cold else ("warm",))]:
                    # cold: every implementation rotates over copies of its own weight (see the docstring)
                    ncopy = (lambda b: cold_copies(b, l3)) if temp == "cold" else (lambda b: 1)
                    dense_bytes = dense.numel() * dense.element_size()
                    denses = [dense] + [dense.clone() for _ in range(ncopy(dense_bytes) - 1)]
                    nmws = [nmw] + [_clone_nm(nmw) for _ in range(ncopy(weight_bytes) - 1)]
                    x = torch.randn(R, K, dtype=dtype, device=session.device)
                    with torch.inference_mode():
                        want = F.linear(x.float(), dense.float())
                    scale = want.abs().max().item() or 1.0

                    def check(out: Any, want=want, scale=scale, dt=dt) -> str:
                        err = (out.float() - want).abs().max().item() / scale
                        return "ok" if err <= (1e-4 if dt == "fp32" else 3e-2) else f"max rel err {err:.2e}"

                    cases = [
                        H.Case("torch:F.linear", "baseline", _Rotate(F.linear, [(x, w) for w in denses]), check=check),
                        H.Case(f"sparseops:{backend}", "sparseops",
                               _Rotate(lambda a, w: so.nm_linear(a, w, backend=backend), [(x, w) for w in nmws]),
                               check=check),
                    ]  # fmt: skip
                    if w_csr is not None:
                        if _csr_linear_runs(x, w_csr):
                            csr_bytes = sum(t.numel() * t.element_size() for t in (w_csr.values(), w_csr.col_indices()))
                            csrs = [w_csr] + [w_csr.clone() for _ in range(ncopy(csr_bytes) - 1)]
                            csr = _Rotate(_csr_linear, [(x, w) for w in csrs])
                            csr = H.Case("torch:csr", "baseline", csr, check=check, graph=False)
                            cases.insert(1, csr)
                        else:
                            session.log(f"torch:csr: skipped for {dt} (no CSR matmul for it here)")
                    if w_semi is not None:
                        cases.insert(1, H.Case("torch:semi-structured", "baseline",
                                               lambda a=(x, w_semi): F.linear(*a), check=check))  # fmt: skip
                    live: list[Any] = []
                    if peers is not None:
                        extra, live = peers.cases(
                            x, dense, dt, check, copies=ncopy(dense_bytes), sparse_copies=ncopy(weight_bytes)
                        )
                        cases[1:1] = extra
                    session.measure_group(
                        cases, family=FAMILY, op=f"nm_linear {pat}" + (" cold" if temp == "cold" else ""),
                        shape=f"{name} {pat}",
                        params=f"out={NO} in={K} n={n} m={m}", size=R, size_name="batch", dtype=dt,
                        bytes=weight_bytes + R * (K + NO) * x.element_size(), flops=2 * R * NO * K * n // m,
                        headline=(n, m) == (2, 4),
                    )  # fmt: skip
                    for ext in live:
                        ext.drop()
                    del denses, nmws
                    session.write_csv(FAMILY, out_dir)


def _clone_nm(nmw: Any) -> Any:
    """A copy of a compressed weight in its own memory (values and meta cloned)."""
    import copy

    c = copy.copy(nmw)
    c.values, c.meta = nmw.values.clone(), nmw.meta.clone()
    return c


def _prune_group(session: H.Session, so: Any, out_dir: Path, dtype_name: str) -> None:
    NO, K = PRUNE_SHAPE
    n, m = 2, 4
    dtype = DTYPES[dtype_name]
    w = torch.randn(NO, K, dtype=dtype, device=session.device)
    groups = w.abs().float().view(NO, K // m, m)
    # The best N of each group, as magnitudes: under ties (bf16 has many) any of the tied
    # positions is a right answer, so masks may differ while the kept magnitudes cannot.
    want = groups.topk(n, dim=-1).values.sum(-1)

    def check_mask(mask: Any, want=want) -> str:
        if not torch.equal(mask.view(NO, K // m, m).sum(-1), torch.full_like(want, n, dtype=torch.long)):
            return f"mask does not keep exactly {n} of every {m}"
        kept = (groups * mask.view(NO, K // m, m)).sum(-1)
        return "ok" if torch.equal(kept, want) else f"{int((kept != want).sum())} groups keep a smaller |w|"

    def check_compressed(nmw: Any) -> str:
        return check_mask(nmw.dense() != 0)  # randn has no exact zeros

    backend = "auto" if session.device.type == "cuda" else "cpu"
    cases = [
        H.Case("torch:topk-mask", "baseline", lambda: topk_mask(w, n, m), check=check_mask),
        H.Case("sparseops:nm_mask", "sparseops", lambda: so.nm_mask(w, n, m, backend=backend), check=check_mask),
        H.Case("sparseops:nm_compress(prune)", "sparseops",
               lambda: so.nm_compress(w, n, m, prune=True, backend=backend), check=check_compressed),
    ]  # fmt: skip
    kept = NO * K * n // m
    session.measure_group(
        cases, family=FAMILY, op="nm_prune 2:4", shape=f"{NO}x{K} 2:4", params=f"out={NO} in={K} n={n} m={m}",
        size=NO, size_name="out", dtype=dtype_name,
        bytes=w.numel() * w.element_size() + kept * w.element_size() + kept * 2 // 8,
    )  # fmt: skip
    session.write_csv(FAMILY, out_dir)


def run(
    session: H.Session,
    *,
    out_dir: Path,
    batches: Sequence[int] | None = None,
    patterns: Sequence[str] | None = None,
    dtypes: Sequence[str] = ("bf16",),
    shapes: Sequence[str] | None = None,
    cold: bool = False,
) -> list[H.Result]:
    """Time sparseops.nm_linear against dense, torch's sparse paths and the floor; then the prune."""
    so = H.import_sparseops()
    table = QUICK_SHAPES if session.quick else SHAPES
    if shapes:
        table = {name: SHAPES[name] for name in shapes}
    patterns = patterns or (QUICK_PATTERNS if session.quick else PATTERNS)
    if batches is None:
        batches = QUICK_BATCH if session.quick else (GPU_BATCH if session.device.type == "cuda" else CPU_BATCH)
    session.plan(len(dtypes) * len(table) * len(patterns) * len(batches) * (2 if cold else 1) + len(dtypes))
    _linear_groups(session, so, out_dir, table, patterns, batches, dtypes, cold)
    for dt in dtypes:
        _prune_group(session, so, out_dir, dt)
    return session.family_results(FAMILY)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_nm_sparse", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="4096x4096 2:4 at batch 1 and 16, short budgets")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default: CPU 1 16 128)")
    p.add_argument("--patterns", nargs="+", default=None, help="N:M patterns (default 2:4 1:4 2:8)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None, help="weights (default all)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--threads", type=int, help=H.THREADS_HELP)
    p.add_argument(
        "--cold", action="store_true", help="also rows with each weight rotated over copies spanning 3x the L3"
    )
    args = p.parse_args(argv)
    session, out_dir = H.open_session(args)
    results = run(
        session,
        out_dir=out_dir,
        batches=args.batch,
        patterns=args.patterns,
        dtypes=args.dtypes,
        shapes=args.shapes,
        cold=args.cold,
    )
    for r in results:
        print(
            f"{r.dtype} batch={r.size} {r.shape} {r.impl}: median {H.fmt_num(r.median_us)} us "
            f"(p20 {H.fmt_num(r.p20_us)}, p80 {H.fmt_num(r.p80_us)}), {H.fmt_num(r.pct_bw)} % of copy bandwidth, "
            f"x_floor {H.fmt_num(r.x_floor)}, {r.speedups} {r.speedup_bands} check {r.check}",
            flush=True,
        )
    session.log(f"wrote {out_dir / (FAMILY + '.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
