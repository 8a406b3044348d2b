"""N:M sparsity: nm_linear and nm_compress on every backend against the reference, the format
itself (bit layout, padding), masks (plain and transposable), NMWeight round trips, autograd,
opcheck, torch.compile, bad inputs, the portable CPU path and thread-count determinism."""

from __future__ import annotations

import io

import pytest
import torch
import torch._dynamo.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseops
from conftest import HAS_CUDA, backend_params, interpreted, rerun_in_subprocess
from sparseops.ops.nm_sparse import _regular_patterns
from sparseops.reference import nm_sparse as ref
from sparseops.testing import nm_weight

LINEAR = backend_params("nm_linear")
COMPRESS = backend_params("nm_compress")
HAS_C = sparseops.build_info()["extension"]

PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8), (1, 8), (8, 16), (1, 2), (15, 16), (3, 4)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _weight(out, k, n, m, dtype=torch.float32, device="cpu", seed=0):
    """A random unit-scale N:M weight [out, k] (pruned by the reference) and its compressed form."""
    return nm_weight(out, k, n, m, dtype=dtype, device=device, seed=seed)


def _x(*shape, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _check_linear(x, nmw, bias, backend, dense):
    """Error vs fp64 at most 2x torch's own F.linear error in that dtype (DESIGN.md), plus a
    floor of a few fp32 ulps of the row norms (fp32 accumulation in another order). A forced
    backend that refuses these inputs (cuda: fp32, n > 2) must say so: returns None then."""
    if backend is not None and backend not in sparseops.available_backends("nm_linear", x, nmw):
        with pytest.raises(RuntimeError, match="cannot take"):
            sparseops.nm_linear(x, nmw, bias, backend=backend)
        return None
    y = sparseops.nm_linear(x, nmw, bias, backend=backend)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], nmw.shape[0]) and y.device == x.device
    exact = torch.nn.functional.linear(x.double(), dense.double(), None if bias is None else bias.double())
    if x.dtype == torch.float64:
        torch.testing.assert_close(y, exact, rtol=1e-12, atol=1e-12)
        return
    own = torch.nn.functional.linear(x.cpu(), dense.cpu(), None if bias is None else bias.cpu()).double()
    own_err = (own - exact.cpu()).abs().max().item() if exact.numel() else 0.0
    floor = 1e-5 * (1 + (x.double().abs() @ dense.double().abs().T).max().item() if exact.numel() else 1)
    err = (y.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert err <= 2 * own_err + floor, (err, own_err, floor)
    return y


# ---------------------------------------------------------------------------------------------
# nm_linear against the reference


@pytest.mark.parametrize("device,backend", LINEAR)
@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_patterns_dtypes(device, backend, n, m, dtype):
    shapes = [(1, 7, 32), (7, 97, 64)] if interpreted(device, backend) else [(0, 5, 32), (1, 7, 48), (7, 97, 64)]
    for R, out, k in shapes:
        dense, nmw = _weight(out, k, n, m, dtype, device)
        _check_linear(_x(R, k, dtype=dtype, device=device), nmw, None, backend, dense)


@pytest.mark.parametrize("device,backend", LINEAR)
@pytest.mark.parametrize("R", [0, 1, 7, 16, 97])
def test_linear_batch_sizes_bias(device, backend, R):
    out, k = (33, 64) if interpreted(device, backend) else (97, 256)
    for dtype in DTYPES:
        dense, nmw = _weight(out, k, 2, 4, dtype, device, seed=R)
        bias = _x(out, dtype=dtype, device=device, seed=5)
        _check_linear(_x(R, k, dtype=dtype, device=device), nmw, bias, backend, dense)


@pytest.mark.parametrize("device,backend", LINEAR)
def test_linear_large_batch_and_wide(device, backend):
    """Rows above the CPU dense crossover (64), out wide enough for several tiles, in % 16 != 0."""
    if interpreted(device, backend):
        pytest.skip("interpreter: covered by the smaller shapes")
    for R, out, k, (n, m) in [(64, 300, 200, (2, 4)), (130, 257, 96, (1, 8)), (70, 16, 34, (1, 2))]:
        dense, nmw = _weight(out, k, n, m, torch.float32, device)
        bias = _x(out, device=device)
        _check_linear(_x(R, k, device=device), nmw, bias, backend, dense)
        d16, n16 = _weight(out, k, n, m, torch.bfloat16, device)
        _check_linear(_x(R, k, dtype=torch.bfloat16, device=device), n16, None, backend, d16)


def _dtype_for(backend):
    """fp32, or bf16 for the cuda backend (the sparse tensor cores take fp16 / bf16)."""
    return torch.bfloat16 if backend == "cuda" else torch.float32


@pytest.mark.parametrize("device,backend", LINEAR)
def test_linear_leading_dims_noncontiguous(device, backend):
    dt = _dtype_for(backend)
    dense, nmw = _weight(9, 32, 2, 4, dt, device)
    x = _x(3, 2, 32, dtype=dt, device=device)
    y = _check_linear(x, nmw, None, backend, dense)
    assert y.shape == (3, 2, 9)
    xt = _x(64, 5, dtype=dt, device=device).T  # [5, 64] with strides (1, 5)
    dense, nmw = _weight(7, 64, 1, 4, dt, device)
    _check_linear(xt, nmw, None, backend, dense)
    x1 = _x(64, dtype=dt, device=device)  # 1-D x
    assert sparseops.nm_linear(x1, nmw, backend=backend).shape == (7,)


@pytest.mark.parametrize("device,backend", LINEAR)
def test_linear_zero_sizes(device, backend):
    dt = _dtype_for(backend)
    for out, k in [(0, 16), (5, 0)]:
        nmw = sparseops.NMWeight(
            torch.zeros(out, k // 4 * 2, dtype=dt, device=device),
            torch.zeros(out, (k // 4 * 2 * 2 + 7) // 8, dtype=torch.uint8, device=device),
            2,
            4,
            (out, k),
        )
        bias = _x(out, dtype=dt, device=device)
        y = sparseops.nm_linear(_x(3, k, dtype=dt, device=device), nmw, bias, backend=backend)
        assert y.shape == (3, out)
        torch.testing.assert_close(y, bias.expand(3, out))


@pytest.mark.parametrize("device,backend", LINEAR)
def test_linear_fp64(device, backend):
    if backend in ("triton", "cuda"):
        pytest.skip("the Triton kernel takes fp32 / fp16 / bf16, the sparse tensor cores fp16 / bf16")
    dense, nmw = _weight(13, 48, 2, 8, torch.float64, device)
    _check_linear(_x(5, 48, dtype=torch.float64, device=device), nmw, _x(13, dtype=torch.float64), backend, dense)


def test_linear_reference_is_masked_dense():
    dense, nmw = _weight(11, 64, 4, 8, torch.float64)
    x = _x(6, 64, dtype=torch.float64)
    y = ref.nm_linear_ref(x, nmw.values, nmw.meta, 4, 8, 64)
    torch.testing.assert_close(y, x @ dense.T, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# The format: bit layout, padding, sizes


def test_format_bits_by_hand():
    # 2:4, one row, two groups: keep (1, 3) and (0, 2) -> positions 1,3,0,2 in 2 bits each.
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0]])
    nmw = sparseops.nm_compress(w, 2, 4)
    assert nmw.values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert nmw.meta.tolist() == [[1 | (3 << 2) | (0 << 4) | (2 << 6)]]
    # 1:8: 4 bits per position; 3 groups -> 2 bytes, the unused high nibble is 0.
    w = torch.zeros(1, 24)
    w[0, 5], w[0, 8 + 7], w[0, 16 + 0] = 1.0, 2.0, 3.0
    nmw = sparseops.nm_compress(w, 1, 8)
    assert nmw.meta.tolist() == [[5 | (7 << 4), 0]]
    # 1:2: 1 bit per position.
    w = torch.tensor([[0.0, 1.0, 2.0, 0.0, 0.0, 3.0]])
    assert sparseops.nm_compress(w, 1, 2).meta.tolist() == [[0b101]]


@pytest.mark.parametrize("device,backend", COMPRESS)
def test_compress_pads_short_groups(device, backend):
    w = torch.zeros(2, 8, device=device)
    w[0, 2] = 5.0  # group 0 keeps one value: pad with the lowest unkept position (0)
    w[1, 6] = -1.0  # row 1 group 0 empty -> positions 0, 1; group 1 keeps 6 and pads 4
    nmw = sparseops.nm_compress(w, 2, 4, backend=backend)
    cols = ref.nm_columns_ref(nmw.meta, 2, 4, 4)
    assert cols.tolist() == [[0, 2, 4, 5], [0, 1, 4, 6]]
    assert nmw.values.tolist() == [[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0]]
    torch.testing.assert_close(nmw.dense(), w)
    assert nmw.mask().sum(1).tolist() == [4, 4]


def test_bytes_ratio():
    for (n, m), ratio in [((2, 4), 0.5625), ((1, 4), 0.28125), ((2, 8), 0.3125)]:
        _, nmw = _weight(64, 256, n, m, torch.bfloat16)
        assert nmw.nbytes() / (64 * 256 * 2) == ratio


# ---------------------------------------------------------------------------------------------
# nm_compress / nm_mask against the reference


@pytest.mark.parametrize("device,backend", COMPRESS)
@pytest.mark.parametrize("n,m", PATTERNS)
def test_prune_compress_vs_reference(device, backend, n, m):
    out, k = (5, 2 * m) if interpreted(device, backend) else (13, 6 * m)
    for dtype in [torch.float32, torch.bfloat16, torch.float16]:
        w = _x(out, k, dtype=dtype, seed=n * m)
        w[0, :m] = 1.0  # ties: lower index wins
        w[1, 1] = float("nan")  # NaN ranks first
        w[2, m - 1] = 0.0
        scores = _x(out, k, seed=7).abs()
        for s in (None, scores):
            want_mask = ref.nm_mask_ref(w, n, m, scores=s)
            want = ref.nm_compress_ref(w, n, m, mask=want_mask)
            got = sparseops.nm_compress(
                w.to(device), n, m, prune=True, scores=None if s is None else s.to(device), backend=backend
            )
            torch.testing.assert_close(got.values.cpu(), want[0], rtol=0, atol=0, equal_nan=True)
            assert torch.equal(got.meta.cpu(), want[1])
            mask = sparseops.nm_mask(w.to(device), n, m, scores=None if s is None else s.to(device), backend=backend)
            assert torch.equal(mask.cpu(), want_mask)
            assert (mask.reshape(out, -1, m).sum(-1) == n).all()


@pytest.mark.parametrize("device,backend", COMPRESS)
def test_compress_outputs_not_asked_for_are_empty(device, backend):
    """outputs="compressed" (nm_compress) and "mask" (nm_mask) write only those: the others come
    back empty [0], and what is written equals outputs="all", on the prune and keep paths."""
    op = torch.ops.sparseops.nm_compress
    for n, m, dtype in [(2, 4, torch.float32), (1, 8, torch.bfloat16), (3, 16, torch.float16)]:
        w = _x(6, 3 * m + 16 if m < 16 else 3 * m, dtype=dtype, seed=m).to(device)
        mask = ref.nm_mask_ref(w.cpu(), n, m).to(device)
        for args in ((w, n, m, None, None, True), (w, n, m, w.float().square(), None, True),
                     (w * mask, n, m, None, mask, False)):  # fmt: skip
            full = op(*args, backend)
            values, meta, none = op(*args, backend, outputs="compressed")
            assert torch.equal(values, full[0]) and torch.equal(meta, full[1]) and none.shape == (0,)
            a, b, only = op(*args, backend, outputs="mask")
            assert a.shape == b.shape == (0,) and torch.equal(only, full[2])
    with pytest.raises(RuntimeError, match='outputs must be "all", "compressed" or "mask"'):
        op(w, 2, 4, None, None, True, backend, outputs="values")


@pytest.mark.parametrize("device,backend", COMPRESS)
def test_compress_given_mask_and_sparse_weight(device, backend):
    for n, m in [(2, 4), (1, 8), (8, 16), (15, 16)]:
        w = _x(7, 4 * m, seed=m)
        mask = ref.nm_mask_ref(w, n, m)
        mask[0, :m] = False  # a group with no kept position
        mask[1, :m] = False
        mask[1, m - 1] = True  # a group with fewer than n
        ws = (w * mask).to(device)
        a = sparseops.nm_compress(ws, n, m, mask.to(device), backend=backend)
        b = sparseops.nm_compress(ws, n, m, backend=backend)  # mask = non-zeros
        want = ref.nm_compress_ref(w * mask, n, m, mask=mask)
        for got in (a, b):
            assert torch.equal(got.values.cpu(), want[0]) and torch.equal(got.meta.cpu(), want[1])
            torch.testing.assert_close(got.dense().cpu(), w * mask, rtol=0, atol=0)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pattern=st.sampled_from(PATTERNS),
    out=st.integers(1, 9),
    groups=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_mask_invariants(pattern, out, groups, seed, ties):
    n, m = pattern
    w = _x(out, groups * m, seed=seed)
    if ties:
        w = w.round()  # many equal magnitudes (and zeros)
    mask = sparseops.nm_mask(w, n, m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert (mask.reshape(out, groups, m).sum(-1) == n).all()
    assert torch.equal(mask, ref.nm_mask_ref(w, n, m))
    # Every kept |w| is at least every dropped |w| of its group.
    a = w.abs().reshape(out, groups, m)
    km = mask.reshape(out, groups, m)
    kept_min = torch.where(km, a, torch.inf).amin(-1)
    drop_max = torch.where(~km, a, -torch.inf).amax(-1)
    assert (kept_min >= drop_max).all()
    nmw = sparseops.nm_compress(w, n, m, prune=True)
    torch.testing.assert_close(nmw.dense(), w * mask, rtol=0, atol=0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pattern=st.sampled_from([(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (1, 8), (4, 16), (8, 16)]),
    bo=st.integers(1, 3),
    bi=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_transposable_mask_both_ways(pattern, bo, bi, seed):
    n, m = pattern
    w = _x(bo * m, bi * m, seed=seed)
    mask = sparseops.nm_mask(w, n, m, transposable=True)
    assert (mask.reshape(bo * m, bi, m).sum(-1) == n).all()
    assert (mask.T.reshape(bi * m, bo, m).sum(-1) == n).all()
    assert torch.equal(mask, ref.nm_transposable_mask_ref(w, n, m))


def test_transposable_keeps_magnitude():
    w = _x(64, 128, seed=3)
    for n, m, share in [(2, 4, 0.85), (1, 4, 0.8), (4, 8, 0.9), (2, 8, 0.85), (8, 16, 0.9)]:
        plain = (w.abs() * sparseops.nm_mask(w, n, m)).sum()
        both = (w.abs() * sparseops.nm_mask(w, n, m, transposable=True)).sum()
        assert both <= plain + 1e-9
        assert both >= share * plain, (n, m, (both / plain).item())


def test_transposable_exact_small_block():
    # 2:4 on one 4x4 block: the exact solver beats greedy on this block.
    s = torch.tensor(
        [[9.0, 8.0, 0.0, 0.0], [8.0, 9.0, 0.0, 0.0], [7.0, 7.0, 1.0, 1.0], [7.0, 7.0, 1.0, 1.0]], dtype=torch.float64
    )
    mask = sparseops.nm_mask(s, 2, 4, transposable=True)
    assert (mask.sum(0) == 2).all() and (mask.sum(1) == 2).all()
    best = max((s * p).sum().item() for p in _regular_patterns(2, 4))
    assert (s * mask).sum().item() == best


# ---------------------------------------------------------------------------------------------
# NMWeight round trips


def test_roundtrip_compress_decompress_to():
    for n, m in PATTERNS:
        dense, nmw = _weight(10, 3 * m, n, m)
        torch.testing.assert_close(sparseops.nm_decompress(nmw), dense, rtol=0, atol=0)
        again = sparseops.nm_compress(dense, n, m, nmw.mask())
        assert torch.equal(again.values, nmw.values) and torch.equal(again.meta, nmw.meta)
    h = nmw.to(torch.bfloat16)
    assert h.values.dtype == torch.bfloat16 and h.meta.dtype == torch.uint8 and h.shape == nmw.shape
    d = nmw.to("cpu")
    assert d.values is nmw.values or torch.equal(d.values, nmw.values)
    assert "NMWeight(3:4, shape=[10, 12]" in repr(nmw)


def test_roundtrip_torch_save_and_state_dict(tmp_path):
    _, nmw = _weight(12, 32, 2, 4, torch.bfloat16)
    buf = io.BytesIO()
    torch.save({"w": nmw, "sd": nmw.to_state_dict("layer.")}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    for w2 in (back["w"], sparseops.NMWeight.from_state_dict(back["sd"], "layer.")):
        assert isinstance(w2, sparseops.NMWeight) and (w2.n, w2.m, w2.shape) == (2, 4, nmw.shape)
        assert torch.equal(w2.values, nmw.values) and torch.equal(w2.meta, nmw.meta)
    assert set(back["sd"]) == {"layer.values", "layer.meta", "layer.nm_shape"}


def test_roundtrip_safetensors(tmp_path):
    st_torch = pytest.importorskip("safetensors.torch")
    _, nmw = _weight(12, 32, 1, 4, torch.float16)
    path = tmp_path / "w.safetensors"
    st_torch.save_file(nmw.to_state_dict("l."), str(path))
    w2 = sparseops.NMWeight.from_state_dict(st_torch.load_file(str(path)), "l.")
    assert torch.equal(w2.values, nmw.values) and torch.equal(w2.meta, nmw.meta) and w2.shape == nmw.shape


# ---------------------------------------------------------------------------------------------
# Autograd, opcheck, torch.compile


@pytest.mark.parametrize("device,backend", LINEAR)
def test_gradcheck_fp64(device, backend):
    if backend in ("triton", "cuda"):
        pytest.skip("the Triton and CUDA kernels take 16/32-bit floats; the backward is shared torch code")
    _, nmw = _weight(5, 16, 2, 4, torch.float64, device)
    values = nmw.values.clone().requires_grad_()
    x = _x(3, 16, dtype=torch.float64, device=device).requires_grad_()
    bias = _x(5, dtype=torch.float64, device=device).requires_grad_()

    def f(x, values, bias):
        return torch.ops.sparseops.nm_linear(x, values, nmw.meta, 2, 4, 16, bias, backend)

    assert torch.autograd.gradcheck(f, (x, values, bias))


def test_grad_values_is_dense_grad_at_kept_columns():
    dense, nmw = _weight(6, 32, 1, 4, torch.float64)
    values = nmw.values.clone().requires_grad_()
    x = _x(2, 3, 32, dtype=torch.float64).requires_grad_()
    w = sparseops.NMWeight(values, nmw.meta, 1, 4, nmw.shape)
    sparseops.nm_linear(x, w).pow(2).sum().backward()
    wd = dense.clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, wd).pow(2).sum().backward()
    cols = ref.nm_columns_ref(nmw.meta, 1, 4, values.shape[1])
    torch.testing.assert_close(values.grad, wd.grad.gather(1, cols))
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("device,backend", LINEAR)
def test_opcheck_linear(device, backend):
    for dtype in [torch.float32, torch.bfloat16] if backend != "cuda" else [torch.bfloat16, torch.float16]:
        _, nmw = _weight(9, 32, 2, 4, dtype, device)
        x = _x(3, 32, dtype=dtype, device=device)
        bias = _x(9, dtype=dtype, device=device)
        for b in (None, bias):
            args = (x, nmw.values, nmw.meta, 2, 4, 32, b, backend)
            torch.library.opcheck(torch.ops.sparseops.nm_linear.default, args)


@pytest.mark.parametrize("device,backend", COMPRESS)
def test_opcheck_compress(device, backend):
    w = _x(6, 16, device=device)
    mask = ref.nm_mask_ref(w.cpu(), 2, 4).to(device)
    torch.library.opcheck(torch.ops.sparseops.nm_compress.default, (w, 2, 4, None, None, True, backend))
    torch.library.opcheck(torch.ops.sparseops.nm_compress.default, (w * mask, 2, 4, None, mask, False, backend))
    torch.library.opcheck(torch.ops.sparseops.nm_compress.default, (w, 1, 8, w.abs(), None, True, backend))
    for outputs in ("compressed", "mask"):
        torch.library.opcheck(
            torch.ops.sparseops.nm_compress.default, (w, 2, 4, None, None, True, backend), {"outputs": outputs}
        )


@pytest.mark.parametrize("device,backend", LINEAR)
def test_compile_dynamic_one_graph(device, backend):
    torch._dynamo.reset()
    dt = _dtype_for(backend)
    _, nmw = _weight(9, 32, 2, 4, dt, device)
    bias = _x(9, dtype=dt, device=device)
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(fullgraph=True, dynamic=True, backend=counter)
    def f(x):
        return sparseops.nm_linear(x, nmw, bias, backend=backend)

    for R in (3, 5, 17, 33):
        x = _x(R, 32, dtype=dt, device=device, seed=R)
        want = sparseops.nm_linear(x, nmw, bias, backend=backend)  # eager first: fills the backend cache
        torch.testing.assert_close(f(x), want)
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.skipif(not HAS_C, reason="the checks live in the C++ op")
def test_bad_inputs_name_the_argument():
    _, nmw = _weight(4, 16, 2, 4)
    x = _x(3, 16)
    op = torch.ops.sparseops.nm_linear
    with pytest.raises(RuntimeError, match="in_features .* multiple of m"):
        op(_x(3, 18), torch.zeros(4, 9), torch.zeros(4, 3, dtype=torch.uint8), 2, 4, 18)
    with pytest.raises(RuntimeError, match="m must be one of"):
        op(x, nmw.values, nmw.meta, 2, 5, 16)
    with pytest.raises(RuntimeError, match="n must satisfy"):
        op(x, nmw.values, nmw.meta, 4, 4, 16)
    with pytest.raises(RuntimeError, match="x.size\\(-1\\) must equal in_features"):
        op(_x(3, 12), nmw.values, nmw.meta, 2, 4, 16)
    with pytest.raises(RuntimeError, match="values must have the dtype of x"):
        op(x, nmw.values.double(), nmw.meta, 2, 4, 16)
    with pytest.raises(RuntimeError, match="meta must be uint8"):
        op(x, nmw.values, nmw.meta.int(), 2, 4, 16)
    with pytest.raises(RuntimeError, match="meta must have shape"):
        op(x, nmw.values, nmw.meta[:, :1], 2, 4, 16)
    with pytest.raises(RuntimeError, match="values"):
        op(x, nmw.values[:, :3], nmw.meta, 2, 4, 16)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op(x, nmw.values, nmw.meta, 2, 4, 16, torch.zeros(5))
    with pytest.raises(RuntimeError, match="x must"):
        op(x.int(), nmw.values, nmw.meta, 2, 4, 16)
    with pytest.raises(RuntimeError, match="unknown backend|backend"):
        op(x, nmw.values, nmw.meta, 2, 4, 16, None, "nope")
    w = _x(4, 16)
    with pytest.raises(RuntimeError, match="not 2:4 sparse"):
        sparseops.nm_compress(w, 2, 4)
    mask = ref.nm_mask_ref(w, 2, 4)
    with pytest.raises(RuntimeError, match="non-zeros outside mask"):
        sparseops.nm_compress(w, 2, 4, mask)
    with pytest.raises(RuntimeError, match="mask must be a bool"):
        sparseops.nm_compress(w * mask, 2, 4, mask.int())
    with pytest.raises(RuntimeError, match="not 1:4 sparse under mask"):
        sparseops.nm_compress(w * mask, 1, 4, mask)
    with pytest.raises(RuntimeError, match="scores must have the shape of w"):
        sparseops.nm_compress(w, 2, 4, prune=True, scores=torch.zeros(4, 8))
    with pytest.raises(RuntimeError, match="w must be a 2-D"):
        sparseops.nm_compress(w.reshape(-1), 2, 4)
    with pytest.raises(RuntimeError, match="in_features .* multiple of m"):
        sparseops.nm_compress(_x(4, 6), 2, 4, prune=True)


def test_bad_python_arguments():
    w = _x(4, 16)
    with pytest.raises(ValueError, match="m must be one of"):
        sparseops.nm_mask(w, 1, 3)
    with pytest.raises(ValueError, match="n must satisfy"):
        sparseops.nm_mask(w, 0, 4)
    with pytest.raises(ValueError, match="w.shape\\[1\\]"):
        sparseops.nm_mask(_x(4, 6), 1, 4)
    with pytest.raises(ValueError, match="out_features = 6"):
        sparseops.nm_mask(_x(6, 16), 1, 4, transposable=True)
    with pytest.raises(ValueError, match="scores must be"):
        sparseops.nm_mask(w, 2, 4, scores=torch.zeros(3))
    with pytest.raises(ValueError, match="not both"):
        sparseops.nm_compress(w, 2, 4, w != 0, prune=True)
    with pytest.raises(ValueError, match="values must have shape"):
        sparseops.NMWeight(torch.zeros(4, 7), torch.zeros(4, 2, dtype=torch.uint8), 2, 4, (4, 16))
    with pytest.raises(ValueError, match="meta must be uint8"):
        sparseops.NMWeight(torch.zeros(4, 8), torch.zeros(4, 3, dtype=torch.uint8), 2, 4, (4, 16))
    with pytest.raises(TypeError, match="nmw must be an NMWeight"):
        sparseops.nm_linear(_x(2, 16), w)


# ---------------------------------------------------------------------------------------------
# CPU kernel: portable path, determinism


@pytest.mark.skipif(not HAS_C, reason="needs the C++ extension")
def test_portable_cpu_path():
    rerun_in_subprocess(
        __file__, "cpu-cpu and (patterns_dtypes or batch_sizes or large_batch or prune_compress)",
        SPARSEOPS_CPU_NO_AVX512="1",
    )  # fmt: skip


@pytest.mark.skipif(not HAS_C, reason="needs the C++ extension")
def test_deterministic_across_threads():
    prev = torch.get_num_threads()
    try:
        for R in (1, 7, 100):
            for dtype in (torch.float32, torch.bfloat16):
                _, nmw = _weight(301, 256, 2, 4, dtype)
                x = _x(R, 256, dtype=dtype)
                outs = []
                for t in (1, 2):
                    torch.set_num_threads(t)
                    outs.append(sparseops.nm_linear(x, nmw, backend="cpu"))
                assert torch.equal(outs[0], outs[1]), (R, dtype)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_auto_matches_reference():
    dense, nmw = _weight(257, 512, 2, 4, torch.bfloat16, "cuda")
    _check_linear(_x(16, 512, dtype=torch.bfloat16, device="cuda"), nmw, None, None, dense)


# ---------------------------------------------------------------------------------------------
# Converters: compressed-tensors sparse-24-bitmask, torch semi-structured


def test_compressed_tensors_layout_by_hand():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0, 5.0, 6.0, 0.0, 0.0]])
    sd = sparseops.nm_to_compressed_tensors(sparseops.nm_compress(w, 2, 4), "model.layers.0.q_proj.weight")
    assert set(sd) == {"model.layers.0.q_proj." + k for k in ("shape", "compressed", "bitmask")}
    assert sd["model.layers.0.q_proj.shape"].tolist() == [[1], [12]]
    assert sd["model.layers.0.q_proj.compressed"].tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]
    # numpy.packbits(mask, axis=-1, bitorder="little"): columns 1, 3, 4, 6 | 8, 9
    assert sd["model.layers.0.q_proj.bitmask"].tolist() == [[0b01011010, 0b0011]]
    assert sd["model.layers.0.q_proj.bitmask"].dtype == torch.uint8


def test_compressed_tensors_roundtrip():
    for dtype in DTYPES:
        dense, nmw = _weight(13, 40, 2, 4, dtype)
        dense[0, :4] = 0  # a group of explicit zeros
        nmw = sparseops.nm_compress(dense, 2, 4)
        sd = sparseops.nm_to_compressed_tensors(nmw, "l")
        back = sparseops.nm_from_compressed_tensors(sd, "l")
        assert torch.equal(back.values, nmw.values) and torch.equal(back.meta, nmw.meta)
        assert back.shape == nmw.shape
        # Decompress as compressed-tensors does: dense[bitmask] = compressed.
        mask = torch.zeros(13, 40, dtype=torch.bool)
        bits = sd["l.bitmask"]
        for c in range(40):
            mask[:, c] = (bits[:, c // 8] >> (c % 8)) & 1 == 1
        ref_dense = torch.zeros(13, 40, dtype=dtype)
        ref_dense[mask] = sd["l.compressed"].reshape(-1)
        assert torch.equal(ref_dense, dense)
    with pytest.raises(ValueError, match="2:4"):
        sparseops.nm_to_compressed_tensors(_weight(4, 16, 1, 4)[1])
    bad = dict(sd)
    bad["l.bitmask"] = torch.zeros_like(sd["l.bitmask"])
    with pytest.raises(ValueError, match="exactly 2"):
        sparseops.nm_from_compressed_tensors(bad, "l")


def test_semi_structured_from_dense_and_cpu_error():
    dense, nmw = _weight(32, 64, 2, 4, torch.float16)
    back = sparseops.nm_from_semi_structured(dense)
    assert torch.equal(back.values, nmw.values) and torch.equal(back.meta, nmw.meta)
    with pytest.raises(RuntimeError, match="CUDA"):
        sparseops.nm_to_semi_structured(nmw)
    with pytest.raises(ValueError, match="2:4"):
        sparseops.nm_to_semi_structured(_weight(4, 16, 1, 4)[1])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_semi_structured_roundtrip_cuda():
    dense, nmw = _weight(128, 128, 2, 4, torch.float16, "cuda")
    sst = sparseops.nm_to_semi_structured(nmw)
    assert isinstance(sst, torch.sparse.SparseSemiStructuredTensor)
    torch.testing.assert_close(sst.to_dense(), dense, rtol=0, atol=0)
    back = sparseops.nm_from_semi_structured(sst)
    assert torch.equal(back.values, nmw.values) and torch.equal(back.meta, nmw.meta)
