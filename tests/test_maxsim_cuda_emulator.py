"""The fused MaxSim CUDA forward, proven on the CPU: sparseops._C._maxsim_cuda_emulate runs
the kernel's own block body (csrc/include/sparseops/maxsim_fused.cuh) with ldmatrix, mma.sync,
shuffles and cp.async carried out from their PTX definitions, on the launch plan the GPU
launcher makes. Checked against the reference: scores and argmax bit for bit on exact inputs
(the tie grids of sparseops.testing), within the fp32 summation tolerance elsewhere; every
tile kind, chunking of long / many queries, documents cut between warps and blocks, ragged
tails, masks, PyLate masking, mean, packed (cu_seqlens) documents and queries with empty
ones. The emulator also fails on shared-memory or global reads out of bounds, a cp.async
group read before it is waited for (its bytes are poisoned until then), and warps whose
lanes reach different collectives.
"""

from __future__ import annotations

import pytest
import torch

import sparseops
from sparseops import _backend
from sparseops.reference import maxsim_ref
from sparseops.reference.maxsim import maxsim_varlen_ref
from sparseops.testing import maxsim_bool_mask, maxsim_inputs, maxsim_lengths

HAS_EMU = sparseops.build_info()["extension"] and hasattr(_backend._C, "_maxsim_cuda_emulate")
pytestmark = pytest.mark.skipif(not HAS_EMU, reason="C++ extension (with the emulator) not built")


def _emulate(
    q, d, q_mask=None, d_mask=None, *, reduce="sum", pylate=False, cu_q=None, cu_d=None, arg_dtype=torch.int16, **plan
):
    """scores, argmax (and the plan used) of the emulated CUDA kernel on prepared inputs. The
    argmax is int16 by default (what the op allocates below 2**15 document tokens)."""
    if cu_q is None:
        Nq, Lq, _ = q.shape
        Nd = d.shape[0]
        scores = torch.full((Nq, Nd), float("nan"))
        argmax = torch.full((Nq, Nd, Lq), -7, dtype=arg_dtype)
    else:
        Nq, Nd = cu_q.numel() - 1, cu_d.numel() - 1
        scores = torch.full((Nq, Nd), float("nan"))
        argmax = torch.full((Nd, q.shape[0]), -7, dtype=arg_dtype)
    prep = lambda m: None if m is None else (m.contiguous() if m.dtype == torch.bool else m.to(torch.int32))  # noqa: E731
    used = _backend._C._maxsim_cuda_emulate(
        q.contiguous(), d.contiguous(), prep(q_mask), prep(d_mask), cu_q, cu_d, reduce == "mean", pylate,
        scores, argmax, **plan,
    )  # fmt: skip
    return scores, argmax, used


def _check(q, d, *, exact=False, q_mask=None, d_mask=None, reduce="sum", pylate=False, **plan):
    scores, argmax, used = _emulate(q, d, q_mask, d_mask, reduce=reduce, pylate=pylate, **plan)
    kw = {"q_mask": q_mask, "d_mask": d_mask, "reduce": reduce, "pylate_mask": pylate}
    want, want_arg = maxsim_ref(q.float(), d.float(), **kw)
    if exact:
        assert torch.equal(scores, want), (used, (scores - want).abs().max())
        assert torch.equal(argmax, want_arg), used
    else:
        torch.testing.assert_close(scores, want, rtol=2e-5, atol=2e-5 * max(1, q.shape[1]), msg=used)
        assert torch.equal(argmax < 0, want_arg < 0), used
        sims = torch.einsum("nid,mjd->nmij", q.double(), d.double())
        live = argmax >= 0
        got = sims.gather(-1, argmax.clamp_min(0).long()[..., None])[..., 0]
        best = sims.gather(-1, want_arg.clamp_min(0).long()[..., None])[..., 0]
        torch.testing.assert_close(got[live], best[live], rtol=1e-5, atol=1e-5)
    return used


# (Nq, Lq, Nd, Ld, dim): one ColBERT-like query, several short queries sharing a chunk, a
# query longer than a chunk, ragged tails of every length mod 32, dim % 16 == 8 (padded K).
SHAPES = [(1, 32, 5, 75, 32), (3, 7, 4, 33, 16), (2, 40, 3, 31, 24), (1, 5, 7, 1, 8)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_tensor_core_tile_exact(dtype, shape):
    Nq, Lq, Nd, Ld, dim = shape
    q, d = maxsim_inputs(Nq, Lq, Nd, Ld, dim, dtype=dtype, seed=sum(shape), ties=True)
    used = _check(q, d, exact=True, tile="tc", ctas=2, max_warps=3)
    assert used.startswith("tc/")


@pytest.mark.parametrize("tile", ["simt", "simt_sync"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=[str(s) for s in SHAPES[:3]])
def test_ffma_tile_fp32(tile, shape):
    Nq, Lq, Nd, Ld, dim = shape
    q, d = maxsim_inputs(Nq, Lq, Nd, Ld, dim, seed=sum(shape) + 1)
    used = _check(q, d, tile=tile, ctas=2, max_warps=2)
    assert used.startswith(tile + "/")
    q, d = maxsim_inputs(Nq, Lq, Nd, Ld, dim, seed=sum(shape) + 2, ties=True)
    _check(q, d, exact=True, tile=tile, ctas=3, max_warps=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ffma_tile_for_unaligned_half_rows(dtype):
    """bf16 / fp16 rows that are not 16-byte aligned (dim % 8 != 0): element copies + FFMA."""
    q, d = maxsim_inputs(2, 9, 4, 37, 12, dtype=dtype, seed=3, ties=True)
    used = _check(q, d, exact=True, ctas=2, max_warps=2)
    assert used.startswith("simt_sync/")
    q, d = maxsim_inputs(1, 5, 3, 20, 7, dtype=dtype, seed=4)
    _check(q, d, ctas=1, max_warps=2)


def test_random_bf16_and_plans():
    """Random bf16 (sums round differently from the reference's): every chunk size (mtp),
    block count and warp count, including more warps than tokens."""
    q, d = maxsim_inputs(3, 21, 6, 45, 32, dtype=torch.bfloat16, seed=5)
    seen = set()
    for mtp, ctas, warps in [(1, 1, 4), (2, 2, 3), (4, 6, 2), (1, 6, 8)]:
        seen.add(_check(q, d, tile="tc", mtp=mtp, ctas=ctas, max_warps=warps))
    assert len(seen) == 4, seen


@pytest.mark.parametrize("kind", ["bool", "lengths"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("tile", ["tc", "simt"])
def test_masks(kind, reduce, tile):
    Nq, Lq, Nd, Ld, dim = 3, 11, 6, 41, 16
    dtype = torch.bfloat16 if tile == "tc" else torch.float32
    q, d = maxsim_inputs(Nq, Lq, Nd, Ld, dim, dtype=dtype, seed=6, ties=True)
    if kind == "bool":
        qm, dm = maxsim_bool_mask(Nq, Lq, seed=6), maxsim_bool_mask(Nd, Ld, seed=7)
        dm[2] = False  # a document without a real token scores 0
        qm[1] = False  # a query without a real token (mean: 0)
    else:
        qm = torch.tensor([11, 0, 4])
        dm = maxsim_lengths(Nd, Ld, seed=6)
        dm[1], dm[4] = 0, 1
    _check(q, d, exact=True, q_mask=qm, d_mask=dm, reduce=reduce, tile=tile, ctas=2, max_warps=3)


@pytest.mark.parametrize("tile", ["tc", "simt"])
def test_pylate_masking(tile):
    Nq, Lq, Nd, Ld, dim = 2, 9, 5, 35, 16
    dtype = torch.bfloat16 if tile == "tc" else torch.float32
    q, d = maxsim_inputs(Nq, Lq, Nd, Ld, dim, dtype=dtype, seed=8, ties=True, negative=True)
    dm = maxsim_bool_mask(Nd, Ld, seed=8)
    dm[3] = False
    qm = maxsim_bool_mask(Nq, Lq, seed=9)
    # negative=True shifts the grid by 0.01: not exact in 16 bits, so within tolerance.
    _check(q, d, q_mask=qm, d_mask=dm, pylate=True, tile=tile, ctas=2, max_warps=2)


def test_all_negative_and_single_token_documents():
    q, d = maxsim_inputs(2, 6, 9, 1, 32, dtype=torch.bfloat16, seed=10, negative=True)
    _check(q, d, ctas=4, max_warps=3)


def _packed(lengths, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = ((torch.randn(int(sum(lengths)), dim, generator=g).clamp(-1, 1) * 2).round() / 2).to(dtype)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return x, cu


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_documents_and_queries(reduce, dtype):
    """maxsim_varlen's all-pairs form: ragged documents balanced by tokens across blocks and
    warps (cut anywhere), empty documents and queries, including at the very ends."""
    q_lens = [0, 5, 33, 0, 2, 0]
    d_lens = [0, 70, 3, 0, 0, 41, 1, 96, 0]
    q, cu_q = _packed(q_lens, 16, dtype, 11)
    d, cu_d = _packed(d_lens, 16, dtype, 12)
    want, want_arg = maxsim_varlen_ref(q.float(), cu_q, d.float(), cu_d, reduce=reduce)
    for ctas, warps, mtp in [(1, 1, 1), (3, 4, 1), (5, 2, 2), (9, 8, 1)]:
        scores, argmax, used = _emulate(
            q, d, cu_q=cu_q, cu_d=cu_d, reduce=reduce, ctas=ctas, max_warps=warps, mtp=mtp
        )  # fmt: skip
        assert torch.equal(scores, want), (used, scores, want)
        assert torch.equal(argmax, want_arg), used


@pytest.mark.parametrize("tile,dtype", [("tc", torch.bfloat16), ("simt", torch.float32)])
def test_int32_argmax_holds_the_same_indices(tile, dtype):
    """The kernel writes whichever argmax dtype the op allocated: int32 (2**15 or more
    document tokens) gives the same indices as int16, padded and packed, -1 included."""
    q, d = maxsim_inputs(3, 9, 4, 40, 16, dtype=dtype, seed=21, ties=True)
    dm = maxsim_bool_mask(4, 40, seed=22)
    dm[1] = False
    _, narrow, _ = _emulate(q, d, None, dm, tile=tile, arg_dtype=torch.int16)
    _, wide, _ = _emulate(q, d, None, dm, tile=tile, arg_dtype=torch.int32)
    assert narrow.dtype == torch.int16 and wide.dtype == torch.int32
    assert torch.equal(narrow, wide) and (wide[:, 1] == -1).all() and (wide >= 0).any()
    x, cu_q = _packed([0, 5, 9], 16, torch.float32, 23)
    y, cu_d = _packed([7, 0, 30], 16, torch.float32, 24)
    _, narrow, _ = _emulate(x, y, cu_q=cu_q, cu_d=cu_d, arg_dtype=torch.int16)
    _, wide, _ = _emulate(x, y, cu_q=cu_q, cu_d=cu_d, arg_dtype=torch.int32)
    assert torch.equal(narrow, wide) and torch.equal(wide, maxsim_varlen_ref(x, cu_q, y, cu_d)[1])


def test_every_warp_cut_of_one_document():
    """One long document spread over every warp of several blocks' worth of tokens, and a
    block count above the document count (blocks without documents return at once)."""
    q, d = maxsim_inputs(1, 32, 2, 300, 32, dtype=torch.bfloat16, seed=13, ties=True)
    for ctas, warps in [(1, 8), (2, 5), (4, 8)]:
        _check(q, d, exact=True, tile="tc", ctas=ctas, max_warps=warps)


def test_shared_memory_limit_lowers_the_warp_count():
    q, d = maxsim_inputs(1, 8, 3, 40, 64, dtype=torch.bfloat16, seed=14, ties=True)
    big = _check(q, d, exact=True, tile="tc", ctas=1)
    small = _check(q, d, exact=True, tile="tc", ctas=1, max_smem=25000)
    assert "/warps8/" in big and "/warps1/" in small, (big, small)
    with pytest.raises(RuntimeError, match="does not fit"):
        _emulate(q, d, tile="tc", max_smem=4000)
