"""MaxSim on a GPU: sparseops against the naive einsum MaxSim users write today, its
torch.compile, and the fused peers when installed (not yet run on a GPU).

Problems (DESIGN.md / issue 7, bf16 unless said, dim 128, 32 query tokens):
  rerank      1 query x Nd documents x 300 tokens, Nd = 100, 1,000, 10,000 (bf16, fp16, fp32);
              Nd = 100 ... 1,000 is where per-call host time dominates.
  colbert180  1 query x 10,000 documents x 180 tokens.
  ragged      1 query x 10,000 documents of 50-300 tokens: packed (cu_seqlens) for
              sparseops.maxsim_varlen and flash-maxsim's varlen; padded + lengths for the rest.
  colpali     1 query of 1,024 tokens x 1,000 pages x 1,030 tokens (compute-bound), and a
              32-token query against the same pages.
  batch       Nq = 4, 16 queries x 10,000 x 300 (batched search).
  train       in-batch training, B = 32, 128 queries x B documents x 300 tokens: forward +
              backward of a cross-entropy over the [B, B] scores; peak extra memory in the note.

Implementations:
  naive:pylate      einsum("ash,bth->abst") -> max over t -> sum over s (pylate.scores.colbert_scores)
  naive:colpali     einsum("bnd,csd->bcns") -> max(3) -> sum(2) (colpali_engine score_multi_vector)
  naive:colbert     D @ Q^T ([Nd, Ld, Lq]) -> max(1) -> sum(-1) (colbert's colbert_score)
  compile(naive:pylate)  torch.compile of the first
  flash-maxsim, late-interaction-kernels  when importable (see benchmarks/results/README.md for
                    carrying their wheels to a GPU machine without network)
  sparseops:auto / sparseops:cuda / sparseops:triton
Casts are hoisted out of the timed region (ANCHORS: precision swings a naive baseline 1.2-23x).
Each row: do_bench device time (L2 flushed), eager per-call wall time (host included), and
CUDA-graph replay time; GB/s counts document bytes once, % of the copy bandwidth and of the
bf16 GEMM peak measured in the same run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import _harness as H

FAMILY = "maxsim"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- baselines


def naive_pylate(q: torch.Tensor, d: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """pylate.scores.colbert_scores: the full [Nq, Nd, Lq, Ld] einsum, multiplicative mask."""
    s = torch.einsum("ash,bth->abst", q, d)
    if mask is not None:
        s = s * mask[None, :, None, :]
    return s.max(dim=-1).values.float().sum(dim=-1)


def naive_colpali(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """colpali_engine's score_multi_vector (one batch): einsum, max over doc tokens, sum."""
    return torch.einsum("bnd,csd->bcns", q, d).max(dim=3)[0].float().sum(dim=2)


def naive_colbert(q: torch.Tensor, d: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """colbert's colbert_score for one query: D @ Q^T, masked tokens filled with -9999."""
    s = d @ q[0].T  # [Nd, Ld, Lq]
    if mask is not None:
        s = s.masked_fill(~mask[:, :, None], -9999)
    return s.max(dim=1).values.float().sum(dim=-1)[None, :]


def _peers() -> dict[str, Callable[..., Any] | str]:
    """Importable fused peers (name -> callable(q [Nq, Lq, d], d [Nd, Ld, d], lengths)) or
    the import error as a note."""
    out: dict[str, Callable[..., Any] | str] = {}
    try:
        from flash_maxsim import flash_maxsim

        out["flash-maxsim"] = lambda q, d, lengths=None: (
            flash_maxsim(q[0], d) if lengths is None else flash_maxsim(q[0], d, lengths)
        )
    except Exception as exc:  # noqa: BLE001 - optional peer
        out["flash-maxsim"] = f"not importable: {type(exc).__name__}: {exc}"[:160]
    try:
        import late_interaction_kernels as lik

        def lik_call(q, d, lengths=None):
            mask = None if lengths is None else torch.arange(d.shape[1], device=d.device)[None, :] < lengths[:, None]
            return lik.maxsim(q, d, d_mask=mask)

        out["late-interaction-kernels"] = lik_call
    except Exception as exc:  # noqa: BLE001 - optional peer
        out["late-interaction-kernels"] = f"not importable: {type(exc).__name__}: {exc}"[:160]
    return out


# --------------------------------------------------------------------------- problems


def _check_against(want: torch.Tensor, tol: float) -> Callable[[Any], str]:
    def check(out: Any) -> str:
        out = out[0] if isinstance(out, tuple) else out
        got = out.float().reshape(want.shape)
        err = (got - want).abs().max().item()
        return "ok" if err <= tol * max(1.0, want.abs().max().item()) else f"max err {err:.2e}"

    return check


def _reference(so: Any, q: torch.Tensor, d: torch.Tensor, **kw: Any) -> torch.Tensor:
    """fp32 scores from the reference, in document chunks (it materialises Lq x Ld)."""
    outs = []
    dm = kw.pop("d_mask", None)
    chunk = max(1, int(2e8 // max(1, q.shape[0] * q.shape[1] * d.shape[1])))
    for m0 in range(0, d.shape[0], chunk):
        sub = None if dm is None else dm[m0 : m0 + chunk]
        outs.append(so.maxsim(q.float(), d[m0 : m0 + chunk].float(), d_mask=sub, backend="reference", **kw))
    return torch.cat(outs, 1)


def _sparseops_cases(so: Any, fn: Callable[[str | None], Any], check, backends: Sequence[str | None]) -> list[H.Case]:
    cases = []
    for b in backends:
        cases.append(H.Case(f"sparseops:{b or 'auto'}", "sparseops", lambda b=b: fn(b), check=check))
    return cases


def _forward_group(session: H.Session, so: Any, *, shape: str, q, d, lengths=None, packed=None, dt: str, size: int,
                   size_name: str = "Nd", naive: bool = True, headline: bool = True) -> None:  # fmt: skip
    Nq, Lq, dim = q.shape
    Nd, Ld, _ = d.shape
    mask = None if lengths is None else torch.arange(Ld, device=d.device)[None, :] < lengths[:, None]
    with torch.inference_mode():
        want = _reference(so, q, d, d_mask=lengths)
    tol = 2e-5 if dt == "fp32" else 2e-2
    check = _check_against(want, tol)
    cases: list[H.Case] = []
    # The naive forms need [Nq, Nd, Lq, Ld] in memory: only where it fits in a few GB.
    fits = Nq * Nd * Lq * Ld * q.element_size() < 4e9
    if naive and fits:
        cases += [
            H.Case("naive:pylate", "baseline", lambda: naive_pylate(q, d, mask)),
            H.Case("naive:colbert", "baseline", lambda: naive_colbert(q, d, mask)) if Nq == 1 else None,
            H.Case("naive:colpali", "baseline", lambda: naive_colpali(q, d)) if mask is None else None,
        ]
        compiled = torch.compile(naive_pylate, dynamic=False)
        cases.append(H.Case("compile(naive:pylate)", "baseline", lambda: compiled(q, d, mask)))
    for name, peer in _peers().items():
        if isinstance(peer, str):
            cases.append(H.Case(name, "baseline", lambda peer=peer: (_ for _ in ()).throw(RuntimeError(peer))))
        else:
            cases.append(H.Case(name, "baseline", lambda peer=peer: peer(q, d, lengths), check=check))
    cases = [c for c in cases if c is not None]
    cases += _sparseops_cases(so, lambda b: so.maxsim(q, d, d_mask=lengths, backend=b), check, (None, "cuda", "triton"))
    if packed is not None:
        pq, cu_q, pd, cu_d = packed
        cases.append(H.Case("sparseops:varlen-cuda", "sparseops",
                            lambda: so.maxsim_varlen(pq, cu_q, pd, cu_d, backend="cuda"), check=check))  # fmt: skip
    # Document bytes read once (ragged: only the real tokens).
    tokens = Nd * Ld if lengths is None else int(lengths.sum())
    session.measure_group(
        cases, family=FAMILY, op="maxsim", shape=shape, params=f"Nq={Nq} Lq={Lq} Ld={Ld} dim={dim}", size=size,
        size_name=size_name, dtype=dt, bytes=tokens * dim * d.element_size(), flops=2 * Nq * Lq * tokens * dim,
        headline=headline,
    )  # fmt: skip


def _int8_group(session: H.Session, so: Any, Nd: int = 10_000, Ld: int = 300) -> None:
    """int8 documents with per-token scales (Triton: the CUDA C++ kernel takes float ones)
    against the same documents in bf16 on the default path; bytes: int8 values + fp32 scales."""
    from sparseops.testing import maxsim_inputs

    q, d = maxsim_inputs(1, 32, Nd, Ld, 128, dtype=torch.bfloat16, device=session.device, seed=4)
    d8, scale = so.maxsim_quantize(d)
    with torch.inference_mode():
        want = _reference(so, q, (d8.float() * scale[..., None]).to(torch.bfloat16))
    check = _check_against(want, 2e-2)
    cases = [
        H.Case("sparseops:auto bf16 documents", "baseline", lambda: so.maxsim(q, d)),
        H.Case("sparseops:auto", "sparseops", lambda: so.maxsim(q, d8, d_scale=scale), check=check),
    ]
    session.measure_group(
        cases, family=FAMILY, op="maxsim_int8", shape="int8 rerank 1x32 vs Nd x 300", params=f"Ld={Ld} dim=128",
        size=Nd, size_name="Nd", dtype="int8", bytes=d8.numel() + 4 * scale.numel(), flops=2 * 32 * Nd * Ld * 128,
        headline=True,
    )  # fmt: skip


def _train_group(session: H.Session, so: Any, B: int, Ld: int = 300) -> None:
    """Forward + backward of an in-batch cross-entropy; peak extra memory in the note."""
    from sparseops.testing import maxsim_inputs

    q, d = maxsim_inputs(B, 32, B, Ld, 128, dtype=torch.bfloat16, device=session.device, seed=B)
    qq, dd = q.clone().requires_grad_(), d.clone().requires_grad_()
    labels = torch.arange(B, device=session.device)

    def step(score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.enable_grad():
                qq.grad = dd.grad = None
                loss = torch.nn.functional.cross_entropy(score(qq, dd), labels)
                loss.backward()
            return loss.detach()

        return run

    impls = {
        "naive:pylate": ("baseline", step(lambda a, b: naive_pylate(a, b))),
        "sparseops:auto": ("sparseops", step(lambda a, b: so.maxsim(a, b))),
        "sparseops:triton": ("sparseops", step(lambda a, b: so.maxsim(a, b, backend="triton"))),
    }
    for name, peer in _peers().items():
        if not isinstance(peer, str):
            impls[name] = ("baseline", step(lambda a, b, peer=peer: peer(a, b)))
    cases = []
    for name, (kind, fn) in impls.items():
        fn()  # warm up (compilation, allocator)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 1e6
        cases.append(H.Case(name, kind, fn, graph=False, note=f"peak +{extra:.1f} MB"))
    session.measure_group(
        cases, family=FAMILY, op="maxsim_train", shape="in-batch fwd+bwd, Lq=32 Ld=300 dim=128", params="B x B",
        size=B, size_name="B", dtype="bf16", bytes=d.numel() * 2, flops=3 * 2 * B * 32 * B * Ld * 128, headline=True,
    )  # fmt: skip


def run_gpu(session: H.Session, *, out_dir: Path, docs: Sequence[int] | None = None,
            dtypes: Sequence[str] = ("bf16", "fp16", "fp32")) -> list[H.Result]:  # fmt: skip
    so = H.import_sparseops()
    from sparseops.testing import maxsim_inputs, maxsim_lengths

    dev = session.device
    docs = docs or ((100, 1000) if session.quick else (100, 1000, 10_000))
    plan = len(docs) * len(dtypes) + (0 if session.quick else 8)
    session.plan(plan)
    for dt in dtypes:
        for Nd in docs:
            q, d = maxsim_inputs(1, 32, Nd, 300, 128, dtype=DTYPES[dt], device=dev, seed=Nd)
            _forward_group(session, so, shape="rerank 1x32 vs Nd x 300", q=q, d=d, dt=dt, size=Nd)
            session.write_csv(FAMILY, out_dir)
    if not session.quick:
        q, d = maxsim_inputs(1, 32, 10_000, 180, 128, dtype=torch.bfloat16, device=dev, seed=1)
        _forward_group(session, so, shape="colbert 1x32 vs Nd x 180", q=q, d=d, dt="bf16", size=10_000)
        # Ragged corpus: padded + lengths for the dense forms, packed for varlen.
        Nd, Ld = 10_000, 300
        q, d = maxsim_inputs(1, 32, Nd, Ld, 128, dtype=torch.bfloat16, device=dev, seed=2)
        lengths = maxsim_lengths(Nd, Ld, low=50, device=dev, seed=2)
        keep = torch.arange(Ld, device=dev)[None, :] < lengths[:, None]
        cu_d = torch.zeros(Nd + 1, dtype=torch.int32, device=dev)
        cu_d[1:] = torch.cumsum(lengths, 0)
        packed = (q[0].contiguous(), torch.tensor([0, 32], dtype=torch.int32, device=dev), d[keep].contiguous(), cu_d)
        _forward_group(session, so, shape="ragged 1x32 vs Nd x 50-300", q=q, d=d, lengths=lengths, packed=packed,
                       dt="bf16", size=Nd)  # fmt: skip
        for Nq in (4, 16):
            q, d = maxsim_inputs(Nq, 32, 10_000, 300, 128, dtype=torch.bfloat16, device=dev, seed=Nq)
            _forward_group(session, so, shape="batch Nq x 32 vs 10k x 300", q=q, d=d, dt="bf16", size=Nq,
                           size_name="Nq", naive=False)  # fmt: skip
        q, d = maxsim_inputs(1, 1024, 1000, 1030, 128, dtype=torch.bfloat16, device=dev, seed=3)
        _forward_group(session, so, shape="colpali 1x1024 vs Nd x 1030", q=q, d=d, dt="bf16", size=1000)
        _int8_group(session, so)
        session.write_csv(FAMILY, out_dir)
        for B in (32, 128):
            _train_group(session, so, B)
            session.write_csv(FAMILY, out_dir)
    return session.family_results(FAMILY)
