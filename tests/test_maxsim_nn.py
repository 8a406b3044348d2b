"""sparseops.nn.MaxSimScorer and the contrastive late-interaction loss
(MaxSimContrastiveLoss / maxsim_contrastive_loss): values and gradients against a naive einsum
implementation (masks, ragged lengths, hard negatives, packed tokens, PyLate's masking),
gradcheck in fp64, bounded memory, a torch.compile'd training step and bad inputs. The
comparison with PyLate's own Contrastive loss is in tests/test_maxsim_integrations.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import sparseops
from conftest import backend_params
from sparseops.nn import MaxSimContrastiveLoss, MaxSimScorer, maxsim_contrastive_loss
from sparseops.testing import maxsim_bool_mask, maxsim_inputs, maxsim_lengths

HAS_C = sparseops.build_info()["extension"]
pytestmark = pytest.mark.skipif(not HAS_C, reason="C++ extension not built")


# ---------------------------------------------------------------------------------------------
# The naive einsum formulation (what PyLate / colpali compute): the oracle of this file.


def _valid(mask, n, length):
    if mask is None:
        return torch.ones(n, length, dtype=torch.bool)
    if mask.dtype == torch.bool:
        return mask
    return torch.arange(length)[None, :] < mask[:, None]


def naive_scores(q, d, q_mask=None, d_mask=None, *, reduce="sum", similarity="dot", pylate=False):
    """[Nq, Nd] = reduce_i max_j <q_i, d_j> from the full [Nq, Nd, Lq, Ld] einsum, autograd by torch."""
    if similarity == "cosine":
        q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    Nq, Lq, _ = q.shape
    Nd, Ld, _ = d.shape
    qv, dv = _valid(q_mask, Nq, Lq), _valid(d_mask, Nd, Ld)
    sim = torch.einsum("aid,bjd->abij", q, d)
    if pylate:
        sim = sim * dv[None, :, None, :]
        best = sim.amax(dim=-1) if Ld else sim.new_zeros(Nq, Nd, Lq)
    else:
        sim = sim.masked_fill(~dv[None, :, None, :], float("-inf"))
        best = sim.amax(dim=-1) if Ld else sim.new_full((Nq, Nd, Lq), float("-inf"))
        best = torch.where(dv.any(-1)[None, :, None], best, torch.zeros((), dtype=best.dtype))
    best = torch.where(qv[:, None, :], best, torch.zeros((), dtype=best.dtype))
    s = best.sum(-1)
    if reduce == "mean":
        s = s / qv.sum(-1).clamp_min(1)[:, None].to(s.dtype)
    return s


def naive_loss(q, d, q_mask=None, d_mask=None, *, temperature=1.0, in_batch=True, reduction="mean", **kw):
    B = q.shape[0]
    if d.dim() == 3:
        d = d.unsqueeze(1)
        d_mask = None if d_mask is None else d_mask.unsqueeze(1)
    N, Ld, dim = d.shape[1:]
    if in_batch:
        dm = None if d_mask is None else d_mask.reshape(B * N, *d_mask.shape[2:])
        s = naive_scores(q, d.reshape(B * N, Ld, dim), q_mask, dm, **kw)
        labels = torch.arange(B) * N
    else:
        rows = []
        for b in range(B):  # the oracle may loop
            qm = None if q_mask is None else q_mask[b : b + 1]
            dm = None if d_mask is None else d_mask[b]
            rows.append(naive_scores(q[b : b + 1], d[b], qm, dm, **kw)[0])
        s = torch.stack(rows)
        labels = torch.zeros(B, dtype=torch.int64)
    return F.cross_entropy(s / temperature, labels, reduction=reduction)


def _batch(B, N, Lq, Ld, dim, *, dtype=torch.float64, seed=0):
    q, d = maxsim_inputs(B, Lq, B * N, Ld, dim, dtype=dtype, seed=seed)
    return q.clone().requires_grad_(True), d.view(B, N, Ld, dim).clone().requires_grad_(True)


def _masks(kind, B, N, Lq, Ld, seed):
    if kind is None:
        return None, None
    if kind == "lengths":
        return maxsim_lengths(B, Lq, low=1, seed=seed), maxsim_lengths(B * N, Ld, seed=seed + 1).view(B, N)
    return maxsim_bool_mask(B, Lq, seed=seed), maxsim_bool_mask(B * N, Ld, seed=seed + 1).view(B, N, Ld)


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


# ---------------------------------------------------------------------------------------------
# Values and gradients against the naive einsum


@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("masks", [None, "lengths", "bool"])
@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("pylate", [False, True])
def test_loss_matches_naive_einsum(N, masks, in_batch, pylate):
    B, Lq, Ld, dim = 5, 7, 11, 16
    q, d = _batch(B, N, Lq, Ld, dim, seed=N)
    qm, dm = _masks(masks, B, N, Lq, Ld, seed=N)
    for reduce, similarity, t in (("sum", "dot", 1.0), ("mean", "cosine", 0.05)):
        kw = dict(reduce=reduce, similarity=similarity, pylate=pylate)
        got = maxsim_contrastive_loss(
            q, d, q_mask=qm, d_mask=dm, temperature=t, in_batch_negatives=in_batch, reduce=reduce,
            similarity=similarity, pylate_mask=pylate,
        )  # fmt: skip
        want = naive_loss(q, d, qm, dm, temperature=t, in_batch=in_batch, **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        for g, w in zip(_grads(got, q, d), _grads(want, q, d)):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("device,backend", backend_params("maxsim"))
def test_every_backend(device, backend):
    """The loss and the scorer through each backend of the ops (tiny: Triton runs under its
    interpreter here)."""
    B, N, Lq, Ld, dim = 3, 2, 4, 5, 16
    q, d = _batch(B, N, Lq, Ld, dim, dtype=torch.float32, seed=31)
    dl = maxsim_lengths(B * N, Ld, seed=31).view(B, N)
    got = maxsim_contrastive_loss(q.to(device), d.to(device), d_mask=dl.to(device), temperature=0.5, backend=backend)
    want = naive_loss(q, d, None, dl, temperature=0.5)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    for g, w in zip(_grads(got, q, d), _grads(want, q, d)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    s = MaxSimScorer(backend=backend)(q.detach().to(device), d.detach()[:, 0].to(device), pairwise=True)
    torch.testing.assert_close(s.cpu(), naive_scores(q.detach(), d.detach()[:, 0]).diagonal(), rtol=1e-5, atol=1e-5)


def test_positives_only_and_reductions():
    """d [B, Ld, dim] (no hard negatives): in-batch negatives only; reduction sum / none; label smoothing."""
    B, Lq, Ld, dim = 6, 5, 9, 8
    q, d4 = _batch(B, 1, Lq, Ld, dim, seed=3)
    d = d4[:, 0]
    dl = maxsim_lengths(B, Ld, seed=3)
    for reduction in ("sum", "none"):
        got = maxsim_contrastive_loss(q, d, d_mask=dl, reduction=reduction)
        want = naive_loss(q, d, None, dl, reduction=reduction)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got, logits = maxsim_contrastive_loss(q, d, d_mask=dl, label_smoothing=0.1, temperature=0.5, return_scores=True)
    s = naive_scores(q, d, None, dl)
    torch.testing.assert_close(logits, s / 0.5, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, F.cross_entropy(s / 0.5, torch.arange(B), label_smoothing=0.1))


def test_ragged_lengths_with_empty_documents_and_queries():
    """Length-0 documents score 0, length-0 queries have all-zero logits (loss log(C))."""
    B, N, Lq, Ld, dim = 4, 2, 6, 8, 16
    q, d = _batch(B, N, Lq, Ld, dim, seed=5)
    ql = torch.tensor([6, 0, 1, 3])
    dl = torch.tensor([[8, 0], [1, 5], [0, 0], [7, 8]])
    got, logits = maxsim_contrastive_loss(q, d, q_mask=ql, d_mask=dl, reduction="none", return_scores=True)
    want = naive_loss(q, d, ql, dl, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.all(logits[:, [1, 4, 5]] == 0) and torch.all(logits[1] == 0)
    torch.testing.assert_close(got[1], torch.tensor(B * N, dtype=torch.float64).log())
    gq, gd = _grads(got.sum(), q, d)
    for g, w in zip((gq, gd), _grads(want.sum(), q, d)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    # masked tokens take no gradient
    assert torch.all(gq[1] == 0) and torch.all(gd[0, 1] == 0) and torch.all(gd[0, 0, 8:] == 0)


@pytest.mark.parametrize("in_batch", [True, False])
def test_packed_equals_padded(in_batch):
    """Packed tokens (cu_q / cu_d, document b * N + k = query b's slot k) give the padded loss
    with lengths, and the same gradients on the real tokens."""
    B, N, Lq, Ld, dim = 4, 3, 7, 10, 16
    q, d = _batch(B, N, Lq, Ld, dim, seed=7)
    ql = maxsim_lengths(B, Lq, low=1, seed=7)
    dl = maxsim_lengths(B * N, Ld, seed=8).view(B, N)
    qv, dv = _valid(ql, B, Lq), _valid(dl.reshape(-1), B * N, Ld)
    qp = q.detach()[qv].clone().requires_grad_(True)
    dp = d.detach().reshape(B * N, Ld, dim)[dv].clone().requires_grad_(True)
    cu_q = F.pad(torch.cumsum(ql, 0), (1, 0)).to(torch.int32)
    cu_d = F.pad(torch.cumsum(dl.reshape(-1), 0), (1, 0)).to(torch.int32)
    got = maxsim_contrastive_loss(qp, dp, cu_q=cu_q, cu_d=cu_d, in_batch_negatives=in_batch, temperature=0.3)
    want = maxsim_contrastive_loss(q, d, q_mask=ql, d_mask=dl, in_batch_negatives=in_batch, temperature=0.3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    gqp, gdp = _grads(got, qp, dp)
    gq, gd = _grads(want, q, d)
    torch.testing.assert_close(gqp, gq[qv], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gdp, gd.reshape(B * N, Ld, dim)[dv], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(dtype):
    """fp32 / bf16 embeddings: scores accumulate in fp32, so the loss is the fp64 einsum loss of
    the same (rounded) inputs to fp32 accuracy; gradients come back in the input dtype."""
    B, N, Lq, Ld, dim = 8, 2, 16, 33, 64
    q, d = _batch(B, N, Lq, Ld, dim, dtype=dtype, seed=11)
    got = maxsim_contrastive_loss(q, d, temperature=0.1)
    want = naive_loss(q.double(), d.double(), temperature=0.1)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    gq, gd = _grads(got, q, d)
    assert gq.dtype == dtype and gd.dtype == dtype
    wq, wd = _grads(want, *(x for x in (q, d)))  # through .double(): grads in the input dtype
    torch.testing.assert_close(gq.float(), wq.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-4)
    torch.testing.assert_close(gd.float(), wd.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-4)


def test_gradcheck_fp64():
    B, N, Lq, Ld, dim = 3, 2, 3, 4, 5
    q, d = _batch(B, N, Lq, Ld, dim, seed=13)
    ql = torch.tensor([3, 1, 2])
    dm = maxsim_bool_mask(B * N, Ld, seed=13).view(B, N, Ld)
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def f(q, d, t):
        return maxsim_contrastive_loss(q, d, q_mask=ql, d_mask=dm, temperature=t, similarity="cosine")

    assert torch.autograd.gradcheck(f, (q, d, t))

    def g(q, d):
        return maxsim_contrastive_loss(q, d, in_batch_negatives=False, reduce="mean", pylate_mask=True, d_mask=dm)

    assert torch.autograd.gradcheck(g, (q, d))


# ---------------------------------------------------------------------------------------------
# MaxSimScorer


def test_scorer_modes_equal_the_ops():
    q, d = maxsim_inputs(3, 5, 4, 7, 16, seed=17)
    ql, dl = maxsim_lengths(3, 5, seed=17), maxsim_lengths(4, 7, seed=18)
    sc = MaxSimScorer()
    torch.testing.assert_close(sc(q, d, q_mask=ql, d_mask=dl), sparseops.maxsim(q, d, q_mask=ql, d_mask=dl))
    torch.testing.assert_close(sc(q[0], d), sparseops.maxsim(q[0], d))
    dp = d[:3]
    torch.testing.assert_close(sc(q, dp, pairwise=True), sparseops.maxsim_pairs(q, dp))
    d4 = maxsim_inputs(1, 1, 6, 7, 16, seed=19)[1].view(3, 2, 7, 16)
    torch.testing.assert_close(sc(q, d4), sparseops.maxsim_pairs(q, d4))
    cosine = MaxSimScorer(reduce="mean", similarity="cosine", pylate_mask=True, temperature=0.5)
    want = sparseops.maxsim(q, d, d_mask=dl, reduce="mean", similarity="cosine", pylate_mask=True) / 0.5
    torch.testing.assert_close(cosine(q, d, d_mask=dl), want)
    qp, cu_q = q.reshape(-1, 16), torch.tensor([0, 5, 10, 15], dtype=torch.int32)
    dp2, cu_d = d.reshape(-1, 16), torch.tensor([0, 7, 14, 21, 28], dtype=torch.int32)
    torch.testing.assert_close(sc(qp, dp2, cu_q=cu_q, cu_d=cu_d), sparseops.maxsim(q, d))
    pairs = torch.tensor([[0, 3], [2, 1]])
    torch.testing.assert_close(sc(qp, dp2, cu_q=cu_q, cu_d=cu_d, pairs=pairs), sparseops.maxsim(q, d)[[0, 2], [3, 1]])


def test_learnable_temperature():
    q, d = _batch(4, 2, 5, 6, 8, dtype=torch.float32, seed=21)
    sc = MaxSimScorer(temperature=0.2, learnable_temperature=True, min_temperature=0.01)
    names = [n for n, _ in sc.named_parameters()]
    assert names == ["_temperature.log_temperature"]
    torch.testing.assert_close(sc.temperature, torch.tensor(0.2))
    s = sc(q, d.reshape(8, 6, 8))
    torch.testing.assert_close(s, sparseops.maxsim(q, d.reshape(8, 6, 8)) / 0.2)
    loss_mod = MaxSimContrastiveLoss(temperature=0.2, learnable_temperature=True)
    opt = torch.optim.SGD(list(loss_mod.parameters()) + [q, d], lr=0.1)
    before = float(loss_mod.temperature.detach())
    loss = loss_mod(q, d)
    loss.backward()
    assert loss_mod._temperature.log_temperature.grad is not None and q.grad is not None
    opt.step()
    assert float(loss_mod.temperature.detach()) != before
    with torch.no_grad():
        loss_mod._temperature.log_temperature.fill_(-20.0)
    torch.testing.assert_close(loss_mod.temperature, torch.tensor(1e-3))
    # the functional form with the same temperature gives the same loss
    torch.testing.assert_close(
        MaxSimContrastiveLoss(temperature=0.3)(q, d), maxsim_contrastive_loss(q, d, temperature=0.3)
    )
    assert "log_temperature" in "".join(loss_mod.state_dict())
    assert not list(MaxSimScorer().parameters())


# ---------------------------------------------------------------------------------------------
# Memory: nothing of size Lq x Ld per (query, document) pair is created, forward or backward


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_bounded():
    B, N, Lq, Ld, dim = 16, 2, 32, 64, 32
    q, d = _batch(B, N, Lq, Ld, dim, dtype=torch.float32, seed=23)
    dl = maxsim_lengths(B * N, Ld, seed=23).view(B, N)
    with _LargestTensor() as mode:
        loss = maxsim_contrastive_loss(q, d, d_mask=dl, similarity="cosine", temperature=0.05)
        loss.backward()
    sims = B * B * N * Lq * Ld  # what the einsum formulation writes
    bound = max(d.numel(), B * B * N * Lq)  # the inputs / the int32 argmax
    assert mode.largest <= bound < sims // 8, (mode.largest, bound, sims)
    with _LargestTensor() as mode:
        naive_loss(q, d, None, dl).backward()
    assert mode.largest >= sims  # the check above can fail


# ---------------------------------------------------------------------------------------------
# torch.compile of a training step


def test_torch_compile_training_step():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    loss_mod = MaxSimContrastiveLoss(temperature=0.1, learnable_temperature=True, similarity="cosine")
    proj = torch.nn.Linear(16, 16, dtype=torch.float64)

    def step(q, d, dl):
        return loss_mod(proj(q), proj(d), d_mask=dl)

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    for B in (3, 5, 7, 11):
        q, d = _batch(B, 2, 4, 13, 16, seed=B)  # no size equal to another (duck sizing would tie them)
        dl = maxsim_lengths(B * 2, 13, seed=B).view(B, 2).clone()
        want = step(q, d, dl)  # eager first: see the note below
        got = compiled(q, d, dl)
        torch.testing.assert_close(got, want)
        gw = torch.autograd.grad(want, [proj.weight, loss_mod._temperature.log_temperature, q])
        gg = torch.autograd.grad(got, [proj.weight, loss_mod._temperature.log_temperature, q])
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b)
    # One graph for every batch size. (The eager call comes first: dynamo guards on the backend
    # registry's cache (sparseops._backend.Op.choose), so an eager call that adds its first
    # entry after a compiled one costs one recompile.)
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs():
    q, d = _batch(3, 2, 4, 5, 8, seed=29)
    with pytest.raises(ValueError, match=r"d must be \[B, Ld, dim\].*B = q.shape\[0\] = 3"):
        maxsim_contrastive_loss(q, d[:2])
    with pytest.raises(ValueError, match="q must be"):
        maxsim_contrastive_loss(q[0], d)
    with pytest.raises(ValueError, match="reduction"):
        maxsim_contrastive_loss(q, d, reduction="max")
    with pytest.raises(ValueError, match="temperature must be positive"):
        maxsim_contrastive_loss(q, d, temperature=0.0)
    qp, dp = q.detach().reshape(-1, 8), d.detach().reshape(-1, 8)
    cu_q = torch.tensor([0, 4, 8, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_q and cu_d go together"):
        maxsim_contrastive_loss(qp, dp, cu_q=cu_q)
    with pytest.raises(ValueError, match="N per query"):
        maxsim_contrastive_loss(qp, dp, cu_q=cu_q, cu_d=torch.tensor([0, 10, 20, 30], dtype=torch.int32)[:3])
    with pytest.raises(ValueError, match="take no masks"):
        cu_d = torch.tensor([0, 5, 10, 15, 20, 25, 30], dtype=torch.int32)
        maxsim_contrastive_loss(qp, dp, cu_q=cu_q, cu_d=cu_d, d_mask=torch.ones(6, dtype=torch.int64))
    with pytest.raises(ValueError, match="packed tokens"):
        maxsim_contrastive_loss(q, d, cu_q=cu_q, cu_d=cu_q)
    with pytest.raises(ValueError, match="temperature must be a positive"):
        MaxSimScorer(temperature=-1.0)
    with pytest.raises(ValueError, match="reduce"):
        MaxSimScorer(reduce="max")
    with pytest.raises(ValueError, match="similarity"):
        MaxSimContrastiveLoss(similarity="l2")
    with pytest.raises(ValueError, match="pairs goes with packed tokens"):
        MaxSimScorer()(q, d[:, 0], pairs=torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="d_mask"):  # the op's own check names the argument
        maxsim_contrastive_loss(q, d, d_mask=torch.ones(3, 2, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# GPU, production size (issue 7's training goal: B = 128 fwd + bwd with <= 50 MB extra memory)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_in_batch_training_step_b128():
    B, N, Lq, Ld, dim = 128, 2, 32, 300, 128
    q, d = maxsim_inputs(B, Lq, B * N, Ld, dim, dtype=torch.bfloat16, device="cuda", seed=41)
    q = q.requires_grad_(True)
    d = d.view(B, N, Ld, dim).requires_grad_(True)
    dl = maxsim_lengths(B * N, Ld, low=50, device="cuda", seed=41).view(B, N)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = maxsim_contrastive_loss(q, d, d_mask=dl, temperature=0.05)
    gq, gd = torch.autograd.grad(loss, (q, d))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # the gradients themselves (bf16, like the inputs) and their fp32 accumulators are
    # counted; the [B, B*N, Lq, Ld] similarities (1.26 GB in fp32) must not be
    grads = (q.numel() + d.numel()) * (2 + 4)
    assert extra <= grads + 50 * 2**20, (extra, grads)
    want = naive_loss(q.detach().double().cpu(), d.detach().double().cpu(), None, dl.cpu(), temperature=0.05)
    torch.testing.assert_close(loss.double().cpu(), want, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(gq).all() and torch.isfinite(gd).all()
