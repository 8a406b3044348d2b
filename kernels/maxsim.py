"""Triton kernel for MaxSim late interaction (scores and the argmax the backward reads).

The semantics are those of ``sparseops.reference.maxsim`` (the specification). One program
per (query, block of DOCS documents), a flat 1-D grid (CUDA caps grid axes 1 and 2 at
65535). For each block of BLOCK_LQ query tokens the program keeps the query tile in
registers; for each of its documents it walks the document in BLOCK_LD-token tiles:
``tl.dot`` of the [BLOCK_LQ, dim] query tile with the [dim, BLOCK_LD] document tile (fp32
operands with ``input_precision="ieee"``: exact fp32, no tf32), masked tokens set to -inf,
then the tile's row max and its lowest column folded into a running max / argmax in
registers. The Lq x Ld similarities never leave registers. Below dim 16 (``tl.dot`` needs
K >= 16) the tile is a broadcast multiply and a sum over dim instead.

Under the interpreter (and for fp32 / fp64, and below dim 16) tiles are widened to fp32
(fp64) at load: the interpreter's bf16 ``tl.dot`` is silently wrong and its bf16 arithmetic
misbehaves (DESIGN.md). Compiled bf16 / fp16 tiles stay 16-bit into ``tl.dot`` (tensor
cores, fp32 accumulation): widening them first made every dot an fp32 "ieee" one, FMA
units instead of tensor cores. Many query rows (Nq * Lq >= 64, dim >= 16, not fp64) go to
the multi-query kernel (``kernels/maxsim_multi.py``), which reads each document tile once
per 128 query rows instead of once per query.

Single config, no autotune (the interpreter cannot run autotune, and a fixed table keeps
launches deterministic and graph-friendly). Loops over runtime bounds are
``while`` loops (``for i in range(x)`` with a runtime x fails in the interpreter under
numpy >= 2.3); masks are tensor comparisons only (see ``kernels/_common.py``).

Host function ``maxsim_triton`` is called by the C++ op's Python hook, which has validated
the arguments and preallocated the outputs; it only asserts the contract.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_pow2, on_gpu

__all__ = ["MULTI_QUERY_ROWS", "maxsim_triton", "use_multi_query"]

_MASK_KINDS = {"none": 0, "bool": 1, "lengths": 2}
# Query rows from which the multi-query kernel takes over: from two ColBERT queries on, the
# per-query kernel reads every document tile once per query.
MULTI_QUERY_ROWS = 64


def use_multi_query(rows: int, dim: int, dtype: torch.dtype) -> bool:
    """The launcher's choice: the multi-query kernel for many query rows (it needs tl.dot,
    so dim >= 16, and no fp64: triton 3.4's interpreter has no fp64 tl.dot)."""
    return rows >= MULTI_QUERY_ROWS and dim >= 16 and dtype != torch.float64
_NONE = 2**30  # "no token taken" while scanning: larger than every token index


@triton.jit
def _maxsim_kernel(
    q_ptr,  # [Nq, Lq, dim] contiguous, fp32 / fp16 / bf16 / fp64
    d_ptr,  # [Nd, Ld, dim] contiguous, same dtype (int8 with D_SCALE)
    dscale_ptr,  # D_SCALE: [Nd * Ld] fp32, one scale per document token
    qmask_ptr,  # Q_MASK 1: [Nq, Lq] uint8 (the bool mask as bytes); 2: [Nq] int32 lengths
    dmask_ptr,  # D_MASK likewise for documents
    qcount_ptr,  # [Nq] ACC real query tokens (read only when MEAN)
    scores_ptr,  # [Nq, Nd] ACC, zeroed by the host (query-token blocks add into it)
    argmax_ptr,  # [Nq, Nd, Lq] int16 / int32
    Nd,
    Lq,
    Ld,
    dim,
    blocks_per_query,  # cdiv(Nd, DOCS)
    Q_MASK: tl.constexpr,
    D_MASK: tl.constexpr,
    MEAN: tl.constexpr,
    USE_DOT: tl.constexpr,  # dim >= 16
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    BLOCK_LQ: tl.constexpr,
    BLOCK_LD: tl.constexpr,
    DIM_PAD: tl.constexpr,
    DOCS: tl.constexpr,
    NONE: tl.constexpr,
    PYLATE: tl.constexpr,  # masked document tokens score 0 and take part (D_MASK is 0 or 1)
    WIDEN: tl.constexpr,  # tiles widened to ACC at load (interpreter, fp32 / fp64, no tl.dot)
    D_SCALE: tl.constexpr,  # int8 documents: similarity <q_i, d_j> * d_scale[j]
):
    pid = tl.program_id(0)
    n = pid // blocks_per_query
    m_start = (pid % blocks_per_query) * DOCS
    m_end = tl.minimum(m_start + DOCS, Nd)
    offs_i = tl.arange(0, BLOCK_LQ)
    offs_j = tl.arange(0, BLOCK_LD)
    offs_k = tl.arange(0, DIM_PAD)
    k_in = offs_k < dim
    n64 = n.to(tl.int64)
    if Q_MASK == 2:  # noqa: SIM108 - a constexpr branch, traced once per mask kind
        q_len = tl.load(qmask_ptr + n)
    else:
        q_len = Lq
    if MEAN:
        count = tl.load(qcount_ptr + n)
        inv = tl.where(count > 0, 1.0 / tl.maximum(count, 1.0), 0.0)
    i0 = 0
    while i0 < Lq:
        rows = i0 + offs_i
        q_valid = rows < q_len
        if Q_MASK == 1:
            q_valid = q_valid & (tl.load(qmask_ptr + n64 * Lq + rows, mask=rows < Lq, other=0) != 0)
        q_tile = tl.load(
            q_ptr + (n64 * Lq + rows)[:, None] * dim + offs_k[None, :],
            mask=(rows < Lq)[:, None] & k_in[None, :],
            other=0.0,
        )
        if WIDEN:
            q_tile = q_tile.to(ACC)
        m = m_start
        while m < m_end:
            m64 = m.to(tl.int64)
            if D_MASK == 2:  # noqa: SIM108
                d_len = tl.load(dmask_ptr + m)
            else:
                d_len = Ld
            best = tl.full([BLOCK_LQ], float("-inf"), ACC)
            arg = tl.full([BLOCK_LQ], NONE, tl.int32)
            j0 = 0
            while j0 < d_len:
                cols = j0 + offs_j
                c_valid = cols < d_len
                if D_MASK == 1:
                    c_valid = c_valid & (tl.load(dmask_ptr + m64 * Ld + cols, mask=cols < Ld, other=0) != 0)
                d_tile = tl.load(
                    d_ptr + (m64 * Ld + cols)[:, None] * dim + offs_k[None, :],
                    mask=(cols < d_len)[:, None] & k_in[None, :],
                    other=0.0,
                )
                if WIDEN:  # noqa: SIM108 - a constexpr branch
                    d_tile = d_tile.to(ACC)
                else:
                    d_tile = d_tile.to(q_tile.dtype)  # int8 documents: exact in bf16 / fp16
                if USE_DOT and WIDEN:
                    s = tl.dot(q_tile, tl.trans(d_tile), input_precision="ieee", out_dtype=ACC)
                elif USE_DOT:
                    # bf16 / fp16 on the GPU's tensor cores, fp32 accumulation.
                    s = tl.dot(q_tile, tl.trans(d_tile), out_dtype=ACC)
                else:
                    s = tl.sum(q_tile[:, None, :] * d_tile[None, :, :], axis=2)
                if D_SCALE:  # after the dot, as the reference scales
                    s = s * tl.load(dscale_ptr + m64 * Ld + cols, mask=cols < d_len, other=0.0).to(ACC)[None, :]
                if PYLATE:
                    # PyLate: a masked token scores 0 and is a candidate like any other.
                    s = tl.where(c_valid[None, :], s, 0.0)
                    c_valid = cols < d_len
                # A masked token is -inf and out of the candidates: it never wins, even when
                # every real similarity is -inf (then the lowest real token is taken).
                s = tl.where(c_valid[None, :], s, float("-inf"))
                t_max = tl.max(s, axis=1)
                t_arg = tl.min(tl.where(c_valid[None, :] & (s == t_max[:, None]), cols[None, :], NONE), axis=1)
                # Strictly larger wins: earlier tiles (lower indices) keep ties.
                better = (t_max > best) | ((arg == NONE) & (t_arg < NONE))
                best = tl.where(better, t_max, best)
                arg = tl.where(better, t_arg, arg)
                j0 += BLOCK_LD
            live = q_valid & (arg < NONE)
            part = tl.sum(tl.where(live, best, 0.0), axis=0)
            if PYLATE and D_MASK == 1:
                # A masked winner (similarity 0) is reported as -1: it takes no gradient.
                won = tl.load(dmask_ptr + m64 * Ld + arg, mask=live, other=0) != 0
                live = live & won
            if MEAN:
                part = part * inv
            s_off = n64 * Nd + m64
            tl.store(scores_ptr + s_off, tl.load(scores_ptr + s_off) + part)
            tl.store(argmax_ptr + s_off * Lq + rows, tl.where(live, arg, -1), mask=rows < Lq)
            m += 1
        i0 += BLOCK_LQ


def maxsim_triton(
    q: torch.Tensor,
    d: torch.Tensor,
    q_mask: torch.Tensor | None,
    d_mask: torch.Tensor | None,
    q_kind: str,
    d_kind: str,
    reduce: str,
    scores: torch.Tensor,
    argmax: torch.Tensor,
    *,
    pylate: bool = False,
    multi_query: bool | None = None,
    d_scale: torch.Tensor | None = None,
) -> None:
    """Fill ``scores`` [Nq, Nd] and ``argmax`` [Nq, Nd, Lq] (int16 or int32) (the op layer's
    contract: contiguous inputs, masks as uint8-viewable bool [N, L] or int32 lengths in
    [0, L], Nq, Nd, Lq, Ld >= 1; int8 d with d_scale fp32 [Nd * Ld]). ``multi_query`` forces
    (True) or rules out (False) the multi-query kernel; None: ``use_multi_query``."""
    Nq, Lq, dim = q.shape
    Nd, Ld, _ = d.shape
    assert q.is_contiguous() and d.is_contiguous() and scores.is_contiguous() and argmax.is_contiguous()
    assert min(Nq, Nd, Lq, Ld) >= 1
    assert (d.dtype == torch.int8) == (d_scale is not None) and (d_scale is None or d_scale.is_contiguous())
    if multi_query is None:
        multi_query = use_multi_query(Nq * Lq, dim, q.dtype)
    if multi_query:
        from .maxsim_multi import maxsim_multi_query_triton

        maxsim_multi_query_triton(
            q, d, q_mask, d_mask, _MASK_KINDS[q_kind], _MASK_KINDS[d_kind], reduce == "mean", pylate, scores, argmax,
            d_scale=d_scale,
        )  # fmt: skip
        return
    fp64 = q.dtype == torch.float64
    acc_dtype = torch.float64 if fp64 else torch.float32
    scores.zero_()
    qk, dk = _MASK_KINDS[q_kind], _MASK_KINDS[d_kind]
    qm = q_mask.view(torch.uint8) if qk == 1 else (q_mask if qk == 2 else q)
    dm = d_mask.view(torch.uint8) if dk == 1 else (d_mask if dk == 2 else d)
    mean = reduce == "mean"
    if mean:
        if qk == 0:
            qcount = torch.full((Nq,), Lq, dtype=acc_dtype, device=q.device)
        elif qk == 1:
            qcount = q_mask.sum(dim=-1).to(acc_dtype)
        else:
            qcount = q_mask.to(acc_dtype)
    else:
        qcount = scores
    # fp64 (gradcheck) takes the broadcast path: triton 3.4's interpreter has no fp64 tl.dot.
    use_dot = dim >= 16 and not fp64
    if use_dot:
        # tl.dot needs every tile side >= 16; 64 query tokens x 64 document tokens x dim
        # keeps the fp32 accumulator and both tiles in registers at dim 128.
        block_lq = max(16, min(next_pow2(Lq), 64))
        block_ld = 64 if on_gpu(q) else 32
        dim_pad = max(16, next_pow2(dim))
    else:
        # Broadcast multiply: a [BLOCK_LQ, BLOCK_LD, dim] product per tile.
        block_lq = min(next_pow2(Lq), 32)
        block_ld = 16
        dim_pad = next_pow2(dim)
    # The interpreter runs programs one after another: fewer, longer programs are faster.
    docs = 4 if on_gpu(q) else 16
    blocks = cdiv(Nd, docs)
    _maxsim_kernel[(Nq * blocks,)](
        q,
        d,
        d_scale if d_scale is not None else scores,
        qm,
        dm,
        qcount,
        scores,
        argmax,
        Nd,
        Lq,
        Ld,
        dim,
        blocks,
        Q_MASK=qk,
        D_MASK=dk,
        MEAN=mean,
        USE_DOT=use_dot,
        ACC=tl.float64 if fp64 else tl.float32,
        BLOCK_LQ=block_lq,
        BLOCK_LD=block_ld,
        DIM_PAD=dim_pad,
        DOCS=docs,
        NONE=_NONE,
        PYLATE=pylate,
        WIDEN=not on_gpu(q) or not use_dot or q.dtype in (torch.float32, torch.float64),
        D_SCALE=d_scale is not None,
    )
