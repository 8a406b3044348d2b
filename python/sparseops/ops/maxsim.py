"""MaxSim late interaction: ``sparseops.maxsim``, ``maxsim_varlen``, ``maxsim_pairs`` and
``maxsim_topk``, the ColBERT / ColPali scoring, re-ranking, training and search ops.

Each op is declared once, in C++ (csrc/registration.cpp), where its arguments are parsed and
checked for every backend (csrc/ops/maxsim.cpp). This module registers the fake
implementations, the autograd formulas (all through the one backward op
``sparseops::maxsim_backward``, which reads the argmax the forward saved), each backend with
its rank and reason (``sparseops._backend``), the Python kernels the C++ ops call for the
Triton and reference backends, and the public functions. The semantics are specified by
``sparseops.reference.maxsim``.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import maxsim as ref
from ._common import accumulate_dtype as _accumulate_dtype
from ._common import describe as _describe

__all__ = ["maxsim", "maxsim_pairs", "maxsim_quantize", "maxsim_topk", "maxsim_varlen"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _argmax_dtype(doc_tokens) -> torch.dtype:
    """The saved argmax's dtype (csrc/include/sparseops/maxsim.h, argmax_dtype): int16 when
    every document has fewer than 2**15 tokens (doc_tokens: Ld, or the total of packed
    documents), int32 otherwise. From shapes only, so fakes and torch.compile know it."""
    return torch.int16 if doc_tokens < 2**15 else torch.int32


def _public_argmax(argmax: torch.Tensor) -> torch.Tensor:
    """What return_argmax hands out: int32 whatever the op saved (int16 cannot index)."""
    return argmax.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# Fake implementation: the shapes and strides of every backend, SymInt-friendly. It also
# catches what the dispatcher would route here silently: a mask on another device (a meta
# mask with CPU q selects the Meta kernel, which is this function).


def _maxsim_fake(q, d, q_mask=None, d_mask=None, reduce="sum", pylate_mask=False, backend="auto", d_scale=None):
    for name, t in (("d", d), ("q_mask", q_mask), ("d_mask", d_mask), ("d_scale", d_scale)):
        if t is not None and t.device != q.device:
            raise RuntimeError(f"{name} must be on the same device as q ({q.device}), got {_describe(t)}")
    if q.dim() != 3 or d.dim() != 3:
        raise RuntimeError(f"q and d must be 3-D tensors, got q {_describe(q)} and d {_describe(d)}")
    Nq, Lq = q.shape[0], q.shape[1]
    Nd = d.shape[0]
    scores = q.new_empty((Nq, Nd), dtype=_accumulate_dtype(q.dtype))
    argmax = q.new_empty((Nq, Nd, Lq), dtype=_argmax_dtype(d.shape[1]))
    return scores, argmax


def _same_device(q, **named) -> None:
    for name, t in named.items():
        if t is not None and t.device != q.device:
            raise RuntimeError(f"{name} must be on the same device as q ({q.device}), got {_describe(t)}")


def _varlen_fake(q, cu_q, d, cu_d, pairs=None, reduce="sum", backend="auto", d_scale=None):
    _same_device(q, cu_q=cu_q, d=d, cu_d=cu_d, pairs=pairs, d_scale=d_scale)
    acc = _accumulate_dtype(q.dtype)
    if pairs is None:
        Nq, Nd = cu_q.shape[0] - 1, cu_d.shape[0] - 1
        return q.new_empty((Nq, Nd), dtype=acc), q.new_empty((Nd, q.shape[0]), dtype=_argmax_dtype(d.shape[0]))
    # The flat argmax holds every pair's query tokens: a size known only from the data.
    total = torch.library.get_ctx().new_dynamic_size()
    return q.new_empty((pairs.shape[0],), dtype=acc), q.new_empty((total,), dtype=_argmax_dtype(d.shape[0]))


def _pairs_fake(q, d, q_mask=None, d_mask=None, reduce="sum", pylate_mask=False, backend="auto", d_scale=None):
    _same_device(q, d=d, q_mask=q_mask, d_mask=d_mask, d_scale=d_scale)
    B, K = d.shape[0], d.shape[1]
    return (
        q.new_empty((B, K), dtype=_accumulate_dtype(q.dtype)),
        q.new_empty((B, K, q.shape[1]), dtype=_argmax_dtype(d.shape[2])),
    )


def _topk_fake(q, d, cu_d, k, q_mask=None, candidates=None, reduce="sum", backend="auto", d_scale=None):
    _same_device(q, d=d, cu_d=cu_d, q_mask=q_mask, candidates=candidates, d_scale=d_scale)
    Nq = q.shape[0]
    return q.new_empty((Nq, k), dtype=_accumulate_dtype(q.dtype)), q.new_empty((Nq, k), dtype=torch.int64)


def _backward_fake(grad, q, d, argmax, meta, num_q, num_d, need_dq, need_dd, backend="auto", d_scale=None):
    acc = _accumulate_dtype(q.dtype)
    dq = q.new_empty(q.shape, dtype=acc) if need_dq else q.new_empty((0,), dtype=acc)
    dd = d.new_empty(d.shape, dtype=acc) if need_dd else d.new_empty((0,), dtype=acc)
    return dq, dd


# ---------------------------------------------------------------------------------------------
# Autograd. Registered from Python on the C++ ops (the forward kernels run for hundreds of
# microseconds or more at the shapes MaxSim serves, so a Python autograd wrapper's ~9 us is
# noise). Every op's backward is the one op sparseops::maxsim_backward: per (query, document)
# pair a gradient coefficient and where its query rows, document rows and saved argmax
# lie (meta [P, 6]). Its CPU kernel accumulates dq per query and dd per document in a fixed
# order (deterministic, no atomics) straight from the argmax: no Lq x Ld and no
# [Nq, Nd, Lq, dim] temporary. Masked tokens and empty documents have argmax -1 and get zero
# gradient. On CUDA tensors it runs the Triton kernel (kernels/maxsim_backward.py: grouped the
# same way, deterministic, no atomics; no CUDA C++ backward yet).
#
# int8 documents are not differentiable (a quantised index is frozen; int8 tensors cannot
# require grad): the backward gives dq only, reading d * d_scale at the argmax, and a d_scale
# that requires grad is refused by the public functions (and here, for direct op calls).


def _query_counts(q_mask, Nq: int, Lq: int, like: torch.Tensor) -> torch.Tensor:
    """Real query tokens per query, [Nq] in like's dtype (what reduce="mean" divides by)."""
    if q_mask is None:
        return torch.full((Nq,), Lq, dtype=like.dtype, device=like.device)
    if q_mask.dtype == torch.bool:
        return q_mask.sum(dim=-1).to(like.dtype)
    return q_mask.clamp(0, Lq).to(like.dtype)


def _mean_scale(g: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """g [P] / count [P], 0 where count is 0."""
    return torch.where(count > 0, g / count.clamp_min(1), torch.zeros_like(g))


def _check_scale_grad(ctx, name: str) -> None:
    if ctx.needs_input_grad[-1]:
        raise RuntimeError(
            f"sparseops.{name}: d_scale is not differentiable (int8 documents are a frozen, quantised "
            "index); detach it, or score float documents to train them"
        )


def _run_backward(
    ctx, g, q_rows, d_rows, argmax, q_id, q_start, q_len, d_id, d_start, arg_off, num_q, num_d, d_scale=None
):
    meta = torch.stack([q_id, q_start, q_len, d_id, d_start, arg_off], dim=1).to(torch.int64).contiguous()
    need_dq, need_dd = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[2 if ctx.varlen else 1])
    need_dd = need_dd and d_scale is None
    dq, dd = torch.ops.sparseops.maxsim_backward(
        g.contiguous(), q_rows, d_rows, argmax.reshape(-1), meta, num_q, num_d, need_dq, need_dd,
        d_scale=None if d_scale is None else d_scale.reshape(-1),
    )  # fmt: skip
    return (dq if need_dq else None), (dd if need_dd else None)


def _maxsim_setup(ctx, inputs, output) -> None:
    q, d, q_mask, d_mask, reduce, _pylate, _backend_name, d_scale = inputs
    ctx.reduce, ctx.varlen = reduce, False
    ctx.save_for_backward(q, d, output[1], q_mask, d_scale)


def _maxsim_backward(ctx, grad_scores, _grad_argmax):
    _check_scale_grad(ctx, "maxsim")
    q, d, argmax, q_mask, d_scale = ctx.saved_tensors
    Nq, Lq, dim = q.shape
    Nd, Ld, _ = d.shape
    g = grad_scores.to(_accumulate_dtype(q.dtype))  # may be a stride-0 expand
    if ctx.reduce == "mean":
        g = _mean_scale(g, _query_counts(q_mask, Nq, Lq, g)[:, None])
    dev = q.device
    n = torch.arange(Nq, device=dev)[:, None].expand(Nq, Nd).reshape(-1)
    m = torch.arange(Nd, device=dev)[None, :].expand(Nq, Nd).reshape(-1)
    dq, dd = _run_backward(
        ctx, g.reshape(-1), q.reshape(Nq * Lq, dim), d.reshape(Nd * Ld, dim), argmax,
        n, n * Lq, torch.full_like(n, Lq), m, m * Ld, (n * Nd + m) * Lq, Nq, Nd, d_scale,
    )  # fmt: skip
    dq = None if dq is None else dq.view(Nq, Lq, dim).to(q.dtype)
    dd = None if dd is None else dd.view(Nd, Ld, dim).to(d.dtype)
    return dq, dd, None, None, None, None, None, None


def _varlen_setup(ctx, inputs, output) -> None:
    q, cu_q, d, cu_d, pairs, reduce, _backend_name, d_scale = inputs
    ctx.reduce, ctx.varlen = reduce, True
    ctx.save_for_backward(q, cu_q, d, cu_d, pairs, output[1], d_scale)


def _varlen_backward(ctx, grad_scores, _grad_argmax):
    _check_scale_grad(ctx, "maxsim_varlen")
    q, cu_q, d, cu_d, pairs, argmax, d_scale = ctx.saved_tensors
    Nq, Nd = cu_q.shape[0] - 1, cu_d.shape[0] - 1
    g = grad_scores.to(_accumulate_dtype(q.dtype))
    cq, cd = cu_q.to(torch.int64), cu_d.to(torch.int64)
    lq = cq[1:] - cq[:-1]
    dev = q.device
    if pairs is None:
        n = torch.arange(Nq, device=dev)[:, None].expand(Nq, Nd).reshape(-1)
        m = torch.arange(Nd, device=dev)[None, :].expand(Nq, Nd).reshape(-1)
        g = g.reshape(-1)
        off = m * q.shape[0] + cq[n]
    else:
        n, m = pairs[:, 0].to(torch.int64), pairs[:, 1].to(torch.int64)
        lens = lq[n]
        off = torch.cumsum(lens, 0) - lens
    if ctx.reduce == "mean":
        g = _mean_scale(g, lq[n].to(g.dtype))
    dq, dd = _run_backward(
        ctx, g, q.contiguous(), d.contiguous(), argmax, n, cq[n], lq[n], m, cd[m], off, Nq, Nd, d_scale
    )
    dq = None if dq is None else dq.to(q.dtype)
    dd = None if dd is None else dd.to(d.dtype)
    return dq, None, dd, None, None, None, None, None


def _pairs_setup(ctx, inputs, output) -> None:
    q, d, q_mask, d_mask, reduce, _pylate, _backend_name, d_scale = inputs
    ctx.reduce, ctx.varlen = reduce, False
    ctx.save_for_backward(q, d, output[1], q_mask, d_scale)


def _pairs_backward(ctx, grad_scores, _grad_argmax):
    _check_scale_grad(ctx, "maxsim_pairs")
    q, d, argmax, q_mask, d_scale = ctx.saved_tensors
    B, Lq, dim = q.shape
    _, K, Ld, _ = d.shape
    g = grad_scores.to(_accumulate_dtype(q.dtype))
    if ctx.reduce == "mean":
        g = _mean_scale(g, _query_counts(q_mask, B, Lq, g)[:, None])
    dev = q.device
    b = torch.arange(B, device=dev)[:, None].expand(B, K).reshape(-1)
    j = torch.arange(B * K, device=dev)
    dq, dd = _run_backward(
        ctx, g.reshape(-1), q.reshape(B * Lq, dim), d.reshape(B * K * Ld, dim), argmax,
        b, b * Lq, torch.full_like(b, Lq), j, j * Ld, j * Lq, B, B * K, d_scale,
    )  # fmt: skip
    dq = None if dq is None else dq.view(B, Lq, dim).to(q.dtype)
    dd = None if dd is None else dd.view(B, K, Ld, dim).to(d.dtype)
    return dq, dd, None, None, None, None, None, None


if _backend.HAS_C:
    torch.library.register_fake("sparseops::maxsim")(_maxsim_fake)
    torch.library.register_fake("sparseops::maxsim_varlen")(_varlen_fake)
    torch.library.register_fake("sparseops::maxsim_pairs")(_pairs_fake)
    torch.library.register_fake("sparseops::maxsim_topk")(_topk_fake)
    torch.library.register_fake("sparseops::maxsim_backward")(_backward_fake)
    torch.library.register_autograd("sparseops::maxsim", _maxsim_backward, setup_context=_maxsim_setup)
    torch.library.register_autograd("sparseops::maxsim_varlen", _varlen_backward, setup_context=_varlen_setup)
    torch.library.register_autograd("sparseops::maxsim_pairs", _pairs_backward, setup_context=_pairs_setup)
    _maxsim_op = torch.ops.sparseops.maxsim.default
    _varlen_op = torch.ops.sparseops.maxsim_varlen.default
    _pairs_op = torch.ops.sparseops.maxsim_pairs.default
    _topk_op = torch.ops.sparseops.maxsim_topk.default


# ---------------------------------------------------------------------------------------------
# Backends. Facts: (device type, dtype, dim < 16, int8 documents): the Triton kernel takes a
# path without tl.dot below 16 (tl.dot needs K >= 16), so reasons and future ranks can depend
# on it; int8 documents are refused by the CUDA C++ kernel only (Triton loads int8 tiles,
# converts them exactly to q's dtype and scales each similarity after the dot).


def _facts(q, d=None, *_):
    if isinstance(q, torch.Tensor):
        int8 = isinstance(d, torch.Tensor) and d.dtype == torch.int8
        return (q.device.type, q.dtype, q.dim() >= 1 and q.shape[-1] < 16, int8)
    if isinstance(q, (str, torch.device)):
        return (torch.device(q).type, None, None, False)
    raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")


def _triton_reason(device, *_):
    return _backend.triton_kernels(device)




# The ops with a CUDA C++ kernel (maxsim, maxsim_varlen) add three facts: dim > 256 (the
# kernel keeps 32-token document tiles in shared memory), more query rows than one pass of
# it holds (Nq * Lq or total_q > 128: compute-bound, where auto prefers Triton's multi-query
# kernel, which reads each document tile once per 128 query rows whatever Nq is), and a
# pairs list (maxsim_varlen; the CUDA kernel scores all pairs).
_CUDA_MAX_DIM = 256
_CUDA_PASS_ROWS = 128


def _fused_facts(q, d=None, pairs=None, *_):
    if isinstance(q, torch.Tensor):
        # On every call of the public functions: the is_cuda / is_cpu flags and one shape
        # tuple, not q.device.type (~0.7 us, _backend.tensor_facts).
        shape = q.shape
        nd = len(shape)
        rows = shape[0] * shape[1] if nd == 3 else (shape[0] if nd == 2 else 0)
        dim = shape[-1] if nd >= 1 else 0
        device = "cuda" if q.is_cuda else "cpu" if q.is_cpu else q.device.type
        int8 = isinstance(d, torch.Tensor) and d.dtype == torch.int8
        return (device, q.dtype, dim < 16, int8, dim > _CUDA_MAX_DIM, rows > _CUDA_PASS_ROWS, _is_pairs(pairs))
    if isinstance(q, (str, torch.device)):
        return (torch.device(q).type, None, None, False, False, False, False)
    raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")


_SINGLE_QUERY = object()  # maxsim's q is one [Lq, dim] query (rows = Lq), not a pairs list


def _is_pairs(pairs) -> bool:
    return pairs is not None and pairs is not _SINGLE_QUERY


def _cuda_reason(device, dtype, small_dim=None, int8=False, wide=False, many_rows=False, pairs=False):
    why = _backend.native_cuda(device)
    if why is not None:
        return why
    if int8:
        return "takes float documents (int8 documents run on triton)"
    if dtype == torch.float64:  # other dtypes are the C++ op's errors, for every backend
        return "takes fp32, bf16 and fp16 (fp64 runs on triton)"
    if wide:
        return f"takes dim <= {_CUDA_MAX_DIM} (32-token document tiles live in shared memory)"
    if pairs:
        return "scores all pairs only (pairs=None); pair lists run on triton"
    return None


class _FusedOp(_backend.Op):
    """An op whose auto choice on CUDA also weighs the number of query rows: above one pass
    of the CUDA kernel (> 128 rows) the work is compute-bound and Triton's multi-query kernel
    takes it. An explicit backend="cuda" still runs the CUDA kernel (in passes of 128 rows)."""

    def _resolve(self, facts, name):
        chosen = super()._resolve(facts, name)
        if (name is None or name == "auto") and chosen == "cuda" and facts[5]:
            triton = self.backends.get("triton")
            if triton is not None and triton.unsupported_reason(*facts) is None:
                return "triton"
        return chosen


def _reference_kernel(inputs, outputs, options) -> None:
    q, d, q_mask, d_mask, d_scale = inputs  # d_scale flat [Nd * Ld] (the C++ op's layout)
    if d_scale is not None:
        d_scale = d_scale.view(d.shape[:2])
    scores, argmax = ref.maxsim_ref(
        q, d, q_mask=q_mask, d_mask=d_mask, reduce=options["reduce"], pylate_mask=options["pylate_mask"],
        d_scale=d_scale,
    )  # fmt: skip
    outputs[0].copy_(scores)
    outputs[1].copy_(argmax)


def _triton_kernel(inputs, outputs, options) -> None:
    from ..kernels.maxsim import maxsim_triton

    q, d, q_mask, d_mask, d_scale = inputs
    maxsim_triton(
        q, d, q_mask, d_mask, options["q_mask"], options["d_mask"], options["reduce"], *outputs,
        pylate=options["pylate_mask"], d_scale=d_scale,
    )  # fmt: skip


def _varlen_reference_kernel(inputs, outputs, options) -> None:
    q, cu_q, d, cu_d, pairs, _arg_off, d_scale = inputs
    scores, argmax = ref.maxsim_varlen_ref(q, cu_q, d, cu_d, pairs=pairs, reduce=options["reduce"], d_scale=d_scale)
    outputs[0].copy_(scores)
    outputs[1].copy_(argmax)


def _pairs_reference_kernel(inputs, outputs, options) -> None:
    q, d, q_mask, d_mask, d_scale = inputs  # d [B * K, Ld, dim]; masks per row of d; d_scale flat
    B, K = outputs[0].shape
    dm = None if d_mask is None else d_mask.reshape(B, K, *d_mask.shape[1:])
    ds = None if d_scale is None else d_scale.reshape(B, K, d.shape[1])
    scores, argmax = ref.maxsim_pairs_ref(
        q, d.reshape(B, K, *d.shape[1:]), q_mask=q_mask, d_mask=dm, reduce=options["reduce"],
        pylate_mask=options["pylate_mask"], d_scale=ds,
    )  # fmt: skip
    outputs[0].copy_(scores)
    outputs[1].copy_(argmax)


def _topk_reference_kernel(inputs, outputs, options) -> None:
    q, d, cu_d, q_mask, candidates, d_scale = inputs
    scores, ids = ref.maxsim_topk_ref(
        q, d, cu_d, options["k"], q_mask=q_mask, candidates=candidates, reduce=options["reduce"], d_scale=d_scale
    )
    outputs[0].copy_(scores)
    outputs[1].copy_(ids)


def _backward_reference_kernel(inputs, outputs, options) -> None:
    grad, q, d, argmax, meta, d_scale = inputs
    dq, dd = ref.maxsim_backward_ref(grad, q, d, argmax, meta, options["need_dq"], options["need_dd"], d_scale)
    outs = iter(outputs)
    if dq is not None:
        next(outs).copy_(dq)
    if dd is not None:
        next(outs).copy_(dd)


_MAXSIM = _FusedOp("maxsim", _fused_facts)
# "cuda": the fused CUDA C++ forward, launched by the C++ op (no Python between the op and
# the launch: what small re-ranks pay for).
_MAXSIM.register("cuda", rank=0, unsupported_reason=_cuda_reason)
_MAXSIM.register("cpu", rank=0, unsupported_reason=_backend.native_cpu)
_MAXSIM.register("triton", rank=1, unsupported_reason=_triton_reason, kernel=_triton_kernel)
_MAXSIM.register("reference", rank=9, unsupported_reason=_backend.always, kernel=_reference_kernel)


def _varlen_triton_kernel(inputs, outputs, options) -> None:
    from ..kernels.maxsim_pairs import maxsim_varlen_triton

    q, cu_q, d, cu_d, pairs, arg_off, d_scale = inputs
    maxsim_varlen_triton(q, cu_q, d, cu_d, pairs, arg_off, options["reduce"], *outputs, d_scale=d_scale)


def _pairs_triton_kernel(inputs, outputs, options) -> None:
    from ..kernels.maxsim_pairs import maxsim_pairs_triton

    q, d, q_mask, d_mask, d_scale = inputs
    maxsim_pairs_triton(
        q, d, q_mask, d_mask, options["q_mask"], options["d_mask"], options["reduce"], options["pylate_mask"], *outputs,
        d_scale=d_scale,
    )  # fmt: skip


def _topk_triton_kernel(inputs, outputs, options) -> None:
    from ..kernels.maxsim_pairs import maxsim_topk_triton

    q, d, cu_d, q_mask, candidates, d_scale = inputs
    maxsim_topk_triton(
        q, d, cu_d, q_mask, candidates, options["k"], options["q_mask"], options["reduce"], *outputs, d_scale=d_scale
    )


# maxsim_varlen: the CUDA kernel scores all pairs; pair lists, maxsim_pairs and maxsim_topk
# have no CUDA C++ kernel, so on CUDA tensors auto picks Triton for them.
_VARLEN = _FusedOp("maxsim_varlen", _fused_facts)
_VARLEN.register("cuda", rank=0, unsupported_reason=_cuda_reason)
_VARLEN.register("cpu", rank=0, unsupported_reason=_backend.native_cpu)
_VARLEN.register("triton", rank=1, unsupported_reason=_triton_reason, kernel=_varlen_triton_kernel)
_VARLEN.register("reference", rank=9, unsupported_reason=_backend.always, kernel=_varlen_reference_kernel)

_PAIRS = _backend.Op("maxsim_pairs", _facts)
_PAIRS.register("cpu", rank=0, unsupported_reason=_backend.native_cpu)
_PAIRS.register("triton", rank=1, unsupported_reason=_triton_reason, kernel=_pairs_triton_kernel)
_PAIRS.register("reference", rank=9, unsupported_reason=_backend.always, kernel=_pairs_reference_kernel)

_TOPK = _backend.Op("maxsim_topk", _facts)
_TOPK.register("cpu", rank=0, unsupported_reason=_backend.native_cpu)
_TOPK.register("triton", rank=1, unsupported_reason=_triton_reason, kernel=_topk_triton_kernel)
_TOPK.register("reference", rank=9, unsupported_reason=_backend.always, kernel=_topk_reference_kernel)


def _backward_triton_kernel(inputs, outputs, options) -> None:
    from ..kernels.maxsim_backward import maxsim_backward_triton

    grad, q, d, argmax, meta, d_scale = inputs
    outs = iter(outputs)
    dq = next(outs) if options["need_dq"] else None
    dd = next(outs) if options["need_dd"] else None
    maxsim_backward_triton(grad, q, d, argmax, meta, options["num_q"], options["num_d"], dq, dd, d_scale=d_scale)


# The shared backward: the C++ kernel on CPU, the Triton kernel on CUDA (auto).
_BACKWARD = _backend.Op("maxsim_backward", _facts)
_BACKWARD.register("cpu", rank=0, unsupported_reason=_backend.native_cpu)
_BACKWARD.register("triton", rank=1, unsupported_reason=_triton_reason, kernel=_backward_triton_kernel)
_BACKWARD.register("reference", rank=9, unsupported_reason=_backend.always, kernel=_backward_reference_kernel)


# ---------------------------------------------------------------------------------------------
# Public API


def maxsim(
    q: torch.Tensor,
    d: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    reduce: str = "sum",
    similarity: str = "dot",
    pylate_mask: bool = False,
    return_argmax: bool = False,
    backend: str | None = None,
    d_scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Late-interaction (ColBERT / ColPali) scores of every query against every document.

    scores[n, m] = sum over the real tokens i of query n of max over the real tokens j of
    document m of <q[n, i], d[m, j]>, without materialising the Lq x Ld similarities.

    Args:
        q: [Nq, Lq, dim] query token embeddings, or [Lq, dim] for one query (then the result
            is [Nd], like ``flash_maxsim`` and ``maxsim_cpu.maxsim_scores``; PyLate's
            ``colbert_scores`` and colpali's ``score_multi_vector`` always batch queries and
            get [Nq, Nd]). fp32 (scored exactly in fp32: no tf32 or fp16 downcast), bf16 or
            fp16 (products accumulated in fp32), fp64 (scored in fp64); any strides.
        d: [Nd, Ld, dim] document token embeddings, same dtype and device as q; or int8
            documents quantised per token (``maxsim_quantize``) with ``d_scale``.
        q_mask: None, bool [Nq, Lq] (True = real token; [Lq] for a 2-D q) or int32/int64
            lengths [Nq] (the first lengths[n] tokens are real; a 0-dim tensor for a 2-D q).
        d_mask: None, bool [Nd, Ld] or int32/int64 lengths [Nd]. Lengths must lie in
            [0, L]: an error on CPU tensors; on CUDA tensors (where checking would need a
            host synchronisation) they are clamped to [0, L].
        reduce: "sum" (ColBERT) or "mean" (the sum over the number of real query tokens).
        similarity: "dot", or "cosine": the tokens are L2-normalised once here, before the
            op (in the accumulate dtype, rounded back to the input dtype; a zero token stays
            zero), so the gradient flows through the normalisation by autograd.
        pylate_mask: PyLate's multiplicative masking (``pylate.scores.colbert_scores``): a
            masked document token's similarity is 0 and takes part in the max (so a document
            with a masked token never scores a token below 0); a masked query token adds 0.
            A masked winner (lowest index among equal maxima) has argmax -1 and no gradient.
        return_argmax: also return the int32 argmax [Nq, Nd, Lq] (or [Nd, Lq]): the document
            token each query token took, -1 where none was (masked query token, empty
            document, masked winner under pylate_mask). The op saves it for the backward as
            int16 when Ld < 32768 (half the memory), int32 otherwise; this copy is int32.
        backend: None/"auto", "cuda", "cpu", "triton" or "reference". On CUDA tensors auto
            picks "cuda" (the fused CUDA C++ forward: fp32 / bf16 / fp16, dim <= 256) up to
            128 query rows (Nq * Lq), and "triton" above (its multi-query kernel, for
            compute-bound batches) or where "cuda" refuses (fp64, dim > 256).
        d_scale: fp32 [Nd, Ld], required with int8 d (and refused otherwise): the scale of
            each document token. The similarity is <q_i, d_j> * d_scale[m, j] (asymmetric:
            the query stays float; ``reference`` computes exactly that).

    int8 documents: the "cpu" backend, on processors with AVX512_VNNI and dim % 4 == 0,
    quantises each query token on the fly (symmetric per token: a_i = max_k |q_ik| / 127,
    q^_ik = round-half-even(q_ik / a_i)) and multiplies integers (vpdpbusd, exact int32), so
    each similarity is a_i * float(<q^_i, d_j>) * d_scale[j], within e_ij = (a_i / 2) *
    ||d_j||_1 * |d_scale[j]| (plus fp32 rounding) of the exact one, and each query token's
    max within max_j e_ij; a score is within the sum (or mean) of those. For unit-norm
    tokens at dim 128 that is ~1e-3 relative per similarity in the worst case, and argmax may
    differ from the reference's where two similarities are closer than that. fp64 queries
    (gradcheck) and other processors take the exact float path. The "triton" backend (what
    auto runs on CUDA tensors: the "cuda" kernel takes float documents) converts int8 tiles
    exactly to q's dtype and scales each similarity after the dot, the reference's formula
    at float tolerances. Differentiable in q only: d int8 cannot require
    grad, and a d_scale that requires grad is an error (the index is frozen).

    Returns:
        scores [Nq, Nd] (or [Nd]) fp32 (fp64 for fp64 inputs), contiguous, differentiable in
        q and d; (scores, argmax) when return_argmax.

    Semantics, identical on every backend (``sparseops.reference.maxsim.maxsim_ref`` is the
    specification): a masked document token never wins the max; a document with no real
    token scores 0 for every query token; a masked query token adds nothing; "mean" with no
    real query token gives 0; empty Nq, Nd, Lq, Ld work. Ties in the max go to the lowest
    document token (this decides which token the gradient flows to). Inputs are expected to
    be finite (NaN similarities give unspecified scores).

    Backward: dq[n, i] = sum_m g[n, m] * d[m, argmax[n, m, i]] and the matching scatter-add
    into dd, from the argmax saved by the forward; masked tokens get zero gradient.
    """
    _check_scale("maxsim", d_scale, similarity)
    single = isinstance(q, torch.Tensor) and q.dim() == 2
    name = _MAXSIM.choose(backend, q, d, _SINGLE_QUERY if single else None)
    if single:
        q = q.unsqueeze(0)
        if q_mask is not None and isinstance(q_mask, torch.Tensor):
            q_mask = q_mask.unsqueeze(0) if q_mask.dtype == torch.bool else q_mask.reshape(1)
    q, d = _similarity(similarity, q, d)
    if _backend.HAS_C:
        scores, argmax = _call(_maxsim_op, (q, d), q, d, q_mask, d_mask, reduce, pylate_mask, name, d_scale)
    else:
        scores, argmax = ref.maxsim_ref(
            q, d, q_mask=q_mask, d_mask=d_mask, reduce=reduce, pylate_mask=pylate_mask, d_scale=d_scale
        )
    if single:
        scores, argmax = scores[0], argmax[0]
    return (scores, _public_argmax(argmax)) if return_argmax else scores


def _check_scale(op: str, d_scale: torch.Tensor | None, similarity: str) -> None:
    """int8 documents: d_scale is frozen, and cosine needs float documents."""
    if d_scale is None:
        return
    if isinstance(d_scale, torch.Tensor) and d_scale.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"sparseops.{op}: d_scale requires grad, but int8 documents are not differentiable (a "
            "quantised index is frozen): pass d_scale.detach(), or score float documents to train them"
        )
    if similarity == "cosine":
        raise ValueError(
            f'sparseops.{op}: similarity="cosine" needs float documents; quantise normalised documents '
            '(maxsim_quantize(F.normalize(d, dim=-1))) and use similarity="dot"'
        )


def maxsim_quantize(d: torch.Tensor, *, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise document token embeddings to int8 with one scale per token (symmetric).

    Args:
        d: [..., dim] float token embeddings (any float dtype, any device, any strides).
        dim: the embedding dimension (only the last one is supported: -1 or d.dim() - 1).

    Returns:
        (values int8 [..., dim], scale fp32 [...]): scale = max_k |d_k| / 127 per token
        (computed in fp32; 0 for a zero token) and values = round-half-even(d / scale)
        clamped to [-127, 127] (-128 is never used, so negation is exact), so
        d ~ values * scale[..., None] within scale / 2 per coordinate. What every MaxSim op
        takes as ``d`` and ``d_scale``; a packed corpus [total, dim] gives scale [total] for
        maxsim_varlen / maxsim_topk. Not differentiable.
    """
    if not isinstance(d, torch.Tensor) or not d.is_floating_point():
        raise TypeError(f"maxsim_quantize: d must be a float tensor, got {_describe(d)}")
    if d.dim() < 1 or dim not in (-1, d.dim() - 1):
        raise ValueError(f"maxsim_quantize: dim must be the last dimension of d (-1), got dim={dim} for {_describe(d)}")
    with torch.no_grad():
        x = d.detach().to(torch.float32)
        amax = x.abs().amax(dim=-1) if x.shape[-1] > 0 else x.new_zeros(x.shape[:-1])
        scale = amax / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        values = torch.round(x / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return values, scale.contiguous()


def _call(op, differentiable, *args):
    """op(*args), below the autograd key when no input needs a gradient: the Python autograd
    wrapper that ``register_autograd`` installs costs ~9 us per call even then (H100 host,
    torch 2.11, DESIGN.md), as much as the whole C++ op. Under torch.compile the op is called
    as it is (the guard is not traceable, and compiled graphs pay no per-call wrapper)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        for x in differentiable:
            if isinstance(x, torch.Tensor) and x.requires_grad:
                return op(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return op(*args)


def _similarity(similarity: str, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """similarity="cosine": L2-normalise the tokens once, before the op (autograd carries the
    gradient through the normalisation)."""
    if similarity == "dot":
        return xs
    if similarity == "cosine":
        return tuple(
            torch.nn.functional.normalize(x.to(_accumulate_dtype(x.dtype)), dim=-1).to(x.dtype)
            if isinstance(x, torch.Tensor)
            else x
            for x in xs
        )
    raise ValueError(f'similarity must be "dot" or "cosine", got {similarity!r}')


def maxsim_varlen(
    q: torch.Tensor,
    cu_q: torch.Tensor,
    d: torch.Tensor,
    cu_d: torch.Tensor,
    *,
    pairs: torch.Tensor | None = None,
    reduce: str = "sum",
    similarity: str = "dot",
    return_argmax: bool = False,
    backend: str | None = None,
    d_scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """MaxSim of packed, ragged token sequences (FlashAttention's cu_seqlens): no padding.

    Args:
        q: [total_q, dim] query tokens; query n is rows cu_q[n]:cu_q[n + 1].
        cu_q: int32 [Nq + 1] cumulative lengths: cu_q[0] = 0, non-decreasing, cu_q[-1] =
            total_q (checked on CPU tensors; trusted on CUDA tensors, where checking would
            need a host synchronisation).
        d: [total_d, dim] document tokens, same dtype and device (or int8 with d_scale fp32
            [total_d], as in ``maxsim``); cu_d: int32 [Nd + 1].
        pairs: None (every query against every document: scores [Nq, Nd]) or int32/int64
            [P, 2] rows (query, document) (scores [P]; ids checked on CPU tensors). With
            pairs on CUDA tensors the op reads one number back to size its argmax.
        reduce, similarity: as in ``maxsim`` ("mean" divides by the query's length).
        return_argmax: also return the int32 argmax (document-local token index, -1 for an
            empty document): [Nd, total_q] for all pairs (query n against document m at
            [m, cu_q[n]:cu_q[n + 1]]), flat [sum of the pairs' query lengths] with pairs. The
            op saves it as int16 when total_d < 32768 (a bound the shapes give), else int32.

    Empty queries and documents score 0. Differentiable in q and d (backward from the
    argmax). Backends: "cuda" (the fused CUDA C++ forward, all pairs only; auto picks it up
    to 128 query rows), "cpu" (C++), "triton", "reference".
    """
    name = _VARLEN.choose(backend, q, d, pairs)
    _check_scale("maxsim_varlen", d_scale, similarity)
    q, d = _similarity(similarity, q, d)
    scores, argmax = _call(_varlen_op, (q, d), q, cu_q, d, cu_d, pairs, reduce, name, d_scale)
    return (scores, _public_argmax(argmax)) if return_argmax else scores


def maxsim_pairs(
    q: torch.Tensor,
    d: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    reduce: str = "sum",
    similarity: str = "dot",
    pylate_mask: bool = False,
    return_argmax: bool = False,
    backend: str | None = None,
    d_scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """MaxSim of aligned pairs: query b against its own document(s) only.

    Args:
        q: [B, Lq, dim] queries.
        d: [B, Ld, dim] (one document per query: scores [B], PyLate's
            ``colbert_scores_pairwise``) or [B, K, Ld, dim] (K candidates per query: scores
            [B, K], PyLate's ``colbert_kd_scores``).
        q_mask: None, bool [B, Lq] or lengths [B].
        d_mask: None, bool [B, Ld] / [B, K, Ld] or lengths [B] / [B, K].
        reduce, similarity, pylate_mask: as in ``maxsim``.
        return_argmax: also return the int32 argmax [B, Lq] / [B, K, Lq] (saved as int16
            when Ld < 32768).
        d_scale: with int8 d, fp32 [B, Ld] / [B, K, Ld] (as in ``maxsim``).

    Differentiable in q and d. Backends: "cpu" (C++), "triton", "reference".
    """
    name = _PAIRS.choose(backend, q, d)
    _check_scale("maxsim_pairs", d_scale, similarity)
    three = isinstance(d, torch.Tensor) and d.dim() == 3
    if three:
        d = d.unsqueeze(1)
        if d_mask is not None and isinstance(d_mask, torch.Tensor):
            d_mask = d_mask.unsqueeze(1)
        if isinstance(d_scale, torch.Tensor) and d_scale.dim() == 2:
            d_scale = d_scale.unsqueeze(1)
    q, d = _similarity(similarity, q, d)
    scores, argmax = _pairs_op(q, d, q_mask, d_mask, reduce, pylate_mask, name, d_scale)
    if three:
        scores, argmax = scores[:, 0], argmax[:, 0]
    return (scores, _public_argmax(argmax)) if return_argmax else scores


def maxsim_topk(
    q: torch.Tensor,
    d: torch.Tensor,
    cu_d: torch.Tensor,
    k: int,
    *,
    q_mask: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    reduce: str = "sum",
    similarity: str = "dot",
    backend: str | None = None,
    d_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best documents of a packed corpus for each query, memory bounded by k.

    Args:
        q: [Nq, Lq, dim] queries or [Lq, dim] for one (then the outputs are [k]).
        d: [total_d, dim] packed document tokens, cu_d int32 [Nd + 1] (as in maxsim_varlen).
        k: documents per query (> 0). With fewer than k scored documents the tail is
            padded with score -inf and id -1.
        q_mask: None, bool [Nq, Lq] or lengths [Nq] (as in ``maxsim``).
        candidates: None (the whole corpus), int [C] (the same candidate ids for every
            query) or [Nq, C] (per query); -1 marks an unused slot; a repeated id is scored
            (and may be returned) once per occurrence.
        reduce, similarity: as in ``maxsim``.
        d_scale: with int8 d, fp32 [total_d] (as in ``maxsim``).

    Returns:
        (scores [Nq, k] fp32 (fp64 for fp64 inputs), ids [Nq, k] int64), best first; equal
        scores go to the lower document id. Not differentiable (use maxsim_varlen with
        pairs=ids to train on the retrieved documents). The CPU kernel keeps per-thread
        heaps of k per query and merges them in a fixed order: the answer does not depend on
        the thread count. The Triton kernel scores a fixed chunk of documents at a time and
        merges it into the running k best (memory bounded by k + chunk). Backends: "cpu"
        (C++), "triton", "reference".
    """
    name = _TOPK.choose(backend, q, d)
    _check_scale("maxsim_topk", d_scale, similarity)
    single = isinstance(q, torch.Tensor) and q.dim() == 2
    if single:
        q = q.unsqueeze(0)
        if q_mask is not None and isinstance(q_mask, torch.Tensor):
            q_mask = q_mask.unsqueeze(0) if q_mask.dtype == torch.bool else q_mask.reshape(1)
        if candidates is not None and isinstance(candidates, torch.Tensor) and candidates.dim() == 2:
            raise RuntimeError(f"candidates for a single query must be [C], got {_describe(candidates)}")
    q, d = _similarity(similarity, q, d)
    scores, ids = _topk_op(q, d, cu_d, k, q_mask, candidates, reduce, name, d_scale)
    return (scores[0], ids[0]) if single else (scores, ids)
