"""sparseops.MaxSimIndex: search against a brute-force top-k (every score by the einsum
reference, a stable sort: ties to the earlier document), incremental adds in every input form,
amortised growth, remove, candidates, sharding, normalisation, dtype moves, save / load in both
formats, the empty index, k past the corpus and bad inputs."""

from __future__ import annotations

import pytest
import torch

import sparseops
import sparseops.maxsim_index as mi
from conftest import backend_params
from sparseops import MaxSimIndex
from sparseops.reference.maxsim import maxsim_normalize_ref, maxsim_ref
from sparseops.testing import maxsim_inputs, maxsim_lengths

HAS_C = sparseops.build_info()["extension"]
HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_C, reason="C++ extension not built")


def _docs(n, L, dim, *, seed=0, low=0, dtype=torch.float32, ties=False):
    """n documents as a list of [L_i, dim] tensors, lengths in [low, L]."""
    _, d = maxsim_inputs(1, 1, n, L, dim, dtype=dtype, seed=seed, ties=ties)
    lens = maxsim_lengths(n, L, low=low, seed=seed)
    return [d[i, : int(lens[i])].clone() for i in range(n)]


def brute_force(q, docs, k, *, q_mask=None, candidates=None, reduce="sum", cosine=False):
    """(scores [Nq, k], positions [Nq, k]) from every einsum score, best first, ties to the
    lower position, padded with -inf / -1."""
    dim = q.shape[-1]
    L = max([x.shape[0] for x in docs], default=0)
    padded = torch.zeros(len(docs), L, dim, dtype=q.dtype)
    for i, x in enumerate(docs):
        padded[i, : x.shape[0]] = x
    lens = torch.tensor([x.shape[0] for x in docs], dtype=torch.int64)
    if cosine:
        q, padded = maxsim_normalize_ref(q), maxsim_normalize_ref(padded)
    full = maxsim_ref(q, padded, q_mask=q_mask, d_mask=lens, reduce=reduce)[0]
    acc = full.dtype
    out_s = torch.full((q.shape[0], k), float("-inf"), dtype=acc)
    out_i = torch.full((q.shape[0], k), -1, dtype=torch.int64)
    for n in range(q.shape[0]):
        ids = torch.arange(len(docs)) if candidates is None else torch.as_tensor(
            candidates if not isinstance(candidates[0], list) else candidates[n]
        )  # fmt: skip
        ids = ids[ids >= 0].sort(stable=True).values  # ties go to the lower document
        vals = full[n, ids]
        order = torch.argsort(vals, descending=True, stable=True)  # ids ascending in, ties stay low
        take = min(k, ids.numel())
        out_s[n, :take], out_i[n, :take] = vals[order[:take]], ids[order[:take]]
    return out_s, out_i


# ---------------------------------------------------------------------------------------------
# search == brute force


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_search_equals_brute_force(dtype, reduce):
    docs = _docs(97, 40, 32, seed=1, dtype=dtype)  # lengths 0 ... 40
    index = MaxSimIndex(32, dtype=dtype)
    assert index.add(docs) == list(range(97))
    q, _ = maxsim_inputs(5, 7, 1, 1, 32, dtype=dtype, seed=2)
    ql = torch.tensor([7, 1, 0, 3, 7])
    for k in (1, 10, 97):
        s, ids = index.search(q, k, q_mask=ql, reduce=reduce)
        ws, wi = brute_force(q, docs, k, q_mask=ql, reduce=reduce)
        assert ids.dtype == torch.int64 and s.shape == (5, k)
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(s, ws, **tol)
        if dtype != torch.bfloat16:  # bf16: near-equal fp32 sums may order differently
            assert torch.equal(ids, wi)
        else:
            assert torch.equal(ids[2], wi[2])  # the empty query: all 0, ties to the lower id


@pytest.mark.parametrize("device,backend", backend_params("maxsim_topk"))
def test_search_on_every_backend(device, backend):
    docs = [x.to(device) for x in _docs(13, 9, 16, seed=25)]
    index = MaxSimIndex(16, device=device)
    index.add(docs)
    q, _ = maxsim_inputs(2, 5, 1, 1, 16, seed=26)
    s, ids = index.search(q.to(device), 4, backend=backend, candidates=[3, 0, 12, 7, 5])
    ws, wi = brute_force(q, [x.cpu() for x in docs], 4, candidates=[3, 0, 12, 7, 5])
    torch.testing.assert_close(s.cpu(), ws)
    assert torch.equal(ids.cpu(), wi)


def test_ties_go_to_the_earlier_document():
    base = _docs(6, 5, 16, seed=3, low=1, ties=True)
    docs = base + base + base[:2]  # exact duplicates: equal scores
    index = MaxSimIndex()
    index.add(docs[:5])
    index.add(docs[5:])
    q, _ = maxsim_inputs(3, 4, 1, 1, 16, seed=4, ties=True)
    s, ids = index.search(q, len(docs))
    ws, wi = brute_force(q, docs, len(docs))
    assert torch.equal(ids, wi) and torch.equal(s, ws)


def test_single_query_list_of_queries_and_k_past_the_corpus():
    docs = _docs(9, 12, 16, seed=5, low=1)
    index = MaxSimIndex(16)
    index.add(docs)
    q, _ = maxsim_inputs(3, 6, 1, 1, 16, seed=6)
    s1, i1 = index.search(q[1], 4)
    s, i = index.search(q, 4)
    assert s1.shape == (4,) and torch.equal(i1, i[1]) and torch.equal(s1, s[1])
    ql = [q[0, :6], q[1, :2], q[2, :5]]
    s2, i2 = index.search(ql, 4)
    ws, wi = brute_force(q, docs, 4, q_mask=torch.tensor([6, 2, 5]))
    assert torch.equal(i2, wi)
    torch.testing.assert_close(s2, ws)
    s3, i3 = index.search(q, 20)  # k > len: padded with -inf / -1
    assert torch.all(i3[:, 9:] == -1) and torch.all(torch.isneginf(s3[:, 9:]))
    assert torch.equal(i3[:, :9].sort(dim=1).values, torch.arange(9).expand(3, 9))


# ---------------------------------------------------------------------------------------------
# adds, growth, ids, remove, candidates


def test_every_add_form_and_incremental_adds():
    docs = _docs(30, 20, 16, seed=7)
    once = MaxSimIndex(16)
    once.add(docs)
    inc = MaxSimIndex(16)
    inc.add(docs[:5])  # list
    part = docs[5:12]  # padded + lengths
    L = max(x.shape[0] for x in part)
    pad = torch.zeros(len(part), L + 2, 16)
    for i, x in enumerate(part):
        pad[i, : x.shape[0]] = x
    inc.add(pad, lengths=[x.shape[0] for x in part])
    part = docs[12:20]  # padded + a non-prefix bool mask
    mask = torch.zeros(len(part), 25, dtype=torch.bool)
    pad = torch.randn(len(part), 25, 16)
    for i, x in enumerate(part):
        where = torch.randperm(25)[: x.shape[0]].sort().values
        mask[i, where] = True
        pad[i, where] = x
    inc.add(pad, mask=mask)
    part = docs[20:28]  # packed + cu_seqlens
    cu = torch.zeros(len(part) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([x.shape[0] for x in part]), 0)
    inc.add(torch.cat(part), cu_seqlens=cu)
    full = torch.stack([docs[28][:3], docs[29][:3]])  # padded, every token real
    docs[28], docs[29] = docs[28][:3], docs[29][:3]
    once = MaxSimIndex(16)
    once.add(docs)
    inc.add(full, ids=[28, 29])
    assert len(inc) == len(once) == 30 and inc.num_tokens == once.num_tokens
    assert torch.equal(inc.packed()[0], once.packed()[0]) and torch.equal(inc.packed()[1], once.packed()[1])
    assert torch.equal(inc.lengths(), torch.tensor([x.shape[0] for x in docs]))
    q, _ = maxsim_inputs(2, 5, 1, 1, 16, seed=8)
    assert torch.equal(inc.search(q, 7)[1], brute_force(q, docs, 7)[1])


def test_growth_is_amortised():
    index = MaxSimIndex(8)
    buffers = set()
    for _ in range(200):
        index.add([torch.randn(10, 8)])
        buffers.add(index._tokens.data_ptr())
    assert len(index) == 200 and index.num_tokens == 2000
    assert len(buffers) <= 8  # 1024, then x1.5: 1536, 2304 ... (not one copy per add)


def test_ids_int_and_str():
    docs = _docs(6, 8, 16, seed=9, low=1)
    index = MaxSimIndex()
    assert index.add(docs[:3], ids=torch.tensor([10, 3, 7])) == [10, 3, 7]
    assert index.add(docs[3:]) == [11, 12, 13]  # next after the largest
    q, _ = maxsim_inputs(2, 4, 1, 1, 16, seed=10)
    _, pos = brute_force(q, docs, 6)
    ids = index.search(q, 6)[1]
    table = torch.tensor([10, 3, 7, 11, 12, 13])
    assert torch.equal(ids, table[pos]) and 7 in index and 8 not in index
    sindex = MaxSimIndex()
    sindex.add(docs, ids=[f"doc-{i}" for i in range(6)])
    s, sids = sindex.search(q, 8)
    assert sids == [[f"doc-{p}" if p >= 0 else None for p in row] for row in brute_force(q, docs, 8)[1].tolist()]
    assert sids[0][6:] == [None, None] and sindex.ids[2] == "doc-2"


def test_candidates_shared_and_per_query():
    docs = _docs(20, 10, 16, seed=11)
    index = MaxSimIndex()
    index.add(docs, ids=list(range(100, 120)))
    q, _ = maxsim_inputs(3, 4, 1, 1, 16, seed=12)
    shared = [105, 100, 119, 111, 105]
    s, ids = index.search(q, 3, candidates=shared)
    ws, wi = brute_force(q, docs, 3, candidates=[5, 0, 19, 11, 5])
    torch.testing.assert_close(s, ws)
    assert torch.equal(ids, torch.where(wi >= 0, wi + 100, wi))
    per = [[101, 102], [117], [103, 104, 105, 106]]
    s, ids = index.search(q, 3, candidates=per)
    ws, wi = brute_force(q, docs, 3, candidates=[[1, 2, -1, -1], [17, -1, -1, -1], [3, 4, 5, 6]])
    torch.testing.assert_close(s, ws)
    assert torch.equal(ids, torch.where(wi >= 0, wi + 100, wi))
    s, ids = index.search(q, 2, candidates=torch.tensor([[101, -1], [102, 103], [-1, -1]]))
    assert ids[2].tolist() == [-1, -1] and ids[0].tolist() == [101, -1]
    with pytest.raises(KeyError, match="candidate id 7 is not in the index"):
        index.search(q, 2, candidates=[7])


def test_remove():
    docs = _docs(12, 10, 16, seed=13)
    index = MaxSimIndex()
    index.add(docs, ids=[f"d{i}" for i in range(12)])
    assert index.remove(["d3", "d0", "d11"]) == 3
    kept = [i for i in range(12) if i not in (0, 3, 11)]
    ref = MaxSimIndex()
    ref.add([docs[i] for i in kept], ids=[f"d{i}" for i in kept])
    q, _ = maxsim_inputs(2, 4, 1, 1, 16, seed=14)
    (s, ids), (ws, wids) = index.search(q, 5), ref.search(q, 5)
    assert torch.equal(s, ws) and ids == wids and len(index) == 9 and "d3" not in index
    index.add([docs[3]], ids=["d3"])  # adding after a remove
    assert index.ids[-1] == "d3" and len(index) == 10
    with pytest.raises(KeyError, match="'nope'"):
        index.remove(["nope"])
    index.remove(index.ids)
    assert len(index) == 0 and index.search(q, 2)[1] == [[None, None], [None, None]]


def test_sharded_search_equals_one_shard(monkeypatch):
    """A corpus past maxsim_topk's per-call token limit is searched shard by shard and merged
    (ties across shards still go to the earlier document)."""
    base = _docs(8, 9, 16, seed=15, low=1, ties=True)
    docs = base * 4
    index = MaxSimIndex()
    index.add(docs)
    q, _ = maxsim_inputs(3, 4, 1, 1, 16, seed=16, ties=True)
    want = index.search(q, 12)
    monkeypatch.setattr(mi, "_SHARD_TOKENS", 23)
    index._cache.clear()
    assert len(index._shards()) > 5
    got = index.search(q, 12)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[1], brute_force(q, docs, 12)[1])
    got = index.search(q, 3, candidates=[30, 1, 17, 9])
    assert torch.equal(got[1], brute_force(q, docs, 3, candidates=[30, 1, 17, 9])[1])


def test_normalize_is_cosine_search():
    docs = _docs(15, 10, 16, seed=17, low=1)
    index = MaxSimIndex(normalize=True)
    index.add([x * 3 for x in docs])
    q, _ = maxsim_inputs(2, 5, 1, 1, 16, seed=18)
    s, ids = index.search(q * 0.5, 6)
    ws, wi = brute_force(q, docs, 6, cosine=True)
    torch.testing.assert_close(s, ws)
    assert torch.equal(ids, wi)
    norms = index.packed()[0].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_dtype_moves():
    docs = _docs(10, 8, 16, seed=19, low=1)
    index = MaxSimIndex()
    index.add(docs)
    assert index.dtype == torch.float32 and index.device == torch.device("cpu")
    q, _ = maxsim_inputs(2, 4, 1, 1, 16, seed=20)
    assert index.to(dtype=torch.bfloat16) is index and index.dtype == torch.bfloat16
    assert index.packed()[0].dtype == torch.bfloat16
    s, _ = index.search(q, 3)  # fp32 queries are converted to the index dtype
    ws, _ = brute_force(q.bfloat16(), [x.bfloat16() for x in docs], 3)
    torch.testing.assert_close(s, ws, rtol=2e-5, atol=2e-5)
    index.add([docs[0]])  # fp32 documents into a bf16 index
    assert index.packed()[0].dtype == torch.bfloat16 and len(index) == 11


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_index_matches_cpu():
    docs = _docs(1000, 300, 128, seed=21, dtype=torch.bfloat16, low=50)
    cpu = MaxSimIndex(128, dtype=torch.bfloat16)
    cpu.add(docs)
    gpu = MaxSimIndex(128, dtype=torch.bfloat16, device="cuda")
    gpu.add(docs)
    q, _ = maxsim_inputs(4, 32, 1, 1, 128, dtype=torch.bfloat16, seed=22)
    sc, ic = cpu.search(q, 10)
    sg, ig = gpu.search(q.cuda(), 10)
    assert ig.device.type == "cuda"
    torch.testing.assert_close(sg.cpu(), sc, rtol=1e-4, atol=1e-4)
    moved = cpu.to("cuda")
    assert moved.search(q.cuda(), 10)[1].device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("kind", ["int", "str"])
def test_save_load_round_trip(tmp_path, fmt, kind):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    docs = _docs(25, 12, 16, seed=23, dtype=torch.bfloat16)
    index = MaxSimIndex(normalize=True)
    ids = [f"doc/{i}-é" for i in range(25)] if kind == "str" else list(range(50, 75))
    index.add(docs, ids=ids)
    path = tmp_path / f"index.{fmt}"
    index.save(path, format=fmt)
    back = MaxSimIndex.load(path)
    assert back.ids == index.ids and back.dtype == torch.bfloat16 and back.normalize and back.dim == 16
    assert torch.equal(back.packed()[0], index.packed()[0]) and torch.equal(back.packed()[1], index.packed()[1])
    q, _ = maxsim_inputs(2, 4, 1, 1, 16, seed=24)
    a, b = index.search(q, 5), back.search(q, 5)
    assert torch.equal(a[0], b[0]) and (a[1] == b[1] if kind == "str" else torch.equal(a[1], b[1]))
    if kind == "int":
        assert back.add([docs[0]]) == [75]  # the next id survives the round trip


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_save_load_empty_and_bad_files(tmp_path, fmt):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    empty = MaxSimIndex(8)
    empty.save(tmp_path / "e", format=fmt)
    back = MaxSimIndex.load(tmp_path / "e")
    assert len(back) == 0 and back.dim == 8
    s, i = back.search(torch.randn(2, 3, 8), 4)
    assert torch.all(i == -1) and torch.all(torch.isneginf(s))
    torch.save({"metadata": {"format": "sparseops.MaxSimIndex", "version": "99"}, "tensors": {}}, tmp_path / "v")
    with pytest.raises(ValueError, match="version 99"):
        MaxSimIndex.load(tmp_path / "v")
    torch.save({"a": torch.zeros(1)}, tmp_path / "x")
    with pytest.raises(ValueError, match="not a saved MaxSimIndex"):
        MaxSimIndex.load(tmp_path / "x")
    (tmp_path / "junk").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{junk")
    with pytest.raises(ValueError):
        MaxSimIndex.load(tmp_path / "junk")


# ---------------------------------------------------------------------------------------------
# empty index, bad inputs


def test_empty_index():
    index = MaxSimIndex()
    assert len(index) == 0 and index.num_tokens == 0
    s, i = index.search(torch.randn(3, 4, 8), 2)
    assert s.shape == (3, 2) and torch.all(i == -1) and torch.all(torch.isneginf(s))
    assert index.add([]) == [] and len(index) == 0
    index.add([torch.zeros(0, 8), torch.ones(3, 8)])  # an empty document scores 0, above negatives
    s, i = index.search(-torch.ones(1, 2, 8), 2)
    assert i.tolist() == [[0, 1]] and s[0, 0] == 0


def test_bad_inputs():
    index = MaxSimIndex(16)
    index.add([torch.randn(3, 16)], ids=[5])
    with pytest.raises(ValueError, match="dim 16"):
        index.add([torch.randn(3, 8)])
    with pytest.raises(ValueError, match="already in the index"):
        index.add([torch.randn(3, 16)], ids=[5])
    with pytest.raises(ValueError, match="already in the index"):
        index.add([torch.randn(3, 16)] * 2, ids=[6, 6])
    with pytest.raises(ValueError, match="int ids"):
        index.add([torch.randn(3, 16)], ids=["a"])
    with pytest.raises(ValueError, match="int >= 0"):
        index.add([torch.randn(3, 16)], ids=[-2])
    with pytest.raises(ValueError, match="name the 1 documents"):
        index.add([torch.randn(3, 16)], ids=[1, 2])
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        index.add(torch.randn(3, 16))
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        index.add(torch.randn(3, 16), cu_seqlens=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="lengths must be"):
        index.add(torch.randn(2, 4, 16), lengths=[5, 1])
    with pytest.raises(ValueError, match="mask must be a bool"):
        index.add(torch.randn(2, 4, 16), mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="floating-point"):
        index.add([torch.ones(3, 16, dtype=torch.int64)])
    with pytest.raises(ValueError, match="k must be a positive int"):
        index.search(torch.randn(2, 16), 0)
    with pytest.raises(ValueError, match="dim 16"):
        index.search(torch.randn(2, 3, 8), 1)
    with pytest.raises(ValueError, match="q must be"):
        index.search(torch.randn(2, 2, 3, 16), 1)
    sindex = MaxSimIndex()
    sindex.add([torch.randn(2, 4)], ids=["a"])
    with pytest.raises(ValueError, match="str ids: add needs ids"):
        sindex.add([torch.randn(2, 4)])
    with pytest.raises(ValueError, match="dtype must be"):
        MaxSimIndex(dtype=torch.int8)
    with pytest.raises(ValueError, match='format must be "auto"'):
        index.save("/tmp/never-written", format="npz")
