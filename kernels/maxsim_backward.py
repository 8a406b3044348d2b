"""Triton kernels for the backward every MaxSim op shares (``sparseops::maxsim_backward``),
from the argmax the forward saved. Same contract and semantics as the C++ CPU kernel and
``sparseops.reference.maxsim.maxsim_backward_ref``.

Deterministic, no atomics: the host groups the pairs by query and by document (stable sorts,
so each group walks its pairs in index order). ``_dq_kernel``: one program per query group
and block of BLOCK_T query rows, summing g * d[argmax] over the group's pairs, BLOCK_P pairs
per step (a [BLOCK_P, BLOCK_T, dim] gather) in registers. dd, on GPUs: a counting sort of the
argmax entries by the document row they took (torch's stable sort), then one program per
document row sums g * q[t] over its entries (``_dd_sorted_kernel``): O(entries * dim) work.
The per-document ``_dd_kernel`` (for each block of BLOCK_J document rows, a one-hot
[BLOCK_T, BLOCK_J] product over every query token of every pair: O(Ld * entries * dim)) stays
the interpreter's path. Estimated at in-batch B = 128 (Lq 32, Ld 300, dim 128): 524,288
entries; the one-hot kernel does ~20 G multiply-adds in 128 programs (milliseconds), the
sorted one 67 M plus a sort of 524,288 int32 keys (not yet measured on a GPU). Loads widen to fp32 (fp64 for
fp64); loops over runtime bounds are ``while`` loops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2, on_gpu

__all__ = ["maxsim_backward_triton"]


@triton.jit
def _dq_kernel(
    grad_ptr, d_ptr, dscale_ptr, argmax_ptr, meta_ptr, off_ptr, order_ptr, dq_ptr, dim, blocks_per_group,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, DIM_PAD: tl.constexpr,
    D_SCALE: tl.constexpr,  # int8 d: each taken row counts d_scale[row] * d[row]
):  # fmt: skip
    # BLOCK_P pairs of the group at a time: their argmax rows [BLOCK_P, BLOCK_T] gather
    # [BLOCK_P, BLOCK_T, dim] document rows, summed over the pairs in a fixed tree; blocks of
    # pairs follow in index order (deterministic).
    pid = tl.program_id(0)
    g = pid // blocks_per_group
    t0 = (pid % blocks_per_group) * BLOCK_T
    o0 = tl.load(off_ptr + g)
    o1 = tl.load(off_ptr + g + 1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, DIM_PAD)
    k_in = offs_k < dim
    acc = tl.zeros([BLOCK_T, DIM_PAD], ACC)
    qs = tl.load(meta_ptr + tl.load(order_ptr + o0, mask=o0 < o1, other=0) * 6 + 1, mask=o0 < o1, other=0)
    ql = tl.load(meta_ptr + tl.load(order_ptr + o0, mask=o0 < o1, other=0) * 6 + 2, mask=o0 < o1, other=0)
    rows = t0 + offs_t
    o = o0
    while o < o1:
        op = o + offs_p
        in_p = op < o1
        p = tl.load(order_ptr + op, mask=in_p, other=0)
        c = tl.load(grad_ptr + p, mask=in_p, other=0.0).to(ACC)
        ds = tl.load(meta_ptr + p * 6 + 4, mask=in_p, other=0)
        aoff = tl.load(meta_ptr + p * 6 + 5, mask=in_p, other=0)
        # int16 or int32 (what the forward saved), widened for the index arithmetic.
        a_mask = in_p[:, None] & (rows < ql)[None, :]
        a = tl.load(argmax_ptr + aoff[:, None] + rows[None, :], mask=a_mask, other=-1).to(tl.int32)
        live = a >= 0  # [BLOCK_P, BLOCK_T]
        taken = ds[:, None] + tl.maximum(a, 0).to(tl.int64)  # [BLOCK_P, BLOCK_T] rows of d
        drow = tl.load(
            d_ptr + taken[:, :, None] * dim + offs_k[None, None, :],
            mask=live[:, :, None] & k_in[None, None, :],
            other=0.0,
        ).to(ACC)
        coef = c[:, None]
        if D_SCALE:
            coef = coef * tl.load(dscale_ptr + taken, mask=live, other=0.0).to(ACC)
        acc += tl.sum(drow * coef[:, :, None], axis=0)
        o += BLOCK_P
    tl.store(
        dq_ptr + (qs + rows).to(tl.int64)[:, None] * dim + offs_k[None, :],
        acc,
        mask=(rows < ql)[:, None] & k_in[None, :],
    )


@triton.jit
def _dd_kernel(
    grad_ptr, q_ptr, argmax_ptr, meta_ptr, off_ptr, order_ptr, dd_ptr, dim,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, DIM_PAD: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0)
    o0 = tl.load(off_ptr + g)
    o1 = tl.load(off_ptr + g + 1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_j = tl.arange(0, BLOCK_J)
    offs_k = tl.arange(0, DIM_PAD)
    k_in = offs_k < dim
    ds = tl.load(meta_ptr + tl.load(order_ptr + o0, mask=o0 < o1, other=0) * 6 + 4, mask=o0 < o1, other=0)
    # Pass 1: the highest document row any pair took (rows above it get no gradient here;
    # the host zeroed dd).
    top = -1
    o = o0
    while o < o1:
        p = tl.load(order_ptr + o)
        ql = tl.load(meta_ptr + p * 6 + 2)
        aoff = tl.load(meta_ptr + p * 6 + 5)
        t0 = 0
        while t0 < ql:
            rows = t0 + offs_t
            a = tl.load(argmax_ptr + aoff + rows, mask=rows < ql, other=-1).to(tl.int32)
            top = tl.maximum(top, tl.max(a, axis=0))
            t0 += BLOCK_T
        o += 1
    j0 = 0
    while j0 <= top:
        cols = j0 + offs_j
        acc = tl.zeros([BLOCK_J, DIM_PAD], ACC)
        o = o0
        while o < o1:
            p = tl.load(order_ptr + o)
            c = tl.load(grad_ptr + p).to(ACC)
            qs = tl.load(meta_ptr + p * 6 + 1)
            ql = tl.load(meta_ptr + p * 6 + 2)
            aoff = tl.load(meta_ptr + p * 6 + 5)
            t0 = 0
            while t0 < ql:
                rows = t0 + offs_t
                a = tl.load(argmax_ptr + aoff + rows, mask=rows < ql, other=-1).to(tl.int32)
                hit = (a[:, None] == cols[None, :]) & (a[:, None] >= 0)  # [BLOCK_T, BLOCK_J]
                qt = tl.load(
                    q_ptr + (qs + rows).to(tl.int64)[:, None] * dim + offs_k[None, :],
                    mask=(rows < ql)[:, None] & k_in[None, :],
                    other=0.0,
                ).to(ACC)
                # Query tokens in index order within the pair, pairs in index order.
                acc += tl.sum(tl.where(hit[:, :, None], qt[:, None, :], 0.0), axis=0) * c
                t0 += BLOCK_T
            o += 1
        tl.store(
            dd_ptr + (ds + cols).to(tl.int64)[:, None] * dim + offs_k[None, :],
            acc,
            mask=(cols <= top)[:, None] & k_in[None, :],
        )
        j0 += BLOCK_J


@triton.jit
def _dd_sorted_kernel(
    off_ptr, qrow_ptr, coef_ptr, q_ptr, dd_ptr, dim,
    ACC: tl.constexpr, BLOCK_E: tl.constexpr, DIM_PAD: tl.constexpr,
):  # fmt: skip
    # Document row r: the query tokens that took it are entries off[r] .. off[r + 1] of the
    # sorted list (in argmax order); gathered BLOCK_E at a time and summed in a fixed tree.
    r = tl.program_id(0).to(tl.int64)
    e0 = tl.load(off_ptr + r)
    e1 = tl.load(off_ptr + r + 1)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, DIM_PAD)
    k_in = offs_k < dim
    acc = tl.zeros([DIM_PAD], ACC)
    while e0 < e1:
        e = e0 + offs_e
        in_e = e < e1
        rows = tl.load(qrow_ptr + e, mask=in_e, other=0).to(tl.int64)
        c = tl.load(coef_ptr + e, mask=in_e, other=0.0).to(ACC)
        qt = tl.load(q_ptr + rows[:, None] * dim + offs_k[None, :], mask=in_e[:, None] & k_in[None, :], other=0.0)
        acc += tl.sum(qt.to(ACC) * c[:, None], axis=0)
        e0 += BLOCK_E
    tl.store(dd_ptr + r * dim + offs_k, acc, mask=k_in)


def _dd_sorted(grad, q, argmax, meta, dd, dim_pad, acc_type) -> None:
    """dd by a counting sort of the argmax entries by the document row they took: O(entries *
    dim) work, deterministic (stable sort, fixed per-row order), no atomics. Every argmax
    entry belongs to exactly one pair (the flat argmax is laid out by meta's offsets, without
    gaps), so the pair of each entry is the running count of pair starts, found without a
    host synchronisation. int32 everywhere but the sort's indices: ~18 bytes per entry at the
    peak (9.4 MB at in-batch B = 128, Lq = 32)."""
    E = argmax.numel()
    assert E < 2**31
    Rd = dd.shape[0]
    dev = argmax.device
    i32 = torch.int32
    aoff, live = meta[:, 5], meta[:, 2] > 0
    # Pairs that own entries first, in the order their entries lie in the flat argmax (no
    # nonzero(): it would synchronise with the host).
    by_pos = torch.argsort(torch.where(live, aoff, torch.iinfo(torch.int64).max), stable=True)
    # A 1 where a pair's entries start; empty pairs all write to a spare last slot (only equal
    # values ever meet, so the scatter's order cannot matter).
    starts = torch.zeros(E + 1, dtype=i32, device=dev)
    starts[torch.where(live, aoff, E)] = 1
    owner = by_pos.to(i32).index_select(0, (torch.cumsum(starts[:E], 0, dtype=i32) - 1).clamp_min(0))
    del starts
    m32 = meta.to(i32)
    pos = torch.arange(E, dtype=i32, device=dev) - m32[:, 5].index_select(0, owner)
    a = argmax.reshape(-1)
    key = torch.where(a >= 0, m32[:, 4].index_select(0, owner) + a, Rd)
    qrow = m32[:, 1].index_select(0, owner) + pos
    del pos
    coef = grad.index_select(0, owner)
    del owner
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=Rd + 1)[:Rd]
    del key
    off = torch.zeros(Rd + 1, dtype=torch.int64, device=dev)
    off[1:] = torch.cumsum(counts, 0)
    qrow, coef = qrow[order], coef[order]
    del order
    _dd_sorted_kernel[(Rd,)](off, qrow, coef, q, dd, q.shape[1], ACC=acc_type, BLOCK_E=16, DIM_PAD=dim_pad)


def _groups(col: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable grouping of the pairs by col: (offsets [n + 1] int64, order [P] int64)."""
    order = torch.argsort(col, stable=True)
    counts = torch.bincount(col, minlength=n)
    off = torch.zeros(n + 1, dtype=torch.int64, device=col.device)
    off[1:] = torch.cumsum(counts, 0)
    return off, order


def maxsim_backward_triton(
    grad, q, d, argmax, meta, num_q, num_d, dq, dd, *, sorted_dd: bool | None = None, d_scale=None
) -> None:
    """Fill dq [Rq, dim] / dd [Rd, dim] (either may be None) in full. ``sorted_dd``: dd by
    the counting sort (default on GPUs) or by the per-document one-hot kernel (default under
    the interpreter, whose per-program loops are cheap there). int8 d: d_scale fp32 [Rd] and
    dq only (a quantised index is not differentiable)."""
    assert (d.dtype == torch.int8) == (d_scale is not None) and (d_scale is None or dd is None)
    dim = q.shape[1]
    fp64 = q.dtype == torch.float64
    ACC = tl.float64 if fp64 else tl.float32
    dim_pad = next_pow2(max(dim, 1))
    block_t = 16
    if sorted_dd is None:
        sorted_dd = on_gpu(q)
    if dq is not None:
        dq.zero_()
        if meta.shape[0] > 0 and num_q > 0:
            off, order = _groups(meta[:, 0], num_q)
            max_lq = int(meta[:, 2].max())
            blocks = max(1, -(-max_lq // block_t))
            _dq_kernel[(num_q * blocks,)](
                grad, d, d_scale if d_scale is not None else grad, argmax, meta, off, order, dq, dim, blocks,
                ACC=ACC, BLOCK_T=block_t, BLOCK_P=8 if on_gpu(q) else 4, DIM_PAD=dim_pad, D_SCALE=d_scale is not None,
            )  # fmt: skip
    if dd is not None and sorted_dd:
        if meta.shape[0] > 0 and dd.shape[0] > 0 and argmax.numel() > 0:
            _dd_sorted(grad, q, argmax, meta, dd, dim_pad, ACC)
        else:
            dd.zero_()
    elif dd is not None:
        dd.zero_()
        if meta.shape[0] > 0 and num_d > 0:
            off, order = _groups(meta[:, 3], num_d)
            _dd_kernel[(num_d,)](
                grad, q, argmax, meta, off, order, dd, dim, ACC=ACC, BLOCK_T=block_t, BLOCK_J=16, DIM_PAD=dim_pad
            )
