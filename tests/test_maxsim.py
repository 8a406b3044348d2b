"""maxsim: every backend against the reference, the reference against a brute-force loop,
masking semantics, backward, opcheck, gradcheck, torch.compile and bad-input errors."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseops
from conftest import HAS_CUDA, backend_params, interpreted, rerun_in_subprocess
from sparseops.reference import maxsim_ref
from sparseops.testing import maxsim_bool_mask, maxsim_inputs, maxsim_lengths

BACKENDS = backend_params("maxsim")
HAS_C = sparseops.build_info()["extension"]

# (Nq, Lq, Nd, Ld, dim): odd sizes around every tile edge. The interpreter runs one program
# per (query, block of documents), so Triton on CPU gets the small half only.
SHAPES = [
    (1, 32, 33, 300, 128),
    (3, 7, 7, 97, 96),
    (1, 1, 1, 1, 8),
    (3, 32, 1, 5, 16),
    (1, 7, 33, 97, 8),
    (3, 1, 7, 300, 128),
]
SMALL_SHAPES = [(1, 7, 7, 5, 16), (3, 1, 1, 97, 8), (1, 32, 3, 33, 96), (3, 7, 1, 1, 128)]


def _shapes(device, backend):
    return SMALL_SHAPES if interpreted(device, backend) else SHAPES + SMALL_SHAPES


def _tol(dtype):
    # Scores are sums of Lq maxima of dot products accumulated in fp32 (fp64 for fp64) from
    # exactly widened inputs: backends differ from the reference only in summation order.
    return (1e-10, 1e-10) if dtype == torch.float64 else (2e-5, 2e-5)


def _sims(q, d):
    acc = torch.float64
    return torch.einsum("nid,mjd->nmij", q.to(acc), d.to(acc))


def _check(q, d, backend, *, exact_argmax=False, **kw):
    """Run the op (scores and argmax) and compare with the reference; returns the scores."""
    scores, argmax = torch.ops.sparseops.maxsim(
        q, d, kw.get("q_mask"), kw.get("d_mask"), kw.get("reduce", "sum"), False, backend
    )
    want, want_arg = maxsim_ref(q, d, **kw)
    assert scores.dtype == want.dtype and scores.shape == want.shape and scores.is_contiguous()
    # The op saves int16 below 2**15 document tokens (the public return_argmax widens it).
    assert argmax.dtype == (torch.int16 if d.shape[1] < 2**15 else torch.int32)
    assert argmax.shape == want_arg.shape
    rtol, atol = _tol(q.dtype)
    scale = max(1.0, q.shape[1])
    torch.testing.assert_close(scores, want, rtol=rtol, atol=atol * scale)
    # Where nothing is taken (masked query token, empty document) both say -1.
    torch.testing.assert_close(argmax < 0, want_arg < 0)
    if exact_argmax:
        assert torch.equal(argmax, want_arg)
    elif argmax.numel():
        # Elsewhere the chosen token attains the maximum (near-ties may pick another token
        # under a different summation order), and where the maximum is clear it is the same.
        sims = _sims(q, d)
        live = argmax >= 0
        got = sims.gather(-1, argmax.clamp_min(0).long()[..., None])[..., 0]
        best = sims.gather(-1, want_arg.clamp_min(0).long()[..., None])[..., 0]
        torch.testing.assert_close(got[live], best[live], rtol=1e-5, atol=1e-5)
    return scores


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(device, backend, dtype):
    for i, (Nq, Lq, Nd, Ld, dim) in enumerate(_shapes(device, backend)):
        q, d = maxsim_inputs(Nq, Lq, Nd, Ld, dim, dtype=dtype, device=device, seed=i)
        _check(q, d, backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "lengths"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_masks(device, backend, kind, reduce):
    """Ragged queries and documents, with empty ones (length 0 / all False) forced in."""
    Nq, Lq, Nd, Ld, dim = (3, 7, 7, 33, 16) if interpreted(device, backend) else (3, 32, 33, 97, 96)
    q, d = maxsim_inputs(Nq, Lq, Nd, Ld, dim, device=device, seed=3)
    if kind == "lengths":
        q_mask = maxsim_lengths(Nq, Lq, low=1, device=device, seed=1)
        d_mask = maxsim_lengths(Nd, Ld, device=device, seed=2)
        q_mask[-1] = 0
        d_mask[0] = 0
        d_mask[-1] = Ld
    else:
        q_mask = maxsim_bool_mask(Nq, Lq, device=device, seed=1)
        d_mask = maxsim_bool_mask(Nd, Ld, device=device, seed=2)
        q_mask[-1] = False
        d_mask[0] = False
    scores = _check(q, d, backend, q_mask=q_mask, d_mask=d_mask, reduce=reduce)
    assert (scores[:, 0] == 0).all() and (scores[-1] == 0).all()
    # int32 lengths and masks on one side only take the same paths.
    _check(q, d, backend, d_mask=d_mask, reduce=reduce)
    _check(q, d, backend, q_mask=q_mask.to(torch.int32) if kind == "lengths" else q_mask, reduce=reduce)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_all_negative_similarities(device, backend):
    """Every similarity < 0: a max that starts at 0 (ColBERT's CPU segmented_maxsim) shows up."""
    q, d = maxsim_inputs(3, 7, 7, 33, 16, device=device, seed=4, negative=True)
    d_mask = maxsim_lengths(7, 33, low=1, device=device, seed=4)
    scores = _check(q, d, backend, d_mask=d_mask)
    assert (scores < 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_go_to_the_lowest_token(device, backend, dtype):
    """Grid values make every dot product exact, so the argmax must match bit for bit."""
    Nq, Lq, Nd, Ld, dim = (1, 7, 3, 33, 16) if interpreted(device, backend) else (3, 32, 7, 97, 16)
    q, d = maxsim_inputs(Nq, Lq, Nd, Ld, dim, dtype=dtype, device=device, seed=5, ties=True)
    d[0] = d[0, :1]  # document 0: every token the same, so token 0 must win everywhere
    d_mask = torch.ones(Nd, Ld, dtype=torch.bool, device=device)
    d_mask[1, ::2] = False  # masked duplicates must not win either
    d[1, 1::2] = d[1, 0::2][: d[1, 1::2].shape[0]]  # each real token copies the masked one before it
    _check(q, d, backend, exact_argmax=True, d_mask=d_mask)
    _, argmax = torch.ops.sparseops.maxsim(q, d, None, None, "sum", False, backend)
    assert (argmax[:, 0] == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_noncontiguous(device, backend):
    q, d = maxsim_inputs(3, 7, 7, 33, 16, device=device, seed=6, noncontiguous=True)
    assert not q.is_contiguous() and not d.is_contiguous()
    _check(q, d, backend, d_mask=maxsim_lengths(7, 33, device=device, seed=6))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 3, 5, 8), (2, 4, 0, 5, 8), (2, 0, 3, 5, 8), (2, 4, 3, 0, 8), (2, 4, 3, 5, 0)])
def test_empty_dims(device, backend, shape):
    Nq, Lq, Nd, Ld, dim = shape
    q, d = maxsim_inputs(Nq, Lq, Nd, Ld, dim, device=device, seed=7)
    scores = _check(q, d, backend, exact_argmax=True, reduce="mean")
    if Lq == 0 or Ld == 0 or dim == 0:
        assert (scores == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_single_query_and_public_function(device, backend):
    """A 2-D q gives [Nd] (flash_maxsim / maxsim_cpu convention); masks follow it."""
    q, d = maxsim_inputs(1, 7, 7, 33, 16, device=device, seed=8)
    lengths = torch.tensor(5, device=device)
    got = sparseops.maxsim(q[0], d, q_mask=lengths, backend=backend)
    want = maxsim_ref(q, d, q_mask=lengths.reshape(1))[0][0]
    assert got.shape == (7,)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-4)
    mask = torch.arange(7, device=device) % 2 == 0
    got = sparseops.maxsim(q[0], d, q_mask=mask, reduce="mean", backend=backend)
    torch.testing.assert_close(got, maxsim_ref(q, d, q_mask=mask[None], reduce="mean")[0][0], rtol=2e-5, atol=2e-4)


def test_reference_against_brute_force_loop():
    """The reference's masking and reductions against the definition, written as loops."""
    q, d = maxsim_inputs(2, 4, 3, 5, 3, dtype=torch.float64, seed=9)
    q_mask = torch.tensor([[True, False, True, True], [False] * 4])
    d_mask = torch.tensor([[True, True, False, True, False], [False] * 5, [False, False, False, False, True]])
    for reduce in ("sum", "mean"):
        scores, argmax = maxsim_ref(q, d, q_mask=q_mask, d_mask=d_mask, reduce=reduce)
        for n in range(2):
            for m in range(3):
                total, count = 0.0, 0
                for i in range(4):
                    if not q_mask[n, i]:
                        assert argmax[n, m, i] == -1
                        continue
                    count += 1
                    real = [j for j in range(5) if d_mask[m, j]]
                    if not real:
                        assert argmax[n, m, i] == -1
                        continue
                    sims = [float(q[n, i] @ d[m, j]) for j in real]
                    best = max(sims)
                    total += best
                    assert argmax[n, m, i] == real[sims.index(best)]
                want = total / count if reduce == "mean" and count else (0.0 if reduce == "mean" else total)
                assert abs(float(scores[n, m]) - want) < 1e-12


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lq=st.integers(1, 9),
    ld=st.integers(1, 40),
    dim=st.sampled_from([3, 8, 16, 33]),
    seed=st.integers(0, 2**16),
)
def test_masking_equals_removing_tokens(lq, ld, dim, seed):
    """Invariant: masking document / query tokens scores exactly like deleting them."""
    backend = "cpu" if HAS_C else "reference"
    q, d = maxsim_inputs(1, lq, 2, ld, dim, dtype=torch.float64, seed=seed)
    d_mask = maxsim_bool_mask(2, ld, p=0.5, seed=seed)
    q_mask = maxsim_bool_mask(1, lq, p=0.3, seed=seed)
    got = sparseops.maxsim(q, d, q_mask=q_mask, d_mask=d_mask, backend=backend)
    qk = q[0, q_mask[0]][None]
    for m in range(2):
        dk = d[m, d_mask[m]][None]
        want = sparseops.maxsim(qk, dk, backend=backend)[0, 0] if dk.shape[1] else torch.zeros((), dtype=q.dtype)
        torch.testing.assert_close(got[0, m], want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Backward


def _grads(fn, q, d, g):
    q = q.detach().clone().requires_grad_(True)
    d = d.detach().clone().requires_grad_(True)
    return torch.autograd.grad(fn(q, d), (q, d), g)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_backward_matches_reference_autograd(device, backend, reduce):
    """Gradients from the saved argmax equal autograd through the einsum reference (which
    routes each max's gradient to the same lowest-index token), masked tokens get zero."""
    q, d = maxsim_inputs(3, 7, 7, 33, 16, device=device, seed=10)
    q_mask = maxsim_lengths(3, 7, device=device, seed=10)
    d_mask = maxsim_bool_mask(7, 33, device=device, seed=10)
    d_mask[2] = False
    g = torch.randn(3, 7, generator=torch.Generator().manual_seed(1)).to(device)
    kw = {"q_mask": q_mask, "d_mask": d_mask, "reduce": reduce}
    dq, dd = _grads(lambda a, b: sparseops.maxsim(a, b, backend=backend, **kw), q, d, g)
    dq_ref, dd_ref = _grads(lambda a, b: maxsim_ref(a, b, **kw)[0], q, d, g)
    torch.testing.assert_close(dq, dq_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dd, dd_ref, rtol=1e-5, atol=1e-6)
    pos = torch.arange(7, device=device)
    assert (dq[pos[None, :] >= q_mask[:, None]] == 0).all()
    assert (dd[~d_mask] == 0).all() and (dd[2] == 0).all()
    assert dq.abs().sum() > 0 and dd.abs().sum() > 0


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_backward_low_precision_and_broadcast_grad(device, backend):
    """bf16 inputs get bf16 gradients; out.sum().backward() hands in a stride-0 gradient."""
    q, d = maxsim_inputs(2, 7, 5, 33, 16, dtype=torch.bfloat16, device=device, seed=11)
    q.requires_grad_(True)
    d.requires_grad_(True)
    sparseops.maxsim(q, d, backend=backend).sum().backward()
    q2, d2 = q.detach().clone().requires_grad_(True), d.detach().clone().requires_grad_(True)
    maxsim_ref(q2, d2)[0].sum().backward()
    assert q.grad.dtype == torch.bfloat16 and d.grad.dtype == torch.bfloat16
    torch.testing.assert_close(q.grad, q2.grad, rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(d.grad, d2.grad, rtol=1.6e-2, atol=1e-3)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic(device, backend):
    q, d = maxsim_inputs(3, 7, 7, 33, 16, device=device, seed=12, ties=True)
    out = []
    for _ in range(2):
        qq, dd = q.clone().requires_grad_(True), d.clone().requires_grad_(True)
        s = sparseops.maxsim(qq, dd, backend=backend)
        s.sum().backward()
        out.append((s, qq.grad, dd.grad))
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradcheck(device, backend):
    """fp64 gradcheck (the max is piecewise linear: random inputs keep away from ties)."""
    q, d = maxsim_inputs(
        2, 3, 3, 5, 4 if interpreted(device, backend) else 8, dtype=torch.float64, device=device, seed=13
    )
    if backend not in sparseops.available_backends("maxsim", q):
        pytest.skip(f"{backend} refuses fp64 (auto runs it on another backend)")
    q_mask = torch.tensor([3, 2], device=device)
    d_mask = torch.tensor([[True, False, True, True, True], [True] * 5, [False] * 5], device=device)
    for reduce in ("sum", "mean"):
        fn = lambda a, b, r=reduce: sparseops.maxsim(a, b, q_mask=q_mask, d_mask=d_mask, reduce=r, backend=backend)
        assert torch.autograd.gradcheck(fn, (q.requires_grad_(True), d.requires_grad_(True)), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The op pattern: opcheck on every backend, torch.compile without specialising on Nd


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck_every_backend(device, backend):
    q, d = maxsim_inputs(2, 5, 3, 9, 16, device=device, seed=14)
    cases = [
        (q, d, None, None, "sum", False, backend),
        (
            q.clone().requires_grad_(True),
            d.clone().requires_grad_(True),
            torch.tensor([5, 2], device=device),
            maxsim_bool_mask(3, 9, device=device),
            "mean",
            False,
            backend,
        ),
    ]
    for args in cases:
        torch.library.opcheck(torch.ops.sparseops.maxsim.default, args)


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if "triton" not in p.id or HAS_CUDA])
def test_torch_compile_one_graph_across_documents(device, backend):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()

    def score(q, d, lengths):
        return sparseops.maxsim(q, d, d_mask=lengths, reduce="mean", backend=backend) * 2

    compiled = torch.compile(score, fullgraph=True, dynamic=True, backend=counter)
    for Nd in (3, 5, 9, 17):
        q, d = maxsim_inputs(2, 7, Nd, 11, 16, device=device, seed=Nd)
        q.requires_grad_(True)
        lengths = maxsim_lengths(Nd, 11, device=device, seed=Nd)
        got = compiled(q, d, lengths)
        torch.testing.assert_close(got, score(q, d, lengths))
        got.sum().backward()
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------------
# Bad inputs: every backend raises a clear error naming the argument.

BAD_CASES = [
    ("q-rank", lambda dv: (torch.randn(4, 8, 2, 2, device=dv), torch.randn(3, 5, 2, device=dv), {}), "q must be a 3-D"),
    ("d-rank", lambda dv: (torch.randn(2, 4, 8, device=dv), torch.randn(5, 8, device=dv), {}), "d must be a 3-D"),
    (
        "q-dtype",
        lambda dv: (torch.ones(2, 4, 8, dtype=torch.int32, device=dv), torch.ones(3, 5, 8, device=dv), {}),
        "q must have dtype",
    ),
    (
        "d-dtype",
        lambda dv: (torch.randn(2, 4, 8, device=dv), torch.randn(3, 5, 8, device=dv).half(), {}),
        "d must have the dtype of q",
    ),
    ("dim", lambda dv: (torch.randn(2, 4, 8, device=dv), torch.randn(3, 5, 7, device=dv), {}), "embedding size"),
    (
        "reduce",
        lambda dv: (torch.randn(2, 4, 8, device=dv), torch.randn(3, 5, 8, device=dv), {"reduce": "max"}),
        "reduce must be",
    ),
    (
        "q_mask-shape",
        lambda dv: (
            torch.randn(2, 4, 8, device=dv),
            torch.randn(3, 5, 8, device=dv),
            {"q_mask": torch.ones(2, 5, dtype=torch.bool, device=dv)},
        ),
        "q_mask as a bool mask",
    ),
    (
        "d_mask-lengths-shape",
        lambda dv: (
            torch.randn(2, 4, 8, device=dv),
            torch.randn(3, 5, 8, device=dv),
            {"d_mask": torch.tensor([1, 2], device=dv)},
        ),
        "d_mask as lengths",
    ),
    (
        "d_mask-float",
        lambda dv: (
            torch.randn(2, 4, 8, device=dv),
            torch.randn(3, 5, 8, device=dv),
            {"d_mask": torch.ones(3, 5, device=dv)},
        ),
        "d_mask must be a bool mask",
    ),
    (
        "d_mask-int-2d",
        lambda dv: (
            torch.randn(2, 4, 8, device=dv),
            torch.randn(3, 5, 8, device=dv),
            {"d_mask": torch.ones(3, 5, dtype=torch.long, device=dv)},
        ),
        r"\.bool\(\)",
    ),
]


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_inputs_name_the_argument(device, backend, case):
    _, make, pattern = case
    q, d, kw = make(device)
    with pytest.raises(RuntimeError, match=pattern):
        sparseops.maxsim(q, d, backend=backend, **kw)


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.id.startswith("cpu")])
def test_lengths_out_of_range_raise_on_cpu(device, backend):
    q, d = maxsim_inputs(2, 4, 3, 5, 8, seed=15)
    for bad in ([0, 6, 1], [0, -1, 1]):
        with pytest.raises(RuntimeError, match=r"d_mask lengths must lie in \[0, 5\]"):
            sparseops.maxsim(q, d, d_mask=torch.tensor(bad), backend=backend)
    with pytest.raises(RuntimeError, match="q_mask lengths"):
        sparseops.maxsim(q, d, q_mask=torch.tensor([5, 1], dtype=torch.int32), backend=backend)


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
def test_mask_on_another_device_and_cuda_backend_raise():
    q, d = maxsim_inputs(2, 4, 3, 5, 8, seed=16)
    with pytest.raises(RuntimeError, match="d_mask must be on the same device as q"):
        sparseops.maxsim(q, d, d_mask=torch.ones(3, 5, dtype=torch.bool, device="meta"))
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot take these inputs.*takes CUDA tensors"):
        sparseops.maxsim(q, d, backend="cuda")
    with pytest.raises(RuntimeError, match="cannot take cpu tensors"):
        torch.ops.sparseops.maxsim(q, d, None, None, "sum", False, "cuda")
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        sparseops.maxsim([[1.0]], d)


# ---------------------------------------------------------------------------------------------
# The CPU kernel's paths: thread count and ISA do not change the bits / the answer.


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
def test_cpu_bits_do_not_depend_on_threads():
    q, d = maxsim_inputs(9, 32, 33, 97, 96, dtype=torch.bfloat16, seed=17)
    d_mask = maxsim_lengths(33, 97, device="cpu", seed=17)
    old = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(torch.ops.sparseops.maxsim(q, d, None, d_mask, "mean", False, "cpu"))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out[0][0].view(torch.int32), out[1][0].view(torch.int32))
    assert torch.equal(out[0][1], out[1][1])


# The fp32 query-lane tile (AVX-512) and its software prefetch: many documents in a row (the
# prefetch runs past each document into the next one, and past the end of the corpus), Ld
# around the 6- and 8-token blocks, dim not a multiple of the 16-coordinate prefetch step,
# Lq around the 16-lane vectors; masked and unmasked; 1 and 2 threads give the same bits.
@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
@pytest.mark.parametrize(
    "lq,nd,ld,dim,masked",
    [
        (32, 61, 13, 97, False),
        (33, 40, 7, 130, True),
        (16, 97, 6, 16, False),
        (1, 200, 25, 7, True),
        (17, 9, 97, 33, False),
    ],
)
def test_cpu_fp32_lane_tile_many_documents(lq, nd, ld, dim, masked):
    q, d = maxsim_inputs(2, lq, nd, ld, dim, seed=lq + nd)
    kw = {"d_mask": maxsim_lengths(nd, ld, seed=nd)} if masked else {}
    old = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(torch.ops.sparseops.maxsim(q, d, None, kw.get("d_mask"), "sum", False, "cpu"))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out[0][0].view(torch.int32), out[1][0].view(torch.int32))
    assert torch.equal(out[0][1], out[1][1])
    _check(q, d, "cpu", **kw)


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
@pytest.mark.skipif(bool(os.environ.get("SPARSEOPS_CPU_NO_AVX512")), reason="already the portable path")
def test_cpu_portable_path():
    """Machines without AVX-512 run the portable at::vec path; force it in a subprocess (the
    choice is made once per process) and rerun the reference comparisons there."""
    selection = "cpu-cpu and (matches_reference or masks or negative or ties or empty or gradcheck)"
    rerun_in_subprocess(__file__, selection, SPARSEOPS_CPU_NO_AVX512="1")
