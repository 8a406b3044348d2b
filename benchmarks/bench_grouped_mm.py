"""grouped_mm: sparseops.grouped_mm against torch._grouped_mm, a per-expert loop and the
dense GEMM floor, on the expert GEMMs of the DESIGN.md MoE shapes (CPU).

Problem: the up projection (gate | up, [T*k, H] x [E, H, 2I]) of one MoE layer with the
routed rows grouped by expert (balanced random routing), b a transposed view of the
[E, 2I, H] weights (the HF layout), scaled to what a shared CPU holds:
  mixtral-8x7b/4      E 8,  k 2, H 1024 (of 4096), 2I 3584 (of 28672 / 4)
  qwen3-30b-a3b/4     E 32 (of 128), k 8, H 512 (of 2048), 2I 384 (of 1536)
  deepseek-v3/8       E 32 (of 256), k 8, H 896 (of 7168), 2I 512 (of 4096)
  gpt-oss-120b/8      E 16 (of 128), k 4, H 360 (of 2880), 2I 720 (of 5760)
tokens T: 1, 8, 64 (decode) and 4096 (prefill); fp32 and bf16. Each problem also times the
2D x 2D weight gradient of the same projection (dW [E, H, 2I] = x.T @ dy per expert, ragged
K; --no-wgrad skips it). --shapes qwen3-30b-a3b mixtral-8x7b times the full-size layers.

Implementations:
  torch:_grouped_mm   baseline: torch._grouped_mm (skipped where it has no CPU kernel, or
                      where its 16-byte stride rule refuses the shape).
  torch:loop          baseline: one torch.mm per expert on the slices (what users write).
  floor:dense-mm      baseline: one dense torch.mm of the same FLOPs ([T*k, H] x [H, 2I]):
                      the GEMM floor, measured in the same run.
  sparseops:cpu       sparseops.grouped_mm(backend="cpu").

GPU (--device cuda, or the demo on a GPU; bf16): the full-size layers' up ([T*k, H] x [E, H, 2I])
and down ([T*k, I] x [E, I, H]) projections, T 1, 16, 64, 4096, 16384, balanced routing (and
skewed routing, max/mean ~ 5 with empty experts, at T = 4096), plus the weight gradient (ragged
K: [H, T*k] x [T*k, 2I] -> [E, H, 2I]) at T = 4096:
  torch:_grouped_mm   baseline: torch._grouped_mm (CUTLASS on sm90).
  floor:dense-mm      baseline: one dense torch.mm of the same FLOPs.
  sparseops:triton    sparseops.grouped_mm(backend="triton").
GB/s counts the expert weights actually read (experts with rows) plus the rows in and out;
the first call's time (compilation) shows in the notes, peak memory per implementation in the
log.

CLI: python -m benchmarks.bench_grouped_mm [--device cpu|cuda] [--quick] [--tokens T ...] [--dtypes fp32 bf16]
     [--shapes NAME ...] [--no-wgrad] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import _harness as H

FAMILY = "grouped_mm"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# name: (E, k, H, 2I)
SHAPES = {
    "mixtral-8x7b/4": (8, 2, 1024, 3584),
    "qwen3-30b-a3b/4": (32, 8, 512, 384),
    "deepseek-v3/8": (32, 8, 896, 512),
    "gpt-oss-120b/8": (16, 4, 360, 720),
}
QUICK_SHAPES = {"qwen3-30b-a3b/16": (16, 4, 256, 192)}
# The full-size up projections of issue 8's CPU layers (--shapes).
FULL_SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 1536), "mixtral-8x7b": (8, 2, 4096, 28672)}
TOKENS = (1, 8, 64, 4096)
QUICK_TOKENS = (1, 64)


def expert_rows(T: int, k: int, E: int, seed: int) -> torch.Tensor:
    """offs [E] int32 of T*k routed rows grouped by expert (k distinct experts per token)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=gen).topk(k, dim=1).indices.reshape(-1)
    return torch.bincount(ids, minlength=E).cumsum(0).to(torch.int32)


def loop_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The per-expert torch loop: out[s0:s1] = x[s0:s1] @ w[e]."""
    out = x.new_empty((x.shape[0], w.shape[2]))
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[e], out=out[start:end])
        start = end
    return out


def _torch_grouped_runs(x, w, offs) -> bool:
    try:
        torch._grouped_mm(x[:0] if x.shape[0] == 0 else x, w, offs=offs)
        return True
    except Exception:  # noqa: BLE001 - any failure means torch cannot take this problem here
        return False


def run(
    session: H.Session,
    *,
    out_dir: Path,
    tokens: Sequence[int] | None = None,
    dtypes: Sequence[str] = ("fp32", "bf16"),
    shapes: Sequence[str] | None = None,
    wgrad: bool = True,
) -> list[H.Result]:
    """Time sparseops.grouped_mm (the CPU kernel) against torch's grouped GEMM, a loop and the floor."""
    if session.device.type == "cuda":
        return run_gpu(session, out_dir=out_dir, tokens=tokens)
    so = H.import_sparseops()
    if shapes:
        shapes = {name: {**SHAPES, **QUICK_SHAPES, **FULL_SHAPES}[name] for name in shapes}
    else:
        shapes = QUICK_SHAPES if session.quick else SHAPES
    tokens = tokens or (QUICK_TOKENS if session.quick else TOKENS)
    session.plan(len(shapes) * len(tokens) * len(dtypes) * (2 if wgrad else 1))
    for dt in dtypes:
        dtype = DTYPES[dt]
        for name, (E, k, Hd, N) in shapes.items():
            gen = torch.Generator().manual_seed(E)
            w = torch.empty(E, N, Hd, dtype=dtype)
            for e in range(E):  # one expert at a time: no fp32 temporary of a full-size layer
                w[e] = torch.randn(N, Hd, generator=gen)
            w = w.transpose(1, 2)  # [E, H, 2I] view
            for T in tokens:
                offs = expert_rows(T, k, E, seed=T)
                n = T * k
                x = torch.randn(n, Hd, generator=gen).to(dtype)
                with torch.inference_mode():
                    want = so.grouped_mm(x.float(), w.float(), offs, backend="cpu")
                scale = want.abs().max().item() or 1.0

                def check(out: Any, want=want, scale=scale, dt=dt) -> str:
                    err = (out.float() - want).abs().max().item() / scale
                    return "ok" if err <= (1e-4 if dt == "fp32" else 2e-2) else f"max rel err {err:.2e}"

                xa, wa = torch.randn(n, Hd, dtype=dtype), w[0].contiguous()
                cases = [
                    H.Case("torch:loop", "baseline", lambda a=(x, w, offs): loop_mm(*a), check=check, graph=False),
                    H.Case("floor:dense-mm", "baseline", lambda a=(xa, wa): torch.mm(*a)),
                    H.Case("sparseops:cpu", "sparseops",
                           lambda a=(x, w, offs): so.grouped_mm(*a, backend="cpu"), check=check),
                ]  # fmt: skip
                if _torch_grouped_runs(x, w, offs):
                    cases.insert(
                        0,
                        H.Case("torch:_grouped_mm", "baseline",
                               lambda a=(x, w, offs): torch._grouped_mm(a[0], a[1], offs=a[2]), check=check),
                    )  # fmt: skip
                else:
                    session.log(f"torch._grouped_mm: skipped for {name} T={T} {dt} (refuses the shape on CPU)")
                touched = int((offs.diff(prepend=offs.new_zeros(1)) > 0).sum())
                session.measure_group(
                    cases, family=FAMILY, op="grouped_mm 2d3d", shape=f"{name} E={E} k={k} H={Hd} N={N}",
                    params=f"E={E} k={k} K={Hd} N={N} b=transposed view", size=T, size_name="T", dtype=dt,
                    bytes=(touched * Hd * N + n * (Hd + N)) * x.element_size(), flops=2 * n * Hd * N,
                    headline=True,
                )  # fmt: skip
                session.write_csv(FAMILY, out_dir)
                if wgrad:
                    run_wgrad(session, so, name, E, k, Hd, N, T, offs, x, dtype, dt, out_dir)
    return session.family_results(FAMILY)


def loop_wgrad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The per-expert torch loop of the weight gradient: out[e] = a[:, s0:s1] @ b[s0:s1]."""
    out = a.new_empty((offs.numel(), a.shape[0], b.shape[1]))
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a[:, start:end], b[start:end], out=out[e])
        else:
            out[e].zero_()
        start = end
    return out


def run_wgrad(session: H.Session, so: Any, name: str, E: int, k: int, Hd: int, N: int, T: int,
              offs: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, dt: str, out_dir: Path) -> None:
    """The 2D x 2D (ragged K) weight gradient of the same up projection: dW [E, H, 2I] =
    x[rows of e].T @ dy[rows of e], x.T a transposed view (what autograd hands over)."""
    n = x.shape[0]
    gen = torch.Generator().manual_seed(T + 1)
    dy = torch.randn(n, N, generator=gen).to(dtype)
    a = x.t()
    with torch.inference_mode():
        want = so.grouped_mm(a.float(), dy.float(), offs, backend="cpu")
    scale = want.abs().max().item() or 1.0

    def check(out: Any, want=want, scale=scale, dt=dt) -> str:
        err = (out.float() - want).abs().max().item() / scale
        return "ok" if err <= (1e-4 if dt == "fp32" else 2e-2) else f"max rel err {err:.2e}"

    xa, dya = torch.randn(Hd, n, dtype=dtype), torch.randn(n, N, dtype=dtype)
    cases = [
        H.Case("torch:loop", "baseline", lambda: loop_wgrad(a, dy, offs), check=check, graph=False),
        H.Case("floor:dense-mm", "baseline", lambda: torch.mm(xa, dya)),
        H.Case("sparseops:cpu", "sparseops", lambda: so.grouped_mm(a, dy, offs, backend="cpu"), check=check),
    ]
    if _torch_grouped_runs(a, dy, offs):
        cases.insert(0, H.Case("torch:_grouped_mm", "baseline", lambda: torch._grouped_mm(a, dy, offs=offs),
                               check=check))  # fmt: skip
    else:
        session.log(f"torch._grouped_mm 2d2d: skipped for {name} T={T} {dt} (refuses the shape on CPU)")
    session.measure_group(
        cases, family=FAMILY, op="grouped_mm 2d2d wgrad", shape=f"{name} E={E} k={k} H={Hd} N={N}",
        params=f"E={E} k={k} M={Hd} N={N} a=transposed view", size=T, size_name="T", dtype=dt,
        bytes=(E * Hd * N + n * (Hd + N)) * x.element_size(), flops=2 * n * Hd * N, headline=False,
    )  # fmt: skip
    session.write_csv(FAMILY, out_dir)
# ---------------------------------------------------------------------------------------------
# GPU: full-size layers, bf16, sparseops' Triton kernel against torch._grouped_mm.

# name: (E, k, H, I)
GPU_SHAPES = {
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "deepseek-v3": (256, 8, 7168, 2048),
    "gpt-oss-120b": (128, 4, 2880, 2880),
}
GPU_TOKENS = (1, 16, 64, 4096, 16384)
QUICK_GPU_TOKENS = (64, 4096)


def skewed_offs(T: int, k: int, E: int, seed: int) -> torch.Tensor:
    """offs [E] of T*k rows with max/mean ~ 5 and about an eighth of the experts empty."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(E, generator=gen) ** 4
    w[torch.randperm(E, generator=gen)[: max(1, E // 8)]] = 0
    sizes = (w / w.sum() * T * k).floor().long()
    sizes[int(w.argmax())] += T * k - int(sizes.sum())
    return sizes.cumsum(0).to(torch.int32)


def peak_mib(fn: Any) -> float:
    """Peak CUDA memory allocated by one call beyond what was allocated before it (MiB)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_gpu(session: H.Session, *, out_dir: Path, tokens: Sequence[int] | None = None) -> list[H.Result]:
    so = H.import_sparseops()
    dev = session.device
    dtype = torch.bfloat16
    tokens = tokens or (QUICK_GPU_TOKENS if session.quick else GPU_TOKENS)
    shapes = dict(list(GPU_SHAPES.items())[1:3]) if session.quick else GPU_SHAPES
    problems = []
    for name, (E, k, Hd, inter) in shapes.items():
        for proj, (K, N) in (("up", (Hd, 2 * inter)), ("down", (inter, Hd))):
            for T in tokens:
                problems.append((name, E, k, proj, K, N, T, "balanced"))
                if T == 4096:
                    problems.append((name, E, k, proj, K, N, T, "skewed"))
        if 4096 in tokens:
            problems.append((name, E, k, "wgrad", Hd, 2 * inter, 4096, "balanced"))
    session.plan(len(problems))
    weights: dict[tuple, torch.Tensor] = {}
    for name, E, k, proj, K, N, T, routing in problems:
        gen = torch.Generator(device=dev).manual_seed(E + K)
        n = T * k
        offs = (expert_rows(T, k, E, seed=T) if routing == "balanced" else skewed_offs(T, k, E, seed=T)).to(dev)
        touched = int((offs.diff(prepend=offs.new_zeros(1)) > 0).sum())
        if proj == "wgrad":  # dW[e] = x_e^T dy_e: a [K, n] (transposed view), b [n, N] -> [E, K, N]
            a = torch.randn(n, K, device=dev, dtype=dtype, generator=gen).t()
            b = torch.randn(n, N, device=dev, dtype=dtype, generator=gen)
            nbytes = (n * (K + N) + E * K * N) * 2
            desc = f"[{K}, T*k] x [T*k, {N}] -> [E, {K}, {N}] ragged K"
        else:
            key = (name, proj)
            if key not in weights:  # [E, N, K] storage read as its [E, K, N] transposed view (HF layout)
                weights.clear()
                weights[key] = (torch.randn(E, N, K, device=dev, dtype=dtype, generator=gen) / K**0.5).transpose(1, 2)
            b = weights[key]
            a = torch.randn(n, K, device=dev, dtype=dtype, generator=gen)
            nbytes = (touched * K * N + n * (K + N)) * 2
            desc = f"[T*k, {K}] x [E, {K}, {N}]"
        with torch.inference_mode():
            want = torch._grouped_mm(a, b, offs=offs)
        end = int(offs[-1]) if proj != "wgrad" else None
        scale = want[:end].float().abs().max().item() or 1.0

        def check(out: Any, want=want, end=end, scale=scale) -> str:
            err = (out[:end].float() - want[:end].float()).abs().max().item() / scale
            return "ok" if err <= 2e-2 else f"max rel err {err:.2e}"

        xa, wa = torch.randn(n, K, device=dev, dtype=dtype), torch.randn(K, N, device=dev, dtype=dtype)
        cases = [
            H.Case("torch:_grouped_mm", "baseline", lambda a=a, b=b, o=offs: torch._grouped_mm(a, b, offs=o),
                   check=check),
            H.Case("floor:dense-mm", "baseline", lambda x=xa, w=wa: torch.mm(x, w)),
            H.Case("sparseops:triton", "sparseops", lambda a=a, b=b, o=offs: so.grouped_mm(a, b, o, backend="triton"),
                   check=check),
        ]  # fmt: skip
        rows = session.measure_group(
            cases, family=FAMILY, op=f"grouped_mm {proj}", shape=f"{name} {proj} {routing} E={E} k={k}",
            params=f"E={E} k={k} {desc} {routing}", size=T, size_name="T", dtype="bf16", bytes=nbytes,
            flops=2 * n * K * N, headline=proj == "up" and routing == "balanced",
        )  # fmt: skip
        peaks = ", ".join(f"{c.impl} {peak_mib(c.fn):.0f} MiB" for c, r in zip(cases, rows) if r.median_us)
        session.log(f"    peak memory beyond the inputs: {peaks}")
        session.write_csv(FAMILY, out_dir)
        del a, b, want, xa, wa
    return session.family_results(FAMILY)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_grouped_mm", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu (default) or cuda (full-size, bf16)")
    p.add_argument("--quick", action="store_true", help="one small shape, T 1 and 64, short budgets")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (default 1 8 64 4096)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument(
        "--shapes",
        nargs="+",
        choices=sorted({**SHAPES, **QUICK_SHAPES, **FULL_SHAPES}),
        help="problems to time (default: the scaled ones; full-size: " + ", ".join(FULL_SHAPES) + ")",
    )
    p.add_argument("--no-wgrad", action="store_true", help="skip the 2D x 2D weight-gradient rows")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--threads", type=int, help=H.THREADS_HELP)
    args = p.parse_args(argv)
    session, out_dir = H.open_session(args)
    results = run(session, out_dir=out_dir, tokens=args.tokens, dtypes=args.dtypes, shapes=args.shapes,
                  wgrad=not args.no_wgrad)
    for r in results:
        print(
            f"{r.dtype} T={r.size} {r.shape} {r.impl}: median {H.fmt_num(r.median_us)} us "
            f"(p20 {H.fmt_num(r.p20_us)}, p80 {H.fmt_num(r.p80_us)}), {H.fmt_num(r.pct_gemm)} % of GEMM peak, "
            f"x_floor {H.fmt_num(r.x_floor)}, {r.speedups} {r.speedup_bands} check {r.check}",
            flush=True,
        )
    session.log(f"wrote {out_dir / (FAMILY + '.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
