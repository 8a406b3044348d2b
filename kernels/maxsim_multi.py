"""Triton multi-query MaxSim forward: the GEMM-shaped kernel for many query tokens.

When Nq * Lq is large (in-batch training, batched search, 1,024-token ColPali queries) MaxSim
is compute-bound: each document byte meets 2 * Nq * Lq multiply-adds. A per-query kernel
reads every document tile once per query; this one reads it once per block of BLOCK_M query
rows, taken from several queries: a GEMM with M = query rows, N = document tokens, K = dim,
whose epilogue is a segmented row max (per document) and a segmented row sum (per query).

Program (row block b, document group g):
  * rows: BLOCK_M query rows, loaded once. When Lq <= BLOCK_M a block holds QPB =
    BLOCK_M // Lq whole queries (rows past QPB * Lq idle); otherwise a query is cut into
    PARTS = cdiv(Lq, BLOCK_M) blocks whose partial sums go to a [PARTS, Nq, Nd] buffer that
    the host adds up (torch.sum over a fixed axis: deterministic) before "mean" divides.
  * columns: the documents of group g are contiguous rows of d ([Nd, Ld, dim] flattened), so
    the program walks them as one stream of BLOCK_N-token tiles that may straddle documents.
    Per tile: S = Q @ D_tile^T (``tl.dot``: bf16 / fp16 on tensor cores with fp32
    accumulation; fp32 with ``input_precision="ieee"``, exact), then for each document the
    tile touches, the masked row max and its lowest column fold into a running (max, argmax)
    in registers; a document that ends in the tile is finished at once: argmax rows stored,
    per-query sums (a one-hot [BLOCK_M, QPB] reduction) stored. No Lq x Ld in memory, no
    atomics, one launch (plus the host sum when queries are cut).
The grid puts the row blocks of one document group next to each other, so the programs that
read the same document tiles run together and share them through L2.

Semantics are ``sparseops.reference.maxsim``'s (masks as bool or lengths, PyLate's
multiplicative masking, empty documents score 0, ties to the lowest token). Under the
interpreter the tiles are widened to fp32 at load (its bf16 ``tl.dot`` is wrong; DESIGN.md);
loops over runtime bounds are ``while`` loops; one config, no autotune.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_pow2, on_gpu

__all__ = ["maxsim_multi_query_triton"]

_NONE = 2**30


@triton.jit
def _maxsim_multi_kernel(
    q_ptr,  # [Nq, Lq, dim] contiguous
    d_ptr,  # [Nd, Ld, dim] contiguous, same dtype (int8 with D_SCALE)
    dscale_ptr,  # D_SCALE: [Nd * Ld] fp32, one scale per document token
    qmask_ptr,  # Q_MASK 1: [Nq, Lq] uint8; 2: [Nq] int32 lengths in [0, Lq]
    dmask_ptr,  # D_MASK likewise for documents
    qcount_ptr,  # [Nq] fp32 real query tokens (read when MEAN and not SPLIT)
    out_ptr,  # not SPLIT: scores [Nq, Nd] fp32; SPLIT: partial sums [PARTS, Nq, Nd] fp32
    argmax_ptr,  # [Nq, Nd, Lq] int16 / int32
    Nq,
    Lq,
    Nd,
    Ld,
    dim,
    n_row_blocks,
    docs_per_group,
    qpb,  # queries per row block (not SPLIT)
    parts,  # row blocks per query (SPLIT)
    Q_MASK: tl.constexpr,
    D_MASK: tl.constexpr,
    MEAN: tl.constexpr,
    PYLATE: tl.constexpr,
    SPLIT: tl.constexpr,
    WIDEN: tl.constexpr,  # load tiles as fp32 (interpreter, fp32 inputs)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,  # cdiv(dim, BLOCK_K)
    QPB_PAD: tl.constexpr,  # next_pow2(qpb)
    NONE: tl.constexpr,
    D_SCALE: tl.constexpr,  # int8 documents: similarity <q_i, d_j> * d_scale[j]
):
    pid = tl.program_id(0)
    rb = pid % n_row_blocks
    g = pid // n_row_blocks
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # ---- query rows of this block: query n_r, token i_r, slot s_r (0 .. qpb-1)
    if SPLIT:
        n0 = rb // parts
        part = rb % parts
        i_r = part * BLOCK_M + offs_m
        n_r = n0 + offs_m * 0
        s_r = offs_m * 0
        row_in = i_r < Lq
    else:
        n0 = rb * qpb
        part = 0
        s_r = offs_m // Lq
        i_r = offs_m - s_r * Lq
        n_r = n0 + s_r
        row_in = (s_r < qpb) & (n_r < Nq)
    row = n_r.to(tl.int64) * Lq + i_r  # flattened query row
    q_real = row_in
    if Q_MASK == 1:
        q_real = q_real & (tl.load(qmask_ptr + row, mask=row_in, other=0) != 0)
    if Q_MASK == 2:
        q_real = q_real & (i_r < tl.load(qmask_ptr + n_r, mask=row_in, other=0))
    if NUM_K == 1:
        q_tile = tl.load(
            q_ptr + row[:, None] * dim + offs_k[None, :], mask=row_in[:, None] & (offs_k < dim)[None, :], other=0.0
        )
        if WIDEN:
            q_tile = q_tile.to(tl.float32)
    slots = tl.arange(0, QPB_PAD)
    if MEAN and not SPLIT:
        cnt = tl.load(qcount_ptr + n0 + slots, mask=(slots < qpb) & (n0 + slots < Nq), other=0.0)
    # ---- documents [m0, m1) as one stream of flat token rows [m0 * Ld, m1 * Ld)
    m0 = g * docs_per_group
    m1 = tl.minimum(m0 + docs_per_group, Nd)
    t_end = m1.to(tl.int64) * Ld
    t0 = m0.to(tl.int64) * Ld
    m = m0
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    arg = tl.full([BLOCK_M], NONE, tl.int32)
    while t0 < t_end:
        cols = t0 + offs_n
        in_rng = cols < t_end
        if NUM_K == 1:
            d_tile = tl.load(
                d_ptr + cols[:, None] * dim + offs_k[None, :], mask=in_rng[:, None] & (offs_k < dim)[None, :], other=0.0
            )
            if WIDEN:
                d_tile = d_tile.to(tl.float32)
                s = tl.dot(q_tile, tl.trans(d_tile), input_precision="ieee", out_dtype=tl.float32)
            else:
                d_tile = d_tile.to(q_tile.dtype)  # int8 documents: exact in bf16 / fp16
                s = tl.dot(q_tile, tl.trans(d_tile), out_dtype=tl.float32)
        else:
            s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for kc in tl.static_range(NUM_K):
                kk = kc * BLOCK_K + offs_k
                k_ok = (kk < dim)[None, :]
                qk = tl.load(q_ptr + row[:, None] * dim + kk[None, :], mask=row_in[:, None] & k_ok, other=0.0)
                dk = tl.load(d_ptr + cols[:, None] * dim + kk[None, :], mask=in_rng[:, None] & k_ok, other=0.0)
                if WIDEN:
                    qk, dk = qk.to(tl.float32), dk.to(tl.float32)
                    s += tl.dot(qk, tl.trans(dk), input_precision="ieee", out_dtype=tl.float32)
                else:
                    s += tl.dot(qk, tl.trans(dk.to(qk.dtype)), out_dtype=tl.float32)
        if D_SCALE:  # after the dot, as the reference scales
            s = s * tl.load(dscale_ptr + cols, mask=in_rng, other=0.0)[None, :]
        tile_hi = tl.minimum(t0 + BLOCK_N, t_end)
        # The documents this tile touches: m .. m_last.
        m_last = ((tile_hi - 1) // Ld).to(tl.int32)
        mm = m
        while mm <= m_last:
            doc_lo = mm.to(tl.int64) * Ld
            j = (cols - doc_lo).to(tl.int32)  # document-local token of each column
            seg = in_rng & (j >= 0) & (j < Ld)
            if D_MASK == 2:
                d_len = tl.load(dmask_ptr + mm)
                present = seg & (j < d_len)
            else:
                present = seg
            if D_MASK == 1:  # noqa: SIM108 - a constexpr branch, traced once per mask kind
                real = present & (tl.load(dmask_ptr + cols, mask=seg, other=0) != 0)
            else:
                real = present
            if PYLATE:
                # A masked token scores 0 and is a candidate like any other.
                sv = tl.where(real[None, :], s, 0.0)
                cand = present
            else:
                sv = s
                cand = real
            sv = tl.where(cand[None, :], sv, float("-inf"))
            # Row max and its lowest column in one reduction. A row whose candidates are all
            # -inf (overflow) takes the first candidate, as the reference does; `first` is
            # NONE when the tile has no candidate of this document.
            t_max, t_col = tl.max(sv, axis=1, return_indices=True, return_indices_tie_break_left=True)
            first = tl.min(tl.where(cand, j, NONE), axis=0)
            t_arg = tl.where(t_max == float("-inf"), first, (t_col + (t0 - doc_lo)).to(tl.int32))
            better = (t_max > best) | ((arg == NONE) & (t_arg < NONE))
            best = tl.where(better, t_max, best)
            arg = tl.where(better, t_arg, arg)
            if doc_lo + Ld <= tile_hi:
                # Document mm ends in this tile: store its argmax rows and per-query sums.
                live = q_real & (arg < NONE)
                contrib = tl.where(live, best, 0.0)
                if PYLATE and D_MASK == 1:
                    won = tl.load(dmask_ptr + doc_lo + arg, mask=live, other=0) != 0
                    live = live & won
                a_off = (n_r.to(tl.int64) * Nd + mm) * Lq + i_r
                tl.store(argmax_ptr + a_off, tl.where(live, arg, -1), mask=row_in)
                if SPLIT:
                    total = tl.sum(contrib, axis=0)
                    tl.store(out_ptr + (part.to(tl.int64) * Nq + n0) * Nd + mm, total)
                else:
                    hit = s_r[:, None] == slots[None, :]
                    sums = tl.sum(tl.where(hit, contrib[:, None], 0.0), axis=0)  # [QPB_PAD]
                    if MEAN:
                        sums = tl.where(cnt > 0, sums / tl.maximum(cnt, 1.0), 0.0)  # as the reference divides
                    n_s = n0 + slots
                    tl.store(out_ptr + n_s.to(tl.int64) * Nd + mm, sums, mask=(slots < qpb) & (n_s < Nq))
                best = tl.full([BLOCK_M], float("-inf"), tl.float32)
                arg = tl.full([BLOCK_M], NONE, tl.int32)
                m = mm + 1
            mm += 1
        t0 += BLOCK_N


def maxsim_multi_query_triton(
    q: torch.Tensor,
    d: torch.Tensor,
    q_mask: torch.Tensor | None,
    d_mask: torch.Tensor | None,
    q_kind: int,
    d_kind: int,
    mean: bool,
    pylate: bool,
    scores: torch.Tensor,
    argmax: torch.Tensor,
    *,
    block_m: int | None = None,
    block_k: int | None = None,
    d_scale: torch.Tensor | None = None,
) -> None:
    """Fill scores [Nq, Nd] fp32 and argmax [Nq, Nd, Lq] int16 / int32 (the op layer's
    contract: contiguous q [Nq, Lq, dim] / d [Nd, Ld, dim] in fp32 / bf16 / fp16 with
    dim >= 16 (or int8 d with d_scale fp32 [Nd * Ld]), masks as uint8-viewable bool or int32
    lengths in [0, L] per the kinds 0 / 1 / 2, every size >= 1).
    ``block_m`` / ``block_k`` override the query rows per program and the K chunk (tests: cut
    queries into parts, split K)."""
    Nq, Lq, dim = q.shape
    Nd, Ld, _ = d.shape
    assert q.is_contiguous() and d.is_contiguous() and scores.is_contiguous() and argmax.is_contiguous()
    assert min(Nq, Lq, Nd, Ld) >= 1 and dim >= 16 and q.dtype != torch.float64
    assert (d.dtype == torch.int8) == (d_scale is not None) and (d_scale is None or d_scale.is_contiguous())
    gpu = on_gpu(q)
    if block_m is None:
        # 128 query rows x 128 document tokens x dim 128 per tl.dot: the shape Hopper's wgmma
        # and Ampere's mma.sync run near peak at with 8 warps (tiles of this size reach
        # 600-700 TF/s in Triton's bf16 matmul on an H100; not yet measured for this kernel).
        block_m = 128 if gpu else 16
    block_n = 128 if gpu else 16
    if block_k is None:
        block_k = min(next_pow2(dim), 128 if gpu else 256)
    num_k = cdiv(dim, block_k)
    split = Lq > block_m
    if split:
        qpb, parts = 1, cdiv(Lq, block_m)
        n_row_blocks = Nq * parts
    else:
        qpb, parts = block_m // Lq, 1
        n_row_blocks = cdiv(Nq, qpb)
    # Document groups: enough programs to fill the GPU twice over, each a few thousand
    # tokens long so that the per-document epilogue and the query load are amortised.
    if gpu:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        docs = max(1, min(cdiv(4096, Ld), cdiv(Nd * n_row_blocks, 2 * sms)))
    else:
        docs = Nd  # the interpreter runs programs one after another: few, long ones
    groups = cdiv(Nd, docs)
    qm = q_mask.view(torch.uint8) if q_kind == 1 else (q_mask if q_kind == 2 else q)
    dm = d_mask.view(torch.uint8) if d_kind == 1 else (d_mask if d_kind == 2 else d)
    if mean and not split:
        if q_kind == 0:
            qcount = torch.full((Nq,), float(Lq), dtype=torch.float32, device=q.device)
        elif q_kind == 1:
            qcount = q_mask.sum(dim=-1).to(torch.float32)
        else:
            qcount = q_mask.to(torch.float32)
    else:
        qcount = scores
    out = torch.empty((parts, Nq, Nd), dtype=torch.float32, device=q.device) if split else scores
    widen = (not gpu) or q.dtype == torch.float32
    _maxsim_multi_kernel[(n_row_blocks * groups,)](
        q, d, d_scale if d_scale is not None else out, qm, dm, qcount, out, argmax, Nq, Lq, Nd, Ld, dim,
        n_row_blocks, docs, qpb, parts,
        Q_MASK=q_kind, D_MASK=d_kind, MEAN=mean, PYLATE=pylate, SPLIT=split, WIDEN=widen,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NUM_K=num_k, QPB_PAD=next_pow2(qpb), NONE=_NONE,
        D_SCALE=d_scale is not None,
        num_warps=8 if gpu else 4, num_stages=3 if gpu else 1,
    )  # fmt: skip
    if split:
        total = out.sum(dim=0)
        if mean:
            if q_kind == 0:
                cnt = torch.full((Nq, 1), float(Lq), dtype=torch.float32, device=q.device)
            elif q_kind == 1:
                cnt = q_mask.sum(dim=-1, keepdim=True).to(torch.float32)
            else:
                cnt = q_mask.to(torch.float32)[:, None]
            total = torch.where(cnt > 0, total / cnt.clamp_min(1.0), torch.zeros((), device=q.device))
        scores.copy_(total)
