"""Triton kernels for MoE routing: top-k expert selection and the expert-grouping metadata.

The semantics are those of ``sparseops.reference.routing`` (the specification): ids and
metadata bit for bit, weights to accumulate-dtype rounding. The kernels are plain Triton
(no autotune, one config per shape from the launch tables below) so that they also run
under ``TRITON_INTERPRET=1`` on CPU tensors, which is how the CPU-only test suite runs them.

Host functions (called by ``sparseops.ops.routing`` or the C++ op's Python hook, which
validate the arguments and preallocate the outputs; the launchers only assert the contract):

* ``topk_route_triton``: one launch, ``cdiv(T, BLOCK_T)`` programs of BLOCK_T tokens each.
* ``route_metadata_triton``: three launches (four with ``block_m > 0``), no host sync,
  every output sized from static bounds (CUDA-graph capturable), no atomics deciding order.

Interpreter notes (see ``kernels/_common.py``): loop bounds are constexpr (k, n_group,
topk_group: a recompile per routing config, not per batch) or a ``while`` loop on a runtime
scalar, because ``for i in range(x)`` with a runtime ``x`` fails under numpy >= 2.3; masks
never combine a tensor with a scalar boolean, which the triton 3.9 interpreter turns into
an int32 mask that loads and stores reject.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from ._common import (
    argmax_lowest_index,
    cdiv,
    exclusive_cumsum,
    f64_bits,
    f64_from_bits,
    first_program_bound,
    histogram,
    masked_softmax,
    nan_to_neg_inf,
    next_pow2,
    on_gpu,
    segment_score,
    take_where,
)

__all__ = ["topk_route_triton", "route_metadata_triton"]


# --------------------------------------------------------------------------------------
# topk_route
# --------------------------------------------------------------------------------------


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
    K: tl.constexpr,  # experts per token (loop bounds are constexpr: see the module note)
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
    GROUP_TOP2: tl.constexpr,  # a group scores the sum of its two best (else its best) experts
    NEED_SCORE: tl.constexpr,  # HAS_BIAS or GROUPED: rank by the fp64-computed score
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    # [BLOCK_T, 1] all true: broadcasts a per-expert mask to the tile as a tensor, never
    # through a scalar boolean (see the module note).
    all_rows = (rows >= 0)[:, None]

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
            s64 = masked_softmax(x64, en2)
        biased = s64.to(ACC)
        if HAS_BIAS:
            b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(ACC)
            biased = biased + b[None, :]
    if HAS_BIAS:  # noqa: SIM108
        rank = biased
    else:
        rank = x
    rank = tl.where(en2, nan_to_neg_inf(rank), float("-inf"))

    # Candidates: enabled experts, restricted to the topk_group best groups when grouped.
    if GROUPED:
        # As the reference's nan_to_num(nan=-inf): an infinite score counts as the largest
        # finite value, NaN and a disabled expert as -inf (the select, not the clamp, maps
        # NaN: the NaN handling of min / max differs between numpy and GPU code). So no group value
        # is NaN or +inf, and no group score is NaN (a top-2 sum may overflow to +inf).
        big = tl.full([1, 1], ACC_MAX, ACC)
        pg = tl.minimum(tl.maximum(biased, -big), big)
        pg = tl.where(en2 & (biased == biased), pg, float("-inf"))
        gcols = tl.arange(0, G_PAD)
        gscore = tl.full([BLOCK_T, G_PAD], float("-inf"), ACC)
        # A loop (not unrolled) over groups with column masks, so any group size works.
        for g in range(N_GROUP):
            lo = g * group_size
            in_g = (cols[None, :] >= lo) & (cols[None, :] < lo + group_size)
            s = segment_score(pg, in_g, cols[None, :], E_PAD, GROUP_TOP2)
            gscore = tl.where(gcols[None, :] == g, s[:, None], gscore)
        # TOPK_GROUP rounds of argmax over the groups, lower group first on ties.
        gavail = (gcols[None, :] < N_GROUP) & all_rows  # [BLOCK_T, G_PAD]
        chosen = (cols[None, :] < 0) & all_rows  # [BLOCK_T, E_PAD] all false
        for _ in range(TOPK_GROUP):
            _gm, gsel = argmax_lowest_index(gscore, gavail, gcols[None, :], G_PAD)
            gavail = gavail & (gcols[None, :] != gsel[:, None])
            glo = gsel * group_size
            chosen = chosen | ((cols[None, :] >= glo[:, None]) & (cols[None, :] < glo[:, None] + group_size))
        cand = chosen & en2
    else:
        cand = all_rows & en2

    # What the weights are made of, per expert: the logit (softmax over the chosen ones
    # later), sigmoid(logit), or the softmax over enabled experts.
    if TOPK_THEN_SOFTMAX:
        wsrc = x
    elif SIGMOID:
        wsrc = 1.0 / (1.0 + tl.exp(-x))
    else:
        wsrc = masked_softmax(x, en2)

    # K rounds of argmax among candidates, lower index on ties.
    kcols = tl.arange(0, K_PAD)
    ids_t = tl.full([BLOCK_T, K_PAD], -1, tl.int32)
    val_t = tl.zeros([BLOCK_T, K_PAD], ACC)
    for r in range(K):
        _m, sel = argmax_lowest_index(rank, cand, cols[None, :], E_PAD)
        hit = cols[None, :] == sel[:, None]  # nowhere when no candidate is left (sel == E_PAD)
        cand = cand & (cols[None, :] != sel[:, None])
        v = take_where(wsrc, hit)
        slot = kcols[None, :] == r
        ids_t = tl.where(slot, tl.where(sel < E_PAD, sel, -1)[:, None], ids_t)
        val_t = tl.where(slot, v[:, None], val_t)

    valid = ids_t >= 0
    if TOPK_THEN_SOFTMAX:
        # The slot tile as a masked softmax over the valid slots: a NaN or +inf selected
        # logit, or no valid slot, makes the row NaN -> zeros, as softmax(...).nan_to_num(0).
        w = masked_softmax(tl.where(valid, val_t, float("-inf")), (kcols < K)[None, :])
    else:
        w = tl.where(valid, val_t, 0.0)
        if RENORMALIZE:
            tot = tl.sum(w, axis=1)
            pos = tot > 0
            w = tl.where(pos[:, None], w / tl.where(pos, tot, 1.0)[:, None], 0.0)
    w = w * f64_from_bits(scale_bits).to(ACC)

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
    block_t = min(block_t, next_pow2(T))
    if on_gpu:
        # Not under the interpreter, which runs programs one after another: there fewer,
        # bigger programs are faster, and T = 1 still covers one-token programs.
        block_t = min(block_t, next_pow2(cdiv(T, _TOPK_MIN_PROGRAMS)))
    # ~8-16 tile values per thread once the tile shrinks.
    num_warps = max(1, min(num_warps, block_t * E_PAD // 256))
    return block_t, num_warps


_GROUP_SCORINGS = ("top2_sum", "max")


def topk_route_triton(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    weights: torch.Tensor,
    ids: torch.Tensor,
    opts: Any,
) -> None:
    """Top-k routing into preallocated outputs, one Triton launch; the semantics of ``topk_route_ref``.

    Args (validated by the caller; only the contract is asserted here):
        logits: [T, E] contiguous, fp32 / fp16 / bf16 / fp64; T >= 1, 1 <= E <= 1024.
        bias: None or [E] contiguous in the accumulate dtype (fp64 for fp64 logits, else
            fp32); shifts the ranking only.
        mask: None or [E] contiguous bool, True = enabled expert.
        weights: [T, k] contiguous, accumulate dtype; written in full.
        ids: [T, k] contiguous int32; written in full.
        opts: any object with the plain-Python attributes
            k: experts per token, 1 <= k <= min(E, 32);
            scoring: "softmax" or "sigmoid";
            order: "softmax_then_topk" or "topk_then_softmax" (softmax scoring only);
            renormalize: divide the selected weights by their sum (when > 0); ignored by
                topk_then_softmax, whose weights already sum to 1;
            n_group, topk_group: keep the topk_group best of n_group equal groups (n_group
                divides E), each scored as group_scoring says;
            group_scoring: "top2_sum" (the sum of a group's two best biased scores) or
                "max" (its best biased score);
            scale: multiplies the weights.

    Writes ids in selection order (best first, lower expert index on ties; slots no
    candidate can fill get -1) and their weights (0 for -1 slots).
    """
    T, E = logits.shape
    k, n_group = int(opts.k), int(opts.n_group)
    fp64 = logits.dtype == torch.float64
    acc = torch.float64 if fp64 else torch.float32
    assert T >= 1 and logits.is_contiguous(), "topk_route_triton: logits [T >= 1, E] contiguous"
    assert weights.shape == (T, k) and weights.dtype == acc and weights.is_contiguous(), "weights [T, k] acc"
    assert ids.shape == (T, k) and ids.dtype == torch.int32 and ids.is_contiguous(), "ids [T, k] int32"
    assert bias is None or (bias.shape == (E,) and bias.dtype == acc and bias.is_contiguous()), "bias [E] acc"
    assert mask is None or (mask.shape == (E,) and mask.dtype == torch.bool and mask.is_contiguous()), "mask [E]"
    assert opts.group_scoring in _GROUP_SCORINGS, opts.group_scoring
    E_PAD = next_pow2(E)
    block_t, num_warps = _topk_launch_config(T, E_PAD, on_gpu(logits))
    sigmoid = opts.scoring == "sigmoid"
    grouped = n_group > 1
    group_size = E // n_group
    _topk_route_kernel[(cdiv(T, block_t),)](
        logits,
        logits if bias is None else bias,  # never read without HAS_BIAS / HAS_MASK
        logits if mask is None else mask.view(torch.uint8),
        weights,
        ids,
        T,
        E,
        group_size,
        f64_bits(opts.scale),
        K=k,
        N_GROUP=n_group,
        TOPK_GROUP=int(opts.topk_group),
        ACC=tl.float64 if fp64 else tl.float32,
        ACC_MAX=torch.finfo(acc).max,
        E_PAD=E_PAD,
        K_PAD=next_pow2(k),
        G_PAD=next_pow2(n_group),
        BLOCK_T=block_t,
        SIGMOID=sigmoid,
        TOPK_THEN_SOFTMAX=(not sigmoid) and opts.order == "topk_then_softmax",
        RENORMALIZE=bool(opts.renormalize),
        HAS_BIAS=bias is not None,
        HAS_MASK=mask is not None,
        GROUPED=grouped,
        # A group of one expert scores that expert under either rule.
        GROUP_TOP2=opts.group_scoring == "top2_sum" and group_size >= 2,
        NEED_SCORE=bias is not None or grouped,
        num_warps=num_warps,
    )


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
# n == 0 (outside the caller contract, accepted all the same) still launches (a)-(c) with
# one fully masked tile, so counts and offs are written.

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
    h = histogram(tl.where(kept, idv, 0), NBINS, kept)  # every value in range
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
    while c0 < num_tiles:  # a runtime bound: see the module note
        o = c0 + tl.arange(0, CHUNK)
        m = (e[:, None] <= E) & (o[None, :] < num_tiles)
        h = tl.load(row + o[None, :], mask=m, other=0)
        # In place: the value stored at o depends on the value loaded from o.
        tl.store(row + o[None, :], carry[:, None] + exclusive_cumsum(h, 1), mask=m)
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
    starts = exclusive_cumsum(cnt, 0)  # starts[E] = number of kept slots: dropped slots go last
    # Program 0 writes offs and padded_offs. The program test is folded into the bound, not
    # and-ed into the mask as a scalar boolean (see the module note).
    lim = first_program_bound(E)
    tl.store(offs_ptr + ev, starts + cnt, mask=ev < lim)
    if HAS_PAD:
        pc = (cnt + block_m - 1) // block_m * block_m
        tl.store(padded_offs_ptr + ev, tl.cumsum(pc, axis=0), mask=ev < lim)

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


def route_metadata_triton(ids: torch.Tensor, num_experts: int, block_m: int, out: Sequence[torch.Tensor]) -> None:
    """Group the routed slots by expert into preallocated outputs; the semantics of ``route_metadata_ref``.

    Args (validated by the caller; only the contract is asserted here):
        ids: [T, k] contiguous int32 with n = T*k >= 1 (n = 0 works too); values in
            [-1, E): -1 marks a dropped slot, and so does any value outside [0, E), which
            is never used as an index.
        num_experts: E, 1 <= E <= 1024.
        block_m: 0, or the row-block size each expert's rows are padded to.
        out: the 8 contiguous int32 outputs, each written in full: counts [E], offs [E],
            sorted_slots [n], inverse [n], tokens [n], padded_slots [P], block_expert
            [P // block_m], padded_offs [E], where P = (n + E*(block_m - 1)) // block_m *
            block_m; with block_m == 0 the last three are empty (P = 0).

    sorted_slots lists the slots expert by expert, ascending within an expert, dropped
    slots last; padded_slots holds the sentinel n in padding rows; block_expert is -1 past
    the last used block. Three launches (four with block_m > 0), a small int32 workspace
    from the caching allocator, no host synchronisation.
    """
    T, k = ids.shape
    E = int(num_experts)
    n = T * k
    P = (n + E * (block_m - 1)) // block_m * block_m if block_m > 0 else 0
    counts, offs, sorted_slots, inverse, tokens, padded_slots, block_expert, padded_offs = out
    assert ids.dtype == torch.int32 and ids.is_contiguous(), "route_metadata_triton: ids [T, k] contiguous int32"
    sizes = (E, E, n, n, n, P, P // block_m if block_m > 0 else 0, E if block_m > 0 else 0)
    for t, size in zip(out, sizes, strict=True):
        assert t.dtype == torch.int32 and t.shape == (size,) and t.is_contiguous(), (t.shape, size)
    dev = ids.device
    num_tiles = max(1, cdiv(n, _META_BLOCK))
    hist = torch.empty((E + 1) * num_tiles, dtype=torch.int32, device=dev)

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
        NBINS=max(32, next_pow2(E)),
        num_warps=4,
    )
    chunk = min(_META_SCAN_CHUNK, next_pow2(num_tiles))
    eb = min(next_pow2(E + 1), max(1, 2048 // chunk))
    _route_scan_kernel[(cdiv(E + 1, eb),)](hist, counts, E, num_tiles, EB=eb, CHUNK=chunk, num_warps=4)
    _route_place_kernel[(num_tiles,)](
        ids_flat,
        hist,
        counts,
        offs,
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
        E1_PAD=next_pow2(E + 1),
        HAS_PAD=block_m > 0,
        num_warps=8,
    )
    if P > 0:
        _route_pad_kernel[(cdiv(P, _META_PB),)](
            counts,
            offs,
            padded_offs,
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
