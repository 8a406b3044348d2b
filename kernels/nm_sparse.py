"""Triton kernels for N:M structured sparsity: ``nm_linear_triton`` and ``nm_compress_triton``.

Format (NM_FORMAT, fixed): a dense weight W [out, in] keeps n of every m consecutive values
along ``in``; ``values`` [out, KEPT] (KEPT = in // m * n) holds group g's kept values at
[g*n, g*n + n) in increasing position order; ``meta`` uint8 [out, MB], MB = ceil(KEPT * b / 8),
packs each kept value's position p in [0, m) in b = 1, 2, 4, 4 bits (m = 2, 4, 8, 16): value j
at byte (j*b) // 8, bit (j*b) % 8; its dense column is (j // n) * m + p.

nm_linear (y = x2d @ decompress(values, meta)^T + bias, fp32 accumulation, fp64 for fp64):

* ``gather`` path (small R: decode, the memory-bound regime). One program per (block of
  BLOCK_O output rows, block of BLOCK_R input rows). It streams the compressed row of
  values (contiguous loads along the kept axis) and the meta bytes, decodes each kept value's
  dense column in registers, gathers x at those columns (x is a few KB, cache resident) and
  accumulates ``sum_j x[r, col(o, j)] * values[o, j]``. Only compressed bytes come from memory:
  2:4 bf16 reads 0.5625x the dense weight bytes, 1:4 0.28x.
* ``tile`` path (any R, the one for large R). One program per (BLOCK_R x BLOCK_O) output tile;
  per K tile of BLOCK_G groups (BLOCK_G * m dense columns) it loads the compressed [BLOCK_O,
  BLOCK_G, n] values and their positions, expands them to the dense [BLOCK_O, BLOCK_G * m]
  tile in registers (a select over the n slots of each group) and feeds ``tl.dot`` with the
  dense x tile. On a GPU fp16 / bf16 operands go to the tensor cores in their dtype with an
  fp32 accumulator; fp32 uses ``input_precision="ieee"`` (exact, no tf32), and so do fp16 /
  bf16 under the interpreter (its bf16 ``tl.dot`` is silently wrong: DESIGN.md); fp64 takes a
  broadcast multiply-sum (triton 3.4's interpreter has no fp64 ``tl.dot``).

nm_compress (fused prune + compress: mask, values and meta in one pass over w): one program
per (block of rows, block of "super-blocks"). A super-block is the smallest run of whole groups
that fills whole meta bytes: L = lcm(n, 8 / b) kept values = L / n groups = L * b / 8 bytes
(2:4: 2 groups -> 1 byte; 4:8: 1 group -> 2 bytes; 3:4: 4 groups -> 3 bytes), so programs
write disjoint bytes and need no atomics. Each element's rank in its group is the number of
group members that rank before it (larger score first; ties to the lower index; a NaN score
above every number, as torch.topk); it is kept when its rank is < n. A kept element's slot
is the number of kept members before it; its value goes to values[g*n + slot] and its
position's bits are summed (they never overlap) into its byte.

Interpreter rules (kernels/_common.py): loads widen fp16 / bf16 to fp32 at once, loops over
runtime bounds are ``while`` loops, masks are tensor comparisons combined with ``&``, one
launch config (no autotune). Block sizes are unmeasured first choices (no GPU was available
when this was written); the launch tables below are the place to tune them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_pow2, on_gpu

__all__ = ["nm_linear_triton", "nm_compress_triton", "meta_bits"]

_BITS = {2: 1, 4: 2, 8: 4, 16: 4}
# Largest R served by the gather path when the caller does not choose (unmeasured threshold:
# there every x row costs one extra gather per kept value, the tile path a dense expansion
# amortised over its BLOCK_R rows).
_GATHER_MAX_ROWS = 8


def meta_bits(m: int) -> int:
    """Bits per stored position for group size m (1, 2, 4, 4 for m = 2, 4, 8, 16)."""
    return _BITS[m]


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# --------------------------------------------------------------------------------------
# nm_linear
# --------------------------------------------------------------------------------------


@triton.jit
def _nm_linear_gather_kernel(
    x_ptr,  # [R, K] contiguous
    v_ptr,  # [NO, KEPT] contiguous, x's dtype
    meta_ptr,  # [NO, MB] uint8 contiguous
    bias_ptr,  # [NO] or a dummy when not HAS_BIAS
    out_ptr,  # [R, NO] contiguous, x's dtype
    R,
    NO,
    K,
    KEPT,
    MB,
    num_o_blocks,
    N: tl.constexpr,
    M: tl.constexpr,
    B: tl.constexpr,  # bits per position
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_r = pid // num_o_blocks
    pid_o = pid % num_o_blocks
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_in = offs_o < NO
    r_in = offs_r < R
    o64 = offs_o.to(tl.int64)
    r64 = offs_r.to(tl.int64)
    offs_j = tl.arange(0, BLOCK_J)
    acc = tl.zeros([BLOCK_R, BLOCK_O], dtype=ACC)
    j0 = 0
    while j0 < KEPT:
        j = j0 + offs_j
        lm = o_in[:, None] & (j < KEPT)[None, :]  # [BO, BJ]
        v = tl.load(v_ptr + o64[:, None] * KEPT + j[None, :], mask=lm, other=0.0).to(ACC)
        bit = j * B
        byte = tl.load(meta_ptr + o64[:, None] * MB + (bit >> 3)[None, :], mask=lm, other=0).to(tl.int32)
        pos = (byte >> (bit & 7)[None, :]) & ((1 << B) - 1)
        col = (j // N)[None, :] * M + pos  # dense column of every kept value, [BO, BJ]
        xg = tl.load(
            x_ptr + r64[:, None, None] * K + col[None, :, :],
            mask=r_in[:, None, None] & lm[None, :, :],
            other=0.0,
        ).to(ACC)
        acc += tl.sum(xg * v[None, :, :], axis=2)
        j0 += BLOCK_J
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=o_in, other=0.0).to(ACC)[None, :]
    tl.store(
        out_ptr + r64[:, None] * NO + o64[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=r_in[:, None] & o_in[None, :],
    )


@triton.jit
def _nm_linear_tile_kernel(
    x_ptr,  # [R, K] contiguous
    v_ptr,  # [NO, KEPT] contiguous
    meta_ptr,  # [NO, MB] uint8 contiguous
    bias_ptr,
    out_ptr,  # [R, NO] contiguous
    R,
    NO,
    K,
    G,  # groups per row, K // M
    KEPT,
    MB,
    num_o_blocks,
    N: tl.constexpr,
    NP: tl.constexpr,  # next_pow2(N)
    M: tl.constexpr,
    B: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    DOT_NATIVE: tl.constexpr,  # fp16 / bf16 operands in their dtype (GPU tensor cores)
    USE_DOT: tl.constexpr,  # False for fp64: a broadcast multiply-sum instead of tl.dot
    BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    BLOCK_K: tl.constexpr = BLOCK_G * M
    pid = tl.program_id(0)
    pid_r = pid // num_o_blocks
    pid_o = pid % num_o_blocks
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_in = offs_o < NO
    r_in = offs_r < R
    o64 = offs_o.to(tl.int64)
    r64 = offs_r.to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, NP)
    offs_p = tl.arange(0, M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_R, BLOCK_O], dtype=ACC)
    g0 = 0
    while g0 < G:
        g = g0 + offs_g
        j = g[:, None] * N + offs_s[None, :]  # [BG, NP] kept index
        ok = o_in[:, None, None] & ((g < G)[:, None] & (offs_s < N)[None, :])[None, :, :]  # [BO, BG, NP]
        v = tl.load(v_ptr + o64[:, None, None] * KEPT + j[None, :, :], mask=ok, other=0.0)
        if not DOT_NATIVE:
            v = v.to(ACC)
        bit = j * B
        byte = tl.load(meta_ptr + o64[:, None, None] * MB + (bit >> 3)[None, :, :], mask=ok, other=0).to(tl.int32)
        pos = (byte >> (bit & 7)[None, :, :]) & ((1 << B) - 1)  # [BO, BG, NP]
        # Expand: dense[o, g, p] = the value of the slot whose position is p (0 if none).
        hit = pos[:, :, :, None] == offs_p[None, None, None, :]  # [BO, BG, NP, M]
        dense = tl.sum(tl.where(hit, v[:, :, :, None], 0.0), axis=2)  # [BO, BG, M]
        w_tile = tl.reshape(dense, [BLOCK_O, BLOCK_K])
        cols = g0 * M + offs_k
        x_tile = tl.load(
            x_ptr + r64[:, None] * K + cols[None, :],
            mask=r_in[:, None] & (cols < K)[None, :],
            other=0.0,
        )
        if DOT_NATIVE:
            acc = tl.dot(x_tile, tl.trans(w_tile.to(x_tile.dtype)), acc, out_dtype=ACC)
        elif USE_DOT:
            acc = tl.dot(x_tile.to(ACC), tl.trans(w_tile), acc, input_precision="ieee", out_dtype=ACC)
        else:
            acc += tl.sum(x_tile.to(ACC)[:, None, :] * w_tile[None, :, :], axis=2)
        g0 += BLOCK_G
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=o_in, other=0.0).to(ACC)[None, :]
    tl.store(
        out_ptr + r64[:, None] * NO + o64[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=r_in[:, None] & o_in[None, :],
    )


def _gather_config(R: int, NO: int, gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_O, BLOCK_J) of the gather path; BLOCK_R * BLOCK_O * BLOCK_J elements live
    per K step."""
    block_r = min(next_pow2(R), 16)
    if gpu:
        block_o = 16  # 4096 outputs -> 256 programs: enough to stream from every SM
        block_j = max(16, 512 // block_r)
    else:  # the interpreter runs programs one by one: few, large ones
        block_o = min(next_pow2(NO), 64)
        block_j = 64
    return block_r, block_o, block_j


def _tile_config(R: int, NO: int, m: int, gpu: bool, use_dot: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_O, BLOCK_G) of the tile path; tl.dot needs every side >= 16."""
    if not use_dot:  # fp64: the broadcast product [BLOCK_R, BLOCK_O, BLOCK_K] lives per K step
        block_r, block_o, block_k = 16, 16, 16
    elif gpu:
        block_r = 16 if R <= 16 else (64 if R <= 64 else 128)
        block_o = 64
        block_k = 64
    else:
        block_r = max(16, min(next_pow2(R), 64))
        block_o = max(16, min(next_pow2(NO), 64))
        block_k = 32
    return block_r, block_o, max(1, block_k // m)


def nm_linear_triton(
    x2d: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    n: int,
    m: int,
    *,
    path: str | None = None,
) -> None:
    """out [R, NO] = x2d [R, K] @ decompress(values [NO, KEPT], meta [NO, MB])^T + bias [NO].

    NM_FORMAT's kernel contract: contiguous inputs of one dtype (fp32 / fp16 / bf16 / fp64),
    meta uint8, out preallocated in x2d's dtype; the op layer has validated every shape.
    Products are accumulated in fp32 (fp64 for fp64). ``path``: "gather" (small R), "tile"
    (tl.dot), or None (gather for R <= 8, else tile).
    """
    R, K = x2d.shape
    NO, kept = values.shape
    assert m in _BITS and 1 <= n < m and K % m == 0 and kept == K // m * n
    b = _BITS[m]
    mb = (kept * b + 7) // 8
    assert tuple(meta.shape) == (NO, mb) and meta.dtype == torch.uint8
    assert tuple(out.shape) == (R, NO) and out.dtype == x2d.dtype == values.dtype
    assert x2d.is_contiguous() and values.is_contiguous() and meta.is_contiguous() and out.is_contiguous()
    assert bias is None or (bias.is_contiguous() and tuple(bias.shape) == (NO,))
    if R == 0 or NO == 0:
        return
    if K == 0:
        if bias is None:
            out.zero_()
        else:
            out.copy_(bias.expand(R, NO))
        return
    gpu = on_gpu(x2d)
    # Off the GPU (the interpreter) the kernel writes fp32 and torch rounds to bf16 / fp16: the
    # interpreter's own fp32 -> bf16 store doubled the rounding error in the op tests.
    final = out
    if not gpu and out.dtype in (torch.float16, torch.bfloat16):
        out = torch.empty(out.shape, dtype=torch.float32)
    if path is None:
        path = "gather" if R <= _GATHER_MAX_ROWS else "tile"
    acc = _acc_dtype(x2d.dtype)
    bias_arg = bias if bias is not None else values
    if path == "gather":
        block_r, block_o, block_j = _gather_config(R, NO, gpu)
        nob = cdiv(NO, block_o)
        _nm_linear_gather_kernel[(nob * cdiv(R, block_r),)](
            x2d,
            values,
            meta,
            bias_arg,
            out,
            R,
            NO,
            K,
            kept,
            mb,
            nob,
            N=n,
            M=m,
            B=b,
            HAS_BIAS=bias is not None,
            ACC=acc,
            BLOCK_R=block_r,
            BLOCK_O=block_o,
            BLOCK_J=block_j,
        )
    elif path == "tile":
        # fp64 (gradcheck) multiplies without tl.dot: triton 3.4's interpreter has none for fp64.
        use_dot = x2d.dtype != torch.float64
        block_r, block_o, block_g = _tile_config(R, NO, m, gpu, use_dot)
        nob = cdiv(NO, block_o)
        native = gpu and x2d.dtype in (torch.float16, torch.bfloat16)
        _nm_linear_tile_kernel[(nob * cdiv(R, block_r),)](
            x2d,
            values,
            meta,
            bias_arg,
            out,
            R,
            NO,
            K,
            K // m,
            kept,
            mb,
            nob,
            N=n,
            NP=next_pow2(n),
            M=m,
            B=b,
            HAS_BIAS=bias is not None,
            ACC=acc,
            DOT_NATIVE=native,
            USE_DOT=use_dot,
            BLOCK_R=block_r,
            BLOCK_O=block_o,
            BLOCK_G=block_g,
        )
    else:
        raise ValueError(f"path must be 'gather', 'tile' or None, got {path!r}")
    if final is not out:
        final.copy_(out)


# --------------------------------------------------------------------------------------
# nm_compress
# --------------------------------------------------------------------------------------


@triton.jit
def _nm_compress_kernel(
    w_ptr,  # [NO, K] contiguous
    s_ptr,  # [NO, K] scores (HAS_SCORES) or a dummy
    v_ptr,  # [NO, KEPT] out, w's dtype (HAS_COMPRESSED) or a dummy
    meta_ptr,  # [NO, MB] uint8 out (HAS_COMPRESSED) or a dummy
    mask_ptr,  # [NO, K] uint8 view of the bool mask (HAS_MASK) or a dummy
    NO,
    K,
    G,
    KEPT,
    MB,
    num_sb_blocks,
    N: tl.constexpr,
    M: tl.constexpr,
    B: tl.constexpr,
    VPB: tl.constexpr,  # positions per byte, 8 // B
    GS: tl.constexpr,  # groups per super-block
    GSP: tl.constexpr,  # next_pow2(GS)
    BS: tl.constexpr,  # bytes per super-block
    BSP: tl.constexpr,  # next_pow2(BS)
    HAS_SCORES: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_COMPRESSED: tl.constexpr,  # values and meta wanted (nm_mask wants the mask only)
    KEY: tl.constexpr,  # dtype the ranking compares in (fp32, fp64 for fp64 keys)
    BLOCK_O: tl.constexpr,
    BLOCK_SB: tl.constexpr,
):
    NG: tl.constexpr = BLOCK_SB * GSP  # group slots per program (GSP per super-block)
    pid = tl.program_id(0)
    pid_o = pid // num_sb_blocks
    pid_s = pid % num_sb_blocks
    rows = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    r_in = rows < NO
    r64 = rows.to(tl.int64)
    ng = tl.arange(0, NG)
    gs = ng % GSP  # group within its super-block
    g = (pid_s * BLOCK_SB + ng // GSP) * GS + gs
    g_ok = (gs < GS) & (g < G)
    p = tl.arange(0, M)
    col = g[:, None] * M + p[None, :]  # [NG, M]
    ok = r_in[:, None, None] & (g_ok[:, None] & (p < M)[None, :])[None, :, :]  # [BO, NG, M]
    off = r64[:, None, None] * K + col[None, :, :]
    w = tl.load(w_ptr + off, mask=ok, other=0.0)
    if HAS_SCORES:  # noqa: SIM108 - a constexpr branch
        key = tl.load(s_ptr + off, mask=ok, other=0.0).to(KEY)
    else:
        key = tl.abs(w.to(KEY))
    # Rank of element i in its group: how many members q rank before it.
    ki = key[:, :, :, None]
    kq = key[:, :, None, :]
    nan_i = ki != ki
    nan_q = kq != kq
    qi = p[None, None, None, :] < p[None, None, :, None]  # q < i, [1, 1, M(i), M(q)]
    before = (nan_q & (ki == ki)) | (kq > ki) | (((kq == ki) | (nan_q & nan_i)) & qi)
    rank = tl.sum(before.to(tl.int32), axis=3)  # [BO, NG, M]
    kept = (rank < N) & ok
    if HAS_MASK:
        tl.store(mask_ptr + off, kept.to(tl.uint8), mask=ok)
    if HAS_COMPRESSED:  # values in position order and their meta bytes (nm_mask skips them)
        slot = tl.sum((kept[:, :, None, :] & qi).to(tl.int32), axis=3)  # kept members before i
        j = g[None, :, None] * N + slot  # kept index in the row
        tl.store(v_ptr + r64[:, None, None] * KEPT + j, w, mask=kept)
        # meta: byte kb = jl // VPB of the super-block, bits (jl % VPB) * B, jl = gs * N + slot.
        jl = gs[None, :, None] * N + slot
        contrib = tl.where(kept, p[None, None, :] << ((jl % VPB) * B), 0)
        kb = tl.where(kept, jl // VPB, BSP)
        contrib3 = tl.reshape(contrib, [BLOCK_O, BLOCK_SB, GSP * M])
        kb3 = tl.reshape(kb, [BLOCK_O, BLOCK_SB, GSP * M])
        offs_b = tl.arange(0, BSP)
        sel = kb3[:, :, None, :] == offs_b[None, None, :, None]  # [BO, BSB, BSP, GSP*M]
        byte = tl.sum(tl.where(sel, contrib3[:, :, None, :], 0), axis=3)  # [BO, BSB, BSP]
        sb = pid_s * BLOCK_SB + tl.arange(0, BLOCK_SB)
        bidx = sb[:, None] * BS + offs_b[None, :]  # [BSB, BSP]
        bok = r_in[:, None, None] & ((offs_b < BS)[None, :] & (bidx < MB))[None, :, :]
        tl.store(meta_ptr + r64[:, None, None] * MB + bidx[None, :, :], byte.to(tl.uint8), mask=bok)


def _super_block(n: int, m: int) -> tuple[int, int, int]:
    """(values per byte, groups per super-block, bytes per super-block) for n:m."""
    vpb = 8 // _BITS[m]
    span = n * vpb // math.gcd(n, vpb)  # lcm(n, vpb) kept values
    return vpb, span // n, span // vpb


def nm_compress_triton(
    w: torch.Tensor,
    scores: torch.Tensor | None,
    n: int,
    m: int,
    values_out: torch.Tensor,
    meta_out: torch.Tensor,
    mask_out: torch.Tensor | None,
) -> None:
    """Fused prune + compress of w [NO, K]: the n best of every group of m by ``scores`` (same
    shape, any float dtype; None = |w|), larger first, ties to the lower index, NaN above every
    number. Writes values_out [NO, KEPT] (w's dtype), meta_out uint8 [NO, MB] and, when given,
    mask_out bool [NO, K] (exactly n True per group); values_out and meta_out both None:
    the mask only (nm_mask). Contract: contiguous tensors, shapes already checked by the op
    layer."""
    NO, K = w.shape
    assert m in _BITS and 1 <= n < m and K % m == 0
    G = K // m
    kept = G * n
    b = _BITS[m]
    mb = (kept * b + 7) // 8
    compressed = values_out is not None
    assert (meta_out is not None) == compressed and (compressed or mask_out is not None)
    assert w.is_contiguous() and (not compressed or (values_out.is_contiguous() and meta_out.is_contiguous()))
    assert not compressed or (tuple(values_out.shape) == (NO, kept) and values_out.dtype == w.dtype)
    assert not compressed or (tuple(meta_out.shape) == (NO, mb) and meta_out.dtype == torch.uint8)
    assert scores is None or (scores.is_contiguous() and scores.shape == w.shape)
    assert mask_out is None or (mask_out.is_contiguous() and mask_out.shape == w.shape)
    if NO == 0 or K == 0:
        return
    vpb, gs, bs = _super_block(n, m)
    gsp, bsp = next_pow2(gs), next_pow2(bs)
    nsb = cdiv(G, gs)
    key_fp64 = (scores if scores is not None else w).dtype == torch.float64
    # Budget of the [BLOCK_O, BLOCK_SB * GSP, m, m] rank comparison per program.
    gpu = on_gpu(w)
    budget = 8192 if gpu else 65536
    per_row_sb = gsp * m * m
    block_sb = max(1, min(next_pow2(nsb), budget // per_row_sb))
    block_o = 1 if gpu else max(1, min(next_pow2(NO), budget // (per_row_sb * block_sb)))
    nsbb = cdiv(nsb, block_sb)
    mask_arg = mask_out.view(torch.uint8) if mask_out is not None else meta_out
    _nm_compress_kernel[(cdiv(NO, block_o) * nsbb,)](
        w,
        scores if scores is not None else w,
        values_out if compressed else w,
        meta_out if compressed else mask_arg,
        mask_arg,
        NO,
        K,
        G,
        kept,
        mb,
        nsbb,
        N=n,
        M=m,
        B=b,
        VPB=vpb,
        GS=gs,
        GSP=gsp,
        BS=bs,
        BSP=bsp,
        HAS_SCORES=scores is not None,
        HAS_MASK=mask_out is not None,
        HAS_COMPRESSED=compressed,
        KEY=tl.float64 if key_fp64 else tl.float32,
        BLOCK_O=block_o,
        BLOCK_SB=block_sb,
    )
