"""Grouped GEMM: ``sparseops.grouped_mm`` and its fusion helpers ``gather_rows``,
``scatter_rows``, ``row_scale``.

Each op is declared once, in C++ (csrc/registration.cpp), where its arguments are parsed and
checked for every backend (csrc/ops/grouped_mm.cpp). This module registers the fake
implementations, the autograd formulas (each backward is made of these same ops, so double
backward works too), each backend with its rank and reason (``sparseops._backend``), the
Python kernels of the reference backend, and the public functions. The semantics are
specified by ``sparseops.reference.grouped_mm``.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import grouped_mm as ref
from ._common import accumulate_dtype as _accumulate_dtype
from ._common import describe as _describe

__all__ = ["grouped_mm", "gather_rows", "scatter_rows", "row_scale"]


# ---------------------------------------------------------------------------------------------
# Fake implementations (SymInt-friendly), with the Python twins of the checks shapes depend on.


def _grouped_out_shape(a, b, offs):
    if a.dim() not in (2, 3) or b.dim() not in (2, 3):
        raise RuntimeError(f"grouped_mm takes 2-D or 3-D operands, got a {_describe(a)} and b {_describe(b)}")
    lay = ref.layout_of(a, b)
    if lay == "3d3d":
        if offs is not None:
            raise RuntimeError(f"offs must be None when a and b are both 3-D (batched), got {_describe(offs)}")
        return (a.shape[0], a.shape[1], b.shape[2])
    if offs is None:
        raise RuntimeError(f"offs is required when a or b is 2-D (layout {lay}: a {_describe(a)}, b {_describe(b)})")
    if lay == "2d3d":
        return (a.shape[0], b.shape[2])
    if lay == "2d2d":
        return (offs.shape[0], a.shape[0], b.shape[1])
    return (a.shape[1], b.shape[1])


def _grouped_mm_fake(a, b, offs=None, bias=None, out_dtype=None, backend="auto"):
    if b.dtype != a.dtype:
        raise RuntimeError(f"b must have the dtype of a ({a.dtype}), got {_describe(b)}")
    return a.new_empty(_grouped_out_shape(a, b, offs), dtype=out_dtype or a.dtype)


def _gather_fake(a, index, backend="auto"):
    return a.new_empty((index.shape[0], a.shape[1]))


def _scatter_fake(src, index, out_rows, backend="auto"):
    return src.new_empty((out_rows, src.shape[1]))


def _row_scale_fake(x, scale, backend="auto"):
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------------------------
# Autograd. With Y_g = A_g B_g: dA_g = dY_g B_g^T and dB_g = A_g^T dY_g, each again one
# grouped_mm over the same offs (a layout of the four); the bias gradient is the per-group
# column sum of dY (itself a grouped_mm against ones for the jagged layouts).


def _bwd_backend(ctx):
    return ctx.backend if ctx.backend in _GROUPED.backends else "auto"


def _grouped_setup(ctx, inputs, output) -> None:
    a, b, offs, bias, out_dtype, backend = inputs
    ctx.backend = backend
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(a, b, offs)


def _grouped_backward(ctx, dy):
    a, b, offs = ctx.saved_tensors
    need_a, need_b, _, need_bias = ctx.needs_input_grad[:4]
    backend = _bwd_backend(ctx)
    if backend == "auto":
        backend = _GROUPED.choose(None, a)
    g = dy.to(a.dtype)
    op = _grouped_op
    lay = ref.layout_of(a, b)
    da = db = dbias = None
    if lay == "2d3d":  # a [S, K], b [G, K, N], dy [S, N]
        if need_a:
            da = op(g, b.transpose(-2, -1), offs, None, None, backend)
        if need_b:
            db = op(a.transpose(0, 1), g, offs, None, None, backend)
        if need_bias:
            ones = g.new_ones((1, g.shape[0]))
            dbias = op(ones, g, offs, None, None, backend).squeeze(1)
    elif lay == "2d2d":  # a [M, S], b [S, N], dy [G, M, N]
        if need_a:
            da = op(g, b.transpose(0, 1), offs, None, None, backend)
        if need_b:
            db = op(a.transpose(0, 1), g, offs, None, None, backend)
        if need_bias:
            dbias = g.to(_accumulate_dtype(g.dtype)).sum(1)
    elif lay == "3d3d":  # a [G, M, K], b [G, K, N], dy [G, M, N]
        if need_a:
            da = op(g, b.transpose(-2, -1), None, None, None, backend)
        if need_b:
            db = op(a.transpose(-2, -1), g, None, None, None, backend)
        if need_bias:
            dbias = g.to(_accumulate_dtype(g.dtype)).sum(1)
    else:  # 3d2d: a [G, M, K], b [K, S], dy [M, S]
        if need_a:
            da = op(g, b.transpose(0, 1), offs, None, None, backend)
        if need_b:
            db = op(a.transpose(-2, -1), g, offs, None, None, backend)
        if need_bias:
            ones = g.new_ones((a.shape[0], 1, g.shape[0]))
            dbias = op(ones, g, offs, None, None, backend).squeeze(0)
    if dbias is not None:
        dbias = dbias.to(ctx.bias_dtype)
    return da, db, None, dbias, None, None


def _gather_setup(ctx, inputs, output) -> None:
    a, index, backend = inputs
    ctx.rows = a.shape[0]
    ctx.backend = backend if backend in _SCATTER.backends else "auto"
    ctx.save_for_backward(index)


def _gather_backward(ctx, g):
    (index,) = ctx.saved_tensors
    backend = ctx.backend if ctx.backend != "auto" else _SCATTER.choose(None, g)
    return _scatter_op(g, index, ctx.rows, backend), None, None


def _scatter_setup(ctx, inputs, output) -> None:
    src, index, out_rows, backend = inputs
    ctx.backend = backend if backend in _GATHER.backends else "auto"
    ctx.save_for_backward(index)


def _scatter_backward(ctx, g):
    (index,) = ctx.saved_tensors
    backend = ctx.backend if ctx.backend != "auto" else _GATHER.choose(None, g)
    return _gather_op(g, index, backend), None, None, None


def _row_scale_setup(ctx, inputs, output) -> None:
    x, scale, backend = inputs
    ctx.backend = backend if backend in _ROW_SCALE.backends else "auto"
    ctx.save_for_backward(x, scale)


def _row_scale_backward(ctx, g):
    x, scale = ctx.saved_tensors
    dx = dscale = None
    if ctx.needs_input_grad[0]:
        backend = ctx.backend if ctx.backend != "auto" else _ROW_SCALE.choose(None, g)
        dx = _row_scale_op(g, scale, backend)
    if ctx.needs_input_grad[1]:
        acc = _accumulate_dtype(x.dtype)
        dscale = (g.to(acc) * x.to(acc)).sum(1).to(scale.dtype)
    return dx, dscale, None


if _backend.HAS_C:
    torch.library.register_fake("sparseops::grouped_mm")(_grouped_mm_fake)
    torch.library.register_fake("sparseops::gather_rows")(_gather_fake)
    torch.library.register_fake("sparseops::scatter_rows")(_scatter_fake)
    torch.library.register_fake("sparseops::row_scale")(_row_scale_fake)
    torch.library.register_autograd("sparseops::grouped_mm", _grouped_backward, setup_context=_grouped_setup)
    torch.library.register_autograd("sparseops::gather_rows", _gather_backward, setup_context=_gather_setup)
    torch.library.register_autograd("sparseops::scatter_rows", _scatter_backward, setup_context=_scatter_setup)
    torch.library.register_autograd("sparseops::row_scale", _row_scale_backward, setup_context=_row_scale_setup)
    _grouped_op = torch.ops.sparseops.grouped_mm.default
    _gather_op = torch.ops.sparseops.gather_rows.default
    _scatter_op = torch.ops.sparseops.scatter_rows.default
    _row_scale_op = torch.ops.sparseops.row_scale.default


# ---------------------------------------------------------------------------------------------
# Backends: the C++ CPU kernels (csrc/cpu/grouped_mm.cpp), the Triton grouped_mm
# (kernels/grouped_mm.py; on CUDA tensors what auto picks, on CPU tensors only under
# TRITON_INTERPRET=1) and the reference. The fusion helpers have no CUDA or Triton kernel:
# CUDA tensors run their reference.


def _grouped_reference_kernel(inputs, outputs, options) -> None:
    a, b, offs, bias = inputs
    out = outputs[0]
    out.copy_(ref.grouped_mm_ref(a, b, offs, bias=bias, out_dtype=out.dtype))


def _grouped_triton_kernel(inputs, outputs, options) -> None:
    from ..kernels.grouped_mm import grouped_mm_triton

    a, b, offs, bias = inputs
    grouped_mm_triton(a, b, offs, bias, options["layout"], outputs[0])


def _triton_reason(device, *_):
    return _backend.triton_kernels(device)


def _gather_reference_kernel(inputs, outputs, options) -> None:
    a, index = inputs
    outputs[0].copy_(ref.gather_rows_ref(a, index))


def _scatter_reference_kernel(inputs, outputs, options) -> None:
    src, index = inputs
    outputs[0].copy_(ref.scatter_rows_ref(src, index, outputs[0].shape[0]))


def _row_scale_reference_kernel(inputs, outputs, options) -> None:
    x, scale = inputs
    outputs[0].copy_(ref.row_scale_ref(x, scale))


_GROUPED = _backend.Op("grouped_mm", _backend.tensor_facts("a"))
_GROUPED.register("cpu", rank=0, unsupported_reason=_backend.native_cpu)
_GROUPED.register("triton", rank=1, unsupported_reason=_triton_reason, kernel=_grouped_triton_kernel)
_GROUPED.register("reference", rank=9, unsupported_reason=_backend.always, kernel=_grouped_reference_kernel)
_GATHER = _backend.Op("gather_rows", _backend.tensor_facts("a"))
_GATHER.register("cpu", rank=0, unsupported_reason=_backend.native_cpu)
_GATHER.register("reference", rank=9, unsupported_reason=_backend.always, kernel=_gather_reference_kernel)
_SCATTER = _backend.Op("scatter_rows", _backend.tensor_facts("src"))
_SCATTER.register("cpu", rank=0, unsupported_reason=_backend.native_cpu)
_SCATTER.register("reference", rank=9, unsupported_reason=_backend.always, kernel=_scatter_reference_kernel)
_ROW_SCALE = _backend.Op("row_scale", _backend.tensor_facts("x"))
_ROW_SCALE.register("cpu", rank=0, unsupported_reason=_backend.native_cpu)
_ROW_SCALE.register("reference", rank=9, unsupported_reason=_backend.always, kernel=_row_scale_reference_kernel)


# ---------------------------------------------------------------------------------------------
# Public API


def grouped_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    offs: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """One GEMM per group (``torch._grouped_mm`` / ``F.grouped_mm`` semantics, without their
    restrictions). ``offs`` [G] int32 holds the cumulative ends of the groups along the
    jagged dimension (group g spans [offs[g-1], offs[g]), offs[-1] := 0).

    Layouts:
        a [S, K], b [G, K, N], offs [G]    -> [S, N]     rows of a grouped (MoE expert GEMM)
        a [M, S], b [S, N], offs [G]       -> [G, M, N]  ragged K (the weight gradient)
        a [G, M, K], b [G, K, N], no offs  -> [G, M, N]  batched
        a [G, M, K], b [K, S], offs [G]    -> [M, S]     columns of b grouped

    Any group size (0 included), any number of groups, any strides (b is typically a
    transposed view ``w.transpose(-2, -1)`` of [G, N, K] weights), fp32 / bf16 / fp16 / fp64.
    Rows (2D x 3D) or columns (3D x 2D) past offs[-1] are zero; an empty ragged-K group's
    output is zero (+ bias). offs must be non-decreasing and offs[-1] <= the jagged length:
    checked on CPU, not checked on CUDA (no host sync; invalid offs are undefined behaviour).

    bias: optional [G, N] (per-group row vector; [S] per output column for 3D x 2D), in a's
    dtype or out_dtype. out_dtype: None (a's dtype), a's dtype, or torch.float32 for bf16 /
    fp16 inputs. Products are summed at fp32 (fp64 for fp64) and rounded once.

    Differentiable in a, b and bias (the backward is grouped_mm again, over the same offs).
    backend: None/"auto", "cpu", "triton" (what auto picks on CUDA tensors; CPU tensors only
    under TRITON_INTERPRET=1) or "reference".
    """
    name = _GROUPED.choose(backend, a)
    if _backend.HAS_C:
        return _grouped_op(a, b, offs, bias, out_dtype, name)
    return ref.grouped_mm_ref(a, b, offs, bias=bias, out_dtype=out_dtype)


def gather_rows(a: torch.Tensor, index: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """out [n, D] with out[i] = a[index[i]], a zero row where index[i] == -1.

    a [R, D] fp32 / bf16 / fp16 / fp64; index [n] int32 / int64 in [-1, R) (checked on CPU).
    Differentiable in a (the backward is ``scatter_rows``)."""
    name = _GATHER.choose(backend, a)
    if _backend.HAS_C:
        return _gather_op(a, index, name)
    return ref.gather_rows_ref(a, index)


def scatter_rows(src: torch.Tensor, index: torch.Tensor, out_rows: int, *, backend: str | None = None) -> torch.Tensor:
    """out [out_rows, D]: zeros, then out[index[i]] += src[i] for every index[i] >= 0 (-1 =
    dropped). Rows receiving several sources sum them in source order at fp32 (fp64 for fp64)
    and round once: deterministic. Differentiable in src (the backward is ``gather_rows``)."""
    name = _SCATTER.choose(backend, src)
    if _backend.HAS_C:
        return _scatter_op(src, index, out_rows, name)
    return ref.scatter_rows_ref(src, index, out_rows)


def row_scale(x: torch.Tensor, scale: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """out[i] = x[i] * scale[i] at fp32 (fp64 for fp64), in x's dtype. x [n, D], scale [n]
    of any float dtype. Differentiable in x and scale."""
    name = _ROW_SCALE.choose(backend, x)
    if _backend.HAS_C:
        return _row_scale_op(x, scale, name)
    return ref.row_scale_ref(x, scale)
