"""MaxSim late interaction: ``sparseops.maxsim``, the ColBERT / ColPali scoring op.

``sparseops::maxsim`` is declared once, in C++ (csrc/registration.cpp), where its arguments
are parsed and checked for every backend (csrc/ops/maxsim.cpp). This module registers the
fake implementation, the autograd formula (plain torch ops, so one backward serves every
backend and torch.compile), each backend with its rank and reason (``sparseops._backend``),
the Python kernels the C++ op calls for the Triton and reference backends, and the public
function. The semantics are specified by ``sparseops.reference.maxsim``.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import maxsim as ref
from ._common import accumulate_dtype as _accumulate_dtype
from ._common import describe as _describe

__all__ = ["maxsim"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------
# Fake implementation: the shapes and strides of every backend, SymInt-friendly. It also
# catches what the dispatcher would route here silently: a mask on another device (a meta
# mask with CPU q selects the Meta kernel, which is this function).


def _maxsim_fake(q, d, q_mask=None, d_mask=None, reduce="sum", backend="auto"):
    for name, t in (("d", d), ("q_mask", q_mask), ("d_mask", d_mask)):
        if t is not None and t.device != q.device:
            raise RuntimeError(f"{name} must be on the same device as q ({q.device}), got {_describe(t)}")
    if q.dim() != 3 or d.dim() != 3:
        raise RuntimeError(f"q and d must be 3-D tensors, got q {_describe(q)} and d {_describe(d)}")
    Nq, Lq = q.shape[0], q.shape[1]
    Nd = d.shape[0]
    scores = q.new_empty((Nq, Nd), dtype=_accumulate_dtype(q.dtype))
    argmax = q.new_empty((Nq, Nd, Lq), dtype=torch.int32)
    return scores, argmax


# ---------------------------------------------------------------------------------------------
# Autograd. Registered from Python on the C++ op: the forward kernel runs for hundreds of
# microseconds or more at the shapes MaxSim serves (1k docs x 300 tokens: ~10 ms on 2 CPU
# cores), so the ~9 us a Python autograd wrapper costs per call (H100 host, torch 2.11,
# 2026-11) does not matter. The backward reads the saved int32 argmax and never forms the
# Lq x Ld similarities: dq gathers the winning document rows, dd scatter-adds the query rows
# into them (index_add_: sequential on CPU, hence deterministic; on CUDA deterministic under
# torch.use_deterministic_algorithms(True)). It holds one [Nq, Nd, Lq, dim] temporary.


def _query_counts(q_mask, Nq: int, Lq: int, like: torch.Tensor) -> torch.Tensor:
    """Real query tokens per query, [Nq] in like's dtype (what reduce="mean" divides by)."""
    if q_mask is None:
        return torch.full((Nq,), Lq, dtype=like.dtype, device=like.device)
    if q_mask.dtype == torch.bool:
        return q_mask.sum(dim=-1).to(like.dtype)
    return q_mask.clamp(0, Lq).to(like.dtype)


def _setup_context(ctx, inputs, output) -> None:
    q, d, q_mask, d_mask, reduce, _backend_name = inputs
    _, argmax = output
    ctx.reduce = reduce
    ctx.save_for_backward(q, d, argmax, q_mask)


def _backward(ctx, grad_scores, _grad_argmax):
    q, d, argmax, q_mask = ctx.saved_tensors
    Nq, Lq, dim = q.shape
    Nd, Ld, _ = d.shape
    acc = _accumulate_dtype(q.dtype)
    g = grad_scores.to(acc)  # may be a stride-0 expand (out.sum().backward())
    if ctx.reduce == "mean":
        count = _query_counts(q_mask, Nq, Lq, g)
        g = torch.where(count[:, None] > 0, g / count.clamp_min(1)[:, None], torch.zeros_like(g))
    live = argmax >= 0  # masked query tokens and empty documents took nothing
    coef = torch.where(live, g[:, :, None], torch.zeros((), dtype=acc, device=g.device))  # [Nq, Nd, Lq]
    # Row of the flattened documents [Nd * Ld, dim] each (query, doc, query token) took.
    rows = (torch.arange(Nd, device=q.device)[None, :, None] * Ld + argmax.clamp_min(0)).reshape(-1)
    grad_q = grad_d = None
    if ctx.needs_input_grad[0]:
        taken = d.reshape(Nd * Ld, dim).to(acc).index_select(0, rows).view(Nq, Nd, Lq, dim)
        grad_q = (coef[..., None] * taken).sum(dim=1).to(q.dtype)
    if ctx.needs_input_grad[1]:
        contrib = (coef[..., None] * q.to(acc)[:, None, :, :]).reshape(-1, dim)
        flat = torch.zeros(Nd * Ld, dim, dtype=acc, device=q.device).index_add_(0, rows, contrib)
        grad_d = flat.view(Nd, Ld, dim).to(d.dtype)
    return grad_q, grad_d, None, None, None, None


if _backend.HAS_C:
    torch.library.register_fake("sparseops::maxsim")(_maxsim_fake)
    torch.library.register_autograd("sparseops::maxsim", _backward, setup_context=_setup_context)
    _maxsim_op = torch.ops.sparseops.maxsim.default


# ---------------------------------------------------------------------------------------------
# Backends. Facts: (device type, dtype, dim < 16): the Triton kernel takes a path without
# tl.dot below 16 (tl.dot needs K >= 16), so reasons and future ranks can depend on it.


def _facts(q, *_):
    if isinstance(q, torch.Tensor):
        return (q.device.type, q.dtype, q.dim() >= 1 and q.shape[-1] < 16)
    if isinstance(q, (str, torch.device)):
        return (torch.device(q).type, None, None)
    raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")


def _triton_reason(device, dtype, small_dim):
    return _backend.triton_kernels(device)


def _reference_kernel(inputs, outputs, options) -> None:
    q, d, q_mask, d_mask = inputs
    scores, argmax = ref.maxsim_ref(q, d, q_mask=q_mask, d_mask=d_mask, reduce=options["reduce"])
    outputs[0].copy_(scores)
    outputs[1].copy_(argmax)


def _triton_kernel(inputs, outputs, options) -> None:
    from ..kernels.maxsim import maxsim_triton

    q, d, q_mask, d_mask = inputs
    maxsim_triton(q, d, q_mask, d_mask, options["q_mask"], options["d_mask"], options["reduce"], *outputs)


_MAXSIM = _backend.Op("maxsim", _facts)
# No "cuda" backend yet (no CUDA C++ kernel): on CUDA tensors auto picks Triton.
_MAXSIM.register("cpu", rank=0, unsupported_reason=_backend.native_cpu)
_MAXSIM.register("triton", rank=1, unsupported_reason=_triton_reason, kernel=_triton_kernel)
_MAXSIM.register("reference", rank=9, unsupported_reason=_backend.always, kernel=_reference_kernel)


# ---------------------------------------------------------------------------------------------
# Public API


def maxsim(
    q: torch.Tensor,
    d: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    reduce: str = "sum",
    backend: str | None = None,
) -> torch.Tensor:
    """Late-interaction (ColBERT / ColPali) scores of every query against every document.

    scores[n, m] = sum over the real tokens i of query n of max over the real tokens j of
    document m of <q[n, i], d[m, j]>, without materialising the Lq x Ld similarities.

    Args:
        q: [Nq, Lq, dim] query token embeddings, or [Lq, dim] for one query (then the result
            is [Nd], like ``flash_maxsim`` and ``maxsim_cpu.maxsim_scores``; PyLate's
            ``colbert_scores`` and colpali's ``score_multi_vector`` always batch queries and
            get [Nq, Nd]). fp32 (scored exactly in fp32: no tf32 or fp16 downcast), bf16 or
            fp16 (products accumulated in fp32), fp64 (scored in fp64); any strides.
        d: [Nd, Ld, dim] document token embeddings, same dtype and device as q.
        q_mask: None, bool [Nq, Lq] (True = real token; [Lq] for a 2-D q) or int32/int64
            lengths [Nq] (the first lengths[n] tokens are real; a 0-dim tensor for a 2-D q).
        d_mask: None, bool [Nd, Ld] or int32/int64 lengths [Nd]. Lengths must lie in
            [0, L]: an error on CPU tensors; on CUDA tensors (where checking would need a
            host synchronisation) they are clamped to [0, L].
        reduce: "sum" (ColBERT) or "mean" (the sum over the number of real query tokens).
        backend: None/"auto", "cpu", "triton" or "reference". There is no CUDA C++ kernel
            yet: on CUDA tensors auto picks "triton".

    Returns:
        scores [Nq, Nd] (or [Nd]) fp32 (fp64 for fp64 inputs), contiguous, differentiable in
        q and d.

    Semantics, identical on every backend (``sparseops.reference.maxsim.maxsim_ref`` is the
    specification): a masked document token never wins the max; a document with no real
    token scores 0 for every query token; a masked query token adds nothing; "mean" with no
    real query token gives 0; empty Nq, Nd, Lq, Ld work. Ties in the max go to the lowest
    document token (this decides which token the gradient flows to). Inputs are expected to
    be finite (NaN similarities give unspecified scores).

    Backward: dq[n, i] = sum_m g[n, m] * d[m, argmax[n, m, i]] and the matching scatter-add
    into dd, from the argmax saved by the forward; masked tokens get zero gradient.
    """
    name = _MAXSIM.choose(backend, q)
    single = isinstance(q, torch.Tensor) and q.dim() == 2
    if single:
        q = q.unsqueeze(0)
        if q_mask is not None and isinstance(q_mask, torch.Tensor):
            q_mask = q_mask.unsqueeze(0) if q_mask.dtype == torch.bool else q_mask.reshape(1)
    if _backend.HAS_C:
        scores = _maxsim_op(q, d, q_mask, d_mask, reduce, name)[0]
    else:
        scores = ref.maxsim_ref(q, d, q_mask=q_mask, d_mask=d_mask, reduce=reduce)[0]
    return scores[0] if single else scores
