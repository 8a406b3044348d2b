"""maxsim_varlen, maxsim_pairs, maxsim_topk and maxsim's similarity / pylate_mask /
return_argmax options: every backend against the reference (fp64 oracle), ragged and empty
sequences, ties, masks, backward (gradcheck and the shared C++ backward against the torch
one), opcheck, torch.compile, bad inputs, thread-count determinism and hypothesis invariants."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseops
from conftest import backend_params, rerun_in_subprocess
from sparseops.reference import maxsim as R
from sparseops.testing import maxsim_bool_mask, maxsim_inputs, maxsim_lengths

HAS_C = sparseops.build_info()["extension"]
pytestmark = pytest.mark.skipif(not HAS_C, reason="C++ extension not built")

# These tests build CPU tensors: the CPU backends and Triton under the interpreter. On a GPU
# the same ops are checked at production sizes in tests/test_maxsim_gpu.py.
VARLEN = backend_params("maxsim_varlen", devices=["cpu"])
PAIRS = backend_params("maxsim_pairs", devices=["cpu"])
TOPK = backend_params("maxsim_topk", devices=["cpu"])
MAXSIM = backend_params("maxsim", devices=["cpu"])
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _tol(dtype, scale=1.0):
    # Backends and the reference score the same widened inputs: only the summation order
    # differs (fp64: 1e-10; everything else accumulates in fp32).
    return dict(rtol=1e-10, atol=1e-10 * scale) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5 * scale)


def _packed(lengths, dim, *, dtype=torch.float32, seed=0, ties=False):
    """Packed tokens [sum(lengths), dim] of unit scale and their int32 cu_seqlens."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    total = int(lengths.sum())
    x, _ = maxsim_inputs(1, max(total, 1), 1, 1, dim, dtype=torch.float64, seed=seed, ties=ties)
    x = x[0, :total].to(dtype)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    return x, cu


# Lengths with 0 and 1 and odd sizes around the 32-token tile edge.
Q_LENS = [[7, 0, 1, 32, 5], [1], [33, 3]]
D_LENS = [[97, 0, 1, 31, 5, 64, 2], [1, 1], [300, 0, 33]]


@pytest.mark.parametrize("device,backend", VARLEN)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_varlen_matches_reference(device, backend, dtype, reduce):
    for case, (lq, ld) in enumerate(zip(Q_LENS, D_LENS)):
        q, cu_q = _packed(lq, 96 if case else 16, dtype=dtype, seed=case)
        d, cu_d = _packed(ld, 96 if case else 16, dtype=dtype, seed=case + 50)
        Nq, Nd = len(lq), len(ld)
        g = torch.Generator().manual_seed(case)
        pairs = torch.stack([torch.randint(0, Nq, (11,), generator=g), torch.randint(0, Nd, (11,), generator=g)], 1)
        for pr in (None, pairs, pairs[:0]):
            s, a = sparseops.maxsim_varlen(
                q, cu_q, d, cu_d, pairs=pr, reduce=reduce, return_argmax=True, backend=backend
            )
            w, wa = R.maxsim_varlen_ref(q, cu_q, d, cu_d, pairs=pr, reduce=reduce)
            assert s.dtype == w.dtype and s.shape == w.shape and a.shape == wa.shape and a.dtype == torch.int32
            torch.testing.assert_close(s, w, **_tol(dtype, max(lq)))
            if dtype in (torch.float32, torch.float64):
                assert torch.equal(a, wa)
            else:
                assert torch.equal(a < 0, wa < 0)


def test_varlen_reference_against_padded_loop():
    """The packed reference equals maxsim_ref on each (query, document) slice by hand."""
    q, cu_q = _packed([3, 0, 5], 8, dtype=torch.float64, seed=1)
    d, cu_d = _packed([4, 1, 0, 7], 8, dtype=torch.float64, seed=2)
    s = R.maxsim_varlen_ref(q, cu_q, d, cu_d)[0]
    for n in range(3):
        for m in range(4):
            qi, dj = q[cu_q[n] : cu_q[n + 1]], d[cu_d[m] : cu_d[m + 1]]
            want = (qi @ dj.T).max(dim=1).values.sum() if qi.numel() and dj.numel() else torch.zeros((), dtype=q.dtype)
            torch.testing.assert_close(s[n, m], want)


@pytest.mark.parametrize("device,backend", VARLEN)
def test_varlen_ties_and_noncontiguous(device, backend):
    q, cu_q = _packed([7, 3], 16, seed=3, ties=True)
    d, cu_d = _packed([33, 5, 9], 16, seed=4, ties=True)
    d = torch.cat([d, d[:9]])  # a repeated document: equal scores, ties in every max
    cu_d = torch.cat([cu_d, cu_d[-1:] + 9])
    s, a = sparseops.maxsim_varlen(q, cu_q, d, cu_d, return_argmax=True, backend=backend)
    w, wa = R.maxsim_varlen_ref(q, cu_q, d, cu_d)
    torch.testing.assert_close(s, w)
    assert torch.equal(a, wa)  # exact grid: the lowest token wins every tie
    wide = torch.zeros(q.shape[0], 2 * q.shape[1])
    wide[:, ::2] = q
    s2 = sparseops.maxsim_varlen(wide[:, ::2], cu_q, d.T.contiguous().T, cu_d, backend=backend)
    torch.testing.assert_close(s2, w)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pairs_matches_reference(device, backend, dtype):
    for B, K, Lq, Ld, dim in [(3, 4, 7, 33, 16), (1, 1, 1, 1, 8), (2, 3, 32, 97, 96)]:
        q, _ = maxsim_inputs(B, Lq, 1, 1, dim, dtype=dtype, seed=B)
        d = maxsim_inputs(1, 1, B * K, Ld, dim, dtype=dtype, seed=B + 9)[1].view(B, K, Ld, dim)
        masks = [
            (None, None),
            (maxsim_lengths(B, Lq, seed=1), maxsim_lengths(B * K, Ld, seed=2).view(B, K)),
            (maxsim_bool_mask(B, Lq, seed=3), maxsim_bool_mask(B * K, Ld, seed=4).view(B, K, Ld)),
        ]
        for qm, dm in masks:
            for reduce in ("sum", "mean"):
                for pylate in (False, True):
                    kw = dict(q_mask=qm, d_mask=dm, reduce=reduce, pylate_mask=pylate)
                    s, a = sparseops.maxsim_pairs(q, d, return_argmax=True, backend=backend, **kw)
                    w, wa = R.maxsim_pairs_ref(q, d, **kw)
                    torch.testing.assert_close(s, w, **_tol(dtype, Lq))
                    assert (
                        torch.equal(a < 0, wa < 0) if dtype in (torch.bfloat16, torch.float16) else torch.equal(a, wa)
                    )
        # A 3-D d: one document per query (PyLate's colbert_scores_pairwise).
        s = sparseops.maxsim_pairs(q, d[:, 0], backend=backend)
        torch.testing.assert_close(s, R.maxsim_pairs_ref(q, d[:, :1])[0][:, 0], **_tol(dtype, Lq))


@pytest.mark.parametrize("device,backend", PAIRS)
def test_pairs_equals_the_diagonal_of_maxsim(device, backend):
    q, d = maxsim_inputs(5, 7, 5, 33, 16, seed=5)
    s = sparseops.maxsim_pairs(q, d, backend=backend)
    torch.testing.assert_close(s, torch.diagonal(sparseops.maxsim(q, d, backend="reference")))


@pytest.mark.parametrize("device,backend", TOPK)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_topk_matches_reference(device, backend, dtype):
    ld = [97, 0, 1, 31, 5, 64, 2, 33, 7, 300, 9]
    d, cu_d = _packed(ld, 16, dtype=dtype, seed=6)
    q, _ = maxsim_inputs(3, 7, 1, 1, 16, dtype=dtype, seed=7)
    Nd = len(ld)
    cand1 = torch.tensor([9, -1, 3, 3, 0, 10])
    cand2 = torch.tensor([[1, 2, 3, -1], [-1, -1, -1, -1], [10, 0, 5, 5]])
    for k in (1, 4, Nd, Nd + 3):
        for cand in (None, cand1, cand2):
            for qm in (None, torch.tensor([7, 0, 3])):
                kw = dict(q_mask=qm, candidates=cand)
                s, i = sparseops.maxsim_topk(q, d, cu_d, k, backend=backend, **kw)
                w, wi = R.maxsim_topk_ref(q, d, cu_d, k, **kw)
                assert s.shape == (3, k) and i.dtype == torch.int64
                torch.testing.assert_close(s, w, **_tol(dtype, 7))
                if dtype != torch.bfloat16:
                    assert torch.equal(i, wi)
    # Past the corpus: padding with -inf / -1.
    s, i = sparseops.maxsim_topk(q[0], d, cu_d, Nd + 2, backend=backend)
    assert s.shape == (Nd + 2,) and torch.isneginf(s[Nd:]).all() and (i[Nd:] == -1).all()
    assert sorted(i[:Nd].tolist()) == list(range(Nd))


@pytest.mark.parametrize("device,backend", TOPK)
def test_topk_ties_go_to_the_lower_id(device, backend):
    d, cu_d = _packed([5, 5], 16, seed=8, ties=True)
    d = torch.cat([d, d, d])  # documents 0-5: 0, 2, 4 equal; 1, 3, 5 equal
    cu_d = torch.arange(0, 31, 5, dtype=torch.int32)
    q, _ = maxsim_inputs(2, 3, 1, 1, 16, seed=9, ties=True)
    s, i = sparseops.maxsim_topk(q, d, cu_d, 6, backend=backend)
    w, wi = R.maxsim_topk_ref(q, d, cu_d, 6)
    assert torch.equal(i, wi)
    for n in range(2):
        for j in range(5):  # equal scores appear in increasing id order
            assert s[n, j] > s[n, j + 1] or i[n, j] < i[n, j + 1]


# ---------------------------------------------------------------------------------------------
# maxsim's options: cosine, pylate_mask, return_argmax


def _pylate_formula(q, d, q_mask, d_mask):
    """pylate.scores.colbert_scores' torch path, written out: multiply by the masks, then max."""
    s = torch.einsum("ash,bth->abst", q.double(), d.double())
    s = s * q_mask.double().unsqueeze(1).unsqueeze(3)
    s = s * d_mask.double().unsqueeze(0).unsqueeze(2)
    return s.max(dim=-1).values.sum(dim=-1)


@pytest.mark.parametrize("device,backend", MAXSIM)
def test_pylate_mask_reproduces_pylate(device, backend):
    q, d = maxsim_inputs(3, 7, 5, 33, 16, seed=10, negative=True)  # masked 0 beats every real token
    qm, dm = maxsim_bool_mask(3, 7, seed=1), maxsim_bool_mask(5, 33, p=0.5, seed=2)
    dm[1] = False  # a fully masked document
    s, a = sparseops.maxsim(q, d, q_mask=qm, d_mask=dm, pylate_mask=True, return_argmax=True, backend=backend)
    torch.testing.assert_close(s.double(), _pylate_formula(q, d, qm, dm), rtol=1e-5, atol=1e-5)
    w, wa = R.maxsim_ref(q, d, q_mask=qm, d_mask=dm, pylate_mask=True)
    assert torch.equal(a, wa)
    # Lengths masks are the prefix bool masks.
    lens = maxsim_lengths(5, 33, seed=3)
    s2 = sparseops.maxsim(q, d, d_mask=lens, pylate_mask=True, backend=backend)
    boolm = torch.arange(33)[None, :] < lens[:, None]
    torch.testing.assert_close(s2.double(), _pylate_formula(q, d, torch.ones(3, 7), boolm), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", MAXSIM)
def test_cosine_and_return_argmax(device, backend):
    q, d = maxsim_inputs(3, 7, 5, 33, 16, seed=11)
    q, d = q * 3.0, d * torch.linspace(0.1, 4, 33)[None, :, None]
    s, a = sparseops.maxsim(q, d, similarity="cosine", return_argmax=True, backend=backend)
    w, wa = R.maxsim_ref(q, d, similarity="cosine")
    torch.testing.assert_close(s, w)
    assert a.shape == (3, 5, 7) and torch.equal(a, wa)
    qn, dn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(d, dim=-1)
    torch.testing.assert_close(s, sparseops.maxsim(qn, dn, backend=backend))
    s1, a1 = sparseops.maxsim(q[0], d, similarity="cosine", return_argmax=True, backend=backend)
    assert s1.shape == (5,) and a1.shape == (5, 7)
    with pytest.raises(ValueError, match="similarity"):
        sparseops.maxsim(q, d, similarity="l2")


def test_cosine_gradcheck():
    q, d = maxsim_inputs(2, 3, 3, 5, 8, dtype=torch.float64, seed=12)
    fn = lambda a, b: sparseops.maxsim(a, b, similarity="cosine")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q.requires_grad_(True), d.requires_grad_(True)))


# ---------------------------------------------------------------------------------------------
# Backward


def test_gradcheck_every_op():
    q, d = maxsim_inputs(2, 3, 3, 5, 8, dtype=torch.float64, seed=13)
    qm = torch.tensor([3, 2])
    dm = torch.tensor([[True, False, True, True, True], [True] * 5, [False] * 5])
    for reduce in ("sum", "mean"):
        for pylate in (False, True):
            fn = lambda a, b, r=reduce, p=pylate: sparseops.maxsim(a, b, q_mask=qm, d_mask=dm, reduce=r, pylate_mask=p)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (q.clone().requires_grad_(), d.clone().requires_grad_()))
    qp, cu_q = _packed([3, 0, 2], 8, dtype=torch.float64, seed=14)
    dp, cu_d = _packed([4, 1, 0, 6], 8, dtype=torch.float64, seed=15)
    pairs = torch.tensor([[0, 3], [2, 0], [1, 1], [2, 3], [0, 3]])
    for pr in (None, pairs):
        for reduce in ("sum", "mean"):
            fn = lambda a, b, p=pr, r=reduce: sparseops.maxsim_varlen(a, cu_q, b, cu_d, pairs=p, reduce=r)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (qp.clone().requires_grad_(), dp.clone().requires_grad_()))
    dk = maxsim_inputs(1, 1, 4, 5, 8, dtype=torch.float64, seed=16)[1].view(2, 2, 5, 8)
    for reduce in ("sum", "mean"):
        fn = lambda a, b, r=reduce: sparseops.maxsim_pairs(
            a, b, q_mask=qm, d_mask=dm[:2].reshape(2, 1, 5).expand(2, 2, 5), reduce=r
        )  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q.clone().requires_grad_(), dk.clone().requires_grad_()))


def _grads(fn, *xs):
    xs = [x.clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    g = torch.linspace(-1, 2, out.numel()).view(out.shape).to(out.dtype)
    (out * g).sum().backward()
    return [x.grad for x in xs]


def _winner_at_the_end(Ld, seed):
    """q [2, 3, 4], d [1, Ld, 4] fp64 whose last token is the only winner of query 0's first
    token (an index that needs every bit of the argmax dtype at the 2**15 boundary)."""
    q, d = maxsim_inputs(2, 3, 1, Ld, 4, dtype=torch.float64, seed=seed)
    d = d * 0.01
    d[0, -1] = q[0, 0] * 10
    return q, d


def _weighted_grads(score_fn, q, d, g):
    """dq, dd of sum(g * score_fn(q, d)) by autograd."""
    q, d = q.clone().requires_grad_(), d.clone().requires_grad_()
    (score_fn(q, d) * g).sum().backward()
    return q.grad, d.grad


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("Ld,want", [(2**15 - 1, torch.int16), (2**15, torch.int32), (40_000, torch.int32)])
def test_saved_argmax_is_int16_below_2_15_document_tokens(backend, Ld, want):
    """Every forward op saves an int16 argmax while document indices fit (Ld < 2**15; packed
    documents: their total), int32 from there; the fake agrees (opcheck), the backward reads
    either, and return_argmax hands out int32 with the same indices."""
    q, d = _winner_at_the_end(Ld, seed=Ld % 97)
    scores, arg = torch.ops.sparseops.maxsim(q, d, None, None, "sum", False, backend)
    assert arg.dtype == want and arg[0, 0, 0] == Ld - 1
    pub = sparseops.maxsim(q, d, return_argmax=True, backend=backend)[1]
    assert pub.dtype == torch.int32 and torch.equal(pub, arg) and torch.equal(pub, R.maxsim_ref(q, d)[1])
    g = torch.tensor([[0.5], [-2.0]], dtype=torch.float64)
    got = _weighted_grads(lambda a, b: sparseops.maxsim(a, b, backend=backend), q, d, g)
    dense = _weighted_grads(lambda a, b: torch.einsum("nid,mjd->nmij", a, b).amax(-1).sum(-1), q, d, g)
    for x, y in zip(got, dense):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    _, arg = torch.ops.sparseops.maxsim_pairs(q[:1], d[None], None, None, "sum", False, backend)
    assert arg.dtype == want and arg[0, 0, 0] == Ld - 1
    # Packed: the dtype follows the total document tokens (the shape), indices stay local.
    cu_q = torch.tensor([0, 3], dtype=torch.int32)
    dp = torch.cat([d[0, :5], d[0]])
    cu_d = torch.tensor([0, 5, Ld + 5], dtype=torch.int32)
    for pairs in (None, torch.tensor([[0, 1], [0, 0]])):
        _, arg = torch.ops.sparseops.maxsim_varlen(q[0], cu_q, dp, cu_d, pairs, "sum", backend)
        assert arg.dtype == (torch.int16 if Ld + 5 < 2**15 else torch.int32)
        assert torch.equal(arg, R.maxsim_varlen_ref(q[0], cu_q, dp, cu_d, pairs=pairs)[1])
    if backend == "cpu" and want == torch.int32 and Ld == 2**15:
        torch.library.opcheck(torch.ops.sparseops.maxsim.default, (q, d, None, None, "sum", False, backend))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_backward_reads_int16_and_int32_and_refuses_others(backend):
    q, d = maxsim_inputs(2, 5, 3, 9, 8, seed=31)
    _, arg = torch.ops.sparseops.maxsim(q, d, None, maxsim_lengths(3, 9, seed=32), "sum", False, "cpu")
    assert arg.dtype == torch.int16
    n = torch.arange(2)[:, None].expand(2, 3).reshape(-1)
    m = torch.arange(3)[None, :].expand(2, 3).reshape(-1)
    meta = torch.stack([n, n * 5, torch.full_like(n, 5), m, m * 9, (n * 3 + m) * 5], 1)
    grad = torch.linspace(-1, 1, 6)
    qr, dr = q.reshape(10, 8), d.reshape(27, 8)
    run = lambda a: torch.ops.sparseops.maxsim_backward(grad, qr, dr, a.reshape(-1), meta, 2, 3, True, True, backend)  # noqa: E731
    narrow, wide = run(arg), run(arg.to(torch.int32))
    for x, y in zip(narrow, wide):
        assert torch.equal(x, y)
    with pytest.raises(RuntimeError, match="argmax must be int16 or int32"):
        run(arg.to(torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backward_matches_the_torch_backward(dtype):
    """The C++ backward kernel against the torch index_add kernel and the einsum autograd."""
    q, d = maxsim_inputs(3, 7, 9, 33, 16, dtype=dtype, seed=17)
    qm, dm = maxsim_bool_mask(3, 7, seed=1), maxsim_lengths(9, 33, seed=2)
    fn = lambda a, b: sparseops.maxsim(a, b, q_mask=qm, d_mask=dm, reduce="mean")  # noqa: E731
    got = _grads(fn, q, d)
    ref_grads = _grads(lambda a, b: R.maxsim_ref(a, b, q_mask=qm, d_mask=dm, reduce="mean")[0], q, d)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(got, ref_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), **tol)
    # The shared backward op on both kernels, for a varlen pairs call.
    qp, cu_q = _packed([7, 0, 5], 16, dtype=dtype, seed=18)
    dp, cu_d = _packed([33, 1, 0, 9], 16, dtype=dtype, seed=19)
    pairs = torch.tensor([[0, 0], [2, 3], [0, 3], [1, 1], [2, 0]])
    _, arg = sparseops.maxsim_varlen(qp, cu_q, dp, cu_d, pairs=pairs, return_argmax=True)
    lq = (cu_q[1:] - cu_q[:-1]).long()
    n, m = pairs[:, 0], pairs[:, 1]
    meta = torch.stack([n, cu_q[n].long(), lq[n], m, cu_d[m].long(), torch.cumsum(lq[n], 0) - lq[n]], 1)
    grad = torch.linspace(-1, 1, 5)
    b = torch.ops.sparseops.maxsim_backward(grad, qp, dp, arg, meta, 3, 4, True, True, "reference")
    for backend in ("cpu", "triton"):
        a = torch.ops.sparseops.maxsim_backward(grad, qp, dp, arg, meta, 3, 4, True, True, backend)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        a = torch.ops.sparseops.maxsim_backward(grad, qp, dp, arg, meta, 3, 4, False, True, backend)
        assert a[0].numel() == 0 and torch.allclose(a[1], b[1], rtol=1e-6, atol=1e-6)
        a = torch.ops.sparseops.maxsim_backward(grad, qp, dp, arg, meta, 3, 4, True, False, backend)
        assert a[1].numel() == 0 and torch.allclose(a[0], b[0], rtol=1e-6, atol=1e-6)


def test_masked_tokens_get_zero_gradient():
    q, d = maxsim_inputs(2, 7, 3, 9, 16, seed=20)
    qm, dm = maxsim_bool_mask(2, 7, seed=3), maxsim_bool_mask(3, 9, seed=4)
    for pylate in (False, True):
        gq, gd = _grads(lambda a, b, p=pylate: sparseops.maxsim(a, b, q_mask=qm, d_mask=dm, pylate_mask=p), q, d)
        assert (gq[~qm] == 0).all() and (gd[~dm] == 0).all()


# ---------------------------------------------------------------------------------------------
# The op pattern: opcheck, torch.compile


def _varlen_args():
    q, cu_q = _packed([7, 0, 5], 16, seed=21)
    d, cu_d = _packed([33, 1, 0, 9], 16, seed=22)
    return q, cu_q, d, cu_d


@pytest.mark.parametrize("device,backend", VARLEN)
def test_opcheck_varlen(device, backend):
    q, cu_q, d, cu_d = _varlen_args()
    torch.library.opcheck(
        torch.ops.sparseops.maxsim_varlen.default, (q.requires_grad_(), cu_q, d, cu_d, None, "mean", backend)
    )
    # With pairs the argmax size depends on the data: the checks that need a static fake
    # size are left out.
    pairs = torch.tensor([[0, 0], [2, 3], [1, 1]])
    torch.library.opcheck(
        torch.ops.sparseops.maxsim_varlen.default,
        (q, cu_q, d, cu_d, pairs, "sum", backend),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("device,backend", PAIRS)
def test_opcheck_pairs(device, backend):
    q, _ = maxsim_inputs(3, 7, 1, 1, 16, seed=23)
    d = maxsim_inputs(1, 1, 6, 9, 16, seed=24)[1].view(3, 2, 9, 16)
    for args in [
        (q, d, None, None, "sum", False, backend),
        (
            q.requires_grad_(),
            d.requires_grad_(),
            torch.tensor([7, 0, 3]),
            maxsim_bool_mask(6, 9).view(3, 2, 9),
            "mean",
            True,
            backend,
        ),
    ]:
        torch.library.opcheck(torch.ops.sparseops.maxsim_pairs.default, args)


@pytest.mark.parametrize("device,backend", TOPK)
def test_opcheck_topk(device, backend):
    q, _ = maxsim_inputs(3, 7, 1, 1, 16, seed=25)
    _, _, d, cu_d = _varlen_args()
    for args in [
        (q, d, cu_d, 3, None, None, "sum", backend),
        (q, d, cu_d, 6, torch.tensor([7, 0, 3]), torch.tensor([[0, 1], [2, -1], [3, 3]]), "mean", backend),
    ]:
        torch.library.opcheck(torch.ops.sparseops.maxsim_topk.default, args)


def test_opcheck_backward():
    q, cu_q, d, cu_d = _varlen_args()
    _, arg = sparseops.maxsim_varlen(q, cu_q, d, cu_d, pairs=torch.tensor([[0, 0], [2, 3]]), return_argmax=True)
    meta = torch.tensor([[0, 0, 7, 0, 0, 0], [2, 7, 5, 3, 34, 7]])
    for backend in ("cpu", "reference"):
        torch.library.opcheck(
            torch.ops.sparseops.maxsim_backward.default,
            (torch.tensor([1.0, -2.0]), q, d, arg, meta, 3, 4, True, True, backend),
        )


def test_torch_compile_new_ops():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()

    def fn(q, cu_q, d, cu_d, qb, db, lens):
        a = sparseops.maxsim_varlen(q, cu_q, d, cu_d, reduce="mean").sum()
        b = sparseops.maxsim_pairs(qb, db, d_mask=lens, pylate_mask=True).sum()
        c = sparseops.maxsim(qb, db[:, 0], d_mask=lens[:, 0], similarity="cosine").sum()
        s, i = sparseops.maxsim_topk(qb, d, cu_d, 2)
        return a + b + c + s.sum() + i.sum()

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    for nd in (5, 10, 12):  # sizes equal to no other size (duck sizing would tie them)
        q, cu_q = _packed([7, 3, 4], 16, seed=nd)
        d, cu_d = _packed(list(range(1, nd + 1)), 16, seed=nd + 1)
        qb, _ = maxsim_inputs(2, 7, 1, 1, 16, seed=nd)
        db = maxsim_inputs(1, 1, 2 * nd, 9, 16, seed=nd)[1].view(2, nd, 9, 16)
        lens = maxsim_lengths(2 * nd, 9, seed=nd).view(2, nd)
        q.requires_grad_(True)
        qb.requires_grad_(True)
        got = compiled(q, cu_q, d, cu_d, qb, db, lens)
        torch.testing.assert_close(got, fn(q, cu_q, d, cu_d, qb, db, lens))
        got.backward()
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------------
# Bad inputs name the argument

_q, _cu_q = _packed([3, 2], 16, seed=30)
_d, _cu_d = _packed([4, 1, 3], 16, seed=31)
_i32 = torch.int32
BAD_VARLEN = [
    ("cu_q must be int32", dict(cu_q=_cu_q.long())),
    ("cu_d must be non-decreasing", dict(cu_d=torch.tensor([0, 5, 4, 8], dtype=_i32))),
    (r"cu_d\[-1\] must equal d.shape\[0\]", dict(cu_d=torch.tensor([0, 4, 5, 7], dtype=_i32))),
    (r"cu_q\[0\] must be 0", dict(cu_q=torch.tensor([1, 3, 5], dtype=_i32))),
    ("cu_q must be a 1-D", dict(cu_q=_cu_q[None])),
    (r"pairs\[:, 1\] \(document ids\) must lie in \[0, 3\)", dict(pairs=torch.tensor([[0, 3]]))),
    (r"pairs\[:, 0\] \(query ids\) must lie", dict(pairs=torch.tensor([[-1, 0]]))),
    (r"pairs must have shape \[P, 2\]", dict(pairs=torch.tensor([0, 1]))),
    ("d.size\\(1\\) must equal the embedding size", dict(d=_d[:, :8])),
    ("d must have the dtype of q", dict(d=_d.double())),
    ("reduce must be", dict(reduce="max")),
]


@pytest.mark.parametrize("device,backend", VARLEN)
@pytest.mark.parametrize("match,kw", BAD_VARLEN, ids=[m for m, _ in BAD_VARLEN])
def test_varlen_bad_inputs(device, backend, match, kw):
    args = dict(q=_q, cu_q=_cu_q, d=_d, cu_d=_cu_d, pairs=None, reduce="sum")
    args.update(kw)
    with pytest.raises(RuntimeError, match=match):
        sparseops.maxsim_varlen(
            args["q"],
            args["cu_q"],
            args["d"],
            args["cu_d"],
            pairs=args["pairs"],
            reduce=args["reduce"],
            backend=backend,
        )


BAD_TOPK = [
    ("k must be positive", dict(k=0)),
    ("k must be positive", dict(k=-2)),
    (r"candidates must be document ids in \[0, 3\)", dict(candidates=torch.tensor([0, 3]))),
    (r"candidates must have shape \[C\] \(shared\) or \[2, C\]", dict(candidates=torch.zeros(3, 2, dtype=torch.long))),
    ("candidates must be int32/int64", dict(candidates=torch.zeros(2))),
    ("cu_d must be non-decreasing", dict(cu_d=torch.tensor([0, 5, 4, 8], dtype=_i32))),
    ("d.size\\(1\\) must equal the embedding size", dict(d=_d[:, :8])),
    (r"q_mask as lengths must have shape \[2\]", dict(q_mask=torch.tensor([1, 2, 3]))),
]


@pytest.mark.parametrize("device,backend", TOPK)
@pytest.mark.parametrize("match,kw", BAD_TOPK, ids=[m for m, _ in BAD_TOPK])
def test_topk_bad_inputs(device, backend, match, kw):
    args = dict(d=_d, cu_d=_cu_d, k=2, q_mask=None, candidates=None)
    args.update(kw)
    q = torch.cat([_q, _q[:1]]).view(2, 3, 16)
    with pytest.raises(RuntimeError, match=match):
        sparseops.maxsim_topk(
            q, args["d"], args["cu_d"], args["k"], q_mask=args["q_mask"], candidates=args["candidates"], backend=backend
        )


BAD_PAIRS = [
    (r"d.size\(0\) must equal the batch size", dict(d=torch.zeros(3, 2, 5, 16))),
    (r"d.size\(3\) must equal the embedding size", dict(d=torch.zeros(2, 2, 5, 8))),
    (r"d_mask as a bool mask must have shape \[2, 2, 5\]", dict(d_mask=torch.ones(2, 5, dtype=torch.bool))),
    (
        r"d_mask must be a bool mask \[2, 2, 5\] or int32/int64 lengths \[2, 2\]",
        dict(d_mask=torch.ones(2, dtype=torch.long)),
    ),
    (r"d_mask lengths must lie in \[0, 5\]", dict(d_mask=torch.tensor([[1, 6], [0, 0]]))),
    ("d must be a 4-D tensor", dict(d=torch.zeros(2, 2, 2, 5, 16))),
]


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("match,kw", BAD_PAIRS, ids=[m for m, _ in BAD_PAIRS])
def test_pairs_bad_inputs(device, backend, match, kw):
    args = dict(d=torch.zeros(2, 2, 5, 16), d_mask=None)
    args.update(kw)
    with pytest.raises(RuntimeError, match=match):
        sparseops.maxsim_pairs(torch.zeros(2, 3, 16), args["d"], d_mask=args["d_mask"], backend=backend)


# ---------------------------------------------------------------------------------------------
# Threads, ISA and hypothesis invariants


def test_cpu_bits_do_not_depend_on_threads():
    q, cu_q = _packed([32, 7, 1, 0, 20] * 4, 96, dtype=torch.bfloat16, seed=40)
    d, cu_d = _packed([97, 300, 0, 33, 1, 64] * 6, 96, dtype=torch.bfloat16, seed=41)
    qb, _ = maxsim_inputs(9, 32, 1, 1, 96, dtype=torch.bfloat16, seed=42)
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            qq, dd = q.clone().requires_grad_(), d.clone().requires_grad_()
            s = sparseops.maxsim_varlen(qq, cu_q, dd, cu_d, reduce="mean")
            s.backward(torch.linspace(-1, 1, s.numel()).view(s.shape))
            outs.append((s, qq.grad, dd.grad, *sparseops.maxsim_topk(qb, d, cu_d, 5)))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.skipif(bool(os.environ.get("SPARSEOPS_CPU_NO_AVX512")), reason="already the portable path")
def test_cpu_portable_path():
    rerun_in_subprocess(
        __file__, "cpu-cpu and (varlen_matches or pairs_matches or topk_matches)", SPARSEOPS_CPU_NO_AVX512="1"
    )


_hyp = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_hyp
@given(
    lq=st.lists(st.integers(0, 9), min_size=1, max_size=4),
    ld=st.lists(st.integers(0, 40), min_size=1, max_size=7),
    k=st.integers(1, 9),
    seed=st.integers(0, 1000),
)
def test_topk_is_the_topk_of_varlen_scores(lq, ld, k, seed):
    L = max(lq)
    q, _ = maxsim_inputs(len(lq), max(L, 1), 1, 1, 16, seed=seed, ties=seed % 2 == 0)
    d, cu_d = _packed(ld, 16, seed=seed + 1, ties=seed % 2 == 0)
    qm = torch.tensor(lq)
    s, i = sparseops.maxsim_topk(q, d, cu_d, k, q_mask=qm)
    # All scores through varlen (query n = its first lq[n] tokens), then a stable sort.
    qp = torch.cat([q[n, : lq[n]] for n in range(len(lq))])
    cu_q = torch.zeros(len(lq) + 1, dtype=torch.int32)
    cu_q[1:] = torch.cumsum(qm, 0)
    full = sparseops.maxsim_varlen(qp, cu_q, d, cu_d)
    order = torch.argsort(full, dim=1, descending=True, stable=True)[:, :k]
    take = min(k, len(ld))
    assert torch.equal(i[:, :take], order[:, :take])
    torch.testing.assert_close(s[:, :take], full.gather(1, order[:, :take]))
    assert (i[:, take:] == -1).all()


@_hyp
@given(lq=st.integers(1, 9), ld=st.integers(1, 40), seed=st.integers(0, 1000), pylate=st.booleans())
def test_masking_never_changes_an_unmasked_winner(lq, ld, seed, pylate):
    q, d = maxsim_inputs(2, lq, 3, ld, 16, seed=seed)
    _, a0 = sparseops.maxsim(q, d, return_argmax=True)
    dm = maxsim_bool_mask(3, ld, p=0.4, seed=seed)
    _, a1 = sparseops.maxsim(q, d, d_mask=dm, pylate_mask=pylate, return_argmax=True)
    m = torch.arange(3)[None, :, None].expand_as(a0)
    kept = dm[m, a0.long()]  # the unmasked winner is still there: it still wins
    if pylate:  # ... unless it was below 0, the value a masked token takes under pylate_mask
        sims = torch.einsum("nid,mjd->nmij", q.double(), d.double())
        kept &= sims.gather(-1, a0.long()[..., None])[..., 0] > 0
    assert torch.equal(a1[kept], a0[kept])


@pytest.mark.skipif(bool(os.environ.get("SPARSEOPS_CPU_NO_AVX512BF16")), reason="already without vdpbf16ps")
def test_cpu_bf16_without_vdpbf16ps():
    """bf16 takes vdpbf16ps where the processor has AVX512_BF16; rerun the bf16 comparisons
    with the widening fp32 path (the choice is made once per process)."""
    rerun_in_subprocess(
        __file__,
        "(cpu-cpu and matches_reference) or cpu_backward_matches or bits_do_not_depend or bf16_paths",
        SPARSEOPS_CPU_NO_AVX512BF16="1",
    )


@pytest.mark.parametrize("dim", [7, 16, 127, 128])
@pytest.mark.parametrize("pylate", [False, True])
def test_cpu_bf16_paths(dim, pylate):
    """bf16 on CPU: the query-lane vdpbf16ps path (even dim), the packed-pairs path (odd dim)
    and the widening path elsewhere, with masks, PyLate masking and negative similarities,
    against the reference; the chosen token always attains the maximum."""
    for negative in (False, True):
        q, d = maxsim_inputs(3, 37, 5, 41, dim, dtype=torch.bfloat16, seed=dim, negative=negative)
        qm, dm = maxsim_bool_mask(3, 37, seed=dim), maxsim_bool_mask(5, 41, p=0.5, seed=dim + 1)
        for dmask in (dm, maxsim_lengths(5, 41, seed=dim)):
            kw = dict(q_mask=qm, d_mask=dmask, pylate_mask=pylate)
            s, a = sparseops.maxsim(q, d, return_argmax=True, backend="cpu", **kw)
            w, wa = R.maxsim_ref(q, d, **kw)
            torch.testing.assert_close(s, w, rtol=1e-5, atol=1e-4)
            assert torch.equal(a < 0, wa < 0)
            sims = torch.einsum("nid,mjd->nmij", q.double(), d.double())
            live = a >= 0
            got = sims.gather(-1, a.clamp_min(0).long()[..., None])[..., 0]
            best = sims.gather(-1, wa.clamp_min(0).long()[..., None])[..., 0]
            torch.testing.assert_close(got[live], best[live], rtol=1e-5, atol=1e-5)


def test_triton_backward_of_every_op_matches_cpu():
    """The Triton backward kernel (what CUDA tensors run) on the meta tables the autograd
    formulas build: padded maxsim with masks and maxsim_pairs, through the op directly."""
    q, d = maxsim_inputs(3, 7, 5, 33, 16, seed=50)
    qm, dm = maxsim_bool_mask(3, 7, seed=5), maxsim_lengths(5, 33, seed=6)
    _, arg = sparseops.maxsim(q, d, q_mask=qm, d_mask=dm, return_argmax=True)
    n = torch.arange(3)[:, None].expand(3, 5).reshape(-1)
    m = torch.arange(5)[None, :].expand(3, 5).reshape(-1)
    meta = torch.stack([n, n * 7, torch.full_like(n, 7), m, m * 33, (n * 5 + m) * 7], 1)
    grad = torch.linspace(-2, 1, 15)
    qr, dr = q.reshape(21, 16), d.reshape(165, 16)
    b = torch.ops.sparseops.maxsim_backward(grad, qr, dr, arg, meta, 3, 5, True, True, "cpu")
    for arg_dtype in (torch.int16, torch.int32):  # what the forward saves below / from 2**15 tokens
        a = torch.ops.sparseops.maxsim_backward(grad, qr, dr, arg.to(arg_dtype), meta, 3, 5, True, True, "triton")
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", TOPK)
def test_empty_shapes(device, backend):
    """Empty corpus, Lq = 0, no queries, no tokens at all, K = 0, Ld = 0."""
    z = torch.zeros(1, dtype=torch.int32)
    q, _ = maxsim_inputs(2, 3, 1, 1, 16, seed=60)
    d5, cu5 = _packed([2, 3], 16, seed=61)
    s, i = sparseops.maxsim_topk(q, torch.zeros(0, 16), z, 3, backend=backend)
    assert torch.isneginf(s).all() and (i == -1).all()
    s, i = sparseops.maxsim_topk(torch.zeros(2, 0, 16), d5, cu5, 3, backend=backend)
    assert s.tolist() == [[0.0, 0.0, float("-inf")]] * 2 and i.tolist() == [[0, 1, -1]] * 2
    assert sparseops.maxsim_varlen(torch.zeros(0, 16), z, d5, cu5, backend=backend).shape == (0, 2)
    e2, e3 = torch.zeros(2, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    s = sparseops.maxsim_varlen(torch.zeros(0, 16), e3, torch.zeros(0, 16), e2, backend=backend)
    assert s.shape == (2, 1) and (s == 0).all()
    assert sparseops.maxsim_pairs(q, torch.zeros(2, 0, 4, 16), backend=backend).shape == (2, 0)
    assert (sparseops.maxsim_pairs(q, torch.zeros(2, 2, 0, 16), backend=backend) == 0).all()
