"""Triton grouped GEMM: the ``triton`` backend of ``sparseops.grouped_mm`` and the two GEMM
kernels that the fused MoE kernels (kernels/moe.py) reuse with their gathers and epilogues.

Semantics: ``sparseops.reference.grouped_mm`` (the specification). Two kernels serve the four
layouts:

* ``_ragged_m_kernel`` (2D x 3D, and 3D x 2D as its transpose: out^T = b^T a[g]^T reads the
  same memory through swapped strides, no copy). The jagged dimension is cut into BLOCK_M row
  tiles that never straddle a group; rows past offs[-1] get "tail" tiles that write zeros.
  ``offs`` is read on the device only: the grid is a static bound (a persistent grid of at
  most min(bound, SMs x CTAs per SM) programs, bound = (cdiv(S, BLOCK_M) + G + 1) x N tiles),
  and each program finds its tile's group with ``ragged_tile``: a vector scan over offs in
  chunks of BLOCK_G groups (load, per-group tile counts, cumsum, one compare) instead of a
  tile table built by a second launch or a host sync. The scan costs O(G / BLOCK_G) vector
  steps per tile; for G <= 1024 that is one L2-resident load and one cumsum.
* ``_ragged_k_kernel`` (2D x 2D ragged K -> [G, M, N], the weight gradient; 3D x 3D
  batched): a static grid of G x M tiles x N tiles; each program loops over its group's K
  range [offs[g-1], offs[g]) (empty: zeros + bias). Optional gathers along K (MoE weight
  gradients read x / dy rows through the routing's token index, never a permuted copy) and an
  optional row sum of A (the MoE bias gradients, in the same pass over A).

How the design serves the H100 targets (>= 1.0x torch._grouped_mm everywhere, >= 1.3x at
DeepSeek-V3 T = 4096 with 128 rows per expert; ANCHORS.md section 1), none of it measured
yet (no GPU was available when this was written; the tables below are first choices):
* Bandwidth-bound shapes (<= ~300 rows per expert, DeepSeek-V3 and decode) are won by reading
  every expert weight tile exactly once at full HBM speed: tiles are ordered group-major, M
  tile before N tile (GROUP_M = 1 there), so the programs running together share one A tile
  (from L2) and each B tile is read by one program; 128 rows per expert fit one BLOCK_M = 128
  tile, so no weight tile is read twice.
* Weights come through TMA (``tl.make_tensor_descriptor``, device-side descriptors built
  once per persistent program) with a 4-stage pipeline (``tl.range(num_stages=...)``), the
  asynchronous bulk copy that keeps HBM busy without spending registers on addresses;
  descriptors are used where the strides allow (unit inner stride, 16-element aligned outer
  strides, 16-byte aligned base), plain pointer loads otherwise (sm80, odd strides).
  A descriptor zero-fills reads past the weight's edges, so K and N tails need no masks.
* Compute-bound shapes (Mixtral, Qwen3 at T >= 16384: 1000+ rows per expert) take wide
  128 x 256 tiles with 8 warps and a GROUP_M = 8 swizzle, so each weight tile is reused by 8
  consecutive M tiles from L2.
* Decode (a few rows per expert) takes BLOCK_M = 16 and splits N more finely until the
  static tile count covers the SMs: the whole call is one weight stream.
* Persistent programs pay the launch and descriptor set-up once, and no tile ever runs the
  K loop for rows of two groups (ScatterMoE's mixed-tile waste).
Tile shapes come from ``tile_config``: a small table keyed by (average rows per group, N, K,
dtype), never a runtime autotune (deterministic, graph-capturable, no first-call sweep).

Offline sm_90 compile (``python scripts/compile_triton_sm90.py``: triton 3.6, GPUTarget("cuda",
90, 32), ptxas resource usage, 2026-12-07, no GPU): every table variant of every kernel here
and in kernels/moe.py compiles with no spill (no local stack), TMA (cp.async.bulk.tensor) for
the weights, wgmma for BLOCK_M >= 64 (mma.sync below), a software-pipelined K loop (async
copies), and shared memory within the H100's 227 KB: ragged-M bf16 128 x 128 x 64 (4 stages)
165 registers / 128 KB, 128 x 256 x 64 (3 stages) 255 / 144 KB, decode 16 x 64 x 128 96 / 60 KB;
the MoE GEMM-1 128 x 64 (x 2 accumulators) 153-201 / 128 KB; the dH kernel 128 x 32 191-202 /
80 KB. Wider first choices spilled and were narrowed (see tile_config and moe._dh_config). The
gathered ragged-K (weight-gradient) kernels pipeline with less shared memory (52 KB: fewer
stages in flight) than the plain one (128 KB): a tuning lead for the H100 run.

Interpreter and portability rules (kernels/_common.py): runtime-bound loops are ``while``
loops under the interpreter and ``tl.range`` loops compiled (``K_FOR``: the software
pipeliner only transforms ``for`` loops, and ``for`` over a runtime bound fails in the
triton 3.4 - 3.6 interpreters); bf16 / fp16 operands go to ``tl.dot`` in their dtype only
when compiled (the interpreter's bf16 ``tl.dot`` is wrong), fp32 uses ``input_precision=
"ieee"`` (exact fp32, no tf32), fp64 a broadcast multiply-sum (triton 3.4's interpreter has
no fp64 ``tl.dot``); masks are tensor comparisons only. triton 3.4's interpreter checks
descriptor strides in elements (a multiple of 16), hence the 16-element rule above.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreting, next_pow2, on_gpu

__all__ = [
    "TileConfig",
    "tile_config",
    "BOperand",
    "b_operand",
    "ragged_m_mm",
    "ragged_k_mm",
    "grouped_mm_triton",
    "grouped_mm_plan",
    "ensure_allocator",
]
# Device helpers kernels/moe.py shares: ragged_count, ragged_tile, swizzle_tile, make_b_desc,
# mainloop (k_step), mma.

# DOT modes: 0 = operands in their 16-bit dtype (compiled), 1 = fp32 "ieee", 2 = fp64 FMA.
_DOT_NATIVE, _DOT_IEEE, _DOT_FMA = 0, 1, 2
# B operand modes: 0 = pointer loads; 1 = descriptor over [G, PARTS, N, K] (K contiguous);
# 2 = [G, N, PARTS, K] (K contiguous, parts interleaved); 3 = [G, K, PARTS, N] (N contiguous).
_B_PTR, _B_KROWS, _B_KROWS_INTERLEAVED, _B_NROWS = 0, 1, 2, 3
_BLOCK_G = 1024  # groups per scan step (one vector load of offs for G <= 1024)
_INTERP_PROGS = 6  # persistent programs under the interpreter (it runs programs one by one)


# --------------------------------------------------------------------------------------
# Device helpers (shared with kernels/moe.py)
# --------------------------------------------------------------------------------------


@triton.jit
def ragged_count(offs_ptr, G, S, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """(real, last) of the ragged dimension of length S cut by the cumulative ends ``offs`` [G]
    (int32): the number of BLOCK_M tiles of the group-major tile list and offs[-1] (0 for
    G = 0). Ends are clamped to [0, S] and sizes to >= 0 (here and in ``ragged_tile``), so
    invalid offs (unchecked on CUDA) never address memory out of bounds."""
    lanes = tl.arange(0, BLOCK_G)
    real = G * 0
    last = G * 0
    c0 = G * 0
    while c0 < G:
        idx = c0 + lanes
        inb = idx < G
        end = tl.minimum(tl.maximum(tl.load(offs_ptr + idx, mask=inb, other=0), 0), S)
        start = tl.minimum(tl.maximum(tl.load(offs_ptr + idx - 1, mask=inb & (idx > 0), other=0), 0), S)
        ntile = tl.where(inb, (tl.maximum(end - start, 0) + BLOCK_M - 1) // BLOCK_M, 0)
        real += tl.sum(ntile)
        last = tl.maximum(last, tl.max(tl.where(inb, end, 0)))
        c0 += BLOCK_G
    return real, last


@triton.jit
def ragged_tile(t, offs_ptr, G, S, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """The real tile ``t`` (0 <= t < real) of that list: (g, r0, r1) with g its group,
    [r0, min(r0 + BLOCK_M, r1)) its rows and r1 the group's end. A vector scan of offs in
    chunks of BLOCK_G groups: per-group tile counts, their cumsum, one compare; no tile
    table, no second launch, no host sync. Four reductions per chunk (each a jit call under
    the interpreter, where they dominate the cost: the reason for their small number)."""
    lanes = tl.arange(0, BLOCK_G)
    g = t * 0 - 1
    r0 = t * 0
    r1 = t * 0
    base = t * 0
    c0 = t * 0
    while c0 < G:
        idx = c0 + lanes
        inb = idx < G
        end = tl.minimum(tl.maximum(tl.load(offs_ptr + idx, mask=inb, other=0), 0), S)
        start = tl.minimum(tl.maximum(tl.load(offs_ptr + idx - 1, mask=inb & (idx > 0), other=0), 0), S)
        ntile = tl.where(inb, (tl.maximum(end - start, 0) + BLOCK_M - 1) // BLOCK_M, 0)
        incl = tl.cumsum(ntile, 0) + base
        excl = incl - ntile
        hit = (excl <= t) & (t < incl)
        g += tl.sum(tl.where(hit, idx + 1, 0))
        r0 += tl.sum(tl.where(hit, start + (t - excl) * BLOCK_M, 0))
        r1 += tl.sum(tl.where(hit, end, 0))
        base = tl.max(incl)  # incl is non-decreasing: its last entry
        c0 += BLOCK_G
    return g, r0, r1


@triton.jit
def swizzle_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(M tile, N tile) of linear tile ``tile``: bands of GROUP_M M tiles walked N tile by N
    tile (GROUP_M = 1: row-major, consecutive tiles share their A rows)."""
    width = GROUP_M * num_n
    band = tile // width
    first = band * GROUP_M
    size = tl.minimum(num_m - first, GROUP_M)
    mt = first + (tile % width) % size
    nt = (tile % width) // size
    return mt, nt


@triton.jit
def mma(acc, a, b, DOT: tl.constexpr):
    """acc += a @ b in the mode's precision (see _DOT_*)."""
    if DOT == 0:
        acc = tl.dot(a, b, acc)
    elif DOT == 1:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc += tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    return acc


@triton.jit
def make_b_desc(b_ptr, G, d1, d2, d3, s0, s1, s2, B_DESC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The device-side TMA descriptor of a B operand (modes _B_KROWS / _B_KROWS_INTERLEAVED /
    _B_NROWS), or the plain pointer for _B_PTR."""
    if B_DESC == 1:
        d = tl.make_tensor_descriptor(b_ptr, [G, d1, d2, d3], [s0, s1, s2, 1], [1, 1, BLOCK_N, BLOCK_K])
    elif B_DESC == 2:
        d = tl.make_tensor_descriptor(b_ptr, [G, d1, d2, d3], [s0, s1, s2, 1], [1, BLOCK_N, 1, BLOCK_K])
    elif B_DESC == 3:
        d = tl.make_tensor_descriptor(b_ptr, [G, d1, d2, d3], [s0, s1, s2, 1], [1, BLOCK_K, 1, BLOCK_N])
    else:
        d = b_ptr
    return d


@triton.jit
def k_step(acc, acc2, a_ptr, a_rows, a_mask, s_ak, b_ptr, b_desc, g, n0, k0, NB, k_hi, s_g, s_part, s_k, s_n,
           TWO: tl.constexpr, B_DESC: tl.constexpr, DOT: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_K: tl.constexpr):  # fmt: skip
    """One K step: acc += A[rows, k0:k0+BLOCK_K] @ B_0[g, k0:k0+BLOCK_K, n0:n0+BLOCK_N] (and acc2
    with part 1 when TWO). B element (k, n) of part p at b_ptr + g*s_g + p*s_part + k*s_k +
    n*s_n, or through the descriptor (which zero-fills past the operand's edges); zeros for
    k >= k_hi or n >= NB. One helper for loads and dots (the interpreter pays per call)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    a = tl.load(
        a_ptr + a_rows[:, None] + ks.to(tl.int64)[None, :] * s_ak,
        mask=a_mask[:, None] & (ks < k_hi)[None, :],
        other=0.0,
    )
    if DOT == 1:
        a = a.to(tl.float32)
    elif DOT == 2:
        a = a.to(tl.float64)
    for part in tl.static_range(2 if TWO else 1):
        if B_DESC == 1:
            b = tl.trans(tl.reshape(b_desc.load([g, part, n0, k0]), [BLOCK_N, BLOCK_K]))
        elif B_DESC == 2:
            b = tl.trans(tl.reshape(b_desc.load([g, n0, part, k0]), [BLOCK_N, BLOCK_K]))
        elif B_DESC == 3:
            b = tl.reshape(b_desc.load([g, k0, part, n0]), [BLOCK_K, BLOCK_N])
        else:
            ns = n0 + tl.arange(0, BLOCK_N)
            b = tl.load(
                b_ptr + g.to(tl.int64) * s_g + part * s_part + ks.to(tl.int64)[:, None] * s_k
                + ns.to(tl.int64)[None, :] * s_n,
                mask=(ks < k_hi)[:, None] & (ns < NB)[None, :],
                other=0.0,
            )  # fmt: skip
        # The accumulator goes into tl.dot (wgmma / mma accumulate in place).
        if part == 0:
            if DOT == 0:
                acc = tl.dot(a, b, acc)
            elif DOT == 1:
                acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc += tl.sum(a[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
        else:
            if DOT == 0:
                acc2 = tl.dot(a, b, acc2)
            elif DOT == 1:
                acc2 = tl.dot(a, b.to(tl.float32), acc2, input_precision="ieee")
            else:
                acc2 += tl.sum(a[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    return acc, acc2


@triton.jit
def mainloop(acc, acc2, a_ptr, a_rows, a_mask, s_ak, b_ptr, b_desc, g, n0, NB, k_lo, k_hi,
             s_g, s_part, s_k, s_n, TWO: tl.constexpr, B_DESC: tl.constexpr, DOT: tl.constexpr,
             K_FOR: tl.constexpr, STAGES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """acc (and acc2) += the K steps of ``k_step`` over [k_lo, k_hi). a_rows: [BLOCK_M] int64
    element offsets of A's rows (a gather is already applied), a_mask: which rows exist.
    K_FOR: a ``tl.range`` loop (compiled: the software pipeliner works on ``for`` loops);
    otherwise ``while`` (the interpreter: ``for`` over a runtime bound fails in triton 3.4-3.6)."""
    if K_FOR:
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
            acc, acc2 = k_step(acc, acc2, a_ptr, a_rows, a_mask, s_ak, b_ptr, b_desc, g, n0, k0, NB, k_hi,
                               s_g, s_part, s_k, s_n, TWO, B_DESC, DOT, BLOCK_N, BLOCK_K)  # fmt: skip
    else:
        k0 = k_lo
        while k0 < k_hi:
            acc, acc2 = k_step(acc, acc2, a_ptr, a_rows, a_mask, s_ak, b_ptr, b_desc, g, n0, k0, NB, k_hi,
                               s_g, s_part, s_k, s_n, TWO, B_DESC, DOT, BLOCK_N, BLOCK_K)  # fmt: skip
            k0 += BLOCK_K
    return acc, acc2


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _ragged_m_kernel(
    a_ptr,  # A [S, K] (any strides); with A_GATHER row r reads A row gidx[r]
    b_ptr,  # B: element (g, k, n) at g*s_bg + k*s_bk + n*s_bn (or through the descriptor)
    out_ptr,  # out [S, NB] (any strides)
    bias_ptr,  # BIAS 1: [G, NB] rows of stride s_biasg; 2: [S] one value per row
    scale_ptr,  # SCALE: fp32 [*], row r scaled by scale[sidx[r]]
    offs_ptr,  # [G] int32 cumulative ends of the groups along S
    gidx_ptr,  # A_GATHER: [S] int32 row of A read by sorted row r
    sidx_ptr,  # SCALE: [S] int32 index into scale
    S,
    NB,
    K,
    G,
    s_am,
    s_ak,
    s_bg,
    s_bk,
    s_bn,
    s_om,
    s_on,
    s_biasg,
    d1,
    d2,
    d3,
    ds0,
    ds1,
    ds2,
    num_progs,
    A_GATHER: tl.constexpr,
    BIAS: tl.constexpr,
    SCALE: tl.constexpr,
    ZERO_TAIL: tl.constexpr,  # write zeros to rows past offs[-1]
    B_DESC: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    K_FOR: tl.constexpr,
    STAGES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    real, last = ragged_count(offs_ptr, G, S, BLOCK_M, BLOCK_G)
    num_m = real
    if ZERO_TAIL:
        num_m += (S - last + BLOCK_M - 1) // BLOCK_M
    num_n = (NB + BLOCK_N - 1) // BLOCK_N
    total = num_m * num_n
    b_desc = make_b_desc(b_ptr, G, d1, d2, d3, ds0, ds1, ds2, B_DESC, BLOCK_N, BLOCK_K)
    lanes_m = tl.arange(0, BLOCK_M)
    lanes_n = tl.arange(0, BLOCK_N)
    tile = pid
    while tile < total:
        mt, nt = swizzle_tile(tile, num_m, num_n, GROUP_M)
        g, r0, r1 = ragged_tile(mt, offs_ptr, G, S, BLOCK_M, BLOCK_G)
        tail = mt >= real
        r0 = tl.where(tail, last + (mt - real) * BLOCK_M, r0)
        r1 = tl.where(tail, S, r1)
        k_hi = tl.where(tail, 0, K)  # a tail tile runs no K loop: zeros
        n_hi = tl.where(tail, 0, NB)  # and no bias
        g = tl.maximum(g, 0)
        rows = r0 + lanes_m
        rmask = rows < r1
        if A_GATHER:  # noqa: SIM108 - a constexpr branch
            arow = tl.load(gidx_ptr + rows, mask=rows < tl.minimum(r1, last), other=0)
        else:
            arow = rows
        n0 = nt * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        acc, _unused = mainloop(acc, acc, a_ptr, arow.to(tl.int64) * s_am, rmask, s_ak, b_ptr, b_desc, g, n0, NB,
                                0, k_hi, s_bg, 0, s_bk, s_bn, False, B_DESC, DOT, K_FOR, STAGES, BLOCK_N,
                                BLOCK_K)  # fmt: skip
        cols = n0 + lanes_n
        if BIAS == 1:
            bv = tl.load(bias_ptr + g.to(tl.int64) * s_biasg + cols, mask=cols < n_hi, other=0.0)
            acc += bv.to(ACC)[None, :]
        elif BIAS == 2:
            bv = tl.load(bias_ptr + rows, mask=rows < tl.minimum(r1, last), other=0.0)
            acc += bv.to(ACC)[:, None]
        if SCALE:
            si = tl.load(sidx_ptr + rows, mask=rows < tl.minimum(r1, last), other=0)
            sv = tl.load(scale_ptr + si, mask=rows < tl.minimum(r1, last), other=0.0)
            acc = acc * sv.to(ACC)[:, None]
        tl.store(
            out_ptr + rows.to(tl.int64)[:, None] * s_om + cols.to(tl.int64)[None, :] * s_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=rmask[:, None] & (cols < NB)[None, :],
        )
        tile += num_progs


@triton.jit
def _ragged_k_kernel(
    a_ptr,  # A: element (g, m, k) at g*s_ag + m*s_am + row_a(k)*s_ak
    b_ptr,  # B: element (g, k, n) at g*s_bg + row_b(k)*s_bk + n*s_bn
    out_ptr,  # out [G, M, N] (strides s_og, s_om, s_on)
    bias_ptr,  # [G, N] contiguous in out's dtype (BIAS)
    offs_ptr,  # RAGGED: [G] int32 cumulative ends along K
    aidx_ptr,  # A_GATHER: row_a(k) = aidx[k]
    bidx_ptr,  # B_GATHER: row_b(k) = bidx[k]
    rs_ptr,  # ROWSUM: [G, M] contiguous: sum_k A(g, m, k) (* rscale[k] when ROWSUM == 2)
    rscale_ptr,  # ROWSUM 2: [K] fp32
    M,
    N,
    K,
    s_ag,
    s_am,
    s_ak,
    s_bg,
    s_bk,
    s_bn,
    s_og,
    s_om,
    s_on,
    RAGGED: tl.constexpr,
    A_GATHER: tl.constexpr,
    B_GATHER: tl.constexpr,
    BIAS: tl.constexpr,
    ROWSUM: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    K_FOR: tl.constexpr,
    STAGES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    per_g = num_m * num_n
    g = pid // per_g
    mt, nt = swizzle_tile(pid % per_g, num_m, num_n, GROUP_M)
    if RAGGED:
        k_hi = tl.minimum(tl.maximum(tl.load(offs_ptr + g), 0), K)
        k_lo = tl.where(g > 0, tl.minimum(tl.maximum(tl.load(offs_ptr + tl.maximum(g - 1, 0)), 0), K), 0)
        k_lo = tl.minimum(k_lo, k_hi)
    else:
        k_lo = g * 0
        k_hi = k_lo + K
    ms = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = ms < M
    nmask = ns < N
    g64 = g.to(tl.int64)
    a_base = a_ptr + g64 * s_ag + ms.to(tl.int64)[:, None] * s_am
    b_base = b_ptr + g64 * s_bg + ns.to(tl.int64)[None, :] * s_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    rs = tl.zeros([BLOCK_M], dtype=ACC)
    if K_FOR:
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
            acc, rs = _ragged_k_step(acc, rs, a_base, b_base, aidx_ptr, bidx_ptr, rscale_ptr, k0, k_hi, mmask, nmask,
                                     s_ak, s_bk, A_GATHER, B_GATHER, ROWSUM, DOT, ACC, BLOCK_K)  # fmt: skip
    else:
        k0 = k_lo
        while k0 < k_hi:
            acc, rs = _ragged_k_step(acc, rs, a_base, b_base, aidx_ptr, bidx_ptr, rscale_ptr, k0, k_hi, mmask, nmask,
                                     s_ak, s_bk, A_GATHER, B_GATHER, ROWSUM, DOT, ACC, BLOCK_K)  # fmt: skip
            k0 += BLOCK_K
    if BIAS:
        acc += tl.load(bias_ptr + g64 * N + ns, mask=nmask, other=0.0).to(ACC)[None, :]
    tl.store(
        out_ptr + g64 * s_og + ms.to(tl.int64)[:, None] * s_om + ns.to(tl.int64)[None, :] * s_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=mmask[:, None] & nmask[None, :],
    )
    if ROWSUM:
        # Only the first N tile of each M tile stores its (identical) row sums.
        tl.store(rs_ptr + g64 * M + ms, rs.to(rs_ptr.dtype.element_ty), mask=ms < tl.where(nt == 0, M, 0))


@triton.jit
def _ragged_k_step(acc, rs, a_base, b_base, aidx_ptr, bidx_ptr, rscale_ptr, k0, k_hi, mmask, nmask, s_ak, s_bk,
                   A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, ROWSUM: tl.constexpr, DOT: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    ks = k0 + tl.arange(0, BLOCK_K)
    kmask = ks < k_hi
    if A_GATHER:  # noqa: SIM108 - a constexpr branch
        ka = tl.load(aidx_ptr + ks, mask=kmask, other=0)
    else:
        ka = ks
    if B_GATHER:  # noqa: SIM108 - a constexpr branch
        kb = tl.load(bidx_ptr + ks, mask=kmask, other=0)
    else:
        kb = ks
    a = tl.load(a_base + ka.to(tl.int64)[None, :] * s_ak, mask=mmask[:, None] & kmask[None, :], other=0.0)
    b = tl.load(b_base + kb.to(tl.int64)[:, None] * s_bk, mask=kmask[:, None] & nmask[None, :], other=0.0)
    acc = mma(acc, a, b, DOT)
    if ROWSUM == 1:
        rs += tl.sum(a.to(ACC), axis=1)
    elif ROWSUM == 2:
        sc = tl.load(rscale_ptr + ks, mask=kmask, other=0.0).to(ACC)
        rs += tl.sum(a.to(ACC) * sc[None, :], axis=1)
    return acc, rs


# --------------------------------------------------------------------------------------
# Host side: tile table, B operands, launchers
# --------------------------------------------------------------------------------------


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def _dot_mode(dtype: torch.dtype, gpu: bool) -> int:
    if dtype == torch.float64:
        return _DOT_FMA
    if dtype in (torch.float16, torch.bfloat16) and gpu:
        return _DOT_NATIVE
    return _DOT_IEEE


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _max_programs(device: torch.device, cfg: TileConfig, dtype: torch.dtype) -> int:
    """Persistent grid size: every SM busy, as many CTAs per SM as the stages' shared memory
    allows (228 KB per SM on an H100, 164 KB on an A100; 200 KB assumed)."""
    if not (device.type == "cuda" and not interpreting()):
        return _INTERP_PROGS
    elt = torch.empty((), dtype=dtype).element_size()
    smem = cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k * elt
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * max(
        1, min(4, 200_000 // max(smem, 1))
    )


@functools.lru_cache(maxsize=1024)
def tile_config(avg_rows: float, n: int, k: int, dtype: torch.dtype, gpu: bool, *, parts: int = 1) -> TileConfig:
    """Tile shape for a grouped GEMM with ``avg_rows`` rows per group (the jagged side),
    ``n`` output columns (per part: the MoE GLU kernel computes ``parts`` = 2 accumulators of
    BLOCK_N columns each), contraction ``k`` and operand dtype. A fixed table (unmeasured
    first choices, to be tuned on an H100), never an autotune sweep."""
    if not gpu:
        # The interpreter: few, small programs (its cost is per numpy op); BLOCK_K = 32 and
        # BLOCK_N = 32 still give multi-step K loops and several N tiles on test shapes.
        bm = 16 if avg_rows <= 16 else 32
        if dtype == torch.float64:
            return TileConfig(16, 16, 16, 2, 4, 1)
        return TileConfig(bm, 32, 32, 2, 4, 1)
    if dtype == torch.float64:
        return TileConfig(32, 32, 8, 1, 4, 2)
    # Register budgets below were checked by compiling for sm_90 offline (triton 3.6,
    # GPUTarget("cuda", 90, 32), ptxas resource usage; no spills): see DESIGN.md.
    if dtype == torch.float32:
        # ieee fp32 runs on the FMA units; 64 x 64 x 32 with 4 warps spilled 464 bytes per
        # thread, 64 x 64 x 16 with 8 warps fits (173 registers).
        bm = 32 if avg_rows <= 32 else 64
        cfg = TileConfig(bm, 64, 16, 1, 8, 3)
    elif avg_rows <= 16:  # decode: one weight stream, 16-row MMA tiles, deep K steps
        cfg = TileConfig(16, 64, 128, 1, 4, 4)
    elif avg_rows <= 32:
        cfg = TileConfig(32, 64, 128, 1, 4, 4)
    elif avg_rows <= 64:
        cfg = TileConfig(64, 128, 64, 1, 4, 4)
    elif avg_rows <= 256:  # DeepSeek-V3 T=4096 (128 rows): one M tile per expert
        cfg = TileConfig(128, 128, 64, 1, 8, 4)
    else:  # compute-bound: wide tiles (255 registers, no spill), weight tiles reused by 8 M tiles from L2
        cfg = TileConfig(128, 256, 64, 8, 8, 3)
    if parts > 1 and dtype != torch.float32:
        # Two accumulators (gate and up) of at most 64 columns each: 128 x 128 x 2 spilled 176
        # bytes per thread with the swiglu_oai epilogue, 128 x 64 x 2 takes 188 registers.
        cfg = cfg._replace(block_n=max(16, min(64, cfg.block_n // parts)))
    bn = max(16, min(cfg.block_n, next_pow2(n)))
    bk = max(16, min(cfg.block_k, next_pow2(k)))
    return cfg._replace(block_n=bn, block_k=bk)


def _split_n_for_sms(cfg: TileConfig, m_tiles: int, n: int, device: torch.device) -> TileConfig:
    """Decode: narrow BLOCK_N (down to 32) until the static tile count covers the SMs."""
    if device.type != "cuda" or interpreting():
        return cfg
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    while cfg.block_n > 32 and m_tiles * cdiv(n, cfg.block_n) < sms:
        cfg = cfg._replace(block_n=cfg.block_n // 2)
    return cfg


class BOperand(NamedTuple):
    """A B operand: element (g, k, n) of part p at tensor + g*s_g + p*s_part + k*s_k + n*s_n;
    ``mode`` says how the kernel loads it (pointer loads or which descriptor view), ``dims`` /
    ``dstrides`` the descriptor's shape after the group axis and its strides."""

    tensor: torch.Tensor
    s_g: int
    s_part: int
    s_k: int
    s_n: int
    mode: int
    dims: tuple[int, int, int]
    dstrides: tuple[int, int, int]


@functools.lru_cache(maxsize=8)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _tma_allowed(t: torch.Tensor, use_tma: bool | None) -> bool:
    if use_tma is False or t.dtype == torch.float64:
        return False
    if t.is_cuda and not interpreting():
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        if use_tma is None and _capability_major(index) < 9:
            return False  # sm80: no TMA
    elif not interpreting():
        return False
    return t.data_ptr() % 16 == 0


def _aligned(*strides: int) -> bool:
    return all(s % 16 == 0 for s in strides)


def b_operand(
    w: torch.Tensor, *, n: int, k: int, s_g: int, s_k: int, s_n: int, parts: int = 1, interleaved: bool = False,
    block_n: int, block_k: int, use_tma: bool | None = None,
) -> BOperand:  # fmt: skip
    """Describe B for the kernels. Plain (parts = 1): element (g, k, n) at w + g*s_g + k*s_k +
    n*s_n. GLU (parts = 2, the MoE w13 [E, 2I, H] with s_n the row stride): gate column c is
    row c (concat) or 2c (interleaved), up column c is row I + c or 2c + 1. Picks a
    descriptor view when the strides allow it (``use_tma`` None: on Hopper and under the
    interpreter; False: never; True: wherever the strides allow, even on sm80)."""
    if parts == 2:
        s_part, s_col = (s_n, 2 * s_n) if interleaved else (n * s_n, s_n)
    else:
        s_part, s_col = 0, s_n
    mode, dims, dstrides = _B_PTR, (1, 1, 1), (0, 0, 0)
    if _tma_allowed(w, use_tma) and n > 0 and k > 0 and block_k >= 16 and block_n >= 16:
        if s_k == 1 and not interleaved and _aligned(s_g, s_col, s_part):
            # [G, PARTS, N, K]: part p, column c is row p*s_part + c*s_col; K contiguous.
            mode, dims, dstrides = _B_KROWS, (parts, n, k), (s_g, s_part if parts == 2 else s_g, s_col)
        elif s_k == 1 and interleaved and _aligned(s_g, s_col, s_part):
            # [G, N, 2, K]: gate and up rows alternate.
            mode, dims, dstrides = _B_KROWS_INTERLEAVED, (n, 2, k), (s_g, s_col, s_part)
        elif s_col == 1 and not interleaved and _aligned(s_g, s_k, s_part):
            # [G, K, PARTS, N]: N contiguous (a transposed view of [G, N, K] storage, read as is).
            mode, dims, dstrides = _B_NROWS, (k, parts, n), (s_g, s_k, s_part if parts == 2 else s_k)
    return BOperand(w, s_g, s_part, s_k, s_col, mode, dims, dstrides)


def _tma_alloc(size: int, alignment: int, stream) -> torch.Tensor:
    device = "cpu" if interpreting() else "cuda"
    return torch.empty(size, dtype=torch.int8, device=device)


def ensure_allocator() -> None:
    """Device-side descriptors need a global scratch buffer per program: install a torch
    allocator unless the caller installed one. Called before every launch that uses a
    descriptor, because triton >= 3.5 keeps the allocator in a ContextVar, which a new thread
    (the autograd engine's device threads) does not inherit."""
    from triton.runtime import _allocation

    cur = _allocation._allocator
    cur = cur.get() if hasattr(cur, "get") else cur
    if isinstance(cur, _allocation.NullAllocator):
        triton.set_allocator(_tma_alloc)


def ragged_m_mm(
    a: torch.Tensor, s_am: int, s_ak: int, b: BOperand, out: torch.Tensor, offs: torch.Tensor, *,
    S: int, n: int, k: int, cfg: TileConfig, gather: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    bias_rows: bool = False, scale: torch.Tensor | None = None, scale_index: torch.Tensor | None = None,
    zero_tail: bool = True, s_om: int | None = None, s_on: int | None = None,
) -> None:  # fmt: skip
    """out[r, :n] = A[row(r)] @ B[g(r)] (+ bias) (* scale[scale_index[r]]) for every row r of
    a group; rows past offs[-1] are zeros (``zero_tail``) or left alone. A row r is
    ``a + row(r)*s_am + kk*s_ak`` with row(r) = gather[r] or r. ``bias`` [G, n] (or [S] with
    ``bias_rows``) in out's dtype."""
    G = offs.numel()
    gpu = on_gpu(a)
    dot = _dot_mode(a.dtype, gpu)
    num_n = cdiv(n, cfg.block_n)
    bound = (cdiv(S, cfg.block_m) + G + 1) * num_n
    progs = max(1, min(bound, _max_programs(a.device, cfg, a.dtype)))
    if b.mode != _B_PTR:
        ensure_allocator()
    som = out.stride(0) if s_om is None else s_om
    son = out.stride(1) if s_on is None else s_on
    dummy = offs
    _ragged_m_kernel[(progs,)](
        a, b.tensor, out,
        bias if bias is not None else out, scale if scale is not None else out, offs,
        gather if gather is not None else dummy, scale_index if scale_index is not None else dummy,
        S, n, k, G, s_am, s_ak, b.s_g, b.s_k, b.s_n, som, son,
        bias.stride(0) if (bias is not None and not bias_rows) else 0,
        *b.dims, *b.dstrides, progs,
        A_GATHER=gather is not None, BIAS=0 if bias is None else (2 if bias_rows else 1), SCALE=scale is not None,
        ZERO_TAIL=zero_tail, B_DESC=b.mode, DOT=dot, ACC=_acc(a.dtype), K_FOR=gpu, STAGES=cfg.num_stages,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_G=min(_BLOCK_G, next_pow2(max(G, 1))),
        GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
    )  # fmt: skip


def ragged_k_mm(
    a: torch.Tensor, a_strides: tuple[int, int, int], b: torch.Tensor, b_strides: tuple[int, int, int],
    out: torch.Tensor, *, G: int, M: int, N: int, K: int, cfg: TileConfig, offs: torch.Tensor | None = None,
    a_gather: torch.Tensor | None = None, b_gather: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    rowsum: torch.Tensor | None = None, rowsum_scale: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """out[g] = A_g @ B_g over K range [offs[g-1], offs[g]) (``offs`` given) or [0, K), with
    A_g element (m, kk) at a + g*sa_g + m*sa_m + row_a(kk)*sa_k (row_a = a_gather or identity)
    and B_g element (kk, n) at b + g*sb_g + row_b(kk)*sb_k + n*sb_n; ``out`` [G, M, N] any
    strides; ``bias`` [G, N] contiguous in out's dtype; ``rowsum`` [G, M] contiguous receives
    sum_kk A_g(m, kk) (* rowsum_scale[kk])."""
    gpu = on_gpu(a)
    grid = G * cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n)
    if grid == 0:
        return
    dummy = out
    idx_dummy = offs if offs is not None else torch.empty(1, dtype=torch.int32, device=a.device)
    _ragged_k_kernel[(grid,)](
        a, b, out, bias if bias is not None else dummy, idx_dummy,
        a_gather if a_gather is not None else idx_dummy, b_gather if b_gather is not None else idx_dummy,
        rowsum if rowsum is not None else dummy, rowsum_scale if rowsum_scale is not None else dummy,
        M, N, K, *a_strides, *b_strides, *out.stride(),
        RAGGED=offs is not None, A_GATHER=a_gather is not None, B_GATHER=b_gather is not None, BIAS=bias is not None,
        ROWSUM=0 if rowsum is None else (2 if rowsum_scale is not None else 1), DOT=_dot_mode(a.dtype, gpu),
        ACC=_acc(a.dtype), K_FOR=gpu, STAGES=cfg.num_stages, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# grouped_mm's triton backend
# --------------------------------------------------------------------------------------


def grouped_mm_plan(
    a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None, layout: str, *, use_tma: bool | None = None
) -> dict:
    """What ``grouped_mm_triton`` will launch for these operands: the kernel, its tile config
    and, for the ragged-M layouts, how B is loaded (tests and benchmarks read it)."""
    gpu = on_gpu(a)
    if layout in ("2d3d", "3d2d"):
        if layout == "2d3d":
            S, K = a.shape
            N = b.shape[2]
            G = b.shape[0]
            bt, sg, sk, sn = b, b.stride(0), b.stride(1), b.stride(2)
        else:  # out^T [S, M] = b^T [S, K] @ a[g]^T [K, M]
            G, N, K = a.shape
            S = b.shape[1]
            bt, sg, sk, sn = a, a.stride(0), a.stride(2), a.stride(1)
        cfg = tile_config(S / max(G, 1), N, K, a.dtype, gpu)
        cfg = _split_n_for_sms(cfg, cdiv(S, cfg.block_m) + G, N, a.device)
        bop = b_operand(bt, n=N, k=K, s_g=sg, s_k=sk, s_n=sn, block_n=cfg.block_n, block_k=cfg.block_k, use_tma=use_tma)
        return {"kernel": "ragged_m", "config": cfg, "b_mode": bop.mode, "b": bop, "S": S, "N": N, "K": K}
    if layout == "2d2d":
        M, S = a.shape
        N = b.shape[1]
        G = offs.numel()
        cfg = tile_config(max(M, N), N, S / max(G, 1), a.dtype, gpu)
        return {"kernel": "ragged_k", "config": cfg, "b_mode": _B_PTR, "G": G, "M": M, "N": N, "K": S}
    G, M, K = a.shape
    N = b.shape[2]
    cfg = tile_config(M, N, K, a.dtype, gpu)
    return {"kernel": "ragged_k", "config": cfg, "b_mode": _B_PTR, "G": G, "M": M, "N": N, "K": K}


def grouped_mm_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    offs: torch.Tensor | None,
    bias: torch.Tensor | None,
    layout: str,
    out: torch.Tensor,
    *,
    use_tma: bool | None = None,
) -> None:
    """Fill ``out`` with grouped_mm(a, b, offs, bias) (the op layer's contract: checked
    operands of any strides, offs contiguous int32, bias contiguous in out's dtype, out
    contiguous with the layout's shape, out.numel() > 0)."""
    assert out.is_contiguous() and out.numel() > 0
    plan = grouped_mm_plan(a, b, offs, layout, use_tma=use_tma)
    cfg = plan["config"]
    if layout == "2d3d":
        ragged_m_mm(a, a.stride(0), a.stride(1), plan["b"], out, offs, S=plan["S"], n=plan["N"], k=plan["K"],
                    cfg=cfg, bias=bias)  # fmt: skip
    elif layout == "3d2d":
        # out [M, S] written as out^T [S, M]: rows of out^T are out's columns.
        ragged_m_mm(b, b.stride(1), b.stride(0), plan["b"], out, offs, S=plan["S"], n=plan["N"], k=plan["K"],
                    cfg=cfg, bias=bias, bias_rows=True, s_om=out.stride(1), s_on=out.stride(0))  # fmt: skip
    elif layout == "2d2d":
        ragged_k_mm(a, (0, a.stride(0), a.stride(1)), b, (0, b.stride(0), b.stride(1)), out, G=plan["G"],
                    M=plan["M"], N=plan["N"], K=plan["K"], cfg=cfg, offs=offs, bias=bias)  # fmt: skip
    else:
        ragged_k_mm(a, tuple(a.stride()), b, tuple(b.stride()), out, G=plan["G"], M=plan["M"], N=plan["N"],
                    K=plan["K"], cfg=cfg, bias=bias)  # fmt: skip
