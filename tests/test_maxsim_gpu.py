"""MaxSim on a GPU at production sizes (marked gpu: skipped without one; not yet run on a GPU).

The fused CUDA forward ("cuda" backend) and the multi-query Triton forward against the
reference at the shapes of DESIGN.md (dim 128, 32-token queries, 300-token ColBERT documents,
1,030-token ColPali pages, ragged corpora, in-batch training), every tile kind of the CUDA
kernel (tensor cores, FFMA with cp.async, FFMA with element copies for unaligned rows), the
CPU emulator of the CUDA kernel against the GPU bit for bit, CUDA-graph capture, determinism
and the backward's memory at the in-batch training shape. scripts/gpu_check.sh also runs the
"cuda" tests here under compute-sanitizer (memcheck, racecheck, synccheck): ragged tails must
never read past a document.
"""

from __future__ import annotations

import pytest
import torch

import sparseops
from sparseops import _backend
from sparseops.reference import maxsim_ref
from sparseops.testing import maxsim_bool_mask, maxsim_inputs, maxsim_lengths

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _ref_chunked(q, d, chunk=512, **kw):
    """maxsim_ref over document chunks (the einsum materialises [Nq, Nd, Lq, Ld])."""
    outs, args = [], []
    dm = kw.pop("d_mask", None)
    for m0 in range(0, d.shape[0], chunk):
        sub = None if dm is None else dm[m0 : m0 + chunk]
        s, a = maxsim_ref(q, d[m0 : m0 + chunk], d_mask=sub, **kw)
        outs.append(s)
        args.append(a)
    return torch.cat(outs, 1), torch.cat(args, 1)


def _assert_close(scores, argmax, want, want_arg, q, d, lq):
    torch.testing.assert_close(scores, want, rtol=2e-5, atol=2e-5 * lq)
    assert torch.equal(argmax < 0, want_arg < 0)
    # Where the argmax differs (near-ties summed in another order) it still attains the max.
    diff = (argmax != want_arg).nonzero()[:2000]
    for n, m, i in diff.tolist():
        got = torch.dot(q[n, i].double(), d[m, argmax[n, m, i]].double())
        best = torch.dot(q[n, i].double(), d[m, want_arg[n, m, i]].double())
        assert abs(float(got - best)) <= 1e-4 * max(1.0, abs(float(best)))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_colbert_rerank_10k_documents(backend, dtype):
    q, d = maxsim_inputs(1, 32, 10_000, 300, 128, dtype=dtype, device=DEV, seed=1)
    scores, argmax = sparseops.maxsim(q, d, backend=backend, return_argmax=True)
    want, want_arg = _ref_chunked(q, d)
    _assert_close(scores, argmax, want, want_arg, q, d, 32)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("kind", ["lengths", "bool"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_ragged_and_masked(backend, kind, reduce):
    Nq, Lq, Nd, Ld = 3, 32, 2_000, 300
    q, d = maxsim_inputs(Nq, Lq, Nd, Ld, 128, dtype=torch.bfloat16, device=DEV, seed=2)
    if kind == "lengths":
        qm = torch.tensor([32, 0, 17], device=DEV)
        dm = maxsim_lengths(Nd, Ld, low=0, device=DEV, seed=2)
    else:
        qm, dm = maxsim_bool_mask(Nq, Lq, device=DEV, seed=2), maxsim_bool_mask(Nd, Ld, device=DEV, seed=3)
    scores, argmax = sparseops.maxsim(q, d, q_mask=qm, d_mask=dm, reduce=reduce, backend=backend, return_argmax=True)
    want, want_arg = _ref_chunked(q, d, q_mask=qm, d_mask=dm, reduce=reduce)
    _assert_close(scores, argmax, want, want_arg, q, d, Lq)


def test_pylate_masking_matches_reference():
    q, d = maxsim_inputs(4, 32, 500, 180, 128, dtype=torch.bfloat16, device=DEV, seed=3, negative=True)
    dm = maxsim_bool_mask(500, 180, device=DEV, seed=3)
    for backend in ("cuda", "triton"):
        got = sparseops.maxsim(q, d, d_mask=dm, pylate_mask=True, backend=backend, return_argmax=True)
        want = _ref_chunked(q, d, d_mask=dm, pylate_mask=True)
        _assert_close(*got, *want, q, d, 32)


def test_varlen_ragged_corpus_matches_padded():
    """10,000 documents of 50-300 tokens packed with cu_seqlens: the CUDA kernel's token-
    balanced split against the padded-and-masked op."""
    Nd, Ld = 10_000, 300
    q, d = maxsim_inputs(1, 32, Nd, Ld, 128, dtype=torch.bfloat16, device=DEV, seed=4)
    lengths = maxsim_lengths(Nd, Ld, low=50, device=DEV, seed=4)
    lengths[::997] = 0  # a few empty documents
    keep = torch.arange(Ld, device=DEV)[None, :] < lengths[:, None]
    packed = d[keep]
    cu_d = torch.zeros(Nd + 1, dtype=torch.int32, device=DEV)
    cu_d[1:] = torch.cumsum(lengths, 0)
    cu_q = torch.tensor([0, 32], dtype=torch.int32, device=DEV)
    got, arg = sparseops.maxsim_varlen(q[0], cu_q, packed, cu_d, backend="cuda", return_argmax=True)
    want, want_arg = sparseops.maxsim(q, d, d_mask=lengths, backend="cuda", return_argmax=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert torch.equal(arg, want_arg[0])
    ref, _ = _ref_chunked(q, d, d_mask=lengths)
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-3)


def test_colpali_pages_many_query_tokens():
    """1,024 query tokens (compute-bound): auto runs Triton's multi-query kernel; the CUDA
    kernel (forced) runs it in passes of 128 rows; both match the reference."""
    q, d = maxsim_inputs(1, 1024, 64, 1030, 128, dtype=torch.bfloat16, device=DEV, seed=5)
    assert sparseops.resolve_backend("maxsim", q) == "triton"
    want, want_arg = _ref_chunked(q, d, chunk=8)
    for backend in (None, "cuda"):
        got = sparseops.maxsim(q, d, backend=backend, return_argmax=True)
        _assert_close(*got, want, want_arg, q, d, 1024)


@pytest.mark.parametrize("rows", [32, 512])  # the per-query and the multi-query Triton kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_documents_run_on_triton(dtype, rows):
    """int8 documents (per-token scales) on CUDA: auto passes over the CUDA C++ kernel (float
    documents only) to Triton, which converts int8 tiles exactly to q's dtype and scales each
    similarity after the dot: the reference's semantics at float tolerances; the backward
    gives dq through the scales; the saved argmax is int16."""
    q, d = maxsim_inputs(rows // 32, 32, 2_000, 300, 128, dtype=dtype, device=DEV, seed=7)
    d8, s = sparseops.maxsim_quantize(d)
    scores, argmax = sparseops.maxsim(q, d8, d_scale=s, return_argmax=True)
    deq = (d8.float() * s[..., None]).to(torch.float64)
    want, want_arg = _ref_chunked(q.double(), deq)
    _assert_close(scores, argmax, want.float(), want_arg, q, deq, 32)
    assert torch.ops.sparseops.maxsim(q, d8, None, None, "sum", False, "auto", s)[1].dtype == torch.int16
    x = q[:1].float().requires_grad_()
    sparseops.maxsim(x, d8[:50], d_scale=s[:50]).sum().backward()
    y = x.detach().double().requires_grad_()
    maxsim_ref(y, deq[:50])[0].sum().backward()
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["fp32-async", "bf16-unaligned-dim", "bf16-unaligned-pointer", "fp16-dim24"])
def test_every_cuda_tile_kind(case):
    if case == "fp32-async":
        q, d = maxsim_inputs(2, 32, 777, 129, 128, device=DEV, seed=6)
    elif case == "bf16-unaligned-dim":
        q, d = maxsim_inputs(2, 32, 777, 129, 12, dtype=torch.bfloat16, device=DEV, seed=6)
    elif case == "fp16-dim24":
        q, d = maxsim_inputs(5, 7, 777, 129, 24, dtype=torch.float16, device=DEV, seed=6)
    else:
        q, d = maxsim_inputs(2, 32, 777, 129, 64, dtype=torch.bfloat16, device=DEV, seed=6)
        buf = torch.empty(d.numel() + 1, dtype=d.dtype, device=DEV)
        shifted = buf[1:].view(d.shape)  # contiguous, but 2 bytes off 16-byte alignment
        shifted.copy_(d)
        d = shifted
    got = sparseops.maxsim(q, d, backend="cuda", return_argmax=True)
    _assert_close(*got, *_ref_chunked(q, d), q, d, q.shape[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_the_cpu_emulator_bit_for_bit(dtype):
    """On exact inputs the emulated kernel (tests/test_maxsim_cuda_emulator.py) and the GPU
    give the same bits: the emulator's fragment layouts are the hardware's."""
    q, d = maxsim_inputs(3, 21, 40, 77, 64, dtype=dtype, seed=7, ties=True)
    lengths = maxsim_lengths(40, 77, seed=7)
    gpu = torch.ops.sparseops.maxsim(q.to(DEV), d.to(DEV), None, lengths.to(DEV), "mean", False, "cuda")
    scores = torch.empty(3, 40)
    argmax = torch.empty(3, 40, 21, dtype=torch.int32)
    _backend._C._maxsim_cuda_emulate(q, d, None, lengths.to(torch.int32), None, None, True, False,
                                               scores, argmax, ctas=7)  # fmt: skip
    assert torch.equal(gpu[0].cpu(), scores) and torch.equal(gpu[1].cpu(), argmax)


def test_cuda_graph_capture_and_replay():
    q, d = maxsim_inputs(1, 32, 1000, 300, 128, dtype=torch.bfloat16, device=DEV, seed=8)
    lengths = maxsim_lengths(1000, 300, device=DEV, seed=8)
    with torch.inference_mode():
        for backend in ("cuda", "triton"):
            static = [q.clone(), d.clone(), lengths.clone()]
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    sparseops.maxsim(*static[:2], d_mask=static[2], backend=backend)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = sparseops.maxsim(*static[:2], d_mask=static[2], backend=backend)
            q2, d2 = maxsim_inputs(1, 32, 1000, 300, 128, dtype=torch.bfloat16, device=DEV, seed=9)
            static[0].copy_(q2)
            static[1].copy_(d2)
            g.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(out, sparseops.maxsim(q2, d2, d_mask=lengths, backend=backend))


def test_deterministic_forward_and_backward():
    q, d = maxsim_inputs(32, 32, 32, 300, 128, dtype=torch.bfloat16, device=DEV, seed=10)
    runs = []
    for _ in range(2):
        qq, dd = q.clone().requires_grad_(), d.clone().requires_grad_()
        s = sparseops.maxsim(qq, dd)
        (s.logsumexp(1).sum()).backward()
        runs.append((s.detach(), qq.grad, dd.grad))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)


def test_in_batch_training_gradients_and_memory():
    """B = 128 in-batch negatives, fwd + bwd: gradients match the reference's autograd, and
    the extra memory (everything but the inputs and their gradients) stays under 50 MB (the
    naive einsum needs about 1.7 GB)."""
    B, Lq, Ld = 128, 32, 300
    q, d = maxsim_inputs(B, Lq, B, Ld, 128, dtype=torch.bfloat16, device=DEV, seed=11)
    qq, dd = q.clone().requires_grad_(), d.clone().requires_grad_()
    # Warm up (Triton compilation, allocator) outside the measurement.
    sparseops.maxsim(qq, dd).sum().backward()
    qq.grad = dd.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    s = sparseops.maxsim(qq, dd)
    loss = torch.nn.functional.cross_entropy(s, torch.arange(B, device=DEV))
    loss.backward()
    torch.cuda.synchronize()
    grads = qq.grad.numel() * 2 + dd.grad.numel() * 2
    extra = torch.cuda.max_memory_allocated() - base - grads
    assert extra < 50e6, f"{extra / 1e6:.1f} MB"
    q32, d32 = q.float().requires_grad_(), d.float().requires_grad_()
    s32, _ = maxsim_ref(q32, d32)
    torch.nn.functional.cross_entropy(s32, torch.arange(B, device=DEV)).backward()
    torch.testing.assert_close(qq.grad.float(), q32.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(dd.grad.float(), d32.grad, rtol=2e-2, atol=2e-3)


def test_one_kernel_per_call():
    """The cuda backend's call is one kernel launch: no memset of the scores, no clamp of the
    masks (a bool mask here), no host synchronisation (capturable, see above)."""
    q, d = maxsim_inputs(1, 32, 100, 300, 128, dtype=torch.bfloat16, device=DEV, seed=12)
    mask = maxsim_bool_mask(100, 300, device=DEV, seed=12)
    assert sparseops.resolve_backend("maxsim", q) == "cuda"
    from torch.profiler import ProfilerActivity, profile

    sparseops.maxsim(q, d, d_mask=mask)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sparseops.maxsim(q, d, d_mask=mask)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1 and "maxsim_fused_kernel" in kernels[0], kernels


@pytest.mark.parametrize(
    "dtype,dim", [(torch.bfloat16, 128), (torch.float16, 24), (torch.float32, 96), (torch.bfloat16, 12)]
)
def test_sanitizer_ragged_tails(dtype, dim):
    """Small ragged shapes for compute-sanitizer (scripts/gpu_check.sh runs `-k sanitizer`
    under memcheck / racecheck / synccheck): documents of every length mod 32 (zero-filled
    tails never read past the document), lengths masks, packed documents cut between warps
    and blocks, and several query chunks."""
    for Nq, Lq, Nd, Ld in [(1, 32, 37, 33), (3, 50, 11, 65), (2, 7, 64, 1)]:
        q, d = maxsim_inputs(Nq, Lq, Nd, Ld, dim, dtype=dtype, device=DEV, seed=Nd)
        lengths = maxsim_lengths(Nd, Ld, device=DEV, seed=Nd)
        got = sparseops.maxsim(q, d, d_mask=lengths, backend="cuda", return_argmax=True)
        _assert_close(*got, *_ref_chunked(q, d, d_mask=lengths), q, d, Lq)
        cu_d = torch.zeros(Nd + 1, dtype=torch.int32, device=DEV)
        cu_d[1:] = torch.cumsum(lengths, 0)
        keep = torch.arange(Ld, device=DEV)[None, :] < lengths[:, None]
        cu_q = torch.arange(Nq + 1, dtype=torch.int32, device=DEV) * Lq
        s = sparseops.maxsim_varlen(q.reshape(-1, dim), cu_q, d[keep], cu_d, backend="cuda")
        torch.testing.assert_close(s, got[0], rtol=1e-6, atol=1e-5)
    torch.cuda.synchronize()


def test_pairs_topk_and_varlen_pairs_on_triton():
    """The ops without a CUDA C++ kernel run Triton on CUDA tensors (auto)."""
    B, K, Lq, Ld = 64, 8, 32, 180
    q, _ = maxsim_inputs(B, Lq, 1, 1, 128, dtype=torch.bfloat16, device=DEV, seed=13)
    d = maxsim_inputs(1, 1, B * K, Ld, 128, dtype=torch.bfloat16, device=DEV, seed=14)[1].view(B, K, Ld, 128)
    assert sparseops.resolve_backend("maxsim_pairs", q) == "triton"
    got = sparseops.maxsim_pairs(q, d)
    want = torch.stack([maxsim_ref(q[b : b + 1], d[b])[0][0] for b in range(B)])
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-3)
    Nd = 3000
    docs = maxsim_inputs(1, 1, Nd, 100, 128, dtype=torch.bfloat16, device=DEV, seed=15)[1]
    cu_d = torch.arange(Nd + 1, dtype=torch.int32, device=DEV) * 100
    scores, ids = sparseops.maxsim_topk(q[:4], docs.reshape(-1, 128), cu_d, 10)
    full = _ref_chunked(q[:4], docs)[0]
    torch.testing.assert_close(scores, full.topk(10, dim=1).values, rtol=2e-5, atol=1e-3)
    cu_q = torch.arange(5, dtype=torch.int32, device=DEV) * Lq
    pairs = torch.tensor([[0, 5], [3, 2999], [1, 0], [0, 5]], device=DEV)
    assert sparseops.resolve_backend("maxsim_varlen", q, pairs) == "triton"
    s = sparseops.maxsim_varlen(q[:4].reshape(-1, 128), cu_q, docs.reshape(-1, 128), cu_d, pairs=pairs)
    torch.testing.assert_close(s, full[pairs[:, 0], pairs[:, 1]], rtol=2e-5, atol=1e-3)
