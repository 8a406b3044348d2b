"""grouped_mm's triton backend (kernels/grouped_mm.py): every layout against the fp64
reference (error <= 2x torch's own error in the dtype), empty groups, G = 1 and G > 1024 (two
scan chunks), odd sizes, bias, out_dtype, non-contiguous A, transposed-view B, the descriptor
(TMA) and pointer paths, zeros past offs[-1], autograd, opcheck; under the interpreter on CPU
tensors with tiny shapes (CI runs these three times). GPU tests at production sizes against
torch._grouped_mm, CUDA-graph capture and no host sync."""

from __future__ import annotations

import pytest
import torch
from test_grouped_mm import LAYOUTS, _torch_own, check_close, make_case

import sparseops
from conftest import HAS_CUDA

pytestmark = pytest.mark.skipif(
    "triton" not in sparseops.available_backends("grouped_mm", "cuda" if HAS_CUDA else "cpu"),
    reason="the triton backend cannot run here",
)
DEVICE = "cuda" if HAS_CUDA else "cpu"


def run(a, b, offs, bias=None, **kw):
    return sparseops.grouped_mm(a, b, offs, bias=bias, backend="triton", **kw)


def _cpu(t):
    return t.cpu() if t is not None else None


def _check(layout, out, a, b, offs, bias=None, out_dtype=None):
    """test_grouped_mm's rule (fp64 reference; 16-bit: at most 2x torch's own error in the
    dtype), except that same-dtype fp32 results may also differ by 4 ulps of the output's
    scale: the kernel sums K in BLOCK_K steps, torch.mm in its own order, and for a short K
    torch can be luckier than one ulp of a result of magnitude ~6."""
    out, a, b, offs, bias = out.cpu(), a.cpu(), b.cpu(), _cpu(offs), _cpu(bias)
    if a.dtype != torch.float32 or out_dtype is not None:
        return check_close(out, a, b, offs, bias, out_dtype)
    from sparseops.reference.grouped_mm import grouped_mm_ref

    exp = grouped_mm_ref(a.double(), b.double(), offs, bias=bias.double() if bias is not None else None)
    assert out.shape == exp.shape and out.dtype == a.dtype
    if out.numel():
        own = (_torch_own(a, b, offs, bias).double() - exp).abs().max().item()
        err = (out.double() - exp).abs().max().item()
        assert err <= 2 * own + 4 * torch.finfo(torch.float32).eps * max(1.0, exp.abs().max().item()), (err, own)


@pytest.mark.triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64), ids=str)
def test_layouts_dtypes(layout, dtype):
    # Sizes 1, 7, 0 and 20 rows; N = 97 and K = 7: odd edges on every side of the tiles.
    a, b, offs, bias = make_case(layout, (1, 7, 0, 20), M=7, N=97, K=7, dtype=dtype, device=DEVICE, bias=True)
    _check(layout, run(a, b, offs, bias), a, b, offs, bias)


@pytest.mark.triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
def test_descriptor_and_pointer_paths(layout, tma):
    """Aligned strides (K = N = 32, transposed-view B) take the descriptor (TMA) path where the
    layout has one, and give what the pointer path gives."""
    from sparseops.kernels.grouped_mm import grouped_mm_plan, grouped_mm_triton

    a, b, offs, bias = make_case(layout, (5, 0, 40, 3), M=16, N=32, K=32, dtype=torch.bfloat16, device=DEVICE,
                                 b_transposed=True, bias=True)  # fmt: skip
    plan = grouped_mm_plan(a, b, offs, layout, use_tma=tma)
    if layout in ("2d3d", "3d2d"):
        assert (plan["b_mode"] != 0) == tma
    out = torch.full(sparseops.grouped_mm(a, b, offs, bias=bias, backend="reference").shape, float("nan"),
                     dtype=a.dtype, device=DEVICE)  # fmt: skip
    grouped_mm_triton(a, b, offs, bias, layout, out, use_tma=tma)
    _check(layout, out, a, b, offs, bias)


@pytest.mark.triton
@pytest.mark.parametrize("layout", ("2d3d", "2d2d", "3d2d"))
def test_empty_groups_and_tail(layout):
    for sizes in ((0, 5, 3), (5, 0, 3), (5, 3, 0), (0, 0, 0), (4,)):
        a, b, offs, bias = make_case(layout, sizes, tail=3, device=DEVICE, bias=True, seed=len(sizes))
        out = run(a, b, offs, bias)
        _check(layout, out, a, b, offs, bias)
        end = int(offs[-1])
        if layout == "2d3d":  # rows past offs[-1]: zeros, never garbage
            assert torch.equal(out[end:], torch.zeros_like(out[end:]))
        elif layout == "3d2d":
            assert torch.equal(out[:, end:], torch.zeros_like(out[:, end:]))
        else:  # an empty ragged-K group's output is its bias
            for g, s in enumerate(sizes):
                if s == 0:
                    torch.testing.assert_close(out[g], bias[g].expand_as(out[g]))


@pytest.mark.triton
@pytest.mark.parametrize("layout", ("2d3d", "3d2d"))
def test_many_groups(layout):
    """G = 1100 > 1024: the tile scan walks offs in two chunks (most groups empty). (The
    ragged-K layout has no scan: a static grid of one program per group and tile.)"""
    gen = torch.Generator().manual_seed(11)
    sizes = [0] * 1100
    for i in torch.randint(0, 1100, (6,), generator=gen).tolist():
        sizes[i] += 3
    sizes[-1] = 2
    a, b, offs, _ = make_case(layout, sizes, M=3, N=5, K=4, device=DEVICE)
    _check(layout, run(a, b, offs), a, b, offs)


@pytest.mark.triton
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_group_and_degenerate(layout):
    a, b, offs, _ = make_case(layout, (37,), M=1, N=1, K=1, device=DEVICE)
    _check(layout, run(a, b, offs), a, b, offs)
    if layout == "2d3d":  # no rows at all
        a, b, offs, _ = make_case(layout, (0, 0), tail=0, device=DEVICE)
        assert run(a, b, offs).shape == (0, 9)
    else:  # M = 0
        a, b, offs, _ = make_case(layout, (2, 0, 3), M=0, device=DEVICE)
        assert run(a, b, offs).numel() == 0
    if layout in ("2d3d", "2d2d", "3d2d"):  # G = 0
        a, b, offs, _ = make_case(layout, (), tail=3, device=DEVICE)
        out = run(a, b, offs)
        assert not out.abs().sum().item()


@pytest.mark.triton
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_operands_and_out_dtype(layout):
    a, b, offs, bias = make_case(layout, (1, 17, 0, 9), M=9, N=33, K=35, dtype=torch.bfloat16, device=DEVICE,
                                 b_transposed=True, a_noncontig=True, bias=True, seed=2)  # fmt: skip
    _check(layout, run(a, b, offs, bias), a, b, offs, bias)
    _check(layout, run(a, b, offs, bias, out_dtype=torch.float32), a, b, offs, bias, torch.float32)
    a16, b16, offs16, bias16 = (t.half() if t is not None and t.is_floating_point() else t for t in (a, b, offs, bias))
    _check(layout, run(a16, b16, offs16, bias16, out_dtype=torch.float32), a16, b16, offs16, bias16, torch.float32)


@pytest.mark.triton
@pytest.mark.parametrize("layout", ("2d3d", "2d2d"))
def test_backward_vs_reference(layout):
    """Autograd through the triton backend: dA and dB are grouped_mm calls on triton too."""
    from sparseops.reference.grouped_mm import grouped_mm_ref

    a, b, offs, bias = make_case(layout, (5, 0, 19, 2), K=20, dtype=torch.float32, device=DEVICE, bias=True)
    leaves = [t.detach().requires_grad_(True) for t in (a, b, bias)]
    out = run(leaves[0], leaves[1], offs, leaves[2])
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
    out.backward(dy.to(DEVICE))
    ref_leaves = [t.detach().cpu().double().requires_grad_(True) for t in (a, b, bias)]
    grouped_mm_ref(ref_leaves[0], ref_leaves[1], offs.cpu(), bias=ref_leaves[2]).backward(dy.double())
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.cpu().double(), want.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("layout", ("2d3d", "2d2d"))
def test_opcheck(layout):
    a, b, offs, bias = make_case(layout, (2, 0, 3), N=5, K=4, M=3, device=DEVICE, bias=True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    torch.library.opcheck(torch.ops.sparseops.grouped_mm.default, (a, b, offs, bias, None, "triton"))


def test_backend_choice():
    assert sparseops.available_backends("grouped_mm", "cuda")[0] == "triton"
    assert sparseops.resolve_backend("grouped_mm", "cpu") == "cpu"


def test_tile_table():
    """The heuristic table: decode-sized groups get 16-row tiles, DeepSeek-V3's 128 rows per
    expert one 128-row tile, big groups wide swizzled tiles; fp32 / fp64 their own shapes."""
    from sparseops.kernels.grouped_mm import tile_config

    assert tile_config(4, 4096, 7168, torch.bfloat16, True).block_m == 16
    assert tile_config(128, 4096, 7168, torch.bfloat16, True)[:3] == (128, 128, 64)
    big = tile_config(2048, 28672, 4096, torch.bfloat16, True)
    assert big.block_m == 128 and big.block_n == 256 and big.group_m == 8
    assert tile_config(2048, 1536, 2048, torch.bfloat16, True, parts=2).block_n == 64
    assert tile_config(100, 24, 7, torch.bfloat16, True)[1:3] == (32, 16)  # narrow N, short K
    assert tile_config(100, 4096, 4096, torch.float32, True)[1:3] == (64, 16)
    assert tile_config(100, 4096, 4096, torch.float64, True).block_k == 8


# ------------------------------------------------------------------------------ GPU (H100)

# (name, rows per group, G, N, K): the up / down projections of the standard MoE shapes.
GPU_SHAPES = [
    ("DeepSeek-V3 up T=4096", 128, 256, 4096, 7168),
    ("DeepSeek-V3 down T=4096", 128, 256, 7168, 2048),
    ("Qwen3-30B up T=16384", 1024, 128, 1536, 2048),
    ("Qwen3-30B down T=16384", 1024, 128, 2048, 768),
    ("Mixtral up T=4096", 1024, 8, 28672, 4096),
    ("decode T=64 Qwen3", 4, 128, 1536, 2048),
]


def _gpu_case(rows, G, N, K, skew=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    S = rows * G
    if skew:  # max/mean ~ 5, some empty groups
        w = torch.rand(G, generator=gen) ** 4
        w[torch.randperm(G, generator=gen)[: G // 8]] = 0
        sizes = (w / w.sum() * S).floor().long()
        sizes[0] += S - sizes.sum()
    else:
        sizes = torch.full((G,), rows)
    offs = sizes.cumsum(0).to(torch.int32).cuda()
    a = torch.randn(S, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(G, N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    return a, w.transpose(1, 2), offs


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize(("name", "rows", "G", "N", "K"), GPU_SHAPES, ids=[s[0] for s in GPU_SHAPES])
@pytest.mark.parametrize("skew", [False, True], ids=["balanced", "skewed"])
def test_gpu_production_vs_torch(name, rows, G, N, K, skew):
    a, b, offs = _gpu_case(rows, G, N, K, skew)
    got = run(a, b, offs)
    want = torch._grouped_mm(a, b, offs=offs)
    end = int(offs[-1])
    torch.testing.assert_close(got[:end].float(), want[:end].float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(got[end:], torch.zeros_like(got[end:]))


@pytest.mark.gpu
@pytest.mark.triton
def test_gpu_wgrad_vs_torch():
    x, _, offs = _gpu_case(128, 64, 512, 1024)
    dy = torch.randn(x.shape[0], 768, device="cuda", dtype=torch.bfloat16)
    got = run(x.t(), dy, offs)  # ragged K -> [G, K, N]
    want = torch._grouped_mm(x.t(), dy, offs=offs)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=5e-1)


@pytest.mark.gpu
@pytest.mark.triton
def test_gpu_graph_capture_and_no_host_sync():
    a, b, offs = _gpu_case(128, 64, 1024, 1024, skew=True)
    out = run(a, b, offs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(a, b, offs)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, out)
    assert_no_host_sync(lambda: run(a, b, offs))


def assert_no_host_sync(fn):
    """No device-to-host copy, synchronisation or .item() while fn runs (profiler trace)."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
    names = {e.name for e in prof.events()}
    bad = [n for n in names if "Synchronize" in n or "_local_scalar_dense" in n or n.startswith("cudaMemcpy")]
    assert not bad, bad
