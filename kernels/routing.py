"""Triton kernels for MoE routing: top-k expert selection and the expert-grouping metadata.

The semantics are those of ``sparseops.reference.routing`` (the specification): ids and
metadata bit for bit, weights to accumulate-dtype rounding. The kernels are plain Triton
(no autotune, one config per shape from the launch tables below) so that they also run
under ``TRITON_INTERPRET=1`` on CPU tensors, which is how the CPU-only test suite runs them.

Host functions (called by ``sparseops.ops.routing``, which validates the arguments):

* ``topk_route_triton``: one launch, ``cdiv(T, BLOCK_T)`` programs of BLOCK_T tokens each.
* ``route_metadata_triton``: three launches (four with ``block_m > 0``), no host sync,
  every output sized from static bounds (CUDA-graph capturable), no atomics deciding order.

Interpreter note: ``for i in range(x)`` with ``x`` a runtime kernel argument fails under
``TRITON_INTERPRET=1`` with numpy >= 2.3 (the interpreter turns scalar arguments into
1-element arrays, and ``int()`` of those is an error there). Loop bounds are therefore
constexpr (k, n_group, topk_group: a recompile per routing config, not per batch) or a
``while`` loop on a runtime scalar, which both backends accept.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

__all__ = ["topk_route_triton", "route_metadata_triton"]


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------
# topk_route
# --------------------------------------------------------------------------------------


@triton.jit
def _masked_softmax(x, en):
    """Row softmax of ``x`` [R, C] over the columns where ``en`` [1, C] is true, in x's dtype.

    Disabled columns get 0. A row whose softmax is NaN (no enabled column, a NaN or a +inf
    logit, all logits -inf) gives all zeros, as ``torch.softmax(...).nan_to_num(0)`` does:
    the same max-subtract-exp-sum arithmetic produces the same NaNs.
    """
    xm = tl.where(en, x, float("-inf"))
    mx = tl.max(xm, axis=1)
    e = tl.where(en, tl.exp(xm - mx[:, None]), 0.0)
    p = e / tl.sum(e, axis=1)[:, None]
    return tl.where(p == p, p, 0.0)


@triton.jit(do_not_specialize=["scale_bits"])
def _topk_route_kernel(
    logits_ptr,  # [T, E] contiguous, fp32 / fp16 / bf16 / fp64
    bias_ptr,  # [E] ACC, read only when HAS_BIAS
    mask_ptr,  # [E] uint8 (the bool mask viewed as bytes), read only when HAS_MASK
    weights_ptr,  # [T, k] ACC
    ids_ptr,  # [T, k] int32
    T,
    E,
    group_size,  # E // N_GROUP
    scale_bits,  # the fp64 bit pattern of ``scale`` (a Python float would arrive as fp32)
    K: tl.constexpr,  # experts per token (loop bounds are constexpr: see the note below)
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for fp64 logits
    ACC_MAX: tl.constexpr,  # the largest finite ACC value
    E_PAD: tl.constexpr,  # next power of two >= E
    K_PAD: tl.constexpr,  # next power of two >= K
    G_PAD: tl.constexpr,  # next power of two >= N_GROUP
    BLOCK_T: tl.constexpr,  # tokens per program
    SIGMOID: tl.constexpr,
    TOPK_THEN_SOFTMAX: tl.constexpr,  # softmax scoring with order="topk_then_softmax"
    RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    GROUPED: tl.constexpr,  # N_GROUP > 1
    GROUP_TOP2: tl.constexpr,  # group_size >= 2: a group scores its two best experts
    NEED_SCORE: tl.constexpr,  # HAS_BIAS or GROUPED: rank by the fp64-computed score
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E

    raw = tl.load(
        logits_ptr + rows64[:, None] * E + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    # fp16 / bf16 are widened at once (bf16 arithmetic is unreliable in the interpreter).
    x = raw.to(ACC)

    if HAS_MASK:  # noqa: SIM108 (constexpr branches read better as statements in a kernel)
        en = (tl.load(mask_ptr + cols, mask=col_ok, other=0) != 0) & col_ok
    else:
        en = col_ok
    en2 = en[None, :]

    # Rank: the logit itself without a bias; with one, the score computed in fp64, rounded
    # to ACC, plus the bias (see selection_scores_ref for why fp64-then-round).
    if NEED_SCORE:
        x64 = x.to(tl.float64)  # exact; widening x avoids a direct bf16 -> fp64 conversion
        if SIGMOID:
            s64 = 1.0 / (1.0 + tl.exp(-x64))
        elif TOPK_THEN_SOFTMAX:
            s64 = x64
        else:
            s64 = _masked_softmax(x64, en2)
        biased = s64.to(ACC)
        if HAS_BIAS:
            b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(ACC)
            biased = biased + b[None, :]
    if HAS_BIAS:  # noqa: SIM108
        rank = biased
    else:
        rank = x
    rank = tl.where(rank != rank, float("-inf"), rank)
    rank = tl.where(en2, rank, float("-inf"))

    # Candidates: enabled experts, restricted to the topk_group best groups when grouped.
    if GROUPED:
        # As the reference's nan_to_num(nan=-inf): NaN counts as -inf, an infinite score as
        # the largest finite value, a disabled expert as -inf.
        big = tl.full([1, 1], ACC_MAX, ACC)
        pg = tl.where(biased != biased, float("-inf"), tl.minimum(tl.maximum(biased, -big), big))
        pg = tl.where(en2, pg, float("-inf"))
        gcols = tl.arange(0, G_PAD)
        gscore = tl.full([BLOCK_T, G_PAD], float("-inf"), ACC)
        # A loop (not unrolled) over groups with column masks, so any group size works.
        # Group score = best + second best, the best's first index excluded so that a
        # duplicated maximum counts twice, like torch.topk.
        for g in range(N_GROUP):
            lo = g * group_size
            in_g = (cols[None, :] >= lo) & (cols[None, :] < lo + group_size)
            v = tl.where(in_g, pg, float("-inf"))
            m1 = tl.max(v, axis=1)
            i1 = tl.min(tl.where(in_g & (v == m1[:, None]), cols[None, :], E_PAD), axis=1)
            if GROUP_TOP2:
                m2 = tl.max(tl.where(in_g & (cols[None, :] != i1[:, None]), v, float("-inf")), axis=1)
                s = m1 + m2
            else:
                s = m1
            gscore = tl.where(gcols[None, :] == g, s[:, None], gscore)
        # TOPK_GROUP rounds of argmax over groups, lower group first on ties. A NaN group
        # score (+inf + -inf) sorts first, as in torch's descending sort.
        gavail = (gcols[None, :] < N_GROUP) & (rows[:, None] >= 0)  # [BLOCK_T, G_PAD]
        gnan = gscore != gscore
        chosen = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int1)
        for _ in range(TOPK_GROUP):
            any_nan = tl.max(tl.where(gavail & gnan, 1, 0), axis=1)
            gm = tl.max(tl.where(gavail & (gscore == gscore), gscore, float("-inf")), axis=1)
            ghit = gavail & tl.where(any_nan[:, None] > 0, gnan, gscore == gm[:, None])
            gsel = tl.min(tl.where(ghit, gcols[None, :], G_PAD), axis=1)
            gavail = gavail & (gcols[None, :] != gsel[:, None])
            glo = gsel * group_size
            chosen = chosen | ((cols[None, :] >= glo[:, None]) & (cols[None, :] < glo[:, None] + group_size))
        cand = chosen & en2
    else:
        cand = (rows[:, None] >= 0) & en2

    # What the weights are made of, per expert: the logit (softmax over the chosen ones
    # later), sigmoid(logit), or the softmax over enabled experts.
    if TOPK_THEN_SOFTMAX:
        wsrc = x
    elif SIGMOID:
        wsrc = 1.0 / (1.0 + tl.exp(-x))
    else:
        wsrc = _masked_softmax(x, en2)

    # K rounds of argmax among candidates, lower index on ties. A candidate with rank -inf
    # still wins over "no candidate" because the candidate mask is separate from the rank.
    kcols = tl.arange(0, K_PAD)
    ids_t = tl.full([BLOCK_T, K_PAD], -1, tl.int32)
    val_t = tl.zeros([BLOCK_T, K_PAD], ACC)
    for r in range(K):
        m = tl.max(tl.where(cand, rank, float("-inf")), axis=1)
        sel = tl.min(tl.where(cand & (rank == m[:, None]), cols[None, :], E_PAD), axis=1)
        hit = cols[None, :] == sel[:, None]  # nowhere when no candidate is left (sel == E_PAD)
        cand = cand & (cols[None, :] != sel[:, None])
        v = tl.sum(tl.where(hit, wsrc, 0.0), axis=1)
        slot = kcols[None, :] == r
        ids_t = tl.where(slot, tl.where(sel < E_PAD, sel, -1)[:, None], ids_t)
        val_t = tl.where(slot, v[:, None], val_t)

    valid = ids_t >= 0
    if TOPK_THEN_SOFTMAX:
        sv = tl.where(valid, val_t, float("-inf"))
        mx = tl.max(sv, axis=1)
        e = tl.where(kcols[None, :] < K, tl.exp(sv - mx[:, None]), 0.0)
        w = e / tl.sum(e, axis=1)[:, None]
        w = tl.where(w == w, w, 0.0)
    else:
        w = tl.where(valid, val_t, 0.0)
        if RENORMALIZE:
            tot = tl.sum(w, axis=1)
            pos = tot > 0
            w = tl.where(pos[:, None], w / tl.where(pos, tot, 1.0)[:, None], 0.0)
    scale = scale_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    w = w * scale

    out = rows64[:, None] * K + kcols[None, :]
    omask = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(ids_ptr + out, ids_t, mask=omask)
    tl.store(weights_ptr + out, w, mask=omask)


# Launch table for _topk_route_kernel: E_PAD -> (BLOCK_T, num_warps). A program keeps a
# BLOCK_T x E_PAD tile of logits, rank, weight source and candidate mask in registers
# (plus the fp64 scores when a bias or groups need them); every selection round is three
# row reductions over that tile. About 2048 values per tile, at most 16 per thread, keeps
# the fp64 variant out of local memory at E = 1024; small E packs many tokens per program
# so a row's reductions stay inside one warp. Not yet tuned on a GPU (no timings exist).
_TOPK_LAUNCH: dict[int, tuple[int, int]] = {
    1: (32, 1),
    2: (32, 1),
    4: (32, 1),
    8: (32, 1),
    16: (32, 1),
    32: (32, 2),
    64: (32, 4),
    128: (16, 4),
    256: (8, 4),
    512: (4, 8),
    1024: (2, 8),
}
# Fewer tokens per program while that leaves fewer than this many programs: an H100 has
# 132 SMs, and decode-sized batches (T <= 128) are latency bound, one token per program.
_TOPK_MIN_PROGRAMS = 128


def _topk_launch_config(T: int, E_PAD: int, on_gpu: bool) -> tuple[int, int]:
    block_t, num_warps = _TOPK_LAUNCH[E_PAD]
    block_t = min(block_t, _next_pow2(T))
    if on_gpu:
        # Not under the interpreter, which runs programs one after another: there fewer,
        # bigger programs are faster, and T = 1 still covers one-token programs.
        block_t = min(block_t, _next_pow2(_cdiv(T, _TOPK_MIN_PROGRAMS)))
    # ~8-16 tile values per thread once the tile shrinks.
    num_warps = max(1, min(num_warps, block_t * E_PAD // 256))
    return block_t, num_warps


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def topk_route_triton(
    logits: torch.Tensor,
    k: int,
    *,
    scoring: str = "softmax",
    order: str = "softmax_then_topk",
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scale: float = 1.0,
    expert_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing, one Triton launch; the semantics of ``topk_route_ref``.

    Args (validated by the caller):
        logits: [T, E] contiguous, fp32 / fp16 / bf16 / fp64; T >= 1, 1 <= E <= 1024.
        k: experts per token, 1 <= k <= min(E, 32).
        scoring: "softmax" or "sigmoid". order: "softmax_then_topk" or "topk_then_softmax"
            (only matters for softmax scoring).
        renormalize: divide the selected weights by their sum (when > 0); ignored by
            topk_then_softmax, whose weights already sum to 1.
        bias: None or [E] contiguous in the accumulate dtype; shifts the ranking only.
        n_group, topk_group: keep the topk_group best of n_group equal groups (n_group
            divides E) by the sum of each group's two best biased scores.
        scale: multiplies the weights.
        expert_mask: None or [E] bool, True = enabled.

    Returns:
        weights [T, k] in the accumulate dtype (fp64 for fp64 logits, else fp32) and ids
        [T, k] int32 in selection order (best first, lower expert index on ties); slots no
        candidate can fill get id -1 and weight 0.
    """
    T, E = logits.shape
    fp64 = logits.dtype == torch.float64
    acc = torch.float64 if fp64 else torch.float32
    weights = torch.empty((T, k), dtype=acc, device=logits.device)
    ids = torch.empty((T, k), dtype=torch.int32, device=logits.device)
    if T == 0 or k == 0:
        return weights, ids
    E_PAD = _next_pow2(E)
    block_t, num_warps = _topk_launch_config(T, E_PAD, logits.is_cuda)
    sigmoid = scoring == "sigmoid"
    has_bias = bias is not None
    grouped = n_group > 1
    group_size = E // n_group
    mask_arg = expert_mask.contiguous().view(torch.uint8) if expert_mask is not None else logits
    _topk_route_kernel[(_cdiv(T, block_t),)](
        logits,
        bias if has_bias else logits,
        mask_arg,
        weights,
        ids,
        T,
        E,
        group_size,
        _f64_bits(scale),
        K=k,
        N_GROUP=n_group,
        TOPK_GROUP=topk_group,
        ACC=tl.float64 if fp64 else tl.float32,
        ACC_MAX=torch.finfo(torch.float64 if fp64 else torch.float32).max,
        E_PAD=E_PAD,
        K_PAD=_next_pow2(k),
        G_PAD=_next_pow2(n_group),
        BLOCK_T=block_t,
        SIGMOID=sigmoid,
        TOPK_THEN_SOFTMAX=(not sigmoid) and order == "topk_then_softmax",
        RENORMALIZE=bool(renormalize),
        HAS_BIAS=has_bias,
        HAS_MASK=expert_mask is not None,
        GROUPED=grouped,
        GROUP_TOP2=group_size >= 2,
        NEED_SCORE=has_bias or grouped,
        num_warps=num_warps,
    )
    return weights, ids


# --------------------------------------------------------------------------------------
# route_metadata
# --------------------------------------------------------------------------------------
#
# A stable counting sort of the n = T*k slots by expert, dropped slots (id outside [0, E))
# in a last bucket E. Slots are cut into tiles of _META_BLOCK:
#   (a) _route_hist_kernel   grid num_tiles: hist[e, tile] = count of bucket e in the tile.
#   (b) _route_scan_kernel   grid cdiv(E + 1, EB), an [EB, CHUNK] tile of buckets x tiles per
#                            step (EB * CHUNK <= 2048): hist[e, :] <- exclusive prefix over
#                            tiles, and counts[e] = bucket total (e < E).
#   (c) _route_place_kernel  grid num_tiles: expert starts = exclusive cumsum of counts
#                                            (recomputed by every program); a slot's row is
#                                            start + tile prefix + its stable rank inside
#                                            the tile ([BLOCK, JB] compares); writes
#                                            sorted_slots, tokens, inverse; program 0 writes
#                                            offs and padded_offs.
#   (d) _route_pad_kernel    grid cdiv(P, PB), only when block_m > 0: each padded row finds
#                            its expert by binary search over padded_offs, copies its slot
#                            from sorted_slots or writes the sentinel n; block starts write
#                            block_expert.
# n == 0 still launches (a)-(c) with one (fully masked) tile so counts and offs are written.

_META_BLOCK = 256  # slots per tile in (a) and (c)
_META_JB = 32  # columns per compare chunk in (c): a [256, 32] tile, 32 values per thread at 8 warps
_META_PB = 1024  # padded rows per program in (d)
_META_SCAN_CHUNK = 1024  # most tiles per step of (b)'s loop


@triton.jit
def _route_hist_kernel(ids_ptr, hist_ptr, n, E, num_tiles, dropped_row, BLOCK: tl.constexpr, NBINS: tl.constexpr):
    t = tl.program_id(0)
    s = t * BLOCK + tl.arange(0, BLOCK)
    valid = s < n
    idv = tl.load(ids_ptr + s, mask=valid, other=-1)
    kept = valid & (idv >= 0) & (idv < E)
    # Every value reaching the histogram is inside [0, NBINS) (the GPU lowering would
    # alias out-of-range values onto low bins).
    h = tl.histogram(tl.where(kept, idv, 0), NBINS, mask=kept)
    bins = tl.arange(0, NBINS)
    tl.store(hist_ptr + bins.to(tl.int64) * num_tiles + t, h, mask=bins < E)
    dropped = tl.sum(valid.to(tl.int32), axis=0) - tl.sum(kept.to(tl.int32), axis=0)
    tl.store(hist_ptr + dropped_row + t, dropped)  # dropped_row = E * num_tiles


@triton.jit
def _route_scan_kernel(hist_ptr, counts_ptr, E, num_tiles, EB: tl.constexpr, CHUNK: tl.constexpr):
    e = tl.program_id(0) * EB + tl.arange(0, EB)  # EB buckets per program
    row = hist_ptr + e.to(tl.int64)[:, None] * num_tiles
    carry = tl.zeros([EB], tl.int32)
    c0 = tl.program_id(0) * 0
    while c0 < num_tiles:  # a runtime bound: see the interpreter note at the top
        o = c0 + tl.arange(0, CHUNK)
        m = (e[:, None] <= E) & (o[None, :] < num_tiles)
        h = tl.load(row + o[None, :], mask=m, other=0)
        # In place: the value stored at o depends on the value loaded from o.
        tl.store(row + o[None, :], carry[:, None] + tl.cumsum(h, axis=1) - h, mask=m)
        carry += tl.sum(h, axis=1)
        c0 += CHUNK
    tl.store(counts_ptr + e, carry, mask=e < E)


@triton.jit
def _route_place_kernel(
    ids_ptr,
    hist_ptr,
    counts_ptr,
    offs_ptr,
    padded_offs_ptr,
    sorted_ptr,
    inverse_ptr,
    tokens_ptr,
    n,
    k,
    E,
    num_tiles,
    block_m,
    BLOCK: tl.constexpr,
    JB: tl.constexpr,
    E1_PAD: tl.constexpr,  # next power of two >= E + 1 (the dropped bucket)
    HAS_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    ev = tl.arange(0, E1_PAD)
    cnt = tl.load(counts_ptr + ev, mask=ev < E, other=0)
    incl = tl.cumsum(cnt, axis=0)
    starts = incl - cnt  # starts[E] = number of kept slots: dropped slots go last
    first = t == 0
    tl.store(offs_ptr + ev, incl, mask=(ev < E) & first)
    if HAS_PAD:
        pc = (cnt + block_m - 1) // block_m * block_m
        tl.store(padded_offs_ptr + ev, tl.cumsum(pc, axis=0), mask=(ev < E) & first)

    i = tl.arange(0, BLOCK)
    s = t * BLOCK + i
    valid = s < n
    idv = tl.load(ids_ptr + s, mask=valid, other=-1)
    key = tl.where((idv >= 0) & (idv < E), idv, E)
    # Stable rank inside the tile: how many earlier slots of the tile share the bucket.
    # Masked lanes (bucket E) trail the valid ones, so they never count.
    rank = tl.zeros([BLOCK], tl.int32)
    for jc in tl.static_range(0, BLOCK, JB):
        j = jc + tl.arange(0, JB)
        sj = t * BLOCK + j
        idj = tl.load(ids_ptr + sj, mask=sj < n, other=-1)
        keyj = tl.where((idj >= 0) & (idj < E), idj, E)
        eq = (key[:, None] == keyj[None, :]) & (j[None, :] < i[:, None])
        rank += tl.sum(eq.to(tl.int32), axis=1)
    prefix = tl.load(hist_ptr + key.to(tl.int64) * num_tiles + t, mask=valid, other=0)
    dest = tl.gather(starts, key, 0) + prefix + rank
    tl.store(sorted_ptr + dest, s, mask=valid)
    tl.store(tokens_ptr + dest, s // k, mask=valid)
    tl.store(inverse_ptr + s, dest, mask=valid)


@triton.jit
def _route_pad_kernel(
    counts_ptr,
    offs_ptr,
    padded_offs_ptr,
    sorted_ptr,
    padded_slots_ptr,
    block_expert_ptr,
    n,
    E,
    P,
    block_m,
    PB: tl.constexpr,
    SEARCH_ITERS: tl.constexpr,  # E.bit_length() >= ceil(log2(E + 1))
):
    p = tl.program_id(0) * PB + tl.arange(0, PB)
    valid = p < P
    # e = #{j : padded_offs[j] <= p}: the expert owning padded row p (E past the last one),
    # the same as searchsorted(padded_offs, p, right=True).
    lo = tl.zeros([PB], tl.int32)
    hi = tl.zeros([PB], tl.int32) + E
    for _ in tl.static_range(SEARCH_ITERS):
        act = valid & (lo < hi)
        mid = (lo + hi) // 2
        v = tl.load(padded_offs_ptr + mid, mask=act, other=0)
        lo = tl.where(act & (v <= p), mid + 1, lo)
        hi = tl.where(act & (v > p), mid, hi)
    inr = valid & (lo < E)
    ec = tl.where(inr, lo, 0)
    cnt = tl.load(counts_ptr + ec, mask=inr, other=0)
    pend = tl.load(padded_offs_ptr + ec, mask=inr, other=0)
    oend = tl.load(offs_ptr + ec, mask=inr, other=0)
    r = p - (pend - (cnt + block_m - 1) // block_m * block_m)  # row inside the expert
    is_row = inr & (r < cnt)
    slot = tl.load(sorted_ptr + (oend - cnt + r), mask=is_row, other=0)
    tl.store(padded_slots_ptr + p, tl.where(is_row, slot, n), mask=valid)
    # Padded ends are multiples of block_m, so a block has one expert: that of its first row.
    tl.store(block_expert_ptr + p // block_m, tl.where(lo < E, lo, -1), mask=valid & (p % block_m == 0))


def route_metadata_triton(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """Group the routed slots by expert; the semantics of ``route_metadata_ref``.

    Args (validated by the caller):
        ids: [T, k] contiguous int32, values in [-1, E); -1 (or any value outside [0, E))
            marks a dropped slot. n = T*k >= 0.
        num_experts: E <= 1024.
        block_m: 0, or the row-block size each expert's rows are padded to.

    Returns int32 tensors (counts [E], offs [E], sorted_slots [n], inverse [n], tokens [n],
    padded_slots [P], block_expert [P // block_m], padded_offs [E]), the last three empty
    when block_m == 0, with P = (n + E*(block_m - 1)) // block_m * block_m. sorted_slots
    lists the slots expert by expert, ascending within an expert, dropped slots last;
    padded_slots holds the sentinel n in padding rows; block_expert is -1 past the last
    used block. Three launches (four with block_m > 0); no host synchronisation.
    """
    T, k = ids.shape
    E = int(num_experts)
    n = T * k
    dev = ids.device
    i32 = torch.int32
    counts = torch.empty(E, dtype=i32, device=dev)
    offs = torch.empty(E, dtype=i32, device=dev)
    sorted_slots = torch.empty(n, dtype=i32, device=dev)
    inverse = torch.empty(n, dtype=i32, device=dev)
    tokens = torch.empty(n, dtype=i32, device=dev)
    num_tiles = max(1, _cdiv(n, _META_BLOCK))
    hist = torch.empty((E + 1) * num_tiles, dtype=i32, device=dev)
    if block_m > 0:
        P = (n + E * (block_m - 1)) // block_m * block_m
        padded_slots = torch.empty(P, dtype=i32, device=dev)
        block_expert = torch.empty(P // block_m, dtype=i32, device=dev)
        padded_offs = torch.empty(E, dtype=i32, device=dev)
    else:
        P = 0  # three distinct empty tensors: a custom op's outputs may not alias each other
        padded_slots, block_expert, padded_offs = (torch.empty(0, dtype=i32, device=dev) for _ in range(3))

    def ptr(t: torch.Tensor) -> torch.Tensor:
        # Empty tensors are never dereferenced (every access is masked off), but hand the
        # kernels a real allocation rather than a possibly null pointer.
        return t if t.numel() > 0 else hist

    ids_flat = ptr(ids.reshape(-1))
    _route_hist_kernel[(num_tiles,)](
        ids_flat,
        hist,
        n,
        E,
        num_tiles,
        E * num_tiles,
        BLOCK=_META_BLOCK,
        NBINS=max(32, _next_pow2(E)),
        num_warps=4,
    )
    chunk = min(_META_SCAN_CHUNK, _next_pow2(num_tiles))
    eb = min(_next_pow2(E + 1), max(1, 2048 // chunk))
    _route_scan_kernel[(_cdiv(E + 1, eb),)](hist, ptr(counts), E, num_tiles, EB=eb, CHUNK=chunk, num_warps=4)
    _route_place_kernel[(num_tiles,)](
        ids_flat,
        hist,
        ptr(counts),
        ptr(offs),
        ptr(padded_offs),
        ptr(sorted_slots),
        ptr(inverse),
        ptr(tokens),
        n,
        max(k, 1),
        E,
        num_tiles,
        max(block_m, 1),
        BLOCK=_META_BLOCK,
        JB=_META_JB,
        E1_PAD=_next_pow2(E + 1),
        HAS_PAD=block_m > 0,
        num_warps=8,
    )
    if P > 0:
        _route_pad_kernel[(_cdiv(P, _META_PB),)](
            ptr(counts),
            ptr(offs),
            ptr(padded_offs),
            ptr(sorted_slots),
            padded_slots,
            block_expert,
            n,
            E,
            P,
            block_m,
            PB=_META_PB,
            SEARCH_ITERS=E.bit_length(),
            num_warps=4,
        )
    return counts, offs, sorted_slots, inverse, tokens, padded_slots, block_expert, padded_offs
