"""Triton kernels of the fused MoE expert layer: the ``triton`` backend of ``moe_mlp`` (forward)
and of its backward op ``moe_mlp_backward``.

Semantics: ``sparseops.reference.moe`` (the specification) and the C++ op's contract
(csrc/ops/moe.cpp): the forward returns y [T, H] and the slot-major pre-activation
pre [T*k, P] (P = 2I gated, I otherwise; zero rows for dropped slots); the backward reads x,
pre and the routing (metadata recomputed from ids: one launch), never T*k*H copies of x.

Every GEMM runs over the expert-sorted slots of ``route_metadata`` (stable counting sort:
``offs`` [E] cumulative ends, ``sorted_slots``, ``tokens`` = slot // k, ``inverse``), with the
ragged-M / ragged-K machinery of kernels/grouped_mm.py (tiles inside one expert, ``offs`` read
on the device, static persistent grids: no host sync, CUDA-graph capturable at fixed T).

Forward (4 launches after the metadata):
1. ``_moe_up_kernel`` (GEMM-1): sorted row r reads x[tokens[r]] inside its A loads (the
   permuted copy of x is never written) against w13[e]; gated activations keep two
   accumulators (gate and up columns c of the same tile, in either gate/up layout), so the
   epilogue adds b13, rounds to x's dtype, stores the pre-activation at the slot's row of
   ``pre`` and the activation h [sorted row, I]. Rows of dropped slots (past offs[-1]) get
   zero pre rows.
2. GEMM-2 (``ragged_m_mm`` of kernels/grouped_mm.py): h @ w2[e]^T, epilogue + b2 and times the
   routing weight of the row's slot, into a [T*k, H] buffer in sorted order (x's dtype; fp32
   for fp32, fp64 for fp64).
3. ``_moe_combine_kernel``: y[t] = sum over j of that buffer's row inverse[t*k + j] for kept
   slots, in slot order at fp32 (fp64): deterministic, no atomics.

Backward (6 launches after the metadata; SonicMoE's decomposition, ANCHORS.md section 1):
1. ``_moe_dh_kernel``: dA = dy[tokens[r]] @ w2[e] (dy gathered per slot in the A loads); its
   epilogue re-reads the slot's pre-activation, recomputes h = act(z), writes dz = the
   activation backward of (weight * dA) in w13's column order, hw = weight * h (what dW2
   reads) and per-(row, N tile) partial sums of dA . h (the routing-weight gradient without
   b2; reduced in a fixed order by kernel 6), and the row's weight in sorted order.
2. dW2[e] = sum_r dy[tokens[r]]^T hw[r] (ragged-K ``ragged_k_mm`` with the gather on K), with
   db2[e] = sum_r weight_r dy[tokens[r]] as the row sum of the same A tiles.
3. dW13[e] = sum_r dz[r]^T x[tokens[r]] (ragged-K, B gathered), db13[e] = sum_r dz[r].
4. dx_slot = dz @ w13[e] (ragged-M ``ragged_m_mm``) into a [T*k, H] buffer in sorted order;
5. ``_moe_combine_kernel`` again: dx[t] = sum_j of its slots' rows (deterministic).
6. ``_moe_dweights_kernel``: dweights[t, j] = sum of the slot's partials (fixed order)
   + <dy[t], b2[e]>.

Why this meets the H100 targets (Qwen3-30B-A3B T = 16384: forward <= 2.6 ms, fwd+bwd <= 8 ms;
not yet measured): the layer is 3 GEMMs forward and 5 backward, each reading its operands
once with the activation, bias, routing weight, gathers and reductions fused into loads and
epilogues, so the extra traffic over the GEMMs' own is the [T*k, H] slot buffers (one write,
one read each: ~0.35 ms forward at 3 TB/s for Qwen3 in bf16) and the metadata (~0.1 ms).
The GEMMs use kernels/grouped_mm.py's tiles (TMA weight loads on Hopper, persistent grids,
group-major tile order, wide tiles for the 1024-row experts of this shape).

The activation formulas are those of csrc/include/sparseops/moe.h (shared by the CPU and CUDA
kernels) and the reference; activation codes follow its ``MoeActivation`` enum.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import cdiv, f64_bits, f64_from_bits, next_pow2, on_gpu
from .grouped_mm import (
    _BLOCK_G,
    _acc,
    _dot_mode,
    _max_programs,
    _split_n_for_sms,
    b_operand,
    ensure_allocator,
    mainloop,
    make_b_desc,
    ragged_count,
    ragged_k_mm,
    ragged_m_mm,
    ragged_tile,
    swizzle_tile,
    tile_config,
)

__all__ = ["ACTIVATION_CODES", "moe_mlp_triton", "moe_mlp_backward_triton", "moe_plan"]

# MoeActivation (csrc/include/sparseops/moe.h): 0-4 gated, 5-9 plain.
ACTIVATION_CODES = {
    "swiglu": 0,
    "geglu": 1,
    "geglu_tanh": 2,
    "reglu": 3,
    "swiglu_oai": 4,
    "silu": 5,
    "gelu": 6,
    "gelu_tanh": 7,
    "relu": 8,
    "relu2": 9,
}


# --------------------------------------------------------------------------------------
# Activations and their derivatives (the formulas of sparseops/moe.h), at ACC precision
# --------------------------------------------------------------------------------------


@triton.jit
def act_fwd(g, u, alpha, limit, ACT: tl.constexpr):
    """act(gate g, up u) for the gated activations (ACT 0-4), act(g) for the others (u
    unused). One helper without nested calls: the interpreter pays per jit call.
    tanh(v) = 2 sigmoid(2v) - 1 (tl has no tanh that runs both compiled and interpreted)."""
    if ACT == 0 or ACT == 5:  # silu
        r = g / (1.0 + tl.exp(-g))
    elif ACT == 1 or ACT == 6:  # gelu (erf)
        r = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACT == 2 or ACT == 7:  # gelu_tanh
        t = 2.0 / (1.0 + tl.exp(-1.5957691216057308 * (g + 0.044715 * g * g * g))) - 1.0
        r = 0.5 * g * (1.0 + t)
    elif ACT == 3 or ACT == 8:  # relu
        r = tl.where(g > 0, g, 0.0)
    elif ACT == 9:  # relu2
        r = tl.where(g > 0, g * g, 0.0)
    else:  # swiglu_oai: gate.clamp(max=limit), up.clamp(-limit, limit), (up + 1) gate sigmoid(alpha gate)
        gc = tl.minimum(g, limit)
        uc = tl.maximum(tl.minimum(u, limit), -limit)
        r = (uc + 1.0) * (gc / (1.0 + tl.exp(-gc * alpha)))
    if ACT <= 3:
        r = r * u
    return r


@triton.jit
def act_bwd(g, u, da, alpha, limit, ACT: tl.constexpr):
    """(d gate, d up) of ``act_fwd`` for the incoming gradient da (d up = 0 for the plain
    activations); the formulas of sparseops/moe.h."""
    if ACT == 0 or ACT == 5:
        s = 1.0 / (1.0 + tl.exp(-g))
        f = g * s
        d = s * (1.0 + g * (1.0 - s))
    elif ACT == 1 or ACT == 6:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        f = g * cdf
        d = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    elif ACT == 2 or ACT == 7:
        t = 2.0 / (1.0 + tl.exp(-1.5957691216057308 * (g + 0.044715 * g * g * g))) - 1.0
        f = 0.5 * g * (1.0 + t)
        d = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    elif ACT == 3 or ACT == 8:
        f = tl.where(g > 0, g, 0.0)
        d = tl.where(g > 0, 1.0, 0.0)
    elif ACT == 9:
        f = tl.where(g > 0, g * g, 0.0)
        d = tl.where(g > 0, 2.0 * g, 0.0)
    else:
        f = g  # unused
        d = g  # unused
    if ACT == 4:  # swiglu_oai; the clamps pass the gradient inside their bounds (as torch's)
        gc = tl.minimum(g, limit)
        uc = tl.maximum(tl.minimum(u, limit), -limit)
        s = 1.0 / (1.0 + tl.exp(-gc * alpha))
        dg = tl.where(g <= limit, da * (uc + 1.0) * (s + alpha * gc * s * (1.0 - s)), 0.0)
        du = tl.where((u >= -limit) & (u <= limit), da * gc * s, 0.0)
    elif ACT <= 3:
        dg = da * u * d
        du = da * f
    else:
        dg = da * d
        du = da * 0.0
    return dg, du


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _moe_up_kernel(
    x_ptr,  # [T, H], row stride s_xm, unit column stride
    w_ptr,  # w13 [E, P, H] (through the B operand's strides / descriptor)
    b13_ptr,  # [E, P] contiguous (HAS_BIAS)
    pre_ptr,  # [T*k, P] contiguous, x's dtype: slot-major pre-activation
    h_ptr,  # [T*k, INTER] contiguous, x's dtype: activation in sorted-row order
    offs_ptr,  # [E] int32
    tok_ptr,  # [T*k] int32: token of sorted row r
    slot_ptr,  # [T*k] int32: slot of sorted row r
    S,
    INTER,
    H,
    E,
    P,
    s_xm,
    s_bg,
    s_bpart,
    s_bk,
    s_bn,
    d1,
    d2,
    d3,
    ds0,
    ds1,
    ds2,
    up_off,  # column of up(c) = c * COLM + up_off in pre / b13
    alpha_bits,
    limit_bits,
    num_progs,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    COLM: tl.constexpr,  # 1 (concat / not gated) or 2 (interleaved)
    HAS_BIAS: tl.constexpr,
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
    alpha = f64_from_bits(alpha_bits).to(ACC)
    limit = f64_from_bits(limit_bits).to(ACC)
    real, last = ragged_count(offs_ptr, E, S, BLOCK_M, BLOCK_G)
    num_m = real + (S - last + BLOCK_M - 1) // BLOCK_M  # tail tiles zero the dropped slots' rows
    num_n = (INTER + BLOCK_N - 1) // BLOCK_N
    total = num_m * num_n
    b_desc = make_b_desc(w_ptr, E, d1, d2, d3, ds0, ds1, ds2, B_DESC, BLOCK_N, BLOCK_K)
    lanes_m = tl.arange(0, BLOCK_M)
    lanes_n = tl.arange(0, BLOCK_N)
    tile = pid
    while tile < total:
        mt, nt = swizzle_tile(tile, num_m, num_n, GROUP_M)
        e, r0, r1 = ragged_tile(mt, offs_ptr, E, S, BLOCK_M, BLOCK_G)
        tail = mt >= real
        r0 = tl.where(tail, last + (mt - real) * BLOCK_M, r0)
        r1 = tl.where(tail, S, r1)
        k_hi = tl.where(tail, 0, H)
        c_hi = tl.where(tail, 0, INTER)  # bias columns (none for the tail's zero rows)
        h_hi = tl.minimum(r1, last)  # rows that get an activation row
        e = tl.maximum(e, 0)
        rows = r0 + lanes_m
        rmask = rows < r1
        tok = tl.load(tok_ptr + rows, mask=rows < h_hi, other=0)
        slot = tl.load(slot_ptr + rows, mask=rmask, other=0)
        n0 = nt * BLOCK_N
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        acc_g, acc_u = mainloop(acc_g, acc_u, x_ptr, tok.to(tl.int64) * s_xm, rows < h_hi, 1, w_ptr, b_desc, e, n0,
                                INTER, 0, k_hi, s_bg, s_bpart, s_bk, s_bn, GATED, B_DESC, DOT, K_FOR, STAGES, BLOCK_N,
                                BLOCK_K)  # fmt: skip
        cols = n0 + lanes_n
        cmask = cols < INTER
        gcol = cols * COLM
        ucol = gcol + up_off
        e64 = e.to(tl.int64)
        if HAS_BIAS:
            acc_g += tl.load(b13_ptr + e64 * P + gcol, mask=cols < c_hi, other=0.0).to(ACC)[None, :]
            if GATED:
                acc_u += tl.load(b13_ptr + e64 * P + ucol, mask=cols < c_hi, other=0.0).to(ACC)[None, :]
        # Round through x's dtype (what pre stores and the backward reads), as the CPU kernel.
        zg = acc_g.to(pre_ptr.dtype.element_ty)
        m2 = rmask[:, None] & cmask[None, :]
        prow = slot.to(tl.int64)[:, None] * P
        tl.store(pre_ptr + prow + gcol[None, :], zg, mask=m2)
        if GATED:
            zu = acc_u.to(pre_ptr.dtype.element_ty)
            tl.store(pre_ptr + prow + ucol[None, :], zu, mask=m2)
            a = act_fwd(zg.to(ACC), zu.to(ACC), alpha, limit, ACT)
        else:
            a = act_fwd(zg.to(ACC), zg.to(ACC), alpha, limit, ACT)
        tl.store(
            h_ptr + rows.to(tl.int64)[:, None] * INTER + cols[None, :],
            a.to(h_ptr.dtype.element_ty),
            mask=(rows < h_hi)[:, None] & cmask[None, :],
        )
        tile += num_progs


@triton.jit
def _moe_dh_kernel(
    dy_ptr,  # [T, H], row stride s_dym, unit column stride
    w_ptr,  # w2 [E, H, INTER]: B element (e, k=h, n=i) through the strides / descriptor
    pre_ptr,  # [T*k, P] contiguous
    wt_ptr,  # [T*k] routing weights at ACC
    offs_ptr,
    tok_ptr,
    slot_ptr,
    dz_ptr,  # out [T*k, P] sorted rows, x's dtype
    hw_ptr,  # out [T*k, INTER] sorted rows: weight * act(z), x's dtype
    part_ptr,  # out [T*k, NUM_N] ACC: sum over the tile's columns of dA * act(z)
    ws_ptr,  # out [T*k] ACC: weight of sorted row r
    S,
    INTER,
    H,
    E,
    P,
    s_dym,
    s_bg,
    s_bk,
    s_bn,
    d1,
    d2,
    d3,
    ds0,
    ds1,
    ds2,
    up_off,
    alpha_bits,
    limit_bits,
    num_progs,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    COLM: tl.constexpr,
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
    alpha = f64_from_bits(alpha_bits).to(ACC)
    limit = f64_from_bits(limit_bits).to(ACC)
    real, _last = ragged_count(offs_ptr, E, S, BLOCK_M, BLOCK_G)
    num_n = (INTER + BLOCK_N - 1) // BLOCK_N
    total = real * num_n
    b_desc = make_b_desc(w_ptr, E, d1, d2, d3, ds0, ds1, ds2, B_DESC, BLOCK_N, BLOCK_K)
    lanes_m = tl.arange(0, BLOCK_M)
    lanes_n = tl.arange(0, BLOCK_N)
    tile = pid
    while tile < total:
        mt, nt = swizzle_tile(tile, real, num_n, GROUP_M)
        e, r0, r1 = ragged_tile(mt, offs_ptr, E, S, BLOCK_M, BLOCK_G)
        e = tl.maximum(e, 0)
        rows = r0 + lanes_m
        rmask = rows < r1
        tok = tl.load(tok_ptr + rows, mask=rmask, other=0)
        slot = tl.load(slot_ptr + rows, mask=rmask, other=0)
        w = tl.load(wt_ptr + slot, mask=rmask, other=0.0).to(ACC)
        n0 = nt * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        acc, _unused = mainloop(acc, acc, dy_ptr, tok.to(tl.int64) * s_dym, rmask, 1, w_ptr, b_desc, e, n0, INTER,
                                0, H, s_bg, 0, s_bk, s_bn, False, B_DESC, DOT, K_FOR, STAGES, BLOCK_N,
                                BLOCK_K)  # fmt: skip
        cols = n0 + lanes_n
        cmask = cols < INTER
        m2 = rmask[:, None] & cmask[None, :]
        gcol = cols * COLM
        ucol = gcol + up_off
        prow = slot.to(tl.int64)[:, None] * P
        srow = rows.to(tl.int64)[:, None] * P
        zg = tl.load(pre_ptr + prow + gcol[None, :], mask=m2, other=0.0).to(ACC)
        da = acc * w[:, None]
        if GATED:
            zu = tl.load(pre_ptr + prow + ucol[None, :], mask=m2, other=0.0).to(ACC)
            a = act_fwd(zg, zu, alpha, limit, ACT)
            dzg, dzu = act_bwd(zg, zu, da, alpha, limit, ACT)
            tl.store(dz_ptr + srow + ucol[None, :], dzu.to(dz_ptr.dtype.element_ty), mask=m2)
        else:
            a = act_fwd(zg, zg, alpha, limit, ACT)
            dzg, _dzu = act_bwd(zg, zg, da, alpha, limit, ACT)
        tl.store(dz_ptr + srow + gcol[None, :], dzg.to(dz_ptr.dtype.element_ty), mask=m2)
        tl.store(
            hw_ptr + rows.to(tl.int64)[:, None] * INTER + cols[None, :],
            (a * w[:, None]).to(hw_ptr.dtype.element_ty),
            mask=m2,
        )
        tl.store(part_ptr + rows.to(tl.int64) * num_n + nt, tl.sum(tl.where(m2, acc * a, 0.0), axis=1), mask=rmask)
        tl.store(ws_ptr + rows, w, mask=rows < tl.where(nt == 0, r1, 0))
        tile += num_progs


@triton.jit
def _moe_combine_kernel(
    buf_ptr,  # [T*k, H] rows in sorted order
    inv_ptr,  # [T*k] int32: sorted row of slot s
    ids_ptr,  # [T*k] int32 expert ids (-1 = dropped)
    y_ptr,  # [T, H] contiguous
    T,
    H,
    E,
    KTOP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """y[t] = sum over the kept slots j of buf[inverse[t*k + j]], in slot order at ACC."""
    num_h = (H + BLOCK_H - 1) // BLOCK_H
    pid = tl.program_id(0)
    ts = (pid // num_h) * BLOCK_T + tl.arange(0, BLOCK_T)
    hs = (pid % num_h) * BLOCK_H + tl.arange(0, BLOCK_H)
    tmask = ts < T
    hmask = hs < H
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=ACC)
    for j in tl.static_range(KTOP):
        s = ts.to(tl.int64) * KTOP + j
        e = tl.load(ids_ptr + s, mask=tmask, other=-1)
        keep = tmask & (e >= 0) & (e < E)
        pos = tl.load(inv_ptr + s, mask=keep, other=0)
        acc += tl.load(
            buf_ptr + pos.to(tl.int64)[:, None] * H + hs[None, :], mask=keep[:, None] & hmask[None, :], other=0.0
        ).to(ACC)
    tl.store(
        y_ptr + ts.to(tl.int64)[:, None] * H + hs[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=tmask[:, None] & hmask[None, :],
    )


@triton.jit
def _moe_dweights_kernel(
    part_ptr,  # [T*k, NUM_N] ACC, sorted rows
    inv_ptr,
    ids_ptr,
    dy_ptr,  # [T, H] contiguous
    b2_ptr,  # [E, H] contiguous (HAS_B2)
    dw_ptr,  # out [T*k] ACC
    n_slots,
    H,
    E,
    NUM_N,
    KTOP: tl.constexpr,
    HAS_B2: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """dweights[s] = sum of slot s's partials (in N-tile order) + <dy[s // k], b2[ids[s]]>;
    0 for dropped slots."""
    ss = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = ss < n_slots
    e = tl.load(ids_ptr + ss, mask=smask, other=-1)
    keep = smask & (e >= 0) & (e < E)
    pos = tl.load(inv_ptr + ss, mask=keep, other=0)
    ps = tl.arange(0, BLOCK_P)
    pmask = keep[:, None] & (ps < NUM_N)[None, :]
    part = tl.load(part_ptr + pos.to(tl.int64)[:, None] * NUM_N + ps[None, :], mask=pmask, other=0.0)
    d = tl.sum(part.to(ACC), axis=1)
    if HAS_B2:
        t64 = (ss // KTOP).to(tl.int64)
        e64 = tl.maximum(e, 0).to(tl.int64)
        h0 = 0
        while h0 < H:
            hs = h0 + tl.arange(0, BLOCK_H)
            m2 = keep[:, None] & (hs < H)[None, :]
            dyv = tl.load(dy_ptr + t64[:, None] * H + hs[None, :], mask=m2, other=0.0).to(ACC)
            bv = tl.load(b2_ptr + e64[:, None] * H + hs[None, :], mask=m2, other=0.0).to(ACC)
            d += tl.sum(dyv * bv, axis=1)
            h0 += BLOCK_H
    tl.store(dw_ptr + ss, d, mask=smask)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


def _buffer_dtype(dtype: torch.dtype) -> torch.dtype:
    """The [T*k, H] slot buffers: x's dtype (16-bit: half the traffic of fp32; each slot's
    value is rounded once before the fp32 combine), fp64 for fp64."""
    return dtype


@functools.lru_cache(maxsize=256)
def moe_plan(T: int, H: int, inter: int, E: int, k: int, dtype: torch.dtype, gpu: bool, *, gated: bool = True) -> dict:
    """The tile configs of the layer's GEMMs (forward up / down, backward dH / dx / dW2 /
    dW13), from the average rows per expert T*k/E, the GEMM's N and K and the dtype."""
    avg = T * k / max(E, 1)
    P = 2 * inter if gated else inter
    return {
        "up": tile_config(avg, inter, H, dtype, gpu, parts=2 if gated else 1),
        "down": tile_config(avg, H, inter, dtype, gpu),
        "dh": _dh_config(tile_config(avg, inter, H, dtype, gpu), gpu),
        "dx": tile_config(avg, H, P, dtype, gpu),
        "dw2": tile_config(H, inter, avg, dtype, gpu),
        "dw13": tile_config(P, H, avg, dtype, gpu),
    }


def _dh_config(cfg, gpu: bool):
    """The dH kernel's epilogue keeps ~10 live values per output element (z gate and up, the
    activation, its derivative, dz, h): at more than 16 elements per thread it spilled on
    sm_90 (128 x 64 with 8 warps: 56-200 bytes per thread depending on the activation), so
    its tiles are 32 columns wide with 16 elements per thread (128 x 32: 8 warps, <= 238
    registers, no spill)."""
    if not gpu or cfg.block_n <= 32:
        return cfg
    return cfg._replace(block_n=32, num_warps=max(4, cfg.block_m * 32 // (16 * 32)), group_m=1)


def _gate_up(act: str, interleaved: bool, inter: int) -> tuple[bool, int, int]:
    gated = ACTIVATION_CODES[act] <= 4
    if not gated:
        return False, 1, 0
    return True, (2 if interleaved else 1), (1 if interleaved else inter)


def _combine(buf: torch.Tensor, inverse: torch.Tensor, ids: torch.Tensor, out: torch.Tensor, k: int, E: int) -> None:
    T, H = out.shape
    gpu = on_gpu(out)
    block_t = 4 if gpu else 16
    block_h = min(next_pow2(H), 512 if gpu else 128)
    grid = cdiv(T, block_t) * cdiv(H, block_h)
    _moe_combine_kernel[(grid,)](
        buf, inverse, ids, out, T, H, E,
        KTOP=k, ACC=_acc(out.dtype), BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip


def moe_mlp_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    offs: torch.Tensor,
    sorted_slots: torch.Tensor,
    inverse: torch.Tensor,
    tokens: torch.Tensor,
    activation: str,
    interleaved: bool,
    alpha: float,
    limit: float,
    y: torch.Tensor,
    pre: torch.Tensor,
    *,
    use_tma: bool | None = None,
) -> None:
    """Fill y [T, H] and pre [T*k, P] (the op layer's contract: x contiguous, w13 / w2 of
    any strides in x's dtype, weights [T, k] contiguous at the accumulation dtype, ids [T, k]
    contiguous int32, biases contiguous or None; offs / sorted_slots / inverse / tokens from
    ``route_metadata(ids, E)``; T >= 1)."""
    T, H = x.shape
    E, P, _ = w13.shape
    inter = w2.shape[2]
    k = ids.shape[1]
    S = T * k
    gpu = on_gpu(x)
    code = ACTIVATION_CODES[activation]
    gated, colm, up_off = _gate_up(activation, interleaved, inter)
    plan = moe_plan(T, H, inter, E, k, x.dtype, gpu, gated=gated)
    dtype = x.dtype
    # GEMM-1: gather x rows, two accumulators, bias + activation epilogue.
    cfg = _split_n_for_sms(plan["up"], cdiv(S, plan["up"].block_m) + E, inter, x.device)
    bop = b_operand(w13, n=inter, k=H, s_g=w13.stride(0), s_k=w13.stride(2), s_n=w13.stride(1),
                    parts=2 if gated else 1, interleaved=interleaved, block_n=cfg.block_n, block_k=cfg.block_k,
                    use_tma=use_tma)  # fmt: skip
    h = torch.empty((S, inter), dtype=dtype, device=x.device)
    bound = (cdiv(S, cfg.block_m) + E + 1) * cdiv(inter, cfg.block_n)
    progs = max(1, min(bound, _max_programs(x.device, cfg, dtype)))
    if bop.mode:
        ensure_allocator()
    _moe_up_kernel[(progs,)](
        x, w13, b13 if b13 is not None else x, pre, h, offs, tokens, sorted_slots,
        S, inter, H, E, P, x.stride(0), bop.s_g, bop.s_part, bop.s_k, bop.s_n, *bop.dims, *bop.dstrides,
        up_off, f64_bits(alpha), f64_bits(limit), progs,
        ACT=code, GATED=gated, COLM=colm, HAS_BIAS=b13 is not None, B_DESC=bop.mode, DOT=_dot_mode(dtype, gpu),
        ACC=_acc(dtype), K_FOR=gpu, STAGES=cfg.num_stages, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, BLOCK_G=min(_BLOCK_G, next_pow2(E)), GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
    )  # fmt: skip
    # GEMM-2: h @ w2[e]^T + b2, times the routing weight, into sorted rows.
    cfg2 = _split_n_for_sms(plan["down"], cdiv(S, plan["down"].block_m) + E, H, x.device)
    bop2 = b_operand(w2, n=H, k=inter, s_g=w2.stride(0), s_k=w2.stride(2), s_n=w2.stride(1),
                     block_n=cfg2.block_n, block_k=cfg2.block_k, use_tma=use_tma)  # fmt: skip
    buf = torch.empty((S, H), dtype=_buffer_dtype(dtype), device=x.device)
    ragged_m_mm(h, inter, 1, bop2, buf, offs, S=S, n=H, k=inter, cfg=cfg2, bias=b2, scale=weights.view(-1),
                scale_index=sorted_slots, zero_tail=False)  # fmt: skip
    _combine(buf, inverse, ids, y, k, E)


def moe_mlp_backward_triton(
    dy: torch.Tensor,
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    pre: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    offs: torch.Tensor,
    sorted_slots: torch.Tensor,
    inverse: torch.Tensor,
    tokens: torch.Tensor,
    activation: str,
    interleaved: bool,
    alpha: float,
    limit: float,
    dx: torch.Tensor,
    dw13: torch.Tensor,
    dw2: torch.Tensor,
    dweights: torch.Tensor,
    db13: torch.Tensor,
    db2: torch.Tensor,
    *,
    use_tma: bool | None = None,
) -> None:
    """Fill every gradient output of ``moe_mlp_backward`` (the op layer's contract: dy, x,
    pre contiguous in x's dtype; outputs contiguous and written in full; db13 / db2 used only
    when b13 / b2 are given; T >= 1)."""
    T, H = x.shape
    E, P, _ = w13.shape
    inter = w2.shape[2]
    k = ids.shape[1]
    S = T * k
    gpu = on_gpu(x)
    dtype = x.dtype
    acc_t = torch.float64 if dtype == torch.float64 else torch.float32
    code = ACTIVATION_CODES[activation]
    gated, colm, up_off = _gate_up(activation, interleaved, inter)
    plan = moe_plan(T, H, inter, E, k, dtype, gpu, gated=gated)
    dev = x.device
    # 1. dA = dy_slot @ w2[e] with the activation backward and the weight-gradient partials.
    cfg = plan["dh"]
    bop = b_operand(w2, n=inter, k=H, s_g=w2.stride(0), s_k=w2.stride(1), s_n=w2.stride(2),
                    block_n=cfg.block_n, block_k=cfg.block_k, use_tma=use_tma)  # fmt: skip
    num_n = cdiv(inter, cfg.block_n)
    dz = torch.empty((S, P), dtype=dtype, device=dev)
    hw = torch.empty((S, inter), dtype=dtype, device=dev)
    part = torch.empty((S, num_n), dtype=acc_t, device=dev)
    ws = torch.empty((S,), dtype=acc_t, device=dev)
    bound = (cdiv(S, cfg.block_m) + E) * num_n
    progs = max(1, min(bound, _max_programs(dev, cfg, dtype)))
    if bop.mode:
        ensure_allocator()
    _moe_dh_kernel[(progs,)](
        dy, w2, pre, weights.view(-1), offs, tokens, sorted_slots, dz, hw, part, ws,
        S, inter, H, E, P, dy.stride(0), bop.s_g, bop.s_k, bop.s_n, *bop.dims, *bop.dstrides,
        up_off, f64_bits(alpha), f64_bits(limit), progs,
        ACT=code, GATED=gated, COLM=colm, B_DESC=bop.mode, DOT=_dot_mode(dtype, gpu), ACC=_acc(dtype), K_FOR=gpu,
        STAGES=cfg.num_stages, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_G=min(_BLOCK_G, next_pow2(E)), GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
    )  # fmt: skip
    # 2. dW2[e] = dy_slot^T hw (ragged K, dy gathered), db2 from the same A tiles.
    ragged_k_mm(dy, (0, dy.stride(1), dy.stride(0)), hw, (0, inter, 1), dw2, G=E, M=H, N=inter, K=S,
                cfg=plan["dw2"], offs=offs, a_gather=tokens, rowsum=db2 if b2 is not None else None,
                rowsum_scale=ws)  # fmt: skip
    # 3. dW13[e] = dz^T x_slot (ragged K, x gathered), db13 = column sums of dz.
    ragged_k_mm(dz, (0, 1, P), x, (0, x.stride(0), x.stride(1)), dw13, G=E, M=P, N=H, K=S, cfg=plan["dw13"],
                offs=offs, b_gather=tokens, rowsum=db13 if b13 is not None else None)  # fmt: skip
    # 4. dx_slot = dz @ w13[e] (ragged M) and 5. the deterministic gather-sum over k.
    cfg4 = _split_n_for_sms(plan["dx"], cdiv(S, plan["dx"].block_m) + E, H, dev)
    bop4 = b_operand(w13, n=H, k=P, s_g=w13.stride(0), s_k=w13.stride(1), s_n=w13.stride(2),
                     block_n=cfg4.block_n, block_k=cfg4.block_k, use_tma=use_tma)  # fmt: skip
    buf = torch.empty((S, H), dtype=_buffer_dtype(dtype), device=dev)
    ragged_m_mm(dz, P, 1, bop4, buf, offs, S=S, n=H, k=P, cfg=cfg4, zero_tail=False)
    _combine(buf, inverse, ids, dx, k, E)
    # 6. dweights: the partials of kernel 1 in N-tile order, + <dy, b2[e]>.
    block_s = 32 if gpu else 64
    _moe_dweights_kernel[(cdiv(S, block_s),)](
        part, inverse, ids, dy, b2 if b2 is not None else dy, dweights.view(-1), S, H, E, num_n,
        KTOP=k, HAS_B2=b2 is not None, ACC=_acc(dtype), BLOCK_S=block_s, BLOCK_P=next_pow2(num_n),
        BLOCK_H=min(next_pow2(H), 128), num_warps=4,
    )  # fmt: skip
