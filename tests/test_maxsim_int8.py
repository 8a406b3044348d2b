"""int8 documents with per-token scales (``d_scale``) on every MaxSim op, and the public
quantiser ``sparseops.maxsim_quantize``.

The reference scores the float query against the int8 documents exactly (<q_i, d_j> *
d_scale[j] in the accumulate dtype). The CPU kernel's VNNI path quantises each query token
on the fly, so it is held to the documented bound: a similarity within (a_i / 2) *
||d_j||_1 * |d_scale[j]| of the exact one (a_i = max_k |q_ik| / 127), plus fp32 rounding;
fp64 queries, the CPU float path (SPARSEOPS_CPU_NO_AVX512VNNI=1, rerun in a subprocess) and
the Triton kernels (int8 tiles converted exactly to q's dtype, each similarity scaled after
the dot; here under the interpreter) are held to the float tolerances.
"""

from __future__ import annotations

import os

import pytest
import torch

import sparseops
from conftest import backend_params, interpreted, rerun_in_subprocess
from sparseops import _backend
from sparseops.reference import maxsim as R
from sparseops.testing import maxsim_bool_mask, maxsim_inputs, maxsim_lengths

HAS_C = sparseops.build_info()["extension"]
pytestmark = pytest.mark.skipif(not HAS_C, reason="C++ extension not built")

# Every backend takes int8 documents (the CUDA C++ kernel excepted: auto hands them to Triton).
INT8 = backend_params("maxsim")
FLOAT_PATH = os.environ.get("SPARSEOPS_CPU_NO_AVX512VNNI", "0") not in ("", "0")
QDTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _exact(backend):
    """Held to the float tolerances: every backend but the CPU kernel's VNNI path."""
    return backend != "cpu" or FLOAT_PATH


def _quantized(Nd, Ld, dim, *, seed=0, dtype=torch.float32):
    """Random unit-scale documents quantised per token: (int8 [Nd, Ld, dim], scale [Nd, Ld])."""
    _, d = maxsim_inputs(1, 1, Nd, Ld, dim, dtype=dtype, seed=seed)
    return sparseops.maxsim_quantize(d)


def _bound(q, d8, scale, *, exact=False):
    """[Nq, Nd, Lq]: how far a kernel's per-token max may lie from the reference's.

    The VNNI path: max_j (a_i / 2) * ||d_j||_1 * |s_j| with a_i = max_k |q_ik| / 127 (the
    query quantisation), plus fp32 slack. ``exact`` (fp64 queries, the float path): slack only.
    """
    acc = R.maxsim_accumulate_dtype(q.dtype)
    sims = torch.einsum("nid,mjd->nmij", q.to(torch.float64), d8.to(torch.float64) * scale.double()[..., None])
    rel = 1e-12 if acc == torch.float64 else 3e-6
    slack = sims.abs().amax(dim=-1) * rel + rel / 3
    if exact or acc == torch.float64:
        return slack
    a = q.to(torch.float32).abs().amax(dim=-1).double() / 127  # [Nq, Lq]
    l1 = d8.double().abs().sum(dim=-1) * scale.double().abs()  # [Nd, Ld]
    return a[:, None, :] / 2 * l1.amax(dim=-1)[None, :, None] + slack


def _check(scores, argmax, q, d8, scale, want, want_arg, q_mask=None, d_mask=None, reduce="sum", exact=False):
    """scores within the summed per-token bound; each argmax a real token whose reference
    similarity is within twice the bound of the max (or -1 exactly where the reference has -1)."""
    Nq, Lq = q.shape[:2]
    Nd, Ld = d8.shape[:2]
    per_tok = _bound(q, d8, scale, exact=exact)  # [Nq, Nd, Lq]
    qv = R.maxsim_token_mask_ref(q_mask, Nq, Lq, q.device)
    tol = (per_tok * qv[:, None, :]).sum(dim=-1)
    if reduce == "mean":
        tol = tol / qv.sum(dim=-1).clamp_min(1)[:, None].double()
    err = (scores.double() - want.double()).abs()
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3e} (max err {err.max().item():.3e})"
    assert torch.equal(argmax < 0, want_arg < 0)
    sims = torch.einsum("nid,mjd->nmij", q.double(), d8.double() * scale.double()[..., None])
    dv = R.maxsim_token_mask_ref(d_mask, Nd, Ld, q.device)
    sims = sims.masked_fill(~dv[None, :, None, :], float("-inf"))
    best = sims.amax(dim=-1)
    live = argmax >= 0
    got = sims.gather(-1, argmax.clamp_min(0).long()[..., None])[..., 0]
    assert bool((best[live] - got[live] <= 2 * per_tok[live]).all())


# --------------------------------------------------------------------------- quantiser


def test_quantize_round_trip_and_format():
    x = torch.randn(5, 7, 33, dtype=torch.float64)
    x[1, 2] = 0  # a zero token: scale 0, values 0
    v, s = sparseops.maxsim_quantize(x)
    assert v.dtype == torch.int8 and v.shape == x.shape and s.dtype == torch.float32 and s.shape == (5, 7)
    assert int(v.min()) >= -127 and int(v.max()) <= 127
    assert float(s[1, 2]) == 0 and int(v[1, 2].abs().max()) == 0
    err = (v.double() * s.double()[..., None] - x).abs()
    assert bool((err <= s.double()[..., None] / 2 * (1 + 1e-6) + 1e-12).all())
    # The largest coordinate of every non-zero token lands on +-127 exactly.
    live = s > 0
    assert bool((v.abs().amax(dim=-1)[live] == 127).all())
    # Same answer for a bf16 copy widened the same way, strided input and a packed corpus.
    xb = x.to(torch.bfloat16)
    vb, sb = sparseops.maxsim_quantize(xb)
    vf, sf = sparseops.maxsim_quantize(xb.float())
    assert torch.equal(vb, vf) and torch.equal(sb, sf)
    vt, st = sparseops.maxsim_quantize(x.transpose(0, 1))
    assert torch.equal(vt, v.transpose(0, 1)) and torch.equal(st, s.t())
    vp, sp = sparseops.maxsim_quantize(x.reshape(35, 33))
    assert vp.shape == (35, 33) and sp.shape == (35,)


def test_quantize_bad_inputs():
    with pytest.raises(TypeError, match="float tensor"):
        sparseops.maxsim_quantize(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="last dimension"):
        sparseops.maxsim_quantize(torch.ones(3, 4), dim=0)


# --------------------------------------------------------------------------- reference


def test_reference_is_the_dequantised_float_score():
    q, _ = maxsim_inputs(3, 5, 1, 1, 24, dtype=torch.float64, seed=3)
    d8, s = _quantized(4, 9, 24, seed=4)
    dm = maxsim_lengths(4, 9, seed=5)
    a, aa = R.maxsim_ref(q, d8, d_mask=dm, d_scale=s)
    b, ba = R.maxsim_ref(q, d8.double() * s.double()[..., None], d_mask=dm)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(aa, ba)


# --------------------------------------------------------------------------- maxsim


@pytest.mark.parametrize("device,backend", INT8)
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize(
    "Nq,Lq,Nd,Ld,dim",
    [(1, 32, 9, 300, 128), (2, 7, 5, 97, 12), (3, 1, 4, 1, 4), (1, 33, 3, 40, 6), (9, 17, 3, 33, 64)],
)
def test_maxsim_int8_matches_reference(device, backend, qdtype, Nq, Lq, Nd, Ld, dim):
    if interpreted(device, backend) and Ld == 300:
        pytest.skip("the interpreter takes the smaller shapes")
    q, _ = maxsim_inputs(Nq, Lq, 1, 1, dim, dtype=qdtype, seed=Nq + Ld)
    d8, s = _quantized(Nd, Ld, dim, seed=Ld)
    want, want_arg = R.maxsim_ref(q, d8, d_scale=s)
    got, arg = sparseops.maxsim(q, d8, d_scale=s, return_argmax=True, backend=backend)
    assert got.dtype == want.dtype and got.shape == (Nq, Nd) and arg.dtype == torch.int32
    _check(got, arg, q, d8, s, want, want_arg, exact=_exact(backend))


@pytest.mark.parametrize("device,backend", INT8)
@pytest.mark.parametrize("pylate", [False, True])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("mask_kind", ["lengths", "bool"])
def test_maxsim_int8_masks(device, backend, pylate, reduce, mask_kind):
    Nq, Lq, Nd, Ld, dim = 3, 11, 7, 45, 32
    q, _ = maxsim_inputs(Nq, Lq, 1, 1, dim, seed=1)
    d8, s = _quantized(Nd, Ld, dim, seed=2)
    if mask_kind == "lengths":
        qm, dm = maxsim_lengths(Nq, Lq, seed=3), maxsim_lengths(Nd, Ld, seed=4)
        dm[1] = 0  # an empty document scores 0
    else:
        qm, dm = maxsim_bool_mask(Nq, Lq, seed=3), maxsim_bool_mask(Nd, Ld, seed=4)
        dm[1] = False
    kw = dict(q_mask=qm, d_mask=dm, reduce=reduce, pylate_mask=pylate, d_scale=s)
    want, want_arg = R.maxsim_ref(q, d8, **kw)
    got, arg = sparseops.maxsim(q, d8, return_argmax=True, backend=backend, **kw)
    assert bool((got[:, 1] == 0).all()) and bool((arg[:, 1] == -1).all())
    if pylate:
        # Masked tokens score 0 and take part: bounds still hold, argmax -1 where a masked one wins.
        torch.testing.assert_close(
            got, want, rtol=0, atol=float(_bound(q, d8, s, exact=_exact(backend)).sum(-1).max())
        )
    else:
        _check(got, arg, q, d8, s, want, want_arg, q_mask=qm, d_mask=dm, reduce=reduce,
               exact=_exact(backend))  # fmt: skip


def test_maxsim_int8_single_query_noncontiguous_and_empty():
    q, _ = maxsim_inputs(1, 32, 1, 1, 128, seed=7, noncontiguous=True)
    d8, s = _quantized(6, 50, 128, seed=8)
    d8w = torch.zeros(6, 100, 128, dtype=torch.int8)
    d8w[:, ::2] = d8
    sw = torch.zeros(6, 100)
    sw[:, ::2] = s
    a = sparseops.maxsim(q[0], d8w[:, ::2], d_scale=sw[:, ::2])
    b = sparseops.maxsim(q[0].contiguous(), d8, d_scale=s)
    assert a.shape == (6,) and torch.equal(a, b)
    # Empty shapes.
    assert sparseops.maxsim(q, d8[:0], d_scale=s[:0]).shape == (1, 0)
    z = sparseops.maxsim(q, d8[:, :0], d_scale=s[:, :0])
    assert torch.equal(z, torch.zeros(1, 6))


def test_maxsim_int8_thread_count_does_not_change_bits():
    q, _ = maxsim_inputs(3, 32, 1, 1, 128, seed=11)
    d8, s = _quantized(64, 120, 128, seed=12)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = sparseops.maxsim(q, d8, d_scale=s, return_argmax=True, backend="cpu")
        torch.set_num_threads(max(2, n))
        b = sparseops.maxsim(q, d8, d_scale=s, return_argmax=True, backend="cpu")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------- ragged, pairs, top-k


def _packed_int8(lengths, dim, seed):
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    total = int(lengths.sum())
    d8, s = _quantized(1, max(total, 1), dim, seed=seed)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    return d8[0, :total].contiguous(), s[0, :total].contiguous(), cu


def _padded(x, cu):
    lens = (cu[1:] - cu[:-1]).long()
    out = x.new_zeros(lens.numel(), max(int(lens.max()), 1), *x.shape[1:])
    for i in range(lens.numel()):
        out[i, : int(lens[i])] = x[int(cu[i]) : int(cu[i + 1])]
    return out, lens


@pytest.mark.parametrize("device,backend", backend_params("maxsim_varlen"))
@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16, torch.float64])
def test_varlen_int8(device, backend, qdtype):
    dim = 64
    q, _ = maxsim_inputs(1, 40, 1, 1, dim, dtype=qdtype, seed=21)
    q = q[0]
    cu_q = torch.tensor([0, 7, 7, 8, 40], dtype=torch.int32)  # an empty query and a 1-token one
    d8, s, cu_d = _packed_int8([97, 0, 1, 31, 50, 300], dim, seed=22)
    g = torch.Generator().manual_seed(0)
    pairs = torch.stack([torch.randint(0, 4, (9,), generator=g), torch.randint(0, 6, (9,), generator=g)], 1)
    exact = _exact(backend)
    for pr in (None, pairs):
        got, arg = sparseops.maxsim_varlen(q, cu_q, d8, cu_d, pairs=pr, d_scale=s, return_argmax=True, backend=backend)
        want, want_arg = R.maxsim_varlen_ref(q, cu_q, d8, cu_d, pairs=pr, d_scale=s)
        assert got.shape == want.shape and arg.shape == want_arg.shape
        # Bound: the padded maxsim of the same rows.
        qp, ql = _padded(q, cu_q)
        dp, _ = _padded(d8, cu_d)
        sp, _ = _padded(s, cu_d)
        per = _bound(qp, dp, sp, exact=exact)
        tol = (per * R.maxsim_token_mask_ref(ql, *qp.shape[:2], "cpu")[:, None, :]).sum(-1)
        if pr is not None:
            tol = tol[pr[:, 0], pr[:, 1]]
        assert bool(((got.double() - want.double()).abs() <= tol).all())
        assert torch.equal(arg < 0, want_arg < 0)
    # Empty documents score 0.
    full = sparseops.maxsim_varlen(q, cu_q, d8, cu_d, d_scale=s, backend=backend)
    assert bool((full[:, 1] == 0).all()) and bool((full[1] == 0).all())


@pytest.mark.parametrize("device,backend", backend_params("maxsim_pairs"))
def test_pairs_int8(device, backend):
    B, K, Lq, Ld, dim = 3, 4, 9, 37, 32
    q, _ = maxsim_inputs(B, Lq, 1, 1, dim, seed=31)
    d8, s = _quantized(B * K, Ld, dim, seed=32)
    d8, s = d8.view(B, K, Ld, dim), s.view(B, K, Ld)
    dm = maxsim_lengths(B * K, Ld, seed=33).view(B, K)
    exact = _exact(backend)
    got, arg = sparseops.maxsim_pairs(q, d8, d_mask=dm, d_scale=s, return_argmax=True, backend=backend)
    want, want_arg = R.maxsim_pairs_ref(q, d8, d_mask=dm, d_scale=s)
    for b in range(B):
        _check(got[b : b + 1], arg[b : b + 1], q[b : b + 1], d8[b], s[b], want[b : b + 1], want_arg[b : b + 1],
               d_mask=dm[b], exact=exact)  # fmt: skip
    # 3-D d: one document per query, d_scale [B, Ld].
    g3 = sparseops.maxsim_pairs(q, d8[:, 0], d_scale=s[:, 0], backend=backend)
    w3 = sparseops.maxsim_pairs(q, d8[:, :1], d_scale=s[:, :1], backend=backend)[:, 0]
    assert g3.shape == (B,) and torch.equal(g3, w3)


@pytest.mark.parametrize("device,backend", backend_params("maxsim_topk"))
def test_topk_int8(device, backend):
    dim, k = 32, 5
    q, _ = maxsim_inputs(3, 8, 1, 1, dim, seed=41)
    lens = [30, 0, 12, 50, 1, 44, 23, 9, 60, 17, 33]
    d8, s, cu_d = _packed_int8(lens, dim, seed=42)
    exact = _exact(backend)
    dp, dl = _padded(d8, cu_d)
    sp, _ = _padded(s, cu_d)
    full = R.maxsim_ref(q, dp, d_mask=dl, d_scale=sp)[0]  # [3, Nd]
    tol = _bound(q, dp, sp, exact=exact).sum(-1)  # [3, Nd]
    for cand in (None, torch.tensor([3, 1, -1, 8, 0, 10, 3])):
        got, ids = sparseops.maxsim_topk(q, d8, cu_d, k, candidates=cand, d_scale=s, backend=backend)
        assert got.shape == (3, k) and ids.dtype == torch.int64
        pool = torch.arange(len(lens)) if cand is None else cand[cand >= 0]
        for n in range(3):
            # Each returned score is its document's score within the bound, best first, and no
            # document left out beats the k-th returned one by more than the bounds allow.
            assert bool((got[n, :-1] >= got[n, 1:]).all())
            ref_at = full[n, ids[n]]
            assert bool(((got[n].double() - ref_at.double()).abs() <= tol[n, ids[n]]).all())
            kth = got[n, -1].double()
            others = [int(m) for m in pool if int(m) not in ids[n].tolist()]
            if others:
                assert bool((full[n, others].double() <= kth + tol[n, others] + tol[n, ids[n]].max()).all())


# --------------------------------------------------------------------------- backward


@pytest.mark.parametrize("device,backend", INT8)
def test_backward_q_int8(device, backend):
    q, _ = maxsim_inputs(2, 9, 1, 1, 16, dtype=torch.float64, seed=51)
    d8, s = _quantized(5, 13, 16, seed=52)
    dm = maxsim_lengths(5, 13, low=1, seed=53)
    q1 = q.clone().requires_grad_()
    sparseops.maxsim(q1, d8, d_mask=dm, d_scale=s, reduce="mean", backend=backend).square().sum().backward()
    q2 = q.clone().requires_grad_()
    deq = d8.double() * s.double()[..., None]
    R.maxsim_ref(q2, deq, d_mask=dm, reduce="mean")[0].square().sum().backward()
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-10, atol=1e-12)
    torch.autograd.gradcheck(
        lambda x: sparseops.maxsim(x, d8, d_mask=dm, d_scale=s, backend=backend),
        (q.clone().requires_grad_(),), eps=1e-6, atol=1e-7,
    )  # fmt: skip


def test_backward_q_int8_varlen_and_pairs_fp32():
    q, _ = maxsim_inputs(1, 12, 1, 1, 32, seed=61)
    d8, s, cu_d = _packed_int8([5, 0, 9], 32, seed=62)
    cu_q = torch.tensor([0, 4, 12], dtype=torch.int32)
    x = q[0].clone().requires_grad_()
    out, arg = sparseops.maxsim_varlen(x, cu_q, d8, cu_d, d_scale=s, return_argmax=True)
    out.sum().backward()
    # dq[i] = sum over documents of d[argmax] * scale[argmax] (weight 1 each).
    want = torch.zeros(12, 32)
    for m in range(3):
        for i in range(12):
            a = int(arg[m, i])
            if a >= 0:
                row = int(cu_d[m]) + a
                want[i] += d8[row].float() * s[row]
    torch.testing.assert_close(x.grad, want)
    d4, s4 = _quantized(6, 7, 32, seed=63)
    xp = q[:, :5].repeat(2, 1, 1).clone().requires_grad_()
    sparseops.maxsim_pairs(xp, d4.view(2, 3, 7, 32), d_scale=s4.view(2, 3, 7)).sum().backward()
    assert xp.grad is not None and xp.grad.abs().sum() > 0


def test_d_scale_gradient_is_refused():
    q, _ = maxsim_inputs(1, 4, 1, 1, 8, seed=71)
    d8, s = _quantized(2, 3, 8, seed=72)
    with pytest.raises(RuntimeError, match="d_scale requires grad"):
        sparseops.maxsim(q, d8, d_scale=s.clone().requires_grad_())
    # Direct op calls are refused in the backward.
    x = q.clone().requires_grad_()
    out = torch.ops.sparseops.maxsim(x, d8, None, None, "sum", False, "cpu", s.clone().requires_grad_())[0]
    with pytest.raises(RuntimeError, match="not differentiable"):
        out.sum().backward()
    # Without grad mode a d_scale that requires grad is fine (nothing is recorded).
    with torch.no_grad():
        sparseops.maxsim(q, d8, d_scale=s.clone().requires_grad_())


# --------------------------------------------------------------------------- bad inputs, Triton


def test_bad_int8_inputs():
    q, d = maxsim_inputs(2, 4, 3, 5, 8, seed=81)
    d8, s = sparseops.maxsim_quantize(d)
    with pytest.raises(RuntimeError, match=r"d is int8: d_scale \(fp32 \[3, 5\].*required"):
        sparseops.maxsim(q, d8)
    with pytest.raises(RuntimeError, match=r"d_scale must be fp32 \[3, 5\].*got .*\[3, 4\]"):
        sparseops.maxsim(q, d8, d_scale=s[:, :4])
    with pytest.raises(RuntimeError, match=r"d_scale must be fp32 \[3, 5\].*Half"):
        sparseops.maxsim(q, d8, d_scale=s.half())
    with pytest.raises(RuntimeError, match="d_scale is only taken with int8 d"):
        sparseops.maxsim(q, d, d_scale=s)
    with pytest.raises(RuntimeError, match="d must have the dtype of q .* or be int8"):
        sparseops.maxsim(q, d8.to(torch.int16), d_scale=s)
    with pytest.raises(RuntimeError, match="q must have dtype in"):
        sparseops.maxsim(q.to(torch.int8), d8, d_scale=s)
    with pytest.raises(ValueError, match="cosine"):
        sparseops.maxsim(q, d8, d_scale=s, similarity="cosine")
    cu = torch.tensor([0, 5, 15], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"d_scale must be fp32 \[15\]"):
        sparseops.maxsim_varlen(q[0], torch.tensor([0, 4], dtype=torch.int32), d8.view(15, 8), cu, d_scale=s)
    with pytest.raises(RuntimeError, match=r"d is int8: d_scale"):
        sparseops.maxsim_topk(q, d8.view(15, 8), cu, 2)
    with pytest.raises(RuntimeError, match=r"d_scale must be fp32 \[3, 1, 5\]"):
        sparseops.maxsim_pairs(q[:1].expand(3, 4, 8), d8, d_scale=s.t())


def test_every_backend_takes_int8():
    q, d = maxsim_inputs(1, 4, 3, 5, 16, seed=91)
    d8, _ = sparseops.maxsim_quantize(d)
    reasons = _backend.OPS["maxsim"].reasons(q, d8)
    assert reasons["triton"] == _backend.triton_kernels("cpu") and reasons["cpu"] is None
    assert reasons["reference"] is None


@pytest.mark.triton
@pytest.mark.skipif(not _backend.TRITON_INTERPRET, reason="interpreter test (a GPU runs test_maxsim_gpu.py)")
@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("multi_query", [False, True])
def test_triton_int8_kernels_both_forward_paths_and_split_k(qdtype, multi_query):
    """The per-query and the multi-query (GEMM-shaped) Triton kernels on int8 documents, with
    masks, against the reference; the multi-query one also with its K loop (block_k < dim)."""
    from sparseops.kernels.maxsim import maxsim_triton
    from sparseops.kernels.maxsim_multi import maxsim_multi_query_triton

    q, _ = maxsim_inputs(5, 16, 1, 1, 32, dtype=qdtype, seed=92)
    d8, s = _quantized(4, 21, 32, seed=93)
    dm = maxsim_lengths(4, 21, seed=94)
    dm[2] = 0
    want, want_arg = R.maxsim_ref(q, d8, d_mask=dm, d_scale=s)
    scores, arg = torch.empty(5, 4), torch.full((5, 4, 16), -7, dtype=torch.int16)
    maxsim_triton(q, d8, None, dm.to(torch.int32), "none", "lengths", "sum", scores, arg,
                  multi_query=multi_query, d_scale=s.reshape(-1))  # fmt: skip
    _check(scores, arg, q, d8, s, want, want_arg, d_mask=dm, exact=True)
    if multi_query:
        scores2, arg2 = torch.empty(5, 4), torch.full((5, 4, 16), -7, dtype=torch.int32)
        maxsim_multi_query_triton(q, d8, None, dm.to(torch.int32), 0, 2, False, False, scores2, arg2,
                                  block_k=16, d_scale=s.reshape(-1))  # fmt: skip
        torch.testing.assert_close(scores2, scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(arg2 < 0, arg < 0)


@pytest.mark.triton
@pytest.mark.skipif(not _backend.TRITON_INTERPRET, reason="interpreter test (a GPU runs test_maxsim_gpu.py)")
def test_triton_int8_backward_matches_cpu():
    q, _ = maxsim_inputs(3, 7, 1, 1, 16, seed=95)
    d8, s = _quantized(4, 10, 16, seed=96)
    _, arg = torch.ops.sparseops.maxsim(q, d8, None, None, "sum", False, "cpu", s)
    n = torch.arange(3)[:, None].expand(3, 4).reshape(-1)
    m = torch.arange(4)[None, :].expand(3, 4).reshape(-1)
    meta = torch.stack([n, n * 7, torch.full_like(n, 7), m, m * 10, (n * 4 + m) * 7], 1)
    grad = torch.linspace(-2, 1, 12)
    args = (grad, q.reshape(21, 16), d8.reshape(40, 16), arg.reshape(-1), meta, 3, 4, True, False)
    a = torch.ops.sparseops.maxsim_backward(*args, "triton", d_scale=s.reshape(-1))[0]
    b = torch.ops.sparseops.maxsim_backward(*args, "cpu", d_scale=s.reshape(-1))[0]
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- opcheck, compile


@pytest.mark.parametrize("device,backend", INT8)
def test_opcheck_int8(device, backend):
    q, _ = maxsim_inputs(2, 5, 1, 1, 16, seed=101)
    d8, s = _quantized(3, 7, 16, seed=102)
    args = (q.requires_grad_(), d8, None, maxsim_lengths(3, 7, seed=103).to(torch.int32), "sum", False, backend, s)
    torch.library.opcheck(torch.ops.sparseops.maxsim.default, args)
    dp, sp, cu = _packed_int8([4, 0, 9], 16, seed=104)
    torch.library.opcheck(
        torch.ops.sparseops.maxsim_topk.default, (q.detach(), dp, cu, 2, None, None, "sum", backend, sp)
    )


def test_compile_int8():
    q, _ = maxsim_inputs(2, 8, 1, 1, 32, seed=111)
    f = torch.compile(lambda x, y, z: sparseops.maxsim(x, y, d_scale=z), fullgraph=True, dynamic=True)
    for nd in (3, 5):
        d8, s = _quantized(nd, 11, 32, seed=nd)
        torch.testing.assert_close(f(q, d8, s), sparseops.maxsim(q, d8, d_scale=s))


@pytest.mark.skipif(FLOAT_PATH, reason="already the float path")
def test_float_path_without_vnni():
    """The same tests with VNNI off: int8 documents widened in the packed float tile, held to
    the float tolerance (exact=True above)."""
    rerun_in_subprocess(
        __file__,
        "matches_reference or masks or varlen_int8 or pairs_int8 or topk_int8",
        SPARSEOPS_CPU_NO_AVX512VNNI="1",
    )
