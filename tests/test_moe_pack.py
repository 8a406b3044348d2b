"""moe_mlp on CPU with packed expert weights (sparseops.prepack_moe_weights, csrc/cpu/moe_pack.cpp):
against the reference and the unpacked kernel at odd shapes (block, k-pair and chunk tails,
several passes of token rows), every activation and layout, dropped slots and empty experts;
batch and thread-count invariance; the cache's invalidation on in-place updates, release and
freed tensors; the ISA fallback in a subprocess."""

from __future__ import annotations

import gc
import os

import pytest
import torch

import sparseops
from conftest import rerun_in_subprocess
from sparseops.reference.moe import GATED, moe_mlp_ref
from sparseops.testing import moe_inputs

HAS_C = sparseops.build_info()["extension"]
STREAM_OFF = bool(os.environ.get("SPARSEOPS_CPU_NO_AVX512")) or os.environ.get("SPARSEOPS_MOE_STREAM_ROWS") == "0"
pytestmark = pytest.mark.skipif(not HAS_C or STREAM_OFF, reason="needs the C++ extension and its stream kernel")

TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


@pytest.fixture(autouse=True)
def _fresh_cache():
    sparseops.release_moe_weights()
    yield
    sparseops.release_moe_weights()


def _inputs(T, H, inter, E, k, activation="swiglu", **kw):
    return moe_inputs(T, H, inter, E, k, gated=activation in GATED, **kw)


def _run(inp, **kw):
    return sparseops.moe_mlp(
        inp["x"], inp["w13"], inp["w2"], inp["weights"], inp["ids"], b13=inp["b13"], b2=inp["b2"], backend="cpu", **kw
    )


def _ref(inp, **kw):
    return moe_mlp_ref(inp["x"], inp["w13"], inp["w2"], inp["weights"], inp["ids"], b13=inp["b13"], b2=inp["b2"], **kw)


def _packed_and_plain(inp, **kw):
    plain = _run(inp, **kw)
    sparseops.prepack_moe_weights(inp["w13"], inp["w2"])
    packed = _run(inp, **kw)
    assert sparseops.moe_pack_stats()["packed_bytes"] > 0  # the packed path ran
    return packed, plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("T", "H", "inter", "E", "k"),
    [
        (1, 2048, 96, 128, 8),  # decode: 8 experts of one row
        (16, 33, 17, 13, 3),  # H odd (a k-pair tail), I odd and under one block of 64
        (40, 97, 130, 4, 2),  # I = 2 blocks + 2 rows, 20 rows per expert (4 passes)
        (48, 300, 70, 1, 1),  # one expert of 48 rows: 8 passes over chunks of 128 k-steps
        (100, 64, 40, 1, 1),  # 100 rows: BLAS tiles on the HF layout, the stream kernel packed
    ],
)
def test_packed_matches_reference(dtype, T, H, inter, E, k):
    inp = _inputs(T, H, inter, E, k, dtype=dtype, drop=0.2 if k > 2 else 0.0, bias=True, seed=T + H)
    packed, plain = _packed_and_plain(inp)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(packed, _ref(inp), rtol=rtol, atol=atol)
    torch.testing.assert_close(packed, plain, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("activation", "layout"),
    [
        ("swiglu", "concat"),
        ("geglu", "concat"),
        ("swiglu_oai", "interleaved"),
        ("reglu", "interleaved"),
        ("gelu", "concat"),
        ("relu2", "concat"),
    ],
)
def test_packed_activations_layouts(dtype, activation, layout):
    inp = _inputs(9, 80, 75, 6, 2, activation=activation, dtype=dtype, bias=True, seed=3)
    kw = {"activation": activation, "gate_up_layout": layout}
    packed, _ = _packed_and_plain(inp, **kw)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(packed, _ref(inp, **kw), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pad", [0, 1])
def test_packed_strided_weights(dtype, pad):
    """Weights that are slices of wider rows (row stride H + pad: odd with pad = 1, where
    bf16 pairs cannot move as 32-bit words) and every other expert of a bigger tensor."""
    inp = _inputs(5, 64, 48, 6, 2, dtype=dtype, bias=True, seed=11)
    for name in ("w13", "w2"):
        w = inp[name]
        wide = torch.zeros(2 * w.shape[0], w.shape[1], w.shape[2] + pad, dtype=dtype)
        wide[::2, :, : w.shape[2]] = w
        inp[name] = wide[::2, :, : w.shape[2]]
    packed, plain = _packed_and_plain(inp)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(packed, _ref(inp), rtol=rtol, atol=atol)
    torch.testing.assert_close(packed, plain, rtol=rtol, atol=atol)


@pytest.mark.skipif(bool(os.environ.get("SPARSEOPS_MOE_STREAM_ROWS")), reason="the bound is moved in this process")
def test_packed_stream_bound():
    """Packed experts of up to 256 rows stream; one of 300 rows runs as BLAS tiles (not packed)."""
    inp = _inputs(556, 32, 24, 2, 1, dtype=torch.float32, seed=13)
    inp["ids"][:256] = 0
    inp["ids"][256:] = 1
    sparseops.prepack_moe_weights(inp["w13"], inp["w2"])
    torch.testing.assert_close(_run(inp), _ref(inp), rtol=2e-5, atol=2e-5)
    # Expert 0 only: w13 as gate and up groups of 24 rows padded to 64, x H = 32; w2's 32 rows
    # padded to 64, x I = 24; fp32.
    assert sparseops.moe_pack_stats()["packed_bytes"] == (2 * 64 * 32 + 64 * 24) * 4


def test_packed_routing_edges():
    """Dropped slots, a token with every slot dropped, empty experts, T = 0."""
    inp = _inputs(6, 64, 40, 8, 3, dtype=torch.bfloat16, seed=5)
    inp["ids"] = torch.tensor(
        [[0, -1, 2], [-1, -1, -1], [2, 0, -1], [0, 2, -1], [-1, 0, 2], [2, -1, 0]], dtype=torch.int32
    )
    packed, _ = _packed_and_plain(inp)
    assert torch.equal(packed[1], torch.zeros_like(packed[1]))
    torch.testing.assert_close(packed, _ref(inp), rtol=3e-2, atol=3e-2)
    empty = {n: (v[:0] if n in ("x", "weights", "ids") else v) for n, v in inp.items()}
    assert _run(empty).shape == (0, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_batch_and_thread_invariant(dtype):
    """A token's bits depend neither on the other tokens beside it nor on the thread count."""
    inp = _inputs(12, 200, 136, 16, 4, dtype=dtype, bias=True, seed=2)
    sparseops.prepack_moe_weights(inp["w13"], inp["w2"])
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(_run(inp))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    for rows in (slice(0, 1), slice(3, 10)):
        part = {n: (v[rows] if n in ("x", "weights", "ids") else v) for n, v in inp.items()}
        assert torch.equal(_run(part), outs[0][rows])


def test_packed_cache_invalidation():
    inp = _inputs(4, 96, 64, 8, 2, dtype=torch.bfloat16, seed=7)
    sparseops.prepack_moe_weights(inp["w13"], inp["w2"])
    first = _run(inp)
    assert sparseops.moe_pack_stats()["tensors"] == 2
    with torch.no_grad():  # in place: bumps the version counters
        inp["w13"].neg_()
        inp["w2"][1:].mul_(0.5)
    second = _run(inp)
    torch.testing.assert_close(second, _ref(inp), rtol=3e-2, atol=3e-2)
    assert not torch.allclose(first.float(), second.float())
    # Released: the plain kernel again, the same answer up to the sums' order.
    sparseops.release_moe_weights(inp["w13"], inp["w2"])
    assert sparseops.moe_pack_stats() == {"tensors": 0, "packed_bytes": 0}
    torch.testing.assert_close(_run(inp), second, rtol=3e-2, atol=3e-2)
    # A freed weight's entry goes away; a view with other strides is a different tensor.
    w13 = inp["w13"].clone()
    sparseops.prepack_moe_weights(w13, w13.transpose(1, 2))
    assert sparseops.moe_pack_stats()["tensors"] == 2
    del w13
    gc.collect()
    assert sparseops.moe_pack_stats()["tensors"] == 0


def test_packed_refuses_inference_tensors_and_ignores_other_devices():
    with torch.inference_mode():
        w = torch.randn(2, 16, 8)
    with pytest.raises(RuntimeError, match=r"shape \[2, 16, 8\] is an inference tensor"):
        sparseops.prepack_moe_weights(w)
    with pytest.raises(RuntimeError, match="fp32, bf16 or fp16"):
        sparseops.prepack_moe_weights(torch.zeros(2, 4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"\[E, N, K\].*\[4, 4\]"):
        sparseops.prepack_moe_weights(torch.zeros(4, 4))
    sparseops.prepack_moe_weights(torch.zeros(2, 4, 4, device="meta"))
    assert sparseops.moe_pack_stats()["tensors"] == 0


def test_module_prepack():
    torch.manual_seed(0)
    moe = sparseops.nn.MoE(64, 48, 8, 2).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        want, _ = moe(x)
        moe.prepack_weights()
        got, _ = moe(x)
    assert sparseops.moe_pack_stats()["packed_bytes"] > 0
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(bool(os.environ.get("SPARSEOPS_CPU_NO_AVX512BF16")), reason="already without bf16 dot products")
def test_packed_without_bf16_dot():
    """bf16 weights packed for fp32 FMA (no AVX512_BF16): a fresh process decides the ISA."""
    rerun_in_subprocess(__file__, "packed and not without_bf16", SPARSEOPS_CPU_NO_AVX512BF16="1")
