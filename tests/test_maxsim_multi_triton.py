"""The multi-query Triton MaxSim forward (kernels/maxsim_multi.py) under the interpreter:
every path against the reference on small shapes, bit for bit on exact inputs. Row blocks
holding several whole queries and queries cut into parts (partial sums added on the host),
document tiles straddling documents and tiles holding many documents, masks of both kinds,
empty documents, PyLate masking, mean, dim not a power of two and dim split over K chunks.
The interpreter runs one program at a time, so shapes stay small (a few dozen programs).
"""

from __future__ import annotations

import pytest
import torch

import sparseops
from conftest import HAS_CUDA
from sparseops.reference import maxsim_ref
from sparseops.testing import maxsim_bool_mask, maxsim_inputs, maxsim_lengths

HAS_C = sparseops.build_info()["extension"]
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(HAS_CUDA, reason="interpreter tests (the GPU runs these paths in test_maxsim_gpu.py)"),
]

_KIND = {None: 0, "bool": 1, "lengths": 2}


def _run(q, d, q_mask=None, d_mask=None, *, reduce="sum", pylate=False, block_m=None, block_k=None):
    from sparseops.kernels.maxsim_multi import maxsim_multi_query_triton

    Nq, Lq, _ = q.shape
    Nd = d.shape[0]
    scores = torch.full((Nq, Nd), float("nan"))
    argmax = torch.full((Nq, Nd, Lq), -7, dtype=torch.int32)

    def kind(m):
        return 0 if m is None else (1 if m.dtype == torch.bool else 2)

    def prep(m):
        return None if m is None else (m.contiguous() if m.dtype == torch.bool else m.to(torch.int32).contiguous())

    maxsim_multi_query_triton(
        q.contiguous(), d.contiguous(), prep(q_mask), prep(d_mask), kind(q_mask), kind(d_mask), reduce == "mean",
        pylate, scores, argmax, block_m=block_m, block_k=block_k,
    )  # fmt: skip
    return scores, argmax


def _check(q, d, *, exact, block_m=None, block_k=None, **kw):
    scores, argmax = _run(q, d, kw.get("q_mask"), kw.get("d_mask"), reduce=kw.get("reduce", "sum"),
                          pylate=kw.get("pylate_mask", False), block_m=block_m, block_k=block_k)  # fmt: skip
    want, want_arg = maxsim_ref(q, d, **kw)
    if exact:
        assert torch.equal(scores, want), (scores - want).abs().max()
        assert torch.equal(argmax, want_arg)
    else:
        torch.testing.assert_close(scores, want, rtol=2e-5, atol=2e-5 * q.shape[1])
        assert torch.equal(argmax < 0, want_arg < 0)


# (Nq, Lq, Nd, Ld, dim, block_m, block_k): several queries per block (16 // 5 = 3 per block,
# rows past 15 idle), queries cut into parts (Lq 37 > 16), documents shorter than a 16-token
# tile (many per tile), one-token documents, dim 24 (padded K), dim 40 in three K chunks.
SHAPES = [
    (4, 5, 3, 21, 16, None, None),
    (2, 37, 3, 18, 16, None, None),
    (3, 4, 5, 3, 24, None, None),
    (1, 16, 4, 1, 32, None, None),
    (2, 6, 2, 40, 40, 32, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_exact_on_tie_grids(dtype, shape):
    Nq, Lq, Nd, Ld, dim, block_m, block_k = shape
    q, d = maxsim_inputs(Nq, Lq, Nd, Ld, dim, dtype=dtype, seed=Nq + Ld + dim, ties=True)
    _check(q, d, exact=True, block_m=block_m, block_k=block_k)


def test_fp16():
    q, d = maxsim_inputs(3, 7, 4, 21, 24, dtype=torch.float16, seed=7, ties=True)
    _check(q, d, exact=True)


def test_random_fp32():
    q, d = maxsim_inputs(3, 9, 4, 27, 48, seed=1)
    _check(q, d, exact=False)
    _check(q, d, exact=False, block_m=16)


@pytest.mark.parametrize("kind", ["bool", "lengths"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("lq", [6, 37])
def test_masks(kind, reduce, lq):
    Nq, Nd, Ld, dim = 3, 5, 19, 16
    q, d = maxsim_inputs(Nq, lq, Nd, Ld, dim, seed=2, ties=True)
    if kind == "bool":
        qm, dm = maxsim_bool_mask(Nq, lq, seed=2), maxsim_bool_mask(Nd, Ld, seed=3)
        dm[1] = False
        qm[2] = False
    else:
        qm = torch.tensor([lq, 0, 3])
        dm = maxsim_lengths(Nd, Ld, seed=2)
        dm[0], dm[3] = 0, 1
    _check(q, d, exact=True, q_mask=qm, d_mask=dm, reduce=reduce)


def test_pylate_masking():
    q, d = maxsim_inputs(3, 5, 4, 23, 16, seed=4, ties=True, negative=True)
    dm = maxsim_bool_mask(4, 23, seed=4)
    dm[2] = False
    _check(q, d, exact=True, d_mask=dm, q_mask=maxsim_bool_mask(3, 5, seed=5), pylate_mask=True)


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
def test_the_launcher_picks_it_for_many_query_rows():
    """backend="triton" on many query rows runs the multi-query kernel (and agrees with the
    per-query kernel, forced on the same inputs)."""
    from sparseops.kernels.maxsim import maxsim_triton, use_multi_query

    q, d = maxsim_inputs(5, 16, 3, 20, 16, dtype=torch.bfloat16, seed=6, ties=True)
    assert use_multi_query(5 * 16, 16, torch.bfloat16) and not use_multi_query(32, 16, torch.bfloat16)
    assert not use_multi_query(5 * 16, 8, torch.bfloat16) and not use_multi_query(80, 16, torch.float64)
    got = sparseops.maxsim(q, d, backend="triton", return_argmax=True)
    want = maxsim_ref(q, d)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    scores = torch.empty(5, 3)
    argmax = torch.empty(5, 3, 16, dtype=torch.int32)
    maxsim_triton(q, d, None, None, "none", "none", "sum", scores, argmax, multi_query=False)
    assert torch.equal(scores, want[0]) and torch.equal(argmax, want[1])
