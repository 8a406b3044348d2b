"""The CUDA N:M kernels (csrc/cuda/nm_sparse.cu): nm_linear on the 2:4 sparse tensor cores and the
fused prune-and-compress kernel.

Without a GPU (every test above the GPU section): the hardware metadata against an independent
Python reading of its documented layout; the CPU emulators of both kernels (csrc/cpu/nm_sp24.cpp:
the kernel's own address functions, mma.sp as the PTX ISA defines it) against the reference on
random weights with ties, zeros and -0.0, every configuration, the generic path for every n <= 2
pattern, odd shapes; the compress emulator bit for bit; the auto policy.
With a GPU (marked gpu): production sizes against the reference (DESIGN.md's GEMM rule), the GPU
against the emulator, bias, fp16 / bf16, CUDA-graph capture, the metadata cache, the compress
kernel bit for bit, refusals."""

from __future__ import annotations

import pytest
import torch

import sparseops
from conftest import HAS_CUDA
from sparseops import _backend
from sparseops.ops import nm_sparse as nm_ops
from sparseops.reference import nm_sparse as ref
from sparseops.testing import nm_weight

HAS_C = sparseops.build_info()["extension"]
pytestmark = pytest.mark.skipif(not HAS_C, reason="the emulators live in the C++ extension")

S, M, L, GENERIC = 0, 1, 2, 3
SP24_PATTERNS = [(2, 4), (1, 4), (2, 8), (1, 8), (1, 2), (2, 16), (1, 16)]
ALL_PATTERNS = [*SP24_PATTERNS, (3, 4), (4, 8), (8, 16), (15, 16), (3, 8), (5, 16)]


def _x(*shape, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _special_weight(out, k, n, m, dtype, seed=0):
    """An N:M weight with ties (small integers), kept explicit zeros, -0.0 and short groups."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, (out, k), generator=g).to(torch.float32)
    w[w == 0] = -0.0
    w = w.to(dtype)
    mask = ref.nm_mask_ref(w, n, m)
    mask[0, :m] = False  # an empty group: padded with explicit zeros
    dense = w * mask
    values, meta, _ = ref.nm_compress_ref(dense, n, m, mask=mask)
    return dense, sparseops.NMWeight(values, meta, n, m, (out, k))


def _gemm_check(y, x, dense, bias):
    """DESIGN.md: error vs fp64 at most 2x torch's own error in the same dtype, plus a floor of a
    few fp32 ulps of the row norms (fp32 accumulation in another order)."""
    exact = torch.nn.functional.linear(x.double(), dense.double(), None if bias is None else bias.double())
    own = torch.nn.functional.linear(x, dense, bias).double()
    own_err = (own - exact).abs().max().item() if exact.numel() else 0.0
    floor = 1e-5 * (1 + (x.double().abs() @ dense.double().abs().T).max().item()) if exact.numel() else 0.0
    err = (y.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert y.dtype == x.dtype and y.shape == exact.shape
    assert err <= 2 * own_err + floor, (err, own_err, floor)


def _hw(nmw):
    return torch.ops.sparseops.nm_sp24_meta(nmw.meta, nmw.n, nmw.m, nmw.shape[0], nmw.shape[1])


def _emulate(x, nmw, bias, config, hw=None):
    hw = _hw(nmw) if hw is None else hw
    return torch.ops.sparseops._nm_sp24_emulate(x, nmw.values, nmw.meta, hw, bias, nmw.n, nmw.m, nmw.shape[1], config)


# ---------------------------------------------------------------------------------------------
# Hardware metadata, read back by an independent Python decoder of the documented layout


def _decode_hw(hw, out, k):
    """Per dense row and group of 4 columns (padded to the hw meta's extent): (idx0, idx1).

    Layout (sparseops/nm_sp24.h): word (mtile, kstep, w = 2 g + h) holds rows 16 mtile + g
    (bits 0-15) and + 8 (bits 16-31), dense columns 32 kstep + 16 h ... + 15, group j at
    4 j; nibble = idx0 | idx1 << 2."""
    mt, ks, _ = hw.shape
    words = hw.to(torch.int64) & 0xFFFFFFFF
    idx = torch.empty(mt * 16, ks * 8, 2, dtype=torch.int64)
    for w in range(16):
        g, h = w // 2, w % 2
        for half in range(2):
            rows = torch.arange(mt) * 16 + g + 8 * half
            for j in range(4):
                nib = (words[:, :, w] >> (16 * half + 4 * j)) & 0xF  # [mt, ks]
                groups = torch.arange(ks) * 8 + 4 * h + j
                idx[rows[:, None], groups[None, :], 0] = nib & 3
                idx[rows[:, None], groups[None, :], 1] = nib >> 2
    return idx


def test_hw_meta_2to4_is_the_nm_nibble_reordered():
    for out, k in [(16, 32), (37, 80), (130, 288)]:
        _, nmw = nm_weight(out, k, 2, 4, dtype=torch.bfloat16, seed=out)
        hw = _hw(nmw)
        assert hw.dtype == torch.int32 and hw.shape == ((out + 127) // 128 * 8, (k + 255) // 256 * 8, 16)
        idx = _decode_hw(hw, out, k)
        cols = ref.nm_columns_ref(nmw.meta, 2, 4, k // 2).reshape(out, k // 4, 2)
        assert torch.equal(idx[:out, : k // 4], cols % 4)
        pad = torch.ones_like(idx[..., 0], dtype=torch.bool)
        pad[:out, : k // 4] = False
        assert (idx[..., 0][pad] == 0).all() and (idx[..., 1][pad] == 1).all()


@pytest.mark.parametrize("n,m", SP24_PATTERNS)
def test_hw_meta_covers_every_kept_column(n, m):
    out, k = 21, 6 * m if m > 2 else 34
    _, nmw = _special_weight(out, k, n, m, torch.float16, seed=n + m)
    idx = _decode_hw(_hw(nmw), out, k)
    assert (idx[..., 0] < idx[..., 1]).all()  # never an undefined nibble
    selected = torch.zeros(idx.shape[0], idx.shape[1] * 4, dtype=torch.bool)
    base = torch.arange(idx.shape[1]) * 4
    for s in range(2):
        selected.scatter_(1, base[None, :] + idx[..., s], True)
    assert (selected[:out, :k] | ~nmw.mask()).all()
    # Short groups are padded with their lowest free columns.
    kept = nmw.mask().reshape(out, -1, 4) if k % 4 == 0 else None
    if kept is not None:
        cnt = kept.sum(-1)
        one = cnt == 1
        pos = kept.to(torch.int64).argmax(-1)
        want0 = torch.where(pos == 0, 0, 0)
        want1 = torch.where(pos == 0, 1, pos)
        assert torch.equal(idx[:out, : k // 4, 0][one], want0[one])
        assert torch.equal(idx[:out, : k // 4, 1][one], want1[one])


def test_hw_meta_rejects_bad_meta_and_patterns():
    _, nmw = nm_weight(8, 32, 2, 4)
    bad = nmw.meta.clone()
    bad[3, 1] = 0  # both positions 0 in two groups: not strictly increasing
    with pytest.raises(RuntimeError, match="strictly increasing"):
        torch.ops.sparseops.nm_sp24_meta(bad, 2, 4, 8, 32)
    _, nmw48 = nm_weight(8, 32, 4, 8)
    with pytest.raises(RuntimeError, match="does not map onto"):
        torch.ops.sparseops.nm_sp24_meta(nmw48.meta, 4, 8, 8, 32)
    with pytest.raises(RuntimeError, match="meta must have shape"):
        torch.ops.sparseops.nm_sp24_meta(nmw.meta[:, :3], 2, 4, 8, 32)


def test_hw_meta_fake_matches():
    _, nmw = nm_weight(37, 80, 1, 4)
    torch.library.opcheck(torch.ops.sparseops.nm_sp24_meta.default, (nmw.meta, 1, 4, 37, 80))


# ---------------------------------------------------------------------------------------------
# nm_linear's CUDA kernel, emulated on the CPU


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "config,R,out,k",
    [
        (S, 1, 37, 272),  # M = 1, odd out, k not a multiple of 128 / 256
        (S, 16, 64, 512),
        (S, 5, 33, 16),  # one partial stage
        (M, 17, 97, 144),
        (M, 64, 128, 320),
        (L, 130, 129, 208),  # partial tiles in both dims
        (L, 3, 5, 64),
        (GENERIC, 9, 41, 96),
    ],
)
@pytest.mark.parametrize("special", [False, True])
def test_emulator_matches_reference(dtype, config, R, out, k, special):
    if special:
        dense, nmw = _special_weight(out, k, 2, 4, dtype, seed=R)
    else:
        dense, nmw = nm_weight(out, k, 2, 4, dtype=dtype, seed=R)
    x = _x(R, k, dtype=dtype, seed=k)
    bias = _x(out, dtype=dtype, seed=3) if R % 2 else None
    y = _emulate(x, nmw, bias, config)
    _gemm_check(y, x, dense, bias)


@pytest.mark.parametrize("n,m", SP24_PATTERNS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulator_generic_every_pattern(n, m, dtype):
    for R, out, k in [(1, 19, 8 * m if m > 2 else 38), (33, 70, 40 * m if m > 2 else 102)]:
        dense, nmw = _special_weight(out, k, n, m, dtype, seed=R + n)
        x = _x(R, k, dtype=dtype, seed=R)
        _gemm_check(_emulate(x, nmw, None, GENERIC), x, dense, None)


def test_emulator_generic_2to4_odd_k_and_misaligned_x():
    dense, nmw = nm_weight(23, 36, 2, 4, dtype=torch.bfloat16)  # in % 16 != 0
    x = _x(4, 36, dtype=torch.bfloat16)
    _gemm_check(_emulate(x, nmw, None, GENERIC), x, dense, None)
    with pytest.raises(RuntimeError, match="generic path"):
        _emulate(x, nmw, None, S)
    dense, nmw = nm_weight(23, 64, 2, 4, dtype=torch.bfloat16)
    buf = _x(4 * 64 + 1, dtype=torch.bfloat16)
    xm = buf[1:].view(4, 64)  # 2-byte offset: not 16-byte aligned
    with pytest.raises(RuntimeError, match="generic path"):
        _emulate(xm, nmw, None, M)
    _gemm_check(_emulate(xm, nmw, None, GENERIC), xm, dense, None)


def test_emulator_catches_a_wrong_layout():
    """The emulator must fail a kernel that reads the wrong metadata: swapping two hw words
    (or handing it the plain NM_FORMAT bytes) breaks the product."""
    dense, nmw = nm_weight(32, 64, 2, 4, dtype=torch.bfloat16, seed=4)
    x = _x(8, 64, dtype=torch.bfloat16)
    hw = _hw(nmw)
    swapped = hw.clone()
    swapped[:, :, [0, 2]] = hw[:, :, [2, 0]]
    y = _emulate(x, nmw, None, S, hw=swapped)
    with pytest.raises(AssertionError):
        _gemm_check(y, x, dense, None)


def test_emulator_refuses_what_the_kernel_refuses():
    _, nmw = nm_weight(8, 32, 2, 4)
    hw = _hw(nmw)
    with pytest.raises(RuntimeError, match="fp16 / bf16"):
        _emulate(_x(2, 32), nmw, None, S, hw=hw)
    _, nmw48 = nm_weight(8, 32, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="n <= 2"):
        _emulate(_x(2, 32, dtype=torch.bfloat16), nmw48, None, GENERIC, hw=hw)


# ---------------------------------------------------------------------------------------------
# nm_compress's CUDA kernel, emulated on the CPU: bit for bit the reference


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_same(got, want):
    """Bit for bit, NaN payloads aside: the reference's bf16 gather turns the NaN 0x7FC0 into
    0xFFFF, where the CPU and CUDA kernels copy the weight's bits."""
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        if g.is_floating_point():
            nan = torch.isnan(w)
            assert torch.equal(torch.isnan(g), nan)
            assert torch.equal(_bits(g)[~nan], _bits(w)[~nan])
        else:
            assert torch.equal(g, w)


@pytest.mark.parametrize("n,m", ALL_PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_compress_emulator_bitwise(n, m, dtype):
    out, k = 11, 5 * m + (m if m == 2 else 0)
    w = _x(out, k, dtype=dtype, seed=n * m)
    w[0, :m] = 1.0  # ties: lower index wins
    w[1, 1] = float("nan")  # NaN ranks first
    w[2, : m // 2] = -0.0  # signed zeros are copied bit for bit
    w[3, 2] = float("-inf")
    scores = _x(out, k, seed=7).abs()
    scores[4, :m] = 0.5  # tied scores
    scores[5, 0] = float("nan")
    for s in (None, scores, scores.to(torch.float64), scores.to(torch.bfloat16)):
        mask = ref.nm_mask_ref(w, n, m, scores=s)
        want = ref.nm_compress_ref(w, n, m, mask=mask)
        got = torch.ops.sparseops._nm_compress_emulate(w, n, m, s, None, True)
        _assert_same(got, want)
    # The keep path (prune=False): given a mask (short and empty groups) or the non-zeros.
    mask = ref.nm_mask_ref(w, n, m)
    mask[6, :m] = False
    mask[7, :m] = False
    mask[7, m - 1] = True
    ws = torch.where(mask, w, torch.zeros_like(w))
    ws[8, 0] = -0.0 if not mask[8, 0] else ws[8, 0]
    want = ref.nm_compress_ref(ws, n, m, mask=mask)
    _assert_same(torch.ops.sparseops._nm_compress_emulate(ws, n, m, None, mask, False), want)
    want = ref.nm_compress_ref(ws, n, m)
    _assert_same(torch.ops.sparseops._nm_compress_emulate(ws, n, m, None, None, False), want)


def test_compress_emulator_writes_only_the_outputs_asked_for():
    """The CUDA kernel's blocks with values / meta or the mask not wanted (null pointers in
    nm_compress.h): what is written equals the full run, the rest comes back empty."""
    for n, m in [(2, 4), (1, 2), (3, 8), (5, 16)]:
        w = _x(5, 7 * m, seed=m + n)
        full = torch.ops.sparseops._nm_compress_emulate(w, n, m, None, None, True)
        values, meta, none = torch.ops.sparseops._nm_compress_emulate(w, n, m, None, None, True, outputs="compressed")
        assert torch.equal(values, full[0]) and torch.equal(meta, full[1]) and none.shape == (0,)
        a, b, mask = torch.ops.sparseops._nm_compress_emulate(w, n, m, None, None, True, outputs="mask")
        assert a.shape == b.shape == (0,) and torch.equal(mask, full[2])


def test_compress_emulator_block_edges():
    """Rows whose group count is not a multiple of the thread block (1:2 packs 8 groups per
    meta byte, 1:4 four): the last block of each row writes a partial byte."""
    for n, m, groups in [(1, 2, 13), (1, 4, 7), (3, 4, 5), (1, 8, 3), (3, 16, 3)]:
        w = _x(5, groups * m, seed=groups)
        want = ref.nm_compress_ref(w, n, m, mask=ref.nm_mask_ref(w, n, m))
        _assert_same(torch.ops.sparseops._nm_compress_emulate(w, n, m, None, None, True), want)


# ---------------------------------------------------------------------------------------------
# The auto policy on CUDA (the registry's answer for CUDA facts, whether or not this build has
# CUDA kernels)


@pytest.fixture
def cuda_kernels(monkeypatch):
    monkeypatch.setattr(_backend, "_HAS_CUDA_KERNELS", True)
    nm_ops._LINEAR._cache.clear()
    nm_ops._COMPRESS._cache.clear()
    yield
    nm_ops._LINEAR._cache.clear()
    nm_ops._COMPRESS._cache.clear()


def test_auto_policy_on_cuda(cuda_kernels):
    if not _backend._HAS_TRITON:
        pytest.skip("needs triton")
    pick = nm_ops._LINEAR._resolve
    bf16, fp32 = torch.bfloat16, torch.float32
    assert pick(("cuda", bf16, 2, 4, None), None) == "cuda"
    assert pick(("cuda", torch.float16, 2, 4, None), None) == "cuda"
    assert pick(("cuda", bf16, 1, 4, True), None) == "triton"  # small batch: fewer bytes
    assert pick(("cuda", bf16, 1, 4, False), None) == "cuda"  # large batch: 2x tensor rate
    assert pick(("cuda", bf16, 2, 8, False), None) == "cuda"
    assert pick(("cuda", bf16, 4, 8, False), None) == "triton"  # n > 2: not 2:4
    assert pick(("cuda", fp32, 2, 4, None), None) == "triton"
    assert pick(("cuda", torch.float64, 2, 4, None), None) != "cuda"
    # A forced cuda backend says why it refuses.
    with pytest.raises(RuntimeError, match="at most 2"):
        pick(("cuda", bf16, 4, 8, False), "cuda")
    with pytest.raises(RuntimeError, match="fp16 / bf16"):
        pick(("cuda", fp32, 2, 4, None), "cuda")
    assert nm_ops._COMPRESS._resolve(("cuda", fp32), None) == "cuda"


def test_linear_facts():
    _, nmw = nm_weight(8, 32, 1, 4)
    assert nm_ops._linear_facts(_x(3, 32), nmw) == ("cpu", torch.float32, None, None, None)
    assert nm_ops._linear_facts("cuda") == ("cuda", None, None, None, None)
    assert nm_ops._linear_facts(torch.empty(3, 7, 32, device="meta"), nmw)[0] == "meta"


# ---------------------------------------------------------------------------------------------
# On a GPU


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out,k", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("R", [1, 16, 2048])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_production_sizes(dtype, out, k, R):
    dense, nmw = nm_weight(out, k, 2, 4, dtype=dtype, device="cuda", seed=R)
    x = _x(R, k, dtype=dtype, device="cuda", seed=out)
    bias = _x(out, dtype=dtype, device="cuda", seed=2)
    for b in (None, bias):
        y = sparseops.nm_linear(x, nmw, b, backend="cuda")
        _gemm_check(y, x, dense, b)
    assert sparseops.resolve_backend("nm_linear", x, nmw) == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,m", SP24_PATTERNS)
def test_cuda_odd_shapes_every_pattern(n, m):
    for dtype in (torch.bfloat16, torch.float16):
        for R, out, k in [(1, 97, 16 * m if m > 2 else 38), (7, 257, 80 * m if m > 2 else 146), (300, 33, 48 * m)]:
            dense, nmw = _special_weight(out, k, n, m, dtype, seed=R)
            dense, nmw = dense.cuda(), nmw.to("cuda")
            x = _x(R, k, dtype=dtype, device="cuda", seed=k)
            bias = _x(out, dtype=dtype, device="cuda")
            _gemm_check(sparseops.nm_linear(x, nmw, bias, backend="cuda"), x, dense, bias)
            x3 = _x(2, 3, k, dtype=dtype, device="cuda").transpose(0, 1)  # leading dims, strided
            _gemm_check(sparseops.nm_linear(x3, nmw, None, backend="cuda"), x3, dense, None)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("R", [1, 16, 40, 300])
def test_cuda_agrees_with_emulator(R):
    """The GPU against the CPU emulator of the same kernel (accumulation order aside)."""
    dense, nmw = nm_weight(200, 528, 2, 4, dtype=torch.bfloat16, seed=R)
    x = _x(R, 528, dtype=torch.bfloat16, seed=R)
    y = sparseops.nm_linear(x.cuda(), nmw.to("cuda"), backend="cuda").cpu()
    cfg = S if R <= 16 else M  # 200 rows: too few 128 x 128 tiles for L on any GPU
    emu = _emulate(x, nmw, None, cfg)
    torch.testing.assert_close(y.float(), emu.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_generic_path_misaligned_and_odd_k():
    dense, nmw = nm_weight(77, 36, 2, 4, dtype=torch.float16, device="cuda")
    x = _x(5, 36, dtype=torch.float16, device="cuda")
    _gemm_check(sparseops.nm_linear(x, nmw, backend="cuda"), x, dense, None)
    dense, nmw = nm_weight(77, 64, 2, 4, dtype=torch.float16, device="cuda")
    xm = _x(5 * 64 + 1, dtype=torch.float16, device="cuda")[1:].view(5, 64)
    _gemm_check(sparseops.nm_linear(xm, nmw, backend="cuda"), xm, dense, None)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_capture():
    dense, nmw = nm_weight(1024, 2048, 2, 4, dtype=torch.bfloat16, device="cuda")
    bias = _x(1024, dtype=torch.bfloat16, device="cuda")
    x = _x(16, 2048, dtype=torch.bfloat16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        sparseops.nm_linear(x, nmw, bias)  # warm-up builds the hw meta outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = sparseops.nm_linear(x, nmw, bias)
    for seed in (5, 6):
        x.copy_(_x(16, 2048, dtype=torch.bfloat16, device="cuda", seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        _gemm_check(y, x, dense, bias)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_meta_cache_follows_in_place_changes():
    d1, a = nm_weight(256, 512, 2, 4, dtype=torch.bfloat16, device="cuda", seed=1)
    d2, b = nm_weight(256, 512, 2, 4, dtype=torch.bfloat16, device="cuda", seed=2)
    x = _x(8, 512, dtype=torch.bfloat16, device="cuda")
    _gemm_check(sparseops.nm_linear(x, a, backend="cuda"), x, d1, None)
    a.meta.copy_(b.meta)  # load_state_dict does this: the version bump rebuilds the hw meta
    a.values.copy_(b.values)
    _gemm_check(sparseops.nm_linear(x, a, backend="cuda"), x, d2, None)
    # The hw meta built on the GPU is the CPU's, bit for bit.
    assert torch.equal(_hw(b).cpu(), _hw(b.to("cpu")))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_nmlinear_trains_and_refuses():
    layer = sparseops.nn.NMLinear.from_dense(torch.nn.Linear(256, 128).cuda().bfloat16(), 2, 4)
    x = _x(4, 256, dtype=torch.bfloat16, device="cuda").requires_grad_()
    layer(x).float().pow(2).sum().backward()
    assert layer.values.grad is not None and x.grad is not None
    _, nmw = nm_weight(64, 64, 4, 8, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="at most 2"):
        sparseops.nm_linear(_x(2, 64, dtype=torch.bfloat16, device="cuda"), nmw, backend="cuda")
    assert sparseops.resolve_backend("nm_linear", _x(2, 64, dtype=torch.bfloat16, device="cuda"), nmw) == "triton"
    _, nmw = nm_weight(64, 64, 2, 4, device="cuda")
    with pytest.raises(RuntimeError, match="fp16 / bf16"):
        torch.ops.sparseops.nm_linear(_x(2, 64, device="cuda"), nmw.values, nmw.meta, 2, 4, 64, None, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,m", ALL_PATTERNS)
def test_cuda_compress_bitwise(n, m):
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        w = _x(37, 9 * m, dtype=dtype, seed=m)
        w[0, :m] = 1.0
        w[1, 1] = float("nan")
        w[2, :2] = -0.0
        scores = _x(37, 9 * m, seed=3).abs()
        for s in (None, scores, scores.double()):
            mask = ref.nm_mask_ref(w, n, m, scores=s)
            want = ref.nm_compress_ref(w, n, m, mask=mask)
            got = torch.ops.sparseops.nm_compress(w.cuda(), n, m, None if s is None else s.cuda(), None, True, "cuda")
            _assert_same([t.cpu() for t in got], want)
        ws = torch.where(mask, w, torch.zeros_like(w))
        want = ref.nm_compress_ref(ws, n, m, mask=mask)
        got = torch.ops.sparseops.nm_compress(ws.cuda(), n, m, None, mask.cuda(), False, "cuda")
        _assert_same([t.cpu() for t in got], want)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_compress_production_size():
    w = _x(11008, 4096, dtype=torch.bfloat16, device="cuda")
    nmw = sparseops.nm_compress(w, 2, 4, prune=True)
    want = ref.nm_compress_ref(w, 2, 4, mask=ref.nm_mask_ref(w, 2, 4))
    _assert_same([nmw.values, nmw.meta], [want[0], want[1]])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_opcheck_and_compile():
    _, nmw = nm_weight(48, 64, 2, 4, dtype=torch.bfloat16, device="cuda")
    x = _x(5, 64, dtype=torch.bfloat16, device="cuda")
    bias = _x(48, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.sparseops.nm_linear.default, (x, nmw.values, nmw.meta, 2, 4, 64, bias, "cuda"))
    torch.library.opcheck(torch.ops.sparseops.nm_compress.default, (x, 2, 4, None, None, True, "cuda"))
    f = torch.compile(lambda t: sparseops.nm_linear(t, nmw, bias), fullgraph=True, dynamic=True)
    for R in (1, 9, 33):
        t = _x(R, 64, dtype=torch.bfloat16, device="cuda", seed=R)
        torch.testing.assert_close(f(t), sparseops.nm_linear(t, nmw, bias))
