"""MaxSim on CPU: sparseops against the torch formulations users write and the CPU peers.

Problems (DESIGN.md / issue 7's CPU goals; 1 query x 32 tokens, dim 128):
  uniform   1,000 (and 100: a re-rank) documents x 300 tokens, fp32 / bf16 / int8 documents
  ragged    1,000 documents of 50-300 tokens (seeded), packed (sparseops.maxsim_varlen)
  per-call  1 query token x 1 document token: the host cost of one call (the kernel is ~0)

Implementations (kind "baseline" unless said):
  torch:mm+amax+sum        one flat GEMM [Lq, Nd*Ld], amax over each document, sum over Lq (the
                           uniform baseline of ANCHORS §4), in the input dtype
  torch:pylate-einsum      PyLate's colbert_scores: einsum("ash,bth->abst"), the mask multiplied
                           in (masked similarities are 0), max, sum
  torch:colpali-einsum     colpali's score_multi_vector: einsum("bnd,csd->bcns") on zero-padded
                           documents, max, sum
  torch:colbert-9999       ColBERT's colbert_score: D @ Q^T per document, padding filled with
                           -9999, max, sum
  torch:compile(einsum)    torch.compile of the PyLate einsum (full runs only: it compiles)
  torch:padded-masked      ragged: flat GEMM on the padded documents, padding -inf, amax, sum
  torch:segment_reduce     ragged: flat GEMM on the packed tokens, torch.segment_reduce("max")
  maxsim-cpu, maxsim-fast  the numpy fp32 peers (maxsim_scores / maxsim_scores_variable), run in
                           their own interpreter through benchmarks/_worker.py, alternating with
                           this process: set SPARSEOPS_MAXSIM_PEER_PYTHON to that venv's python
                           (recipe in benchmarks/results/README.md); skipped with a note otherwise
  sparseops:cpu            the CPU kernel (kind "sparseops"); in the int8 rows the same kernel on
                           bf16 documents is the baseline "sparseops:cpu-bf16" (int8 must beat it)
Casts are outside the timing (ANCHORS: hoist them, or precision swings the ratio).

Floors: max(document bytes / copy bandwidth, 2 * Lq * sum(Ld) * dim FLOP / GEMM peak of the
matching dtype): fp32 rows against the fp32 ``torch.mm`` peak the harness measures, bf16 and
int8 rows against a bf16 ``torch.mm`` 2048^3 peak measured in the same run (torch has no fast
CPU int8 GEMM to measure: ``torch._int_mm`` runs below the bf16 one on the 2-core Zen 4).
pct_gemm and x_floor of each row use that peak; pct_bw is of the copy bandwidth.

CLI: python -m benchmarks.bench_maxsim [--quick] [--docs N ...] [--dtypes fp32 bf16 int8]
     [--problems uniform ragged percall] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import _harness as H

FAMILY = "maxsim"
DTYPES = ("fp32", "bf16", "int8")
DOCS = (100, 1000)
QUICK_DOCS = (100,)
PROBLEMS = ("uniform", "ragged", "percall")
LQ, DIM, LD, RAGGED = 32, 128, 300, (50, 300)
PEER_ENV = "SPARSEOPS_MAXSIM_PEER_PYTHON"
PEERS = ("maxsim_cpu", "maxsim_fast")


# --------------------------------------------------------------------------- torch baselines


def flat_mm_maxsim(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """[Lq, dim] x [Nd, Ld, dim] -> [Nd]: one GEMM, amax over each document, sum over Lq."""
    Nd, Ld, dim = d.shape
    sims = torch.mm(q, d.reshape(Nd * Ld, dim).t())  # [Lq, Nd * Ld]
    return sims.view(q.shape[0], Nd, Ld).amax(dim=-1).float().sum(dim=0)


def padded_masked_maxsim(q: torch.Tensor, d: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """The flat GEMM on padded documents, padding [Nd, Ld] (True = pad) set to -inf first."""
    Nd, Ld, dim = d.shape
    sims = torch.mm(q, d.reshape(Nd * Ld, dim).t()).view(q.shape[0], Nd, Ld)
    return sims.masked_fill(pad[None], float("-inf")).amax(dim=-1).float().sum(dim=0)


def segment_reduce_maxsim(q: torch.Tensor, packed: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Packed tokens [total, dim]: one GEMM, torch.segment_reduce max per document, sum."""
    sims = torch.mm(q, packed.t())  # [Lq, total]
    # segment_reduce wants lengths shaped like the data up to the reduced (last) axis.
    lens = lengths[None].expand(sims.shape[0], -1)
    return torch.segment_reduce(sims, "max", lengths=lens, axis=1).float().sum(dim=0)


def pylate_einsum(q: torch.Tensor, d: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """pylate.scores.colbert_scores for one query: masked similarities multiplied to 0."""
    s = torch.einsum("ash,bth->abst", q[None], d)
    if mask is not None:
        s = s * mask[None, :, None, :]
    return s.max(dim=-1).values.sum(dim=-1)[0].float()


def colpali_einsum(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """colpali_engine's score_multi_vector for one query (zero-padded documents)."""
    return torch.einsum("bnd,csd->bcns", q[None], d).max(dim=3)[0].sum(dim=2)[0].float()


def colbert_9999(q: torch.Tensor, d: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """ColBERT's colbert_score: D @ Q^T, padding filled with -9999, max over tokens, sum."""
    s = d @ q.t()  # [Nd, Ld, Lq]
    if pad is not None:
        s = s.masked_fill(pad[..., None], -9999)
    return s.max(dim=1).values.float().sum(dim=-1)


# --------------------------------------------------------------------------- inputs


def ragged_lengths(Nd: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randint(RAGGED[0], RAGGED[1] + 1, (Nd,), generator=g)


def make_problem(Nd: int, ragged: bool, seed: int) -> dict[str, Any]:
    """fp32 query [Lq, dim] and documents (uniform [Nd, Ld, dim], or ragged: padded + packed)."""
    from sparseops.testing import maxsim_inputs

    q, d = maxsim_inputs(1, LQ, Nd, LD if not ragged else RAGGED[1], DIM, seed=seed)
    p: dict[str, Any] = {"q": q[0], "d": d}
    if ragged:
        lens = ragged_lengths(Nd, seed)
        pad = torch.arange(d.shape[1])[None, :] >= lens[:, None]
        d = d.masked_fill(pad[..., None], 0)
        cu = torch.zeros(Nd + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        p.update(d=d, lens=lens, pad=pad, cu=cu, packed=d[~pad].contiguous())
    return p


def reference_scores(p: dict[str, Any]) -> torch.Tensor:
    """fp64 scores of the fp32 problem (padding never wins)."""
    q, d = p["q"].double(), p["d"].double()
    sims = torch.einsum("id,mjd->mij", q, d)
    if "pad" in p:
        sims = sims.masked_fill(p["pad"][:, None, :], float("-inf"))
    return sims.amax(dim=-1).sum(dim=-1)


# --------------------------------------------------------------------------- peers


class PeerPool:
    """The numpy peers in one worker interpreter (SPARSEOPS_MAXSIM_PEER_PYTHON), or a reason why not."""

    def __init__(self) -> None:
        self.worker = None
        self.why = ""
        self.tmp = Path(tempfile.mkdtemp(prefix="sparseops-maxsim-peers-"))
        python = os.environ.get(PEER_ENV, "")
        if not python:
            self.why = f"skipped: {PEER_ENV} is not set (benchmarks/results/README.md has the venv recipe)"
            return
        from benchmarks._worker import Worker, WorkerError

        n = str(torch.get_num_threads())
        try:
            self.worker = Worker(python, threads=int(n), env={"OMP_NUM_THREADS": n, "RAYON_NUM_THREADS": n})
        except (OSError, WorkerError) as exc:
            self.why = f"skipped: the peer interpreter {python} did not start ({exc})"

    def cases(self, p: dict[str, Any], want: torch.Tensor, tag: str, check: Callable[[Any], str]) -> list[H.Case]:
        """One external Case per installed peer (a note row for a missing one)."""
        from benchmarks._worker import WorkerError

        names = [f"{m.replace('_', '-')}" for m in PEERS]
        if self.worker is None:
            return [H.Case(n, "baseline", fn=_skipped(self.why), note=self.why) for n in names]
        folder = self.tmp / tag
        folder.mkdir(exist_ok=True)
        np.save(folder / "q.npy", p["q"].numpy())
        np.save(folder / "want.npy", want.numpy())
        variable = "packed" in p
        np.save(folder / "d.npy", (p["packed"] if variable else p["d"]).numpy())
        if variable:
            np.save(folder / "cu.npy", p["cu"].numpy().astype(np.int64))
        out = []
        for mod, name in zip(PEERS, names, strict=True):
            op = f"{mod}.maxsim_scores" + ("_variable" if variable else "")
            try:
                ext = self.worker.case({"op": op, "dir": str(folder)})
                out.append(H.Case(name, "baseline", external=ext, note=ext.note))
            except WorkerError as exc:
                why = f"skipped: {exc}"
                out.append(H.Case(name, "baseline", fn=_skipped(why), note=why))
        return out

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _skipped(why: str) -> Callable[[], Any]:
    def fn() -> Any:
        raise RuntimeError(why)

    return fn


# --------------------------------------------------------------------------- peaks


def bf16_peak_tflops(quick: bool) -> float:
    """bf16 torch.mm throughput (TFLOP/s) on 2048^3 (1024^3 with --quick), median of calls."""
    m = 1024 if quick else 2048
    a = torch.randn(m, m, dtype=torch.bfloat16)
    b = torch.randn(m, m, dtype=torch.bfloat16)
    torch.mm(a, b)
    t = H.time_cpu(lambda: torch.mm(a, b), 0.15 if quick else 0.4, min_samples=3).median_us * 1e-6
    return 2 * m**3 / t / 1e12


def apply_peak(rows: Sequence[H.Result], peak_tflops: float, label: str, copy_gbps: float) -> None:
    """Recompute pct_gemm / floor / x_floor of rows against ``peak_tflops`` (the dtype's peak)."""
    for r in rows:
        if r.median_us is None or not r.flops:
            continue
        r.pct_gemm = 100 * r.tflops / peak_tflops
        r.floor_us = max(r.bytes / (copy_gbps * 1e9), r.flops / (peak_tflops * 1e12)) * 1e6
        r.x_floor = r.median_us / r.floor_us
        r.note = "; ".join(filter(None, [r.note, f"% of {label} peak {peak_tflops * 1e3:.0f} GFLOP/s"]))


# --------------------------------------------------------------------------- run


def run(
    session: H.Session,
    *,
    out_dir: Path,
    docs: Sequence[int] | None = None,
    dtypes: Sequence[str] = DTYPES,
    problems: Sequence[str] = PROBLEMS,
) -> list[H.Result]:
    """Time every problem (see the module docstring); returns this family's rows."""
    if session.device.type == "cuda":  # the GPU problems and baselines: benchmarks/bench_maxsim_gpu.py
        from benchmarks.bench_maxsim_gpu import run_gpu

        return run_gpu(session, out_dir=out_dir, docs=docs)
    so = H.import_sparseops()
    quick = session.quick
    docs = docs or (QUICK_DOCS if quick else DOCS)
    ceil = session.ceilings
    bf16_peak = bf16_peak_tflops(quick)
    session.log(f"bf16 GEMM peak {bf16_peak * 1e3:.0f} GFLOP/s (torch.mm, same run)")
    peers = PeerPool()
    if peers.why:
        session.log(f"maxsim peers {peers.why}")
    shapes = [(Nd, False) for Nd in docs if "uniform" in problems]
    if "ragged" in problems:
        shapes.append((max(docs), True))
    session.plan(len(shapes) * len(dtypes) + ("percall" in problems))
    try:
        for Nd, ragged in shapes:
            p = make_problem(Nd, ragged, seed=Nd)
            want = reference_scores(p)
            for dt in dtypes:
                rows = _measure(session, so, p, want, Nd, ragged, dt, peers, quick)
                peak, label = (ceil.gemm_tflops, "fp32") if dt == "fp32" else (bf16_peak, "bf16")
                apply_peak(rows, peak, label, ceil.copy_gbps)
                session.write_csv(FAMILY, out_dir)
        if "percall" in problems:
            _percall(session, so)
            session.write_csv(FAMILY, out_dir)
    finally:
        peers.close()
    return session.family_results(FAMILY)


def _measure(session, so, p, want, Nd, ragged, dt, peers, quick) -> list[H.Result]:
    q, d = p["q"], p["d"]
    lens = p.get("lens")
    tokens = int(lens.sum()) if ragged else Nd * LD

    def check_for(tol: float) -> Callable[[Any], str]:
        def check(out: Any) -> str:
            err = (out.double() - want).abs().max().item()
            return "ok" if err <= tol else f"max err {err:.2e}"

        return check

    # fp32 exact; bf16 inputs round each coordinate (2^-9), their GEMM output too; int8 rows
    # add the documents' and the query's quantisation (both about 1/254 of a token's max).
    check = check_for({"fp32": 1e-3, "bf16": 0.5, "int8": 0.5}[dt])
    cases: list[H.Case] = []
    if dt == "int8":
        qb, db = q.bfloat16(), d.bfloat16()
        d8, s8 = so.maxsim_quantize(d if not ragged else p["packed"])
        if ragged:
            cu = p["cu"]
            pb = p["packed"].bfloat16()
            cases.append(
                H.Case(
                    "sparseops:cpu",
                    "sparseops",
                    lambda: so.maxsim_varlen(q, _cu1(), d8, cu, d_scale=s8, backend="cpu")[0],
                    check=check,
                )
            )
            cases.append(
                H.Case(
                    "sparseops:cpu-bf16",
                    "baseline",
                    lambda: so.maxsim_varlen(qb, _cu1(), pb, cu, backend="cpu")[0],
                    check=check,
                )
            )
        else:
            cases.append(
                H.Case("sparseops:cpu", "sparseops", lambda: so.maxsim(q, d8, d_scale=s8, backend="cpu"), check=check)
            )
            cases.append(
                H.Case("sparseops:cpu-bf16", "baseline", lambda: so.maxsim(qb, db, backend="cpu"), check=check)
            )
            cases.append(H.Case("torch:mm+amax+sum", "baseline", lambda: flat_mm_maxsim(qb, db), check=check))
        nbytes = d8.numel() + 4 * s8.numel()
    else:
        dtype = torch.float32 if dt == "fp32" else torch.bfloat16
        qx, dx = q.to(dtype), d.to(dtype)
        if ragged:
            pad, cu, packed = p["pad"], p["cu"], p["packed"].to(dtype)
            maskf = (~pad).to(dtype)
            cases += [
                H.Case("sparseops:cpu", "sparseops",
                       lambda: so.maxsim_varlen(qx, _cu1(), packed, cu, backend="cpu")[0], check=check),
                H.Case("torch:padded-masked", "baseline", lambda: padded_masked_maxsim(qx, dx, pad), check=check),
                H.Case("torch:segment_reduce", "baseline", lambda: segment_reduce_maxsim(qx, packed, lens),
                       check=check),
                H.Case("torch:pylate-einsum", "baseline", lambda: pylate_einsum(qx, dx, maskf)),
                H.Case("torch:colbert-9999", "baseline", lambda: colbert_9999(qx, dx, pad), check=check),
            ]  # fmt: skip
        else:
            cases += [
                H.Case("sparseops:cpu", "sparseops", lambda: so.maxsim(qx, dx, backend="cpu"), check=check),
                H.Case("torch:mm+amax+sum", "baseline", lambda: flat_mm_maxsim(qx, dx), check=check),
                H.Case("torch:pylate-einsum", "baseline", lambda: pylate_einsum(qx, dx, None), check=check),
                H.Case("torch:colpali-einsum", "baseline", lambda: colpali_einsum(qx, dx), check=check),
                H.Case("torch:colbert-9999", "baseline", lambda: colbert_9999(qx, dx, None), check=check),
            ]  # fmt: skip
        if not quick:
            compiled = torch.compile(pylate_einsum, dynamic=False)
            m = None if not ragged else (~p["pad"]).to(dtype)
            cases.append(H.Case("torch:compile(einsum)", "baseline", lambda: compiled(qx, dx, m)))
        if dt == "fp32":
            cases += peers.cases(p, want, f"{'ragged' if ragged else 'uniform'}-{Nd}", check)
        nbytes = (int(lens.sum()) if ragged else d.numel() // DIM) * DIM * (4 if dt == "fp32" else 2)
    shape = f"1x{LQ} vs Nd x {'50-300 ragged' if ragged else LD}, dim {DIM}"
    return session.measure_group(
        cases, family=FAMILY, op="maxsim_varlen" if ragged else "maxsim", shape=shape,
        params=f"Lq={LQ} Ld={'50-300' if ragged else LD} dim={DIM} tokens={tokens}", size=Nd, size_name="Nd",
        dtype=dt, bytes=nbytes, flops=2 * LQ * tokens * DIM, headline=True,
    )  # fmt: skip


_CU1 = torch.tensor([0, LQ], dtype=torch.int32)


def _cu1() -> torch.Tensor:
    return _CU1


def _percall(session: H.Session, so: Any) -> None:
    """Host cost of one call: 1 query token x 1 document token (the kernel itself is ~0)."""
    q = torch.randn(1, 1, DIM)
    d = torch.randn(1, 1, DIM)
    d8, s8 = so.maxsim_quantize(d)
    x = torch.ones(16)
    op = torch.ops.sparseops.maxsim.default
    cases = [
        H.Case("sparseops.maxsim", "sparseops", lambda: so.maxsim(q, d, backend="cpu")),
        H.Case("sparseops.maxsim-int8", "sparseops", lambda: so.maxsim(q, d8, d_scale=s8, backend="cpu")),
        H.Case("torch.ops.sparseops.maxsim", "sparseops", lambda: op(q, d, None, None, "sum", False, "cpu")),
        H.Case("torch.mul", "baseline", lambda: torch.mul(x, x)),
    ]
    session.measure_group(
        cases, family=FAMILY, op="maxsim-percall", shape="1x1 vs 1x1, dim 128", params=f"dim={DIM}",
        size=1, size_name="Nd", dtype="fp32", bytes=4 * DIM, flops=0,
    )  # fmt: skip


def summary(rows: Sequence[H.Result]) -> list[str]:
    """The issue's CPU goals as measured in this run (ratios are the paired interleaved ones)."""
    by = {(r.op, r.size, r.dtype, r.impl): r for r in rows}

    def ratio(op, n, dt, base, impl="sparseops:cpu") -> str:
        r = by.get((op, n, dt, impl))
        if r is None or not r.speedups:
            return "n/a"
        for part in r.speedups.split(";"):
            name, _, v = part.partition("=")
            if name == base:
                return f"{float(v):.2f}x"
        return "n/a"

    def pct(op, n, dt) -> str:
        r = by.get((op, n, dt, "sparseops:cpu"))
        return "n/a" if r is None or r.pct_gemm is None else f"{r.pct_gemm:.0f} %"

    out = []
    for n in sorted({r.size for r in rows if r.op == "maxsim"}):
        out.append(
            f"uniform Nd={n}: fp32 {ratio('maxsim', n, 'fp32', 'maxsim-cpu')} vs maxsim-cpu, "
            f"{ratio('maxsim', n, 'fp32', 'maxsim-fast')} vs maxsim-fast, "
            f"{ratio('maxsim', n, 'fp32', 'torch:mm+amax+sum')} vs torch, {pct('maxsim', n, 'fp32')} of fp32 peak; "
            f"bf16 {ratio('maxsim', n, 'bf16', 'torch:mm+amax+sum')} vs torch bf16, {pct('maxsim', n, 'bf16')} of "
            f"bf16 peak; int8 {ratio('maxsim', n, 'int8', 'sparseops:cpu-bf16')} vs sparseops bf16"
        )
    for n in sorted({r.size for r in rows if r.op == "maxsim_varlen"}):
        per_tok = []
        for dt in ("fp32", "bf16", "int8"):
            rg, un = by.get(("maxsim_varlen", n, dt, "sparseops:cpu")), by.get(("maxsim", n, dt, "sparseops:cpu"))
            if rg and un and rg.median_us and un.median_us:
                per_tok.append(f"{dt} {(rg.median_us / rg.flops) / (un.median_us / un.flops):.2f}")
        out.append(
            f"ragged Nd={n}: fp32 {ratio('maxsim_varlen', n, 'fp32', 'maxsim-cpu')} vs maxsim-cpu, "
            f"{ratio('maxsim_varlen', n, 'fp32', 'torch:padded-masked')} vs padded torch, "
            f"{pct('maxsim_varlen', n, 'fp32')} of fp32 peak; bf16 {pct('maxsim_varlen', n, 'bf16')} of bf16 peak; "
            f"int8 {ratio('maxsim_varlen', n, 'int8', 'sparseops:cpu-bf16')} vs sparseops bf16; time per token "
            f"ragged / uniform: {', '.join(per_tok) or 'n/a'}"
        )
    pc = [r for r in rows if r.op == "maxsim-percall" and r.median_us is not None]
    if pc:
        out.append("per call (1x1): " + ", ".join(f"{r.impl} {r.median_us:.1f} us" for r in pc))
    # The per-call cost of a re-rank is the 1x1 call above (the kernel itself is ~0 there):
    # subtracting a tenth of the 1,000-document time would mix in cache effects (100
    # documents stay in L2/L3, 1,000 do not).
    rr = by.get(("maxsim", 100, "fp32", "sparseops:cpu"))
    if rr is not None and rr.median_us and pc:
        out.append(f"re-rank 100 fp32: {rr.median_us:.0f} us, of which host cost per call ~{pc[0].median_us:.1f} us")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_maxsim", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="100 documents only, short budgets, no torch.compile")
    p.add_argument("--docs", type=int, nargs="+", default=None, help="document counts (default 100 1000)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--threads", type=int, help=H.THREADS_HELP)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: the GPU problems of bench_maxsim_gpu")
    args = p.parse_args(argv)
    session, out_dir = H.open_session(args)
    results = run(session, out_dir=out_dir, docs=args.docs, dtypes=args.dtypes, problems=args.problems)
    for line in summary(results):
        session.log(line)
    session.log(f"wrote {out_dir / (FAMILY + '.csv')}")
    return 0 if all(math.isfinite(r.median_us or 0) for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
