"""moe_mlp's triton backend (kernels/moe.py), forward and backward: every activation in both
gate/up layouts against the reference (output, pre-activation and all six gradients), dtypes,
dropped slots, experts without tokens, strided / transposed-view weights, the descriptor
(TMA) and pointer paths, the backward op against the reference backend, opcheck and the
CUDA-vs-Triton choice of auto; under the interpreter on CPU tensors with tiny shapes (CI runs
these three times). GPU tests at production sizes (Qwen3-30B-A3B, DeepSeek-V3, Mixtral
shapes) against the torch layer, CUDA-graph capture and no host sync."""

from __future__ import annotations

import pytest
import torch

import sparseops
from conftest import HAS_CUDA
from sparseops import _backend
from sparseops.reference.moe import ACTIVATIONS, GATED, moe_mlp_ref
from sparseops.testing import moe_inputs

DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    "triton" not in sparseops.available_backends("moe_mlp", DEVICE), reason="the triton backend cannot run here"
)
NAMES = ["x", "w13", "w2", "weights", "b13", "b2"]
# Forward tolerances: the kernels round the pre-activation, the activation and each slot's
# output to x's dtype (as the CPU kernel does); the reference keeps fp32 throughout.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _inputs(T, H, inter, E, k, activation="swiglu", **kw):
    return moe_inputs(T, H, inter, E, k, gated=activation in GATED, device=DEVICE, **kw)


def _run(inp, backend="triton", **kw):
    return sparseops.moe_mlp(
        inp["x"], inp["w13"], inp["w2"], inp["weights"], inp["ids"], b13=inp["b13"], b2=inp["b2"], backend=backend, **kw
    )


def _grads(fn, inp, names, dy):
    leaves = {n: inp[n].detach().clone().requires_grad_(True) for n in names if inp[n] is not None}
    y = fn(dict(inp, **leaves))
    (y * dy).sum().backward()
    return y, {n: t.grad for n, t in leaves.items()}


def _ref(a, **kw):
    cpu = {n: (v.cpu() if isinstance(v, torch.Tensor) else v) for n, v in a.items()}
    return moe_mlp_ref(cpu["x"], cpu["w13"], cpu["w2"], cpu["weights"], cpu["ids"], b13=cpu["b13"], b2=cpu["b2"], **kw)


def _check_fwd_bwd(inp, **kw):
    """y and pre against the reference; every gradient against autograd through the fp64
    reference (relative to the gradient's largest entry). One forward of the op, whose
    autograd runs the triton backward."""
    dtype = inp["x"].dtype
    leaves = {n: inp[n].detach().clone().requires_grad_(True) for n in NAMES if inp[n] is not None}
    a = dict(inp, **leaves)
    y, pre = torch.ops.sparseops.moe_mlp(
        a["x"], a["w13"], a["w2"], a["weights"], a["ids"], kw.get("activation", "swiglu"),
        kw.get("gate_up_layout", "concat"), a["b13"], a["b2"], kw.get("alpha", 1.702), kw.get("limit", 7.0), "triton",
    )  # fmt: skip
    y_ref, pre_ref = _ref(inp, return_pre=True, **kw)
    tol = TOL[dtype]
    torch.testing.assert_close(y.detach().cpu(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(pre.detach().cpu(), pre_ref, rtol=tol, atol=tol)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    (y * dy.to(DEVICE)).sum().backward()
    wide = {n: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in inp.items()}
    _, want = _grads(lambda r: _ref(r, **kw), wide, NAMES, dy.double())
    gtol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    for n, w in want.items():
        g = leaves[n].grad.cpu().double()
        err = (g - w).abs().max().item() / max(1.0, w.abs().max().item()) if w.numel() else 0.0
        assert err <= gtol, (n, err)
    return y


ACT_LAYOUTS = [(a, "concat") for a in ACTIVATIONS] + [(a, "interleaved") for a in GATED]


@pytest.mark.triton
@pytest.mark.parametrize(("activation", "layout"), ACT_LAYOUTS)
def test_activations_forward_backward(activation, layout):
    inp = _inputs(7, 24, 10, 8, 2, activation, drop=0.2, bias=True, seed=1)
    if activation == "swiglu_oai":
        inp["x"] = inp["x"] * 8  # push gate and up past the clamp limit
    _check_fwd_bwd(inp, activation=activation, gate_up_layout=layout, alpha=1.5, limit=2.0)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_dtypes(dtype):
    inp = _inputs(13, 32, 16, 6, 3, dtype=dtype, drop=0.1, bias=True, seed=2)
    if dtype == torch.float64:
        inp["weights"] = inp["weights"].double()
    _check_fwd_bwd(inp)


@pytest.mark.triton
def test_routing_edges():
    """Dropped slots, experts with no token, one expert taking most rows (several M tiles),
    k = 1, a single token, every slot dropped."""
    inp = _inputs(40, 16, 8, 5, 2, bias=True, seed=3)
    ids = inp["ids"].clone()
    ids[:, 0] = 3
    ids[:, 1] = torch.where(ids[:, 1] == 3, -1, ids[:, 1])
    ids[ids == 1] = 0  # expert 1 empty
    ids[::7, 1] = -1
    inp["ids"] = ids
    _check_fwd_bwd(inp)
    one = _inputs(1, 16, 8, 4, 1, seed=4)
    _check_fwd_bwd(one)
    inp["ids"] = torch.full_like(ids, -1)
    y, pre = torch.ops.sparseops.moe_mlp(
        inp["x"], inp["w13"], inp["w2"], inp["weights"], inp["ids"], "swiglu", "concat", inp["b13"], inp["b2"],
        1.702, 7.0, "triton",
    )  # fmt: skip
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(pre, torch.zeros_like(pre))


@pytest.mark.triton
@pytest.mark.parametrize("layout", ["concat", "interleaved"])
def test_strided_weights(layout):
    """gpt-oss stores w13 as [E, H, 2I]: a transposed view, read without a copy (concat: the
    N-contiguous descriptor; interleaved: pointer loads); non-contiguous x, int64 ids."""
    inp = _inputs(9, 32, 16, 4, 2, bias=True, drop=0.1, seed=5)
    kw = dict(activation="swiglu_oai", gate_up_layout=layout)
    inp["x"] = inp["x"] * 3
    strided = dict(inp)
    strided["w13"] = inp["w13"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["w2"] = inp["w2"].transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(9, 64, device=DEVICE)
    wide[:, ::2] = inp["x"]
    strided["x"] = wide[:, ::2]
    strided["ids"] = inp["ids"].long()
    _check_fwd_bwd(strided, **kw)


@pytest.mark.triton
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
def test_descriptor_and_pointer_paths(tma):
    """Aligned shapes (H = 32, I = 16) take the descriptor path for every weight load when
    allowed; both paths agree with the reference."""
    from sparseops.kernels.moe import moe_mlp_backward_triton, moe_mlp_triton
    from sparseops.ops.routing import route_metadata

    inp = _inputs(11, 32, 16, 4, 2, bias=True, drop=0.1, seed=6)
    x, w13, w2, w, ids, b13, b2 = (inp[n] for n in ("x", "w13", "w2", "weights", "ids", "b13", "b2"))
    meta = route_metadata(ids, 4)
    T, H = x.shape
    y = torch.empty_like(x)
    pre = torch.empty(T * 2, 32, device=DEVICE)
    args = (meta.offs, meta.sorted_slots, meta.inverse, meta.tokens, "swiglu", False, 1.702, 7.0)
    moe_mlp_triton(x, w13, w2, w, ids, b13, b2, *args, y, pre, use_tma=tma)
    y_ref, pre_ref = _ref(inp, return_pre=True)
    torch.testing.assert_close(y.cpu(), y_ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(pre.cpu(), pre_ref, rtol=2e-5, atol=2e-5)
    dy = torch.randn(T, H, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = [torch.empty_like(x), torch.empty_like(w13), torch.empty_like(w2), torch.empty_like(w),
             torch.empty_like(b13), torch.empty_like(b2)]  # fmt: skip
    moe_mlp_backward_triton(dy, x, w13, w2, w, ids, pre, b13, b2, *args, *grads, use_tma=tma)
    want = torch.ops.sparseops.moe_mlp_backward(dy, x, w13, w2, w, ids, pre, b13, b2, "swiglu", "concat", 1.702, 7.0,
                                                "reference")  # fmt: skip
    for name, g, r in zip(("dx", "dw13", "dw2", "dweights", "db13", "db2"), grads, want):
        torch.testing.assert_close(g, r.to(g.dtype), rtol=2e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.triton
def test_backward_op_vs_reference_backend():
    """The C++ op moe_mlp_backward on its triton and reference backends, empty expert 5."""
    inp = _inputs(23, 40, 24, 13, 4, dtype=torch.float32, drop=0.2, bias=True, seed=7)
    inp["ids"][inp["ids"] == 5] = 6
    _, pre = torch.ops.sparseops.moe_mlp(
        inp["x"], inp["w13"], inp["w2"], inp["weights"], inp["ids"], "geglu", "interleaved", inp["b13"], inp["b2"],
        1.702, 7.0, "triton",
    )  # fmt: skip
    dy = torch.randn(23, 40, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    args = (dy, inp["x"], inp["w13"], inp["w2"], inp["weights"], inp["ids"], pre, inp["b13"], inp["b2"],
            "geglu", "interleaved", 1.702, 7.0)  # fmt: skip
    got = torch.ops.sparseops.moe_mlp_backward(*args, "triton")
    want = torch.ops.sparseops.moe_mlp_backward(*args, "reference")
    for name, g, w in zip(("dx", "dw13", "dw2", "dweights", "db13", "db2"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(got[1][5], torch.zeros_like(got[1][5]))  # no token: zero dW13


@pytest.mark.triton
def test_opcheck():
    inp = _inputs(5, 16, 16, 4, 2, bias=True, drop=0.2)
    for n in ("x", "w13", "w2", "weights"):
        inp[n].requires_grad_(True)
    args = (inp["x"], inp["w13"], inp["w2"], inp["weights"], inp["ids"], "swiglu", "concat", inp["b13"], inp["b2"])
    torch.library.opcheck(torch.ops.sparseops.moe_mlp.default, args + (1.702, 7.0, "triton"))


def test_auto_prefers_decode_kernel_for_small_T():
    """Auto on CUDA tensors: the CUDA decode kernel while its extra per-slot weight reads cost
    less than the grouped path's extra host time, Triton beyond (the model in ops/moe.py)."""
    from sparseops.ops import moe as moe_ops

    def bytes_bf16(H, inter):
        return 3 * H * inter * 2

    assert moe_ops._decode_max_tokens(8, 128, bytes_bf16(2048, 768)) == 9  # Qwen3-30B-A3B
    assert moe_ops._decode_max_tokens(8, 256, bytes_bf16(7168, 2048)) == 4  # DeepSeek-V3
    assert moe_ops._decode_max_tokens(2, 8, bytes_bf16(4096, 14336)) == 1  # Mixtral-8x7B
    assert moe_ops._decode_max_tokens(4, 128, bytes_bf16(2880, 2880)) == 7  # gpt-oss-120b
    op = _backend.OPS["moe_mlp"]
    small, large = ("cuda", torch.bfloat16, True), ("cuda", torch.bfloat16, False)
    if sparseops.build_info()["cuda"]:
        assert op._resolve(small, None) == "cuda"
    assert op._resolve(large, None) == "triton"
    assert op._resolve(("cpu", torch.float32, None), None) == "cpu"


# ------------------------------------------------------------------------------ GPU (H100)

# (name, T, H, I, E, k): the standard MoE shapes (DESIGN.md), prefill / training sizes.
GPU_SHAPES = [
    ("Qwen3-30B-A3B T=4096", 4096, 2048, 768, 128, 8),
    ("DeepSeek-V3 T=1024", 1024, 7168, 2048, 256, 8),
    ("Mixtral-8x7B T=1024", 1024, 4096, 14336, 8, 2),
    ("gpt-oss-120b T=512", 512, 2880, 2880, 128, 4),
]


def _torch_layer(x, w13, w2, weights, ids):
    """The torch MoE layer built from torch._grouped_mm (argsort, gather, two grouped GEMMs,
    SiLU * up, weighted index_add): the baseline users write today."""
    T, k = ids.shape
    E = w13.shape[0]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    xs = x[order // k]
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    g, u = h.chunk(2, dim=-1)
    o = torch._grouped_mm(torch.nn.functional.silu(g) * u, w2.transpose(1, 2), offs=offs)
    o = o * weights.reshape(-1)[order, None].to(o.dtype)
    return torch.zeros_like(x).index_add_(0, order // k, o)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize(("name", "T", "H", "inter", "E", "k"), GPU_SHAPES, ids=[s[0] for s in GPU_SHAPES])
def test_gpu_production_vs_torch_layer(name, T, H, inter, E, k):
    inp = moe_inputs(T, H, inter, E, k, dtype=torch.bfloat16, device="cuda", seed=T)
    args = [inp[n] for n in ("x", "w13", "w2", "weights", "ids")]
    leaves = [t.detach().requires_grad_(True) for t in args[:4]]
    y = sparseops.moe_mlp(*leaves, args[4], backend="triton")
    leaves_ref = [t.detach().requires_grad_(True) for t in args[:4]]
    y_ref = _torch_layer(*leaves_ref, args[4])
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=3e-2, atol=3e-2)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for n, a, b in zip(("x", "w13", "w2", "weights"), leaves, leaves_ref):
        scale = b.grad.float().abs().max().item()
        err = (a.grad.float() - b.grad.float()).abs().max().item()
        assert err <= 3e-2 * max(scale, 1.0), (n, err, scale)


@pytest.mark.gpu
@pytest.mark.triton
def test_gpu_graph_capture_no_host_sync_and_decode_choice():
    from test_grouped_mm_triton import assert_no_host_sync

    inp = moe_inputs(512, 2048, 768, 128, 8, dtype=torch.bfloat16, device="cuda", seed=1, drop=0.05)
    out = _run(inp)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _run(inp)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, out)  # deterministic: no atomics decide an order
    assert_no_host_sync(lambda: _run(inp))
    x = inp["x"]
    assert _backend.OPS["moe_mlp"].choose(None, x, inp["w13"], inp["w2"], inp["ids"]) == "triton"
    assert _backend.OPS["moe_mlp"].choose(None, x[:4], inp["w13"], inp["w2"], inp["ids"][:4]) == "cuda"
    small = {n: (v[:4] if n in ("x", "weights", "ids") else v) for n, v in inp.items()}
    torch.testing.assert_close(_run(small, backend=None), _run(small), rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("activation", ["swiglu", "swiglu_oai", "gelu"])
def test_gpu_backward_vs_reference_backend(activation):
    inp = moe_inputs(1024, 1024, 512, 64, 4, gated=activation in GATED, dtype=torch.bfloat16, device="cuda",
                     bias=True, drop=0.05)  # fmt: skip
    x, w13, w2, w, ids, b13, b2 = (inp[n] for n in ("x", "w13", "w2", "weights", "ids", "b13", "b2"))
    _, pre = torch.ops.sparseops.moe_mlp(x, w13, w2, w, ids, activation, "concat", b13, b2, 1.702, 7.0, "triton")
    dy = torch.randn_like(x)
    args = (dy, x, w13, w2, w, ids, pre, b13, b2, activation, "concat", 1.702, 7.0)
    got = torch.ops.sparseops.moe_mlp_backward(*args, "triton")
    want = torch.ops.sparseops.moe_mlp_backward(*args, "reference")
    for name, g, r in zip(("dx", "dw13", "dw2", "dweights", "db13", "db2"), got, want):
        scale = r.float().abs().max().item()
        assert (g.float() - r.float()).abs().max().item() <= 3e-2 * max(scale, 1.0), name
