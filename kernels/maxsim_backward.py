"""Triton kernels for the backward every MaxSim op shares (``sparseops::maxsim_backward``),
from the argmax the forward saved. Same contract and semantics as the C++ CPU kernel and
``sparseops.reference.maxsim.maxsim_backward_ref``.

Deterministic, no atomics: the host groups the pairs by query and by document (stable sorts,
so each group walks its pairs in index order). ``_dq_kernel``: one program per query group
and block of BLOCK_T query rows, summing g * d[argmax] over the group's pairs in registers.
``_dd_kernel``: one program per document group; it first finds the highest row any of its
pairs took, then for each block of BLOCK_J document rows adds g * q[t] of every query token
that took one of them (a one-hot [BLOCK_T, BLOCK_J] product). Loads widen to fp32 (fp64 for
fp64); loops over runtime bounds are ``while`` loops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2

__all__ = ["maxsim_backward_triton"]


@triton.jit
def _dq_kernel(
    grad_ptr, d_ptr, argmax_ptr, meta_ptr, off_ptr, order_ptr, dq_ptr, dim, blocks_per_group,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, DIM_PAD: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    g = pid // blocks_per_group
    t0 = (pid % blocks_per_group) * BLOCK_T
    o0 = tl.load(off_ptr + g)
    o1 = tl.load(off_ptr + g + 1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, DIM_PAD)
    k_in = offs_k < dim
    acc = tl.zeros([BLOCK_T, DIM_PAD], ACC)
    qs = tl.load(meta_ptr + tl.load(order_ptr + o0, mask=o0 < o1, other=0) * 6 + 1, mask=o0 < o1, other=0)
    ql = tl.load(meta_ptr + tl.load(order_ptr + o0, mask=o0 < o1, other=0) * 6 + 2, mask=o0 < o1, other=0)
    rows = t0 + offs_t
    o = o0
    while o < o1:
        p = tl.load(order_ptr + o)
        c = tl.load(grad_ptr + p).to(ACC)
        ds = tl.load(meta_ptr + p * 6 + 4)
        aoff = tl.load(meta_ptr + p * 6 + 5)
        a = tl.load(argmax_ptr + aoff + rows, mask=rows < ql, other=-1)
        live = a >= 0
        drow = tl.load(
            d_ptr + (ds + tl.maximum(a, 0).to(tl.int64))[:, None] * dim + offs_k[None, :],
            mask=live[:, None] & k_in[None, :],
            other=0.0,
        ).to(ACC)
        acc += c * drow
        o += 1
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
            a = tl.load(argmax_ptr + aoff + rows, mask=rows < ql, other=-1)
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
                a = tl.load(argmax_ptr + aoff + rows, mask=rows < ql, other=-1)
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


def _groups(col: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable grouping of the pairs by col: (offsets [n + 1] int64, order [P] int64)."""
    order = torch.argsort(col, stable=True)
    counts = torch.bincount(col, minlength=n)
    off = torch.zeros(n + 1, dtype=torch.int64, device=col.device)
    off[1:] = torch.cumsum(counts, 0)
    return off, order


def maxsim_backward_triton(grad, q, d, argmax, meta, num_q, num_d, dq, dd) -> None:
    """Fill dq [Rq, dim] / dd [Rd, dim] (either may be None) in full."""
    dim = q.shape[1]
    fp64 = q.dtype == torch.float64
    ACC = tl.float64 if fp64 else tl.float32
    dim_pad = next_pow2(max(dim, 1))
    block_t = 16
    if dq is not None:
        dq.zero_()
        if meta.shape[0] > 0 and num_q > 0:
            off, order = _groups(meta[:, 0], num_q)
            max_lq = int(meta[:, 2].max())
            blocks = max(1, -(-max_lq // block_t))
            _dq_kernel[(num_q * blocks,)](
                grad, d, argmax, meta, off, order, dq, dim, blocks, ACC=ACC, BLOCK_T=block_t, DIM_PAD=dim_pad
            )
    if dd is not None:
        dd.zero_()
        if meta.shape[0] > 0 and num_d > 0:
            off, order = _groups(meta[:, 3], num_d)
            _dd_kernel[(num_d,)](
                grad, q, argmax, meta, off, order, dd, dim, ACC=ACC, BLOCK_T=block_t, BLOCK_J=16, DIM_PAD=dim_pad
            )
