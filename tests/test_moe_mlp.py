"""moe_mlp: every backend against the reference, every activation and layout, biases, edge
routings, bad inputs, backward against autograd through the reference, gradcheck, opcheck,
torch.compile and thread-count determinism."""

from __future__ import annotations

import os

import pytest
import torch

import sparseops
from conftest import backend_params, rerun_in_subprocess
from sparseops.reference.moe import ACTIVATIONS, GATED, moe_mlp_hf_loop, moe_mlp_ref
from sparseops.testing import moe_inputs

# Triton on CPU tensors (the interpreter) runs test_moe_triton.py's interpreter-sized matrix instead of
# this one; on a GPU the triton backend runs this whole matrix.
BACKENDS = [p for p in backend_params("moe_mlp") if p.id != "cpu-triton"]
HAS_C = sparseops.build_info()["extension"]
needs_c = pytest.mark.skipif(not HAS_C, reason="needs the C++ extension")

TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    # The kernels round the GEMM outputs to bf16 / fp16 between stages; the reference does not.
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}


def _inputs(T, H, inter, E, k, activation="swiglu", **kw):
    return moe_inputs(T, H, inter, E, k, gated=activation in GATED, **kw)


def _run(inp, backend=None, **kw):
    return sparseops.moe_mlp(
        inp["x"], inp["w13"], inp["w2"], inp["weights"], inp["ids"], b13=inp["b13"], b2=inp["b2"], backend=backend, **kw
    )


def _ref(inp, **kw):
    return moe_mlp_ref(inp["x"], inp["w13"], inp["w2"], inp["weights"], inp["ids"], b13=inp["b13"], b2=inp["b2"], **kw)


# Every activation with the concat layout, the gated ones with the interleaved one too.
ACT_LAYOUTS = [(a, "concat") for a in ACTIVATIONS] + [(a, "interleaved") for a in GATED]


def _close(actual, expected):
    rtol, atol = TOL[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------ forward


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize(("activation", "layout"), ACT_LAYOUTS)
def test_activations_layouts(device, backend, activation, layout):
    inp = _inputs(7, 24, 10, 8, 2, activation, device=device, drop=0.2, bias=True, seed=1)
    if activation == "swiglu_oai":
        inp["x"] = inp["x"] * 8  # push gate and up past the clamp limit
    kw = dict(activation=activation, gate_up_layout=layout, alpha=1.5, limit=2.0)
    _close(_run(inp, backend, **kw), _ref(inp, **kw))


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("T", [0, 1, 7, 97])
@pytest.mark.parametrize(("E", "k"), [(1, 1), (1, 3), (8, 1), (8, 2), (8, 4), (13, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_shapes(device, backend, T, E, k, bias):
    inp = _inputs(T, 33, 17, E, k, device=device, drop=0.1, bias=bias, seed=T + E + k)
    y = _run(inp, backend)
    assert y.shape == (T, 33) and y.dtype == torch.float32
    _close(y, _ref(inp))


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(device, backend, dtype):
    inp = _inputs(97, 64, 48, 8, 2, device=device, dtype=dtype, drop=0.1, bias=True)
    y = _run(inp, backend)
    assert y.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y, _ref(inp), rtol=rtol, atol=atol)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_routing_edges(device, backend):
    inp = _inputs(150, 16, 8, 5, 2, device=device)
    ids = inp["ids"].clone()
    ids[:, 0] = 3  # all first slots to one expert (150 rows: several tiles of one expert)
    ids[:, 1] = torch.where(ids[:, 1] == 3, -1, ids[:, 1])
    ids[ids == 1] = 0  # expert 1 gets no token
    ids[::7, 1] = -1
    inp["ids"] = ids
    _close(_run(inp, backend), _ref(inp))
    inp["ids"] = torch.full_like(ids, -1)  # every slot dropped
    y = _run(inp, backend)
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_strided_inputs(device, backend):
    inp = _inputs(9, 20, 6, 4, 2, device=device, bias=True)
    expected = _ref(inp)
    wide = torch.zeros(9, 40, device=device)
    wide[:, ::2] = inp["x"]
    inp["x"] = wide[:, ::2]  # non-contiguous x
    inp["w13"] = inp["w13"].transpose(1, 2).contiguous().transpose(1, 2)  # gpt-oss storage [E, H, 2I]
    inp["w2"] = inp["w2"].transpose(1, 2).contiguous().transpose(1, 2)
    inp["ids"] = inp["ids"].long()
    inp["weights"] = inp["weights"].double()
    _close(_run(inp, backend), expected)


def test_reference_matches_hf_loop():
    inp = _inputs(31, 16, 12, 6, 2, dtype=torch.float64, drop=0.1)
    y = moe_mlp_hf_loop(inp["x"], inp["w13"], inp["w2"], inp["weights"].double(), inp["ids"])
    torch.testing.assert_close(y, _ref(inp))


# ------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.update(x=d["x"][0]), "x must be a 2-D tensor"),
        (lambda d: d.update(x=d["x"].int()), "x must have dtype"),
        (lambda d: d.update(w13=d["w13"][:, :-1]), r"w13.size\(1\) must equal 2 \*"),
        (lambda d: d.update(w13=d["w13"][..., :-1]), r"w13.size\(2\) must equal the hidden size"),
        (lambda d: d.update(w2=d["w2"][:-1]), r"w2.size\(0\) must equal the number of experts"),
        (lambda d: d.update(w2=d["w2"].double()), "w2 must have the dtype of x"),
        (lambda d: d.update(ids=d["ids"].float()), "ids must have dtype"),
        (lambda d: d.update(ids=d["ids"][:-1]), r"ids.size\(0\) must equal the number of tokens"),
        (lambda d: d.update(ids=d["ids"] + 8), r"ids must hold expert indices in \[0, num_experts = 8\)"),
        (lambda d: d.update(ids=d["ids"] - 5), r"or -1 for a dropped slot"),
        (lambda d: d.update(weights=d["weights"][:, :1]), "weights must have the shape of ids"),
        (lambda d: d.update(b13=torch.zeros(8, 5, device=d["x"].device)), "b13 must have shape"),
        (lambda d: d.update(b2=torch.zeros(8, 5, device=d["x"].device)), "b2 must have shape"),
    ],
)
def test_bad_inputs(device, backend, change, match):
    if device == "cuda" and "expert indices" in match:
        pytest.skip("unchecked on CUDA tensors (a host synchronisation): treated as dropped")
    inp = _inputs(5, 12, 6, 8, 2, device=device)
    change(inp)
    with pytest.raises(RuntimeError, match=match):
        _run(inp, backend)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_bad_options(device, backend):
    inp = _inputs(5, 12, 6, 8, 2, device=device)
    with pytest.raises(RuntimeError, match='activation must be one of .* got "swish"'):
        _run(inp, backend, activation="swish")
    with pytest.raises(RuntimeError, match='gate_up_layout must be "concat" or "interleaved"'):
        _run(inp, backend, gate_up_layout="split")
    with pytest.raises(RuntimeError, match=r"w13.size\(1\) must equal the intermediate size"):
        _run(inp, backend, activation="relu2")  # non-gated with a [E, 2I, H] w13


# ------------------------------------------------------------------------------ backward


def _grads(fn, inp, names):
    leaves = {n: inp[n].detach().clone().requires_grad_(True) for n in names}
    args = dict(inp, **leaves)
    y = fn(args)
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    (y * dy).sum().backward()
    return y, {n: leaves[n].grad for n in names}


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize(("activation", "layout"), ACT_LAYOUTS)
def test_backward_vs_reference_autograd(device, backend, activation, layout):
    inp = _inputs(23, 16, 8, 6, 3, activation, device=device, drop=0.15, bias=True, seed=3)
    if activation == "swiglu_oai":
        inp["x"] = inp["x"] * 6
    kw = dict(activation=activation, gate_up_layout=layout, alpha=1.5, limit=2.0)
    names = ["x", "w13", "w2", "weights", "b13", "b2"]
    y, got = _grads(lambda a: _run(a, backend, **kw), inp, names)
    y_ref, want = _grads(lambda a: _ref(a, **kw), inp, names)
    _close(y, y_ref)
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"grad {n}: {m}")


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("activation", ["swiglu", "geglu_tanh", "swiglu_oai", "gelu", "relu2"])
def test_gradcheck(device, backend, activation):
    inp = _inputs(5, 6, 4, 3, 2, activation, device=device, dtype=torch.float64, bias=True, seed=7)
    inp["weights"] = inp["weights"].double()
    inp["ids"][1, 1] = -1
    kw = dict(activation=activation, alpha=1.5, limit=2.0)
    if activation == "swiglu_oai":
        inp["x"] = inp["x"] * 3

    def fn(x, w13, w2, weights, b13, b2):
        return sparseops.moe_mlp(x, w13, w2, weights, inp["ids"], b13=b13, b2=b2, backend=backend, **kw)

    args = [inp[n].requires_grad_(True) for n in ("x", "w13", "w2", "weights", "b13", "b2")]
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


@needs_c
@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_opcheck(device, backend):
    inp = _inputs(7, 8, 4, 4, 2, device=device, bias=True, drop=0.2)
    for n in ("x", "w13", "w2", "weights"):
        inp[n].requires_grad_(True)
    args = (inp["x"], inp["w13"], inp["w2"], inp["weights"], inp["ids"], "swiglu", "concat", inp["b13"], inp["b2"])
    torch.library.opcheck(torch.ops.sparseops.moe_mlp.default, args + (1.702, 7.0, backend))


@needs_c
@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_compile_dynamic_one_graph(device, backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def layer(x, w13, w2, weights, ids):
        return sparseops.moe_mlp(x, w13, w2, weights, ids, backend=backend) * 2

    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for T in (5, 9, 17, 33):
        inp = _inputs(T, 16, 8, 4, 2, device=device, seed=T)
        args = [inp[n] for n in ("x", "w13", "w2", "weights", "ids")]
        args[0].requires_grad_(True)
        y = compiled(*args)
        torch.testing.assert_close(y, layer(*args))
        y.sum().backward()
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames == frames[:1] * 4, frames  # no recompile as T varies


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("T", "H", "inter", "E", "k"),
    # Layers of two or more tiles (a one-tile layer lets MKL thread its GEMMs: see moe_mlp's docs).
    [(300, 64, 40, 8, 4), (300, 1024, 1024, 8, 2)],
)
def test_thread_count_bitwise(dtype, T, H, inter, E, k):
    inp = _inputs(T, H, inter, E, k, dtype=dtype, drop=0.1 if k > 1 else 0.0, bias=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = _run(inp, "cpu")
        torch.set_num_threads(2)
        y2 = _run(inp, "cpu")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)


def _backward_op_args(inp, dy, pre, activation="swiglu", layout="concat"):
    return (dy, inp["x"], inp["w13"], inp["w2"], inp["weights"], inp["ids"], pre, inp["b13"], inp["b2"],
            activation, layout, 1.702, 7.0)  # fmt: skip


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [0, 1, 97])
def test_backward_kernel_vs_reference_kernel(dtype, T):
    inp = _inputs(T, 40, 24, 13, 4, dtype=dtype, drop=0.2, bias=True, seed=T)
    inp["ids"][inp["ids"] == 5] = 6  # expert 5 gets no token
    _, pre = torch.ops.sparseops.moe_mlp(
        inp["x"], inp["w13"], inp["w2"], inp["weights"], inp["ids"], "swiglu", "concat", inp["b13"], inp["b2"],
        1.702, 7.0, "cpu",
    )  # fmt: skip
    dy = torch.randn(T, 40, generator=torch.Generator().manual_seed(1)).to(dtype)
    args = _backward_op_args(inp, dy, pre)
    got = torch.ops.sparseops.moe_mlp_backward(*args, "cpu")
    want = torch.ops.sparseops.moe_mlp_backward(*args, "reference")
    rtol, atol = TOL[dtype]
    for name, g, w in zip(("dx", "dw13", "dw2", "dweights", "db13", "db2"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol * 4, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(got[1][5], torch.zeros_like(got[1][5]))


@needs_c
def test_backward_thread_count_bitwise():
    inp = _inputs(200, 48, 24, 8, 4, drop=0.1, bias=True)
    _, pre = torch.ops.sparseops.moe_mlp(
        inp["x"], inp["w13"], inp["w2"], inp["weights"], inp["ids"], "swiglu", "concat", inp["b13"], inp["b2"],
        1.702, 7.0, "cpu",
    )  # fmt: skip
    args = _backward_op_args(inp, torch.randn(200, 48), pre)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        g1 = torch.ops.sparseops.moe_mlp_backward(*args, "cpu")
        torch.set_num_threads(2)
        g2 = torch.ops.sparseops.moe_mlp_backward(*args, "cpu")
    finally:
        torch.set_num_threads(before)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 16, 64])
def test_cuda_decode_matches_cpu_and_captures(dtype, T):
    inp = _inputs(T, 256, 96, 16, 4, dtype=dtype, drop=0.1, bias=True, seed=T)
    want = _run(inp, "cpu")
    gpu = {n: (v.cuda() if isinstance(v, torch.Tensor) else v) for n, v in inp.items()}
    got = _run(gpu, "cuda")
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.cpu(), want, rtol=rtol, atol=atol)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _run(gpu, "cuda")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, got)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_backward_strided_inputs(device, backend):
    inp = _inputs(19, 20, 6, 5, 2, "swiglu_oai", device=device, bias=True, drop=0.1, seed=4)
    inp["x"] = inp["x"] * 3
    names = ["x", "w13", "w2", "weights", "b13", "b2"]
    kw = dict(activation="swiglu_oai", gate_up_layout="interleaved")
    y_ref, want = _grads(lambda a: _ref(a, **kw), inp, names)

    def strided(a):
        a = dict(a)
        a["x"] = torch.stack([a["x"], a["x"]], dim=-1)[..., 0]  # non-contiguous view, same values
        a["w13"] = a["w13"].transpose(1, 2).contiguous().transpose(1, 2)  # gpt-oss's [E, H, 2I] storage
        a["ids"] = a["ids"].long()
        return _run(a, backend, **kw)

    y, got = _grads(strided, inp, names)
    _close(y, y_ref)
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"grad {n}: {m}")


@needs_c
@pytest.mark.skipif(bool(os.environ.get("SPARSEOPS_CPU_NO_AVX512")), reason="already the portable path")
def test_portable_cpu_path():
    """The scalar fallback of the AVX-512 elementwise paths, in a fresh process."""
    selection = "(activations or shapes or dtypes or routing_edges or thread_count) and cpu"
    rerun_in_subprocess(__file__, selection, SPARSEOPS_CPU_NO_AVX512="1")


# ------------------------------------------------------------------------------ CPU paths
# The CPU kernel runs experts with at most 48 routed rows through the weight-stream kernel
# (csrc/cpu/moe_stream.cpp) and the others as BLAS tiles; SPARSEOPS_MOE_STREAM_ROWS (read once
# per process) moves that bound, so the subprocess reruns below send every expert one way.
STREAM_OFF = bool(os.environ.get("SPARSEOPS_CPU_NO_AVX512")) or os.environ.get("SPARSEOPS_MOE_STREAM_ROWS") == "0"
needs_stream = pytest.mark.skipif(STREAM_OFF, reason="the stream kernel is off in this process")


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("T", "H", "inter", "E", "k"), [(1, 2048, 96, 128, 8), (16, 33, 17, 13, 3), (40, 97, 40, 4, 2)]
)
def test_stream_path_odd_shapes(dtype, T, H, inter, E, k):
    """Tails of every kind: H not a multiple of 16 / 32 (masked chunks), I not a multiple of 4
    (a partial block of weight rows) or 16 (the thread split), one expert with 40 rows."""
    inp = _inputs(T, H, inter, E, k, dtype=dtype, drop=0.2 if k > 2 else 0.0, bias=True, seed=T + H)
    if T == 40:
        inp["ids"][:, 0] = 1  # expert 1: 40 rows (up to 48 take the stream kernel)
        inp["ids"][:, 1] = torch.where(inp["ids"][:, 1] == 1, 2, inp["ids"][:, 1])
    got = _run(inp, "cpu")
    want = _ref(inp)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@needs_c
@needs_stream
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_path_batch_invariant(dtype):
    """A token's output does not depend on the other tokens routed beside it."""
    inp = _inputs(12, 80, 24, 16, 4, dtype=dtype, bias=True, seed=2)
    full = _run(inp, "cpu")
    for rows in (slice(0, 1), slice(3, 10)):
        part = {n: (v[rows] if n in ("x", "weights", "ids") else v) for n, v in inp.items()}
        assert torch.equal(_run(part, "cpu"), full[rows])


@needs_c
@needs_stream
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("T", "E", "k"), [(1, 64, 8), (16, 128, 8), (30, 1, 1)])
def test_stream_path_thread_count_bitwise(dtype, T, E, k):
    """Decode-sized layers, including one expert with all rows (one tile: MKL would thread it)."""
    inp = _inputs(T, 256, 192, E, k, dtype=dtype, bias=True, seed=T)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(_run(inp, "cpu"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_c
@pytest.mark.skipif(bool(os.environ.get("SPARSEOPS_CPU_NO_AVX512")), reason="already the portable path")
@pytest.mark.parametrize(
    "env",
    [
        {"SPARSEOPS_CPU_NO_AVX512BF16": "1"},  # bf16 dot products widened to fp32 (FMA)
        {"SPARSEOPS_MOE_STREAM_ROWS": "0"},  # every expert as BLAS tiles (AVX-512 elementwise)
        {"SPARSEOPS_MOE_STREAM_ROWS": "100000"},  # every expert through the stream kernel
    ],
    ids=["no-bf16-dot", "tiles-only", "stream-only"],
)
def test_cpu_path_choices(env):
    if any(os.environ.get(k_) for k_ in env):
        pytest.skip("already running under this choice")
    selection = "(activations or shapes or dtypes or routing_edges or thread_count or stream_path) and cpu"
    rerun_in_subprocess(__file__, selection, **env)
