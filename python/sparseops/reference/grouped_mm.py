"""Reference for ``sparseops.grouped_mm`` (the semantics of ``torch._grouped_mm`` /
``F.grouped_mm``, without their restrictions) and its fusion helpers ``gather_rows``,
``scatter_rows``, ``row_scale``.

grouped_mm(a, b, offs=None, *, bias=None, out_dtype=None). ``offs`` [G] int32 holds the
cumulative ends of the groups along the one jagged dimension (group g spans
[offs[g-1], offs[g]), offs[-1] := 0); it must be non-decreasing with offs[-1] <= that
dimension's length. Four layouts (s0, s1 = the span of group g):

    2D x 3D  a [S, K],    b [G, K, N], offs [G]: out [S, N],    out[s0:s1] = a[s0:s1] @ b[g]
    2D x 2D  a [M, S],    b [S, N],    offs [G]: out [G, M, N], out[g] = a[:, s0:s1] @ b[s0:s1]
                                                    (ragged K; an empty group gives zeros)
    3D x 3D  a [G, M, K], b [G, K, N], offs None: out [G, M, N], out[g] = a[g] @ b[g]
    3D x 2D  a [G, M, K], b [K, S],    offs [G]: out [M, S],    out[:, s0:s1] = a[g] @ b[:, s0:s1]

Beyond torch: any group size (0 included), any number of groups, any strides (b is often a
transposed view of [G, N, K] weights), fp32 / bf16 / fp16 / fp64. Rows (2D x 3D) or columns
(3D x 2D) of the output past offs[-1] belong to no group and are ZERO (torch leaves them
uninitialised); their gradient is zero too.

bias (optional, differentiable): [G, N] for 2D x 3D / 2D x 2D / 3D x 3D, added to every row
of group g's output (an empty 2D x 2D group's output is then bias[g]); [S] for 3D x 2D, one
value per output column, added only to columns inside a group.

out_dtype: None (a's dtype) or a's dtype, or fp32 for bf16 / fp16 inputs. Products are
summed at fp32 (fp64 for fp64 inputs) and rounded once to the output dtype.
"""

from __future__ import annotations

import torch

LAYOUTS = ("2d3d", "2d2d", "3d3d", "3d2d")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def layout_of(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{a.dim()}d{b.dim()}d"


def _spans(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    return list(zip(starts, ends))


def grouped_mm_ref(a, b, offs=None, *, bias=None, out_dtype=None) -> torch.Tensor:
    """The semantics above as a loop over the groups (the oracle; not fast)."""
    out_dtype = out_dtype or a.dtype
    acc = accumulate_dtype(a.dtype)
    aa, ba = a.to(acc), b.to(acc)
    bias_a = bias.to(acc) if bias is not None else None
    lay = layout_of(a, b)
    if lay == "3d3d":
        out = torch.bmm(aa, ba)
        if bias_a is not None:
            out = out + bias_a[:, None, :]
        return out.to(out_dtype)
    spans = _spans(offs)
    G = len(spans)
    if lay == "2d3d":
        out = torch.zeros((a.shape[0], b.shape[2]), dtype=acc, device=a.device)
        for g, (s0, s1) in enumerate(spans):
            if s1 > s0:
                out[s0:s1] = aa[s0:s1] @ ba[g]
                if bias_a is not None:
                    out[s0:s1] += bias_a[g]
    elif lay == "2d2d":
        out = torch.zeros((G, a.shape[0], b.shape[1]), dtype=acc, device=a.device)
        for g, (s0, s1) in enumerate(spans):
            out[g] = aa[:, s0:s1] @ ba[s0:s1]
            if bias_a is not None:
                out[g] += bias_a[g]
    elif lay == "3d2d":
        out = torch.zeros((a.shape[1], b.shape[1]), dtype=acc, device=a.device)
        for g, (s0, s1) in enumerate(spans):
            if s1 > s0:
                out[:, s0:s1] = aa[g] @ ba[:, s0:s1]
                if bias_a is not None:
                    out[:, s0:s1] += bias_a[s0:s1]
    else:
        raise ValueError(f"grouped_mm takes 2-D or 3-D operands, got a {a.dim()}-D and b {b.dim()}-D")
    return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Fusion helpers (index int32 / int64; -1 = "no row").


def gather_rows_ref(a: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out [n, D] with out[i] = a[index[i]], a zero row where index[i] == -1."""
    idx = index.long()
    out = torch.zeros((idx.numel(), a.shape[1]), dtype=a.dtype, device=a.device)
    keep = idx >= 0
    out[keep] = a[idx[keep]]
    return out


def scatter_rows_ref(src: torch.Tensor, index: torch.Tensor, out_rows: int) -> torch.Tensor:
    """out [out_rows, D] zeros, then out[index[i]] += src[i] for index[i] >= 0 (rows that
    receive several sources are summed at the accumulation dtype, in source order)."""
    acc = accumulate_dtype(src.dtype)
    idx = index.long()
    keep = idx >= 0
    out = torch.zeros((out_rows, src.shape[1]), dtype=acc, device=src.device)
    out.index_add_(0, idx[keep], src[keep].to(acc))
    return out.to(src.dtype)


def row_scale_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """out[i] = x[i] * scale[i], computed at the accumulation dtype, in x's dtype."""
    acc = accumulate_dtype(x.dtype)
    return (x.to(acc) * scale.to(acc)[:, None]).to(x.dtype)
