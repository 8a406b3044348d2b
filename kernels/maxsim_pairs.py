"""Triton kernel for the pair-list MaxSim ops: ``maxsim_varlen`` (all pairs or a pairs list),
``maxsim_pairs`` and ``maxsim_topk`` (score blocks merged with a running top-k).

The semantics are those of ``sparseops.reference.maxsim`` (the specification). One kernel,
``_maxsim_pair_list_kernel``, scores a list of (query rows, document rows) pairs given as a
meta table [P, 7] int64 = (first query row, query rows, first document row, document rows,
score index, argmax offset, argmax entries to write): one program per pair, query tokens in
blocks of BLOCK_LQ, the document in BLOCK_LD-token tiles, the similarity tile in registers
(``tl.dot`` of fp32 operands with ``input_precision="ieee"``: exact fp32, no tf32; a
broadcast multiply below dim 16), the running max and lowest argmax folded in registers,
exactly as ``kernels/maxsim.py`` does for the padded op. Optional per-row bool masks
(``maxsim_pairs``) and PyLate's multiplicative masking are constexpr paths.

Under the interpreter, for fp32 / fp64 and below dim 16 tiles are widened to fp32 (fp64) at
load (the interpreter's bf16 arithmetic misbehaves; DESIGN.md); compiled bf16 / fp16 tiles go
to ``tl.dot`` as they are (tensor cores, fp32 accumulation). Single config, no autotune; loops over
runtime bounds are ``while`` loops.

``maxsim_topk_triton`` bounds memory by k + a constant chunk of documents: it scores
_TOPK_CHUNK documents at a time for every query and merges them into the running k best with
a (score desc, id asc) sort, so ties go to the lower document id deterministically.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2, on_gpu

__all__ = ["maxsim_pair_list_triton", "maxsim_varlen_triton", "maxsim_pairs_triton", "maxsim_topk_triton"]

_NONE = 2**30
_TOPK_CHUNK = 1024  # documents scored per step of maxsim_topk_triton


@triton.jit
def _maxsim_pair_list_kernel(
    q_ptr,  # [Rq, dim] contiguous
    d_ptr,  # [Rd, dim] contiguous, same dtype (int8 with D_SCALE)
    dscale_ptr,  # D_SCALE: [Rd] fp32, one scale per document row
    qv_ptr,  # Q_MASK: [Rq] uint8 (1 = real token)
    dv_ptr,  # D_MASK: [Rd] uint8
    meta_ptr,  # [P, 7] int64
    qcount_ptr,  # [P] ACC real query tokens (read only when MEAN)
    scores_ptr,  # flat ACC
    argmax_ptr,  # flat int16 / int32
    dim,
    Q_MASK: tl.constexpr,
    D_MASK: tl.constexpr,
    MEAN: tl.constexpr,
    PYLATE: tl.constexpr,
    USE_DOT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_LQ: tl.constexpr,
    BLOCK_LD: tl.constexpr,
    DIM_PAD: tl.constexpr,
    NONE: tl.constexpr,
    WIDEN: tl.constexpr,  # widen tiles to ACC at load (interpreter, fp32 / fp64, no tl.dot)
    D_SCALE: tl.constexpr,  # int8 documents: similarity <q_i, d_j> * d_scale[j]
):
    pid = tl.program_id(0).to(tl.int64)
    qs = tl.load(meta_ptr + pid * 7 + 0)
    ql = tl.load(meta_ptr + pid * 7 + 1)
    ds = tl.load(meta_ptr + pid * 7 + 2)
    dl = tl.load(meta_ptr + pid * 7 + 3)
    out = tl.load(meta_ptr + pid * 7 + 4)
    aoff = tl.load(meta_ptr + pid * 7 + 5)
    cap = tl.load(meta_ptr + pid * 7 + 6)
    offs_i = tl.arange(0, BLOCK_LQ)
    offs_j = tl.arange(0, BLOCK_LD)
    offs_k = tl.arange(0, DIM_PAD)
    k_in = offs_k < dim
    total = tl.zeros([BLOCK_LQ], ACC)
    i_end = tl.maximum(ql, cap)
    i0 = 0
    while i0 < i_end:
        rows = i0 + offs_i
        in_q = rows < ql
        q_valid = in_q
        if Q_MASK:
            q_valid = q_valid & (tl.load(qv_ptr + qs + rows, mask=in_q, other=0) != 0)
        q_tile = tl.load(
            q_ptr + (qs + rows)[:, None] * dim + offs_k[None, :], mask=in_q[:, None] & k_in[None, :], other=0.0
        )
        if WIDEN:
            q_tile = q_tile.to(ACC)
        best = tl.full([BLOCK_LQ], float("-inf"), ACC)
        arg = tl.full([BLOCK_LQ], NONE, tl.int32)
        j0 = 0
        while j0 < dl:
            cols = j0 + offs_j
            in_d = cols < dl
            c_valid = in_d
            if D_MASK:
                c_valid = c_valid & (tl.load(dv_ptr + ds + cols, mask=in_d, other=0) != 0)
            d_tile = tl.load(
                d_ptr + (ds + cols)[:, None] * dim + offs_k[None, :], mask=in_d[:, None] & k_in[None, :], other=0.0
            )
            if WIDEN:  # noqa: SIM108 - a constexpr branch
                d_tile = d_tile.to(ACC)
            else:
                d_tile = d_tile.to(q_tile.dtype)  # int8 documents: exact in bf16 / fp16
            if USE_DOT and WIDEN:
                s = tl.dot(q_tile, tl.trans(d_tile), input_precision="ieee", out_dtype=ACC)
            elif USE_DOT:
                s = tl.dot(q_tile, tl.trans(d_tile), out_dtype=ACC)  # tensor cores, fp32 accumulation
            else:
                s = tl.sum(q_tile[:, None, :] * d_tile[None, :, :], axis=2)
            if D_SCALE:  # after the dot, as the reference scales
                s = s * tl.load(dscale_ptr + ds + cols, mask=in_d, other=0.0).to(ACC)[None, :]
            if PYLATE:
                s = tl.where(c_valid[None, :], s, 0.0)
                c_valid = in_d
            s = tl.where(c_valid[None, :], s, float("-inf"))
            t_max = tl.max(s, axis=1)
            t_arg = tl.min(tl.where(c_valid[None, :] & (s == t_max[:, None]), cols[None, :], NONE), axis=1)
            better = (t_max > best) | ((arg == NONE) & (t_arg < NONE))
            best = tl.where(better, t_max, best)
            arg = tl.where(better, t_arg, arg)
            j0 += BLOCK_LD
        live = q_valid & (arg < NONE)
        total += tl.where(live, best, 0.0)
        if PYLATE and D_MASK:
            won = tl.load(dv_ptr + ds + arg, mask=live, other=0) != 0
            live = live & won
        tl.store(argmax_ptr + aoff + rows, tl.where(live, arg, -1), mask=rows < cap)
        i0 += BLOCK_LQ
    score = tl.sum(total, axis=0)
    if MEAN:
        count = tl.load(qcount_ptr + pid)
        score = tl.where(count > 0, score / tl.maximum(count, 1.0), 0.0)
    tl.store(scores_ptr + out, score)


def maxsim_pair_list_triton(
    q, d, q_valid, d_valid, meta, qcount, scores, argmax, *, pylate=False, d_scale=None
) -> None:
    """Score every pair of meta [P, 7] (see the module docstring) into the flat scores and
    argmax; q_valid / d_valid: None or bool per row; qcount: None (sum) or [P] counts (mean);
    d_scale: fp32 [Rd] with int8 d."""
    assert (d.dtype == torch.int8) == (d_scale is not None) and (d_scale is None or d_scale.is_contiguous())
    P = meta.shape[0]
    if P == 0:
        return
    dim = q.shape[1]
    fp64 = q.dtype == torch.float64
    # fp64 (gradcheck) takes the broadcast path: triton 3.4's interpreter has no fp64 tl.dot.
    use_dot = dim >= 16 and not fp64
    if use_dot:
        block_lq, block_ld, dim_pad = 16 if not on_gpu(q) else 32, 32 if not on_gpu(q) else 64, max(16, next_pow2(dim))
    else:
        block_lq, block_ld, dim_pad = 16, 16, next_pow2(max(dim, 1))
    qv = q_valid.view(torch.uint8) if q_valid is not None else q
    dv = d_valid.view(torch.uint8) if d_valid is not None else d
    _maxsim_pair_list_kernel[(P,)](
        q, d, d_scale if d_scale is not None else scores, qv, dv, meta, qcount if qcount is not None else scores,
        scores, argmax, dim,
        Q_MASK=q_valid is not None, D_MASK=d_valid is not None, MEAN=qcount is not None, PYLATE=pylate,
        USE_DOT=use_dot, ACC=tl.float64 if fp64 else tl.float32,
        BLOCK_LQ=block_lq, BLOCK_LD=block_ld, DIM_PAD=dim_pad, NONE=_NONE,
        WIDEN=not on_gpu(q) or not use_dot or q.dtype in (torch.float32, torch.float64),
        D_SCALE=d_scale is not None,
    )  # fmt: skip


def _meta(*cols) -> torch.Tensor:
    return torch.stack([c.to(torch.int64) for c in cols], dim=1).contiguous()


def maxsim_varlen_triton(q, cu_q, d, cu_d, pairs, arg_off, reduce, scores, argmax, d_scale=None) -> None:
    """maxsim_varlen's outputs (the C++ op's contract: validated, contiguous inputs; int8 d
    with d_scale fp32 [total_d])."""
    Nq, Nd = cu_q.numel() - 1, cu_d.numel() - 1
    cq, cd = cu_q.to(torch.int64), cu_d.to(torch.int64)
    lq, ld = cq[1:] - cq[:-1], cd[1:] - cd[:-1]
    dev = q.device
    if pairs is None:
        n = torch.arange(Nq, device=dev)[:, None].expand(Nq, Nd).reshape(-1)
        m = torch.arange(Nd, device=dev)[None, :].expand(Nq, Nd).reshape(-1)
        out = n * Nd + m
        off = m * q.shape[0] + cq[n]
    else:
        n, m = pairs[:, 0], pairs[:, 1]
        out = torch.arange(n.numel(), device=dev)
        off = arg_off
    meta = _meta(cq[n], lq[n], cd[m], ld[m], out, off, lq[n])
    acc = scores.dtype
    qcount = lq[n].to(acc).contiguous() if reduce == "mean" else None
    maxsim_pair_list_triton(q, d, None, None, meta, qcount, scores.view(-1), argmax.view(-1), d_scale=d_scale)


def maxsim_pairs_triton(q, d, q_mask, d_mask, q_kind, d_kind, reduce, pylate, scores, argmax, d_scale=None) -> None:
    """maxsim_pairs' outputs: q [B, Lq, dim], d [B * K, Ld, dim], masks per the kinds; int8 d
    with d_scale fp32 [B * K * Ld]."""
    B, Lq, dim = q.shape
    BK, Ld, _ = d.shape
    K = BK // B
    dev = q.device
    j = torch.arange(BK, device=dev)
    b = j // K
    ql = q_mask.to(torch.int64)[b] if q_kind == "lengths" else torch.full_like(j, Lq)
    dl = d_mask.to(torch.int64) if d_kind == "lengths" else torch.full_like(j, Ld)
    meta = _meta(b * Lq, ql, j * Ld, dl, j, j * Lq, torch.full_like(j, Lq))
    qv = q_mask.reshape(-1) if q_kind == "bool" else None
    dv = d_mask.reshape(-1) if d_kind == "bool" else None
    qcount = None
    if reduce == "mean":
        cnt = q_mask.sum(dim=1) if q_kind == "bool" else ql[::K] if q_kind == "lengths" else torch.full((B,), Lq)
        qcount = cnt.to(dev).to(scores.dtype)[b].contiguous()
    maxsim_pair_list_triton(
        q.reshape(B * Lq, dim), d.reshape(BK * Ld, dim), qv, dv, meta, qcount, scores.view(-1), argmax.view(-1),
        pylate=pylate, d_scale=d_scale,
    )  # fmt: skip


def maxsim_topk_triton(q, d, cu_d, q_mask, candidates, k, q_kind, reduce, scores, ids, d_scale=None) -> None:
    """maxsim_topk's outputs: score _TOPK_CHUNK documents at a time, keep the k best (int8 d
    with d_scale fp32 [total_d])."""
    Nq, Lq, dim = q.shape
    dev = q.device
    acc = scores.dtype
    cd = cu_d.to(torch.int64)
    Nd = cd.numel() - 1
    qrow = torch.arange(Nq, device=dev)
    ql = q_mask.to(torch.int64) if q_kind == "lengths" else torch.full((Nq,), Lq, device=dev)
    qv = q_mask.reshape(-1) if q_kind == "bool" else None
    count = (q_mask.sum(dim=1) if q_kind == "bool" else ql).to(acc)
    if candidates is None:
        lists = torch.arange(Nd, device=dev)[None, :].expand(Nq, Nd)
    elif candidates.dim() == 1:
        lists = candidates[None, :].expand(Nq, candidates.numel())
    else:
        lists = candidates
    best_s = torch.full((Nq, k), float("-inf"), dtype=acc, device=dev)
    best_i = torch.full((Nq, k), -1, dtype=torch.int64, device=dev)
    C = lists.shape[1]
    c0 = 0
    while c0 < C:
        ids_c = lists[:, c0 : c0 + _TOPK_CHUNK]  # [Nq, c]
        c = ids_c.shape[1]
        n = qrow[:, None].expand(Nq, c).reshape(-1)
        m = ids_c.reshape(-1).clamp_min(0)
        meta = _meta(n * Lq, ql[n], cd[m], cd[m + 1] - cd[m], torch.arange(n.numel(), device=dev), 0 * n, 0 * n)
        part = torch.empty(Nq * c, dtype=acc, device=dev)
        scratch = torch.empty(1, dtype=torch.int32, device=dev)  # cap 0: no argmax is written
        qcount = count[n].contiguous() if reduce == "mean" else None
        maxsim_pair_list_triton(q.reshape(Nq * Lq, dim), d, qv, None, meta, qcount, part, scratch, d_scale=d_scale)
        part = part.view(Nq, c)
        valid = (ids_c >= 0) & ~torch.isnan(part)
        part = torch.where(valid, part, float("-inf"))
        cand_i = torch.where(valid, ids_c, -1)
        all_s, all_i = torch.cat([best_s, part], 1), torch.cat([best_i, cand_i], 1)
        # (score desc, id asc) with the -1 padding last among equal -inf: sort by id (padding
        # as the largest id), then a stable sort by score.
        key = torch.where(all_i < 0, torch.iinfo(torch.int64).max, all_i)
        o = torch.argsort(key, dim=1, stable=True)
        all_s, all_i = all_s.gather(1, o), all_i.gather(1, o)
        o = torch.argsort(all_s, dim=1, descending=True, stable=True)[:, :k]
        best_s, best_i = all_s.gather(1, o), all_i.gather(1, o)
        c0 += _TOPK_CHUNK
    # A scored document at -inf is a real candidate; padding keeps id -1.
    scores.copy_(best_s)
    ids.copy_(best_i)
