"""Helpers shared by every Triton kernel family of sparseops: host-side launch arithmetic and
small ``@triton.jit`` building blocks (reductions, selection, softmax).

Every jit helper here runs both compiled and under ``TRITON_INTERPRET=1`` with each triton
the package admits (tested with the pinned and the newest release). Interpreter rules the
helpers follow, and kernels using them should too:

* Masks are built only from tensor comparisons combined with ``&`` / ``|``. Combining a
  tensor mask with a *scalar* boolean (``(a < b) & (pid == 0)``) yields an int32 mask under
  the triton 3.9 interpreter, which ``tl.load`` / ``tl.store`` reject ("mask has
  unsupported dtype"). Fold scalar conditions into a bound instead (``first_program_bound``).
* Loop bounds are constexpr or ``while`` loops on runtime scalars: ``for i in range(x)``
  with a runtime ``x`` fails under numpy >= 2.3.
* bf16 / fp16 values are widened to fp32 on load (bf16 arithmetic misbehaves there).
* ``tl.histogram`` goes through ``histogram`` here (an int64 result labelled int32 in the
  triton 3.4 / 3.5 interpreters).
* Selection keys passed to the argmax helpers are never NaN: map NaN to -inf first
  (``nan_to_neg_inf``), so that every backend orders candidates the same strict way.
"""

from __future__ import annotations

import os
import struct

import torch
import triton
import triton.language as tl

__all__ = [
    "next_pow2",
    "cdiv",
    "f64_bits",
    "interpreting",
    "on_gpu",
    "f64_from_bits",
    "nan_to_neg_inf",
    "row_max",
    "ranks_before",
    "argmax_lowest_index",
    "take_where",
    "masked_softmax",
    "segment_score",
    "exclusive_cumsum",
    "first_program_bound",
    "histogram",
]

# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1): tl.arange and block sizes need one."""
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def f64_bits(x: float) -> int:
    """The IEEE-754 bit pattern of fp64 ``x`` as a signed int64.

    Triton passes a Python float kernel argument as fp32, which would round a value such as
    a routing scale of 0.1; pass these bits instead and decode them with ``f64_from_bits``
    (mark the argument ``do_not_specialize`` so every value shares one compilation).
    """
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (``TRITON_INTERPRET=1``).

    Read per call rather than cached at import: tests set the variable before the first
    kernel compiles, which may be after this module is imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_gpu(t: torch.Tensor) -> bool:
    """True when kernels on ``t`` run compiled on a GPU (not interpreted on CPU tensors).

    Launch tables use it: the interpreter runs programs one after another, so there fewer,
    bigger programs are faster, while a GPU wants enough programs to fill its SMs.
    """
    return t.is_cuda and not interpreting()


# --------------------------------------------------------------------------------------
# Device side
# --------------------------------------------------------------------------------------


@triton.jit
def f64_from_bits(bits):
    """The fp64 value whose bit pattern ``f64_bits`` produced on the host."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def nan_to_neg_inf(x):
    """x with every NaN replaced by -inf: how selection keys treat NaN on every backend."""
    return tl.where(x != x, float("-inf"), x)


@triton.jit
def row_max(x, valid):
    """Per row of ``x`` [R, C], the max over the columns where ``valid`` (broadcastable to
    [R, C]) holds, NaNs ignored; -inf for a row with no valid, non-NaN entry.

    NaN is excluded explicitly rather than left to ``tl.max``, whose NaN handling is not
    the same everywhere (the interpreter's numpy max propagates NaN; compiled code need
    not), so every backend and release gets the same answer.
    """
    return tl.max(tl.where(valid & (x == x), x, float("-inf")), axis=1)


@triton.jit
def ranks_before(va, ia, vb, ib):
    """True where candidate (va, ia) ranks before (vb, ib): larger value first, lower index on
    ties; the one ordering rule of every routing backend (csrc/include/sparseops/ranking.h).
    Values must not be NaN (see ``nan_to_neg_inf``)."""
    return (va > vb) | ((va == vb) & (ia < ib))


@triton.jit
def argmax_lowest_index(key, cand, idx, NONE: tl.constexpr):
    """Per row, the best candidate by ``ranks_before``: (max key, its lowest index).

    key [R, C] (never NaN), cand [R, C] bool: which entries may be chosen, idx [1, C] or
    [R, C] int32: each column's index. Returns (value [R], index [R]); index is NONE (pick a
    value larger than every index) for a row without candidates. A candidate whose key is
    -inf still wins over "no candidate", because candidacy is a separate mask.
    """
    m = tl.max(tl.where(cand, key, float("-inf")), axis=1)
    i = tl.min(tl.where(cand & (key == m[:, None]), idx, NONE), axis=1)
    return m, i


@triton.jit
def take_where(x, hit):
    """Per row, the value of ``x`` [R, C] at the column where ``hit`` [R, C] holds (at most
    one per row); 0 where a row has none. A one-hot gather made of a select and a row sum,
    which compiles and interprets alike on every triton release."""
    return tl.sum(tl.where(hit, x, 0.0), axis=1)


@triton.jit
def masked_softmax(x, en):
    """Row softmax of ``x`` [R, C] over the columns where ``en`` [1, C] is true, in x's dtype.

    Disabled columns get 0. A row whose softmax is NaN (no enabled column, a NaN or a +inf
    logit, all logits -inf) gives all zeros, as ``torch.softmax(...).nan_to_num(0)`` does:
    the max ignores NaN, so a NaN (or inf - inf) reaches the sum and makes every entry NaN.
    """
    mx = row_max(x, en)
    e = tl.where(en, tl.exp(tl.where(en, x, float("-inf")) - mx[:, None]), 0.0)
    p = e / tl.sum(e, axis=1)[:, None]
    return tl.where(p == p, p, 0.0)


@triton.jit
def segment_score(v, in_seg, idx, NONE: tl.constexpr, TOP2: tl.constexpr):
    """Per row, the score of the entries of ``v`` [R, C] where ``in_seg`` holds: their max, or
    with TOP2 the sum of their two largest values, counting a duplicated maximum twice (the
    best's lowest index is what is excluded, as torch.topk(2).values.sum() does).

    v must not be NaN; idx [1, C] int32 column indices, NONE larger than any of them. A
    segment of one entry with TOP2 adds -inf: callers pass TOP2 only for segments of >= 2.
    """
    m1, i1 = argmax_lowest_index(v, in_seg, idx, NONE)
    if TOP2:
        m2 = row_max(v, in_seg & (idx != i1[:, None]))
        s = m1 + m2
    else:
        s = m1
    return s


@triton.jit
def exclusive_cumsum(x, axis: tl.constexpr):
    """Exclusive prefix sum along ``axis`` (integer x: exact)."""
    return tl.cumsum(x, axis=axis) - x


@triton.jit
def first_program_bound(n):
    """``n`` in program 0 of axis 0 and 0 elsewhere: ``offs < first_program_bound(n)`` masks a
    store to program 0 with one tensor comparison (see the module note on scalar masks)."""
    return tl.where(tl.program_id(0) == 0, n, 0)


@triton.jit
def histogram(values, NBINS: tl.constexpr, mask):
    """int32 [NBINS] counts of ``values`` over the lanes where ``mask`` holds.

    Every masked-in value must lie in [0, NBINS): the GPU lowering aliases out-of-range
    values onto low bins instead of dropping them, so map them (and masked-off lanes) into
    range first. The round trip through int64 is for the triton 3.4 / 3.5 interpreters,
    whose histogram returns int64 data labelled int32, which a store then writes as 8-byte
    elements over its neighbours; compiled, the two casts fold away.
    """
    return tl.histogram(values, NBINS, mask=mask).to(tl.int64).to(tl.int32)
