"""The Triton MaxSim backward (kernels/maxsim_backward.py) under the interpreter: both dd
paths (the GPU's counting sort by document row, the per-document one-hot kernel) and the
pair-blocked dq against the reference backward, on the pair layouts of maxsim, maxsim_varlen
with a pairs list (ragged, with empty queries and repeated pairs) and maxsim_pairs; and both
dd paths give the same bits twice (deterministic)."""

from __future__ import annotations

import pytest
import torch

import sparseops
from conftest import HAS_CUDA
from sparseops.reference.maxsim import maxsim_backward_ref
from sparseops.testing import maxsim_inputs

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(HAS_CUDA, reason="interpreter tests (a GPU runs the backward in test_maxsim_gpu.py)"),
    pytest.mark.skipif(not sparseops.build_info()["extension"], reason="C++ extension not built"),
]


def _maxsim_case():
    q, d = maxsim_inputs(3, 5, 4, 9, 16, seed=1)
    _, argmax = sparseops.maxsim(q, d, d_mask=torch.tensor([9, 0, 4, 1]), backend="reference", return_argmax=True)
    Nq, Lq, dim = q.shape
    Nd, Ld, _ = d.shape
    n = torch.arange(Nq)[:, None].expand(Nq, Nd).reshape(-1)
    m = torch.arange(Nd)[None, :].expand(Nq, Nd).reshape(-1)
    meta = torch.stack([n, n * Lq, torch.full_like(n, Lq), m, m * Ld, (n * Nd + m) * Lq], 1)
    grad = torch.randn(Nq * Nd, generator=torch.Generator().manual_seed(2))
    return grad, q.reshape(-1, dim), d.reshape(-1, dim), argmax.reshape(-1), meta, Nq, Nd


def _varlen_pairs_case():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(12, 16, generator=g)
    d = torch.randn(20, 16, generator=g)
    cu_q = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    cu_d = torch.tensor([0, 7, 7, 20], dtype=torch.int32)
    pairs = torch.tensor([[0, 2], [2, 0], [1, 2], [2, 2], [0, 2], [2, 1]])
    _, argmax = sparseops.maxsim_varlen(q, cu_q, d, cu_d, pairs=pairs, backend="reference", return_argmax=True)
    cq, cd = cu_q.long(), cu_d.long()
    n, m = pairs[:, 0], pairs[:, 1]
    lens = cq[n + 1] - cq[n]
    off = torch.cumsum(lens, 0) - lens
    meta = torch.stack([n, cq[n], lens, m, cd[m], off], 1)
    grad = torch.randn(len(pairs), generator=g)
    return grad, q, d, argmax, meta, 3, 3


@pytest.mark.parametrize("arg_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("case", [_maxsim_case, _varlen_pairs_case], ids=["maxsim", "varlen-pairs"])
def test_both_dd_paths_match_the_reference(case, arg_dtype):
    from sparseops.kernels.maxsim_backward import maxsim_backward_triton

    grad, q, d, argmax, meta, num_q, num_d = case()
    argmax = argmax.to(arg_dtype)  # the forward saves int16 below 2**15 document tokens
    want_dq, want_dd = maxsim_backward_ref(grad, q, d, argmax, meta, True, True)
    for sorted_dd in (True, False):
        bits = []
        for _ in range(2):
            dq, dd = torch.full_like(q, float("nan")), torch.full_like(d, float("nan"))
            maxsim_backward_triton(grad, q, d, argmax, meta, num_q, num_d, dq, dd, sorted_dd=sorted_dd)
            torch.testing.assert_close(dq, want_dq, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(dd, want_dd, rtol=1e-5, atol=1e-6)
            bits.append((dq, dd))
        assert torch.equal(bits[0][0], bits[1][0]) and torch.equal(bits[0][1], bits[1][1])
