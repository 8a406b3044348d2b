"""grouped_mm (+ gather_rows / scatter_rows / row_scale): every backend against the fp64
reference in every layout (error <= 2x torch's own error in the dtype), G in {1, 3, 1500},
empty groups, M = 0, K = 1, odd sizes, transposed / non-contiguous operands, bias, out_dtype,
zeros past offs[-1], bad inputs, opcheck, gradcheck, torch.compile, torch._grouped_mm."""

from __future__ import annotations

import pytest
import torch

import sparseops
from conftest import backend_params, rerun_in_subprocess
from sparseops.reference.grouped_mm import (
    gather_rows_ref,
    grouped_mm_ref,
    row_scale_ref,
    scatter_rows_ref,
)

# Triton on CPU tensors (the interpreter) runs test_grouped_mm_triton.py's interpreter-sized matrix instead of
# this one; on a GPU the triton backend runs this whole matrix.
BACKENDS = [p for p in backend_params("grouped_mm") if p.id != "cpu-triton"]
GATHER_BACKENDS = backend_params("gather_rows")
SCATTER_BACKENDS = backend_params("scatter_rows")
SCALE_BACKENDS = backend_params("row_scale")
HAS_C = sparseops.build_info()["extension"]
needs_c = pytest.mark.skipif(not HAS_C, reason="needs the C++ extension")
LAYOUTS = ("2d3d", "2d2d", "3d3d", "3d2d")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _rnd(*shape, dtype, device, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def make_case(
    layout,
    sizes=(3, 0, 7, 1),
    *,
    M=5,
    N=9,
    K=7,
    tail=2,
    dtype=torch.float32,
    device="cpu",
    b_transposed=False,
    a_noncontig=False,
    bias=False,
    seed=0,
):
    """(a, b, offs, bias) of one layout. sizes: the group sizes along the jagged dimension
    (rows of a for 2d3d, K for 2d2d, columns of b for 3d2d; for 3d3d only len(sizes) counts);
    tail: extra length past offs[-1]."""
    gen = torch.Generator().manual_seed(seed)
    G = len(sizes)
    S = sum(sizes) + (tail if layout != "3d3d" else 0)
    offs = torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32).to(device) if layout != "3d3d" else None

    def rnd(*shape):
        return _rnd(*shape, dtype=dtype, device=device, gen=gen)

    def mat(rows, cols, transposed, batch=None):
        pre = () if batch is None else (batch,)
        if transposed:
            return rnd(*pre, cols, rows).transpose(-2, -1)
        return rnd(*pre, rows, cols)

    if layout == "2d3d":
        a, b = mat(S, K, False), mat(K, N, b_transposed, G)
        bshape = (G, N)
    elif layout == "2d2d":
        a, b = mat(M, S, False), mat(S, N, b_transposed)
        bshape = (G, N)
    elif layout == "3d3d":
        a, b = mat(M, K, False, G), mat(K, N, b_transposed, G)
        bshape = (G, N)
    else:
        a, b = mat(M, K, False, G), mat(K, S, b_transposed)
        bshape = (S,)
    if a_noncontig:  # every other column of a wider tensor
        wide = torch.zeros(*a.shape[:-1], 2 * a.shape[-1], dtype=dtype, device=device)
        wide[..., ::2] = a
        a = wide[..., ::2]
        assert not a.is_contiguous()
    bias_t = rnd(*bshape) if bias else None
    return a, b, offs, bias_t


def check_close(out, a, b, offs, bias=None, out_dtype=None):
    exp = grouped_mm_ref(a.double(), b.double(), offs, bias=bias.double() if bias is not None else None)
    assert out.shape == exp.shape and out.dtype == (out_dtype or a.dtype)
    if out.numel() == 0:
        return
    err = (out.double() - exp).abs().max().item()
    if out_dtype == torch.float32 or a.dtype == torch.float64:
        floor = 1e-10 if a.dtype == torch.float64 else 1e-5
        assert err <= floor * max(1.0, exp.abs().max().item()), err
        return
    # torch's own error in the dtype: each product computed in the dtype, one rounding
    own = _torch_own(a, b, offs, bias)
    own_err = (own.double() - exp).abs().max().item()
    floor = torch.finfo(a.dtype).eps
    assert err <= 2 * own_err + floor, (err, own_err)


def _torch_own(a, b, offs, bias):
    """The layout computed group by group with torch.mm in the dtype (torch's own result)."""
    lay = f"{a.dim()}d{b.dim()}d"
    if lay == "3d3d":
        out = torch.bmm(a, b)
        return out + bias[:, None, :] if bias is not None else out
    ends = offs.tolist()
    spans = list(zip([0] + ends[:-1], ends))
    if lay == "2d3d":
        out = torch.zeros(a.shape[0], b.shape[2], dtype=a.dtype)
        for g, (s0, s1) in enumerate(spans):
            if s1 > s0:
                out[s0:s1] = a[s0:s1] @ b[g] + (bias[g] if bias is not None else 0)
    elif lay == "2d2d":
        out = torch.zeros(len(spans), a.shape[0], b.shape[1], dtype=a.dtype)
        for g, (s0, s1) in enumerate(spans):
            out[g] = a[:, s0:s1] @ b[s0:s1] + (bias[g] if bias is not None else 0)
    else:
        out = torch.zeros(a.shape[1], b.shape[1], dtype=a.dtype)
        for g, (s0, s1) in enumerate(spans):
            if s1 > s0:
                out[:, s0:s1] = a[g] @ b[:, s0:s1] + (bias[s0:s1] if bias is not None else 0)
    return out


def run(a, b, offs, bias=None, backend=None, **kw):
    return sparseops.grouped_mm(a, b, offs, bias=bias, backend=backend, **kw)


# ------------------------------------------------------------------------------ forward


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts_vs_reference(device, backend, layout, dtype):
    a, b, offs, bias = make_case(layout, (3, 0, 7, 1, 20), M=5, N=97, K=7, dtype=dtype, device=device)
    check_close(run(a, b, offs, backend=backend).cpu(), a.cpu(), b.cpu(), offs.cpu() if offs is not None else None)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("b_transposed", [False, True], ids=["b-contig", "b-transposed"])
@pytest.mark.parametrize("a_noncontig", [False, True], ids=["a-contig", "a-strided"])
def test_strides(device, backend, layout, dtype, b_transposed, a_noncontig):
    # Group sizes on both sides of the small-rows kernel / BLAS switch (16 rows).
    sizes = (1, 17, 0, 40, 4)
    a, b, offs, bias = make_case(
        layout, sizes, M=19, N=33, K=35, dtype=dtype, device=device, b_transposed=b_transposed, a_noncontig=a_noncontig
    )
    check_close(run(a, b, offs, backend=backend).cpu(), a.cpu(), b.cpu(), offs.cpu() if offs is not None else None)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("layout", ("2d3d", "2d2d", "3d2d", "3d3d"))
@pytest.mark.parametrize("G", [1, 3, 1500])
def test_group_counts(device, backend, layout, G):
    gen = torch.Generator().manual_seed(G)
    sizes = torch.randint(0, 5, (G,), generator=gen).tolist()
    a, b, offs, _ = make_case(layout, sizes, M=3, N=5, K=4, device=device, b_transposed=G == 3)
    check_close(run(a, b, offs, backend=backend).cpu(), a.cpu(), b.cpu(), offs.cpu() if offs is not None else None)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("layout", ("2d3d", "2d2d", "3d2d"))
@pytest.mark.parametrize("where", ["first", "middle", "last", "all"])
def test_empty_groups(device, backend, layout, where):
    sizes = {"first": (0, 5, 3), "middle": (5, 0, 3), "last": (5, 3, 0), "all": (0, 0, 0)}[where]
    a, b, offs, bias = make_case(layout, sizes, device=device, bias=True, seed=3)
    out = run(a, b, offs, bias, backend=backend)
    check_close(out.cpu(), a.cpu(), b.cpu(), offs.cpu(), bias.cpu())
    if layout == "2d2d":  # an empty ragged-K group's output is its bias
        for g, s in enumerate(sizes):
            if s == 0:
                torch.testing.assert_close(out[g], bias[g].expand_as(out[g]))


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_degenerate_sizes(device, backend, layout):
    # M = 0 / no rows at all, K = 1, N = 1, no groups.
    for kw in (dict(M=0), dict(K=1), dict(N=1), dict(M=1, N=1, K=1)):
        a, b, offs, _ = make_case(layout, (2, 0, 3), device=device, **kw)
        check_close(run(a, b, offs, backend=backend).cpu(), a.cpu(), b.cpu(), offs.cpu() if offs is not None else None)
    if layout == "2d3d":  # S = 0 rows
        a, b, offs, _ = make_case(layout, (0, 0), tail=0, device=device)
        assert run(a, b, offs, backend=backend).shape == (0, 9)
    if layout in ("2d3d", "2d2d", "3d2d"):  # G = 0
        a, b, offs, _ = make_case(layout, (), tail=3, device=device)
        out = run(a, b, offs, backend=backend)
        check_close(out.cpu(), a.cpu(), b.cpu(), offs.cpu())
        assert not out.abs().sum().item()


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("layout", ("2d3d", "3d2d"))
def test_past_offs_is_zero(device, backend, layout):
    a, b, offs, bias = make_case(layout, (3, 4), tail=6, device=device, bias=True)
    out = run(a, b, offs, bias, backend=backend)
    end = int(offs[-1])
    tail = out[end:] if layout == "2d3d" else out[:, end:]
    assert tail.numel() > 0 and torch.equal(tail, torch.zeros_like(tail))


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_bias(device, backend, layout, dtype):
    a, b, offs, bias = make_case(layout, (3, 0, 21), dtype=dtype, device=device, bias=True, seed=5)
    out = run(a, b, offs, bias, backend=backend)
    check_close(out.cpu(), a.cpu(), b.cpu(), offs.cpu() if offs is not None else None, bias.cpu())


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_out_dtype_fp32(device, backend, layout, dtype):
    a, b, offs, bias = make_case(layout, (2, 30, 0, 5), K=40, dtype=dtype, device=device, bias=True, seed=6)
    out = run(a, b, offs, bias, backend=backend, out_dtype=torch.float32)
    check_close(out.cpu(), a.cpu(), b.cpu(), offs.cpu() if offs is not None else None, bias.cpu(), torch.float32)


@needs_c
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_agrees_with_torch_grouped_mm(layout, dtype):
    # torch._grouped_mm runs on CPU in torch 2.13 for fp32 / bf16 / fp16 with 16-byte strides.
    a, b, offs, _ = make_case(layout, (8, 0, 16, 8), M=8, N=16, K=24, tail=8, dtype=dtype, b_transposed=True)
    try:
        want = torch._grouped_mm(a, b, offs)
    except RuntimeError as exc:
        pytest.skip(f"torch._grouped_mm does not run here: {exc}")
    got = run(a, b, offs, backend="cpu")
    if layout == "2d3d":  # torch leaves rows past offs[-1] uninitialised
        want, got = want[: int(offs[-1])], got[: int(offs[-1])]
    if layout == "3d2d":
        want, got = want[:, : int(offs[-1])], got[:, : int(offs[-1])]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)


# ------------------------------------------------------------------------------ bad inputs


@needs_c
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_inputs(backend):
    a, b, offs, _ = make_case("2d3d", (3, 4), tail=2)
    cases = [
        (dict(offs=offs.long()), "offs must have dtype"),
        (dict(offs=offs[:1]), "b.size(0) must equal the number of groups offs.size(0)"),
        (dict(offs=torch.tensor([4, 3], dtype=torch.int32)), "offs must be non-decreasing"),
        (dict(offs=torch.tensor([-1, 3], dtype=torch.int32)), "offs must be non-decreasing"),
        (dict(offs=torch.tensor([4, 10], dtype=torch.int32)), "offs[-1] = 10 must be <= a.size(0)"),
        (dict(offs=offs[None]), "offs must be a 1-D tensor"),
        (dict(offs=None), "offs is required"),
        (dict(b=b[:, :3]), "b.size(1) must equal the contraction size a.size(1)"),
        (dict(b=b.double()), "b must have the dtype of a"),
        (dict(a=a.long()), "a must have dtype in"),
        (dict(a=a[None, None]), "a must be a 2-D or 3-D tensor"),
        (dict(bias=torch.zeros(2, 3)), "bias must have shape [2, 9]"),
        (dict(out_dtype=torch.float16), "out_dtype must be None"),
    ]
    for change, message in cases:
        kw = dict(a=a, b=b, offs=offs, bias=None, out_dtype=None)
        kw.update(change)
        with pytest.raises(RuntimeError, match=_re(message)):
            torch.ops.sparseops.grouped_mm(kw["a"], kw["b"], kw["offs"], kw["bias"], kw["out_dtype"], backend)
    a3 = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="offs must be None"):
        torch.ops.sparseops.grouped_mm(a3, torch.randn(2, 4, 5), offs, None, None, backend)
    with pytest.raises(RuntimeError, match=_re("b.size(1) must equal the contraction size a.size(2)")):
        torch.ops.sparseops.grouped_mm(a3, torch.randn(2, 5, 5), None, None, None, backend)
    with pytest.raises(RuntimeError, match=_re("offs[-1] = 7 must be <= a.size(1)")):
        torch.ops.sparseops.grouped_mm(torch.randn(3, 6), torch.randn(6, 2), offs, None, None, backend)
    with pytest.raises(RuntimeError, match=_re("bias must have shape [5]")):
        torch.ops.sparseops.grouped_mm(
            torch.randn(2, 3, 4), torch.randn(4, 5), offs.clamp(max=5), torch.zeros(2, 5), None, backend
        )
    with pytest.raises(RuntimeError, match="backend must be one of"):
        torch.ops.sparseops.grouped_mm(a, b, offs, None, None, "nope")


def _re(s):
    import re

    return re.escape(s)


# ------------------------------------------------------------------------------ autograd


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(device, backend, layout):
    a, b, offs, bias = make_case(
        layout, (2, 0, 3), M=3, N=4, K=3, dtype=torch.float64, device=device, bias=True, b_transposed=True
    )
    args = [a.detach().requires_grad_(True), b.detach().requires_grad_(True), bias.requires_grad_(True)]

    def fn(a, b, bias):
        return sparseops.grouped_mm(a, b, offs, bias=bias, backend=backend)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_bf16_vs_reference(device, backend, layout):
    a, b, offs, bias = make_case(layout, (5, 0, 19, 2), K=20, dtype=torch.bfloat16, device=device, bias=True)
    leaves = [t.detach().requires_grad_(True) for t in (a, b, bias)]
    out = sparseops.grouped_mm(leaves[0], leaves[1], offs, bias=leaves[2], backend=backend)
    dy = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)
    out.backward(dy)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (a, b, bias)]
    grouped_mm_ref(ref_leaves[0], ref_leaves[1], offs, bias=ref_leaves[2]).backward(dy.double())
    for got, want in zip(leaves, ref_leaves):
        scale = max(1.0, want.grad.abs().max().item())
        assert (got.grad.double() - want.grad).abs().max().item() <= 3e-2 * scale


# ------------------------------------------------------------------------------ opcheck / compile


@needs_c
@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(device, backend, layout):
    a, b, offs, bias = make_case(layout, (2, 0, 3), device=device, bias=True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    torch.library.opcheck(torch.ops.sparseops.grouped_mm.default, (a, b, offs, bias, None, backend))
    torch.library.opcheck(torch.ops.sparseops.grouped_mm.default, (a, b, offs, None, None, backend))


@needs_c
@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_compile_dynamic_one_graph(device, backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def layer(x, w, offs):
        return sparseops.grouped_mm(x, w.transpose(-2, -1), offs, backend=backend) * 2

    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for S, sizes in ((7, (2, 0, 5)), (11, (4, 4, 3)), (20, (10, 1, 6)), (33, (0, 30, 2))):
        a, b, offs, _ = make_case("2d3d", sizes, tail=S - sum(sizes), N=6, K=5, device=device, seed=S)
        w = b.transpose(-2, -1).contiguous().requires_grad_(True)
        x = a.requires_grad_(True)
        y = compiled(x, w, offs)
        torch.testing.assert_close(y, layer(x, w, offs))
        y.sum().backward()
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames == frames[:1] * 4, frames  # no recompile as S varies


# ------------------------------------------------------------------------------ CPU kernel paths


@needs_c
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_thread_count_bitwise(dtype):
    a, b, offs, bias = make_case("2d3d", (1, 3, 200, 0, 17, 4), N=300, K=64, dtype=dtype, bias=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = run(a, b, offs, bias, backend="cpu")
        torch.set_num_threads(2)
        y2 = run(a, b, offs, bias, backend="cpu")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)


@needs_c
def test_portable_cpu_path():
    """The portable (non-AVX-512) loops of the CPU kernel, in a fresh process."""
    rerun_in_subprocess(__file__, "cpu-cpu and (layouts_vs or strides or gather)", SPARSEOPS_CPU_NO_AVX512="1")


# ------------------------------------------------------------------------------ fusion helpers


def _index(n, rows, seed=0, device="cpu", drop=0.3):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, max(rows, 1), (n,), generator=gen)
    idx[torch.rand(n, generator=gen) < drop] = -1
    if rows == 0:
        idx[:] = -1
    return idx.to(torch.int32).to(device)


@pytest.mark.parametrize(("device", "backend"), GATHER_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_rows(device, backend, dtype):
    for rows, n, D in ((7, 13, 97), (1, 1, 1), (5, 0, 3), (0, 4, 3)):
        a = torch.randn(rows, 2 * D, dtype=torch.float64).to(device=device, dtype=dtype)[:, ::2]
        idx = _index(n, rows, seed=n, device=device)
        out = sparseops.gather_rows(a, idx, backend=backend)
        assert torch.equal(out, gather_rows_ref(a, idx))
        assert torch.equal(sparseops.gather_rows(a, idx.long(), backend=backend), out)


@pytest.mark.parametrize(("device", "backend"), SCATTER_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_rows(device, backend, dtype):
    for rows, n, D in ((7, 40, 97), (1, 3, 1), (5, 0, 3), (0, 4, 3)):
        src = torch.randn(n, D, dtype=torch.float64).to(device=device, dtype=dtype)
        idx = _index(n, rows, seed=n, device=device)
        out = sparseops.scatter_rows(src, idx, rows, backend=backend)
        want = scatter_rows_ref(src.double(), idx, rows)
        peak = want.abs().max().item() if want.numel() else 0.0
        tol = 1e-12 if dtype == torch.float64 else 2 * torch.finfo(dtype).eps * max(1.0, peak)
        assert out.dtype == dtype and out.shape == (rows, D)
        if out.numel():
            assert (out.double() - want).abs().max().item() <= tol


@pytest.mark.parametrize(("device", "backend"), SCALE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_scale(device, backend, dtype):
    for n, D in ((13, 97), (1, 1), (0, 3)):
        x = torch.randn(n, 2 * D, dtype=torch.float64).to(device=device, dtype=dtype)[:, ::2]
        s = torch.randn(n, device=device)
        out = sparseops.row_scale(x, s, backend=backend)
        torch.testing.assert_close(out, row_scale_ref(x, s), rtol=0, atol=0)


@pytest.mark.parametrize(("device", "backend"), GATHER_BACKENDS)
def test_helpers_gradcheck_opcheck(device, backend):
    a = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    idx = torch.tensor([3, -1, 0, 3, 5, -1, 1], dtype=torch.int32, device=device)
    assert torch.autograd.gradcheck(lambda a: sparseops.gather_rows(a, idx, backend=backend), (a,))
    src = torch.randn(7, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: sparseops.scatter_rows(s, idx, 6, backend=backend), (src,))
    s = torch.randn(7, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s: sparseops.row_scale(x, s, backend=backend), (src, s))
    if HAS_C:
        torch.library.opcheck(torch.ops.sparseops.gather_rows.default, (a, idx, backend))
        torch.library.opcheck(torch.ops.sparseops.scatter_rows.default, (src, idx, 6, backend))
        torch.library.opcheck(torch.ops.sparseops.row_scale.default, (src, s, backend))


@needs_c
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_helpers_bad_inputs(backend):
    a = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=_re("index must hold row indices in [0, a.size(0) = 4)")):
        torch.ops.sparseops.gather_rows(a, torch.tensor([4], dtype=torch.int32), backend)
    with pytest.raises(RuntimeError, match=_re("index must hold row indices in [0, a.size(0) = 4)")):
        torch.ops.sparseops.gather_rows(a, torch.tensor([-2], dtype=torch.int32), backend)
    with pytest.raises(RuntimeError, match="index must have dtype"):
        torch.ops.sparseops.gather_rows(a, torch.tensor([1.0]), backend)
    with pytest.raises(RuntimeError, match=_re("index.size(0) must equal the rows of src")):
        torch.ops.sparseops.scatter_rows(a, torch.tensor([0], dtype=torch.int32), 2, backend)
    with pytest.raises(RuntimeError, match=_re("out_rows = 2)")):
        torch.ops.sparseops.scatter_rows(a, torch.tensor([0, 1, 2, 0], dtype=torch.int32), 2, backend)
    with pytest.raises(RuntimeError, match=_re("scale.size(0) must equal the rows of x")):
        torch.ops.sparseops.row_scale(a, torch.ones(3), backend)
