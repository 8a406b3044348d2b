"""MaxSim: sparseops.maxsim against torch's flat GEMM formulation, on CPU.

Problem (DESIGN.md / issue 7's CPU goal): 1 query x 32 tokens x dim 128 against 100 and
1,000 documents x 300 tokens, fp32 and bf16.

Baseline (kind "baseline"):
  torch:mm+amax+sum   the uniform baseline of ANCHORS §4: one flat GEMM of the query tokens
                      against every document token, [Lq, Nd*Ld], viewed [Lq, Nd, Ld], amax
                      over Ld, sum over Lq. Casts are outside the timing (ANCHORS: hoist
                      them, or precision swings the ratio).
sparseops rows: the CPU backend (the Triton interpreter and the einsum reference are not
timed: they are for tests).

Floor: max(document bytes / copy bandwidth, 2 * Lq * sum(Ld) * dim FLOP / GEMM peak), the
peak being the fp32 ``torch.mm`` measured in the same run (bf16 rows use the same fp32
peak: the kernel multiplies in fp32).

CLI: python -m benchmarks.bench_maxsim [--quick] [--docs N ...] [--dtypes fp32 bf16] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import _harness as H

FAMILY = "maxsim"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DOCS = (100, 1000)
QUICK_DOCS = (100,)


def flat_mm_maxsim(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """[Lq, dim] x [Nd, Ld, dim] -> [Nd]: one GEMM, amax over each document, sum over Lq."""
    Nd, Ld, dim = d.shape
    sims = torch.mm(q, d.reshape(Nd * Ld, dim).t())  # [Lq, Nd * Ld]
    return sims.view(q.shape[0], Nd, Ld).amax(dim=-1).float().sum(dim=0)


def run(
    session: H.Session, *, out_dir: Path, docs: Sequence[int] | None = None, dtypes: Sequence[str] = ("fp32", "bf16")
) -> list[H.Result]:
    """Time sparseops.maxsim (the CPU kernel on CPU, what auto picks on GPU) against the flat GEMM."""
    if session.device.type == "cuda":  # the GPU problems and baselines: benchmarks/bench_maxsim_gpu.py
        from benchmarks.bench_maxsim_gpu import run_gpu

        return run_gpu(session, out_dir=out_dir, docs=docs)
    so = H.import_sparseops()
    docs = docs or (QUICK_DOCS if session.quick else DOCS)
    backend = "cpu" if session.device.type == "cpu" else "auto"
    from sparseops.testing import MAXSIM_DIM, MAXSIM_QUERY_TOKENS, maxsim_inputs

    Lq, dim, Ld = MAXSIM_QUERY_TOKENS, MAXSIM_DIM, 300
    session.plan(len(docs) * len(dtypes))
    for dt in dtypes:
        for Nd in docs:
            q, d = maxsim_inputs(1, Lq, Nd, Ld, dim, dtype=DTYPES[dt], device=session.device, seed=Nd)
            q2 = q[0]
            with torch.inference_mode():
                want = so.maxsim(q2.float(), d.float(), backend="reference")

            def check(out: Any, want=want, dt=dt) -> str:
                err = (out.float() - want).abs().max().item()
                # bf16 GEMM output is rounded to bf16 before the max: allow its rounding.
                tol = 1e-3 if out.dtype == torch.float32 and dt == "fp32" else 0.5
                return "ok" if err <= tol else f"max err {err:.2e}"

            cases = [
                H.Case("torch:mm+amax+sum", "baseline", lambda q2=q2, d=d: flat_mm_maxsim(q2, d), check=check),
                H.Case(
                    f"sparseops:{backend}",
                    "sparseops",
                    lambda q2=q2, d=d: so.maxsim(q2, d, backend=backend),
                    check=check,
                ),
            ]
            session.measure_group(
                cases, family=FAMILY, op="maxsim", shape=f"1x{Lq} vs Nd x {Ld}, dim {dim}",
                params=f"Lq={Lq} Ld={Ld} dim={dim}", size=Nd, size_name="Nd", dtype=dt,
                bytes=d.numel() * d.element_size(), flops=2 * Lq * Nd * Ld * dim, headline=True,
            )  # fmt: skip
            session.write_csv(FAMILY, out_dir)
    return session.family_results(FAMILY)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_maxsim", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="100 documents only, short budgets")
    p.add_argument("--docs", type=int, nargs="+", default=None, help="document counts (default 100 1000)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--threads", type=int, help=H.THREADS_HELP)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: the GPU problems of bench_maxsim_gpu")
    args = p.parse_args(argv)
    H.set_threads(args.threads)
    device = H.pick_device(args.device)
    so = H.import_sparseops()
    session = H.Session(device, quick=args.quick, sparseops_version=getattr(so, "__version__", ""))
    out_dir = args.out or H.default_out_dir(device, args.quick)
    print(session.header(), flush=True)
    results = run(session, out_dir=out_dir, docs=args.docs, dtypes=args.dtypes)
    for r in results:
        print(
            f"{r.dtype} Nd={r.size} {r.impl}: median {H.fmt_num(r.median_us)} us "
            f"(p20 {H.fmt_num(r.p20_us)}, p80 {H.fmt_num(r.p80_us)}), {H.fmt_num(r.pct_gemm)} % of GEMM peak, "
            f"x_floor {H.fmt_num(r.x_floor)}, {r.speedups} {r.speedup_bands} check {r.check}",
            flush=True,
        )
    session.log(f"wrote {out_dir / (FAMILY + '.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
