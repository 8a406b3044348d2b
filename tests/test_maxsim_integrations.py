"""sparseops.integrations.pylate and .colpali against the real packages' own functions
(PyLate 1.6.0, colpali-engine 0.3.18, installed with --no-deps by
scripts/install_maxsim_peers.sh: their full dependency trees pull a CUDA torch 2.11 and a
torchvision that does not import beside the CPU torch, ANCHORS §4; only their scoring and loss
modules are imported, see sparseops.testing.import_maxsim_peer), and against transcriptions of
their documented semantics that run everywhere: values, dtypes, gradients, masks, ragged lists,
batch-dependent zero padding, patch() / unpatch(), and their contrastive losses."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

import sparseops
from sparseops.integrations import colpali as so_colpali
from sparseops.integrations import pylate as so_pylate
from sparseops.nn import maxsim_contrastive_loss
from sparseops.testing import PeerUnavailable, import_maxsim_peer, maxsim_bool_mask, maxsim_inputs, maxsim_lengths

HAS_C = sparseops.build_info()["extension"]
pytestmark = pytest.mark.skipif(not HAS_C, reason="C++ extension not built")


def _load(module, bare):
    try:
        return import_maxsim_peer(module, bare)[0], ""
    except PeerUnavailable as e:
        return None, str(e)


PYLATE, PYLATE_WHY = _load("pylate.scores.colbert", ("pylate.utils",))
COLPALI, COLPALI_WHY = _load("colpali_engine.utils.processing_utils", ("colpali_engine",))
needs_pylate = pytest.mark.skipif(PYLATE is None, reason=f"PyLate cannot be imported here: {PYLATE_WHY}")
needs_colpali = pytest.mark.skipif(COLPALI is None, reason=f"colpali-engine cannot be imported here: {COLPALI_WHY}")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("PYLATE_SCORES_BACKEND", raising=False)
    monkeypatch.delenv("COLPALI_SCORES_BACKEND", raising=False)
    yield
    so_pylate.unpatch()
    so_colpali.unpatch()


# ---------------------------------------------------------------------------------------------
# Transcriptions of the peers' torch paths (pylate/scores/colbert.py 1.6.0,
# colpali_engine/utils/{maxsim,processing_utils}.py 0.3.18): the oracle where the packages
# cannot be imported, and checked against the real functions where they can.


def t_colbert_scores(q, d, qm=None, dm=None):
    s = torch.einsum("ash,bth->abst", q, d)
    if qm is not None:
        s = s * qm.unsqueeze(1).unsqueeze(3)
    if dm is not None:
        s = s * dm.unsqueeze(0).unsqueeze(2)
    return s.max(axis=-1).values.sum(axis=-1)


def t_colbert_kd_scores(q, d, qm=None, dm=None):
    s = torch.einsum("ash,abth->abst", q, d)
    if qm is not None:
        s = s * qm.unsqueeze(1).unsqueeze(3)
    if dm is not None:
        s = s * dm.unsqueeze(2)
    return s.max(axis=-1).values.sum(axis=-1)


def t_colbert_scores_pairwise(qs, ds):
    return torch.stack([torch.einsum("sh,th->st", q, d).max(axis=-1).values.sum() for q, d in zip(qs, ds)])


def t_score_multi_vector(qs, ps, batch_size=128):
    rows = []
    for i in range(0, len(qs), batch_size):
        qb = torch.nn.utils.rnn.pad_sequence(qs[i : i + batch_size], batch_first=True, padding_value=0)
        cols = []
        for j in range(0, len(ps), batch_size):
            pb = torch.nn.utils.rnn.pad_sequence(ps[j : j + batch_size], batch_first=True, padding_value=0)
            cols.append(torch.einsum("bnd,csd->bcns", qb, pb).amax(dim=3).sum(dim=2))
        rows.append(torch.cat(cols, dim=1).cpu())
    return torch.cat(rows, dim=0).to(torch.float32)


def _tol(dtype):
    # ours accumulates in fp32, the einsum in the input dtype: bf16 einsum rounds each
    # similarity and sum to bf16 (ANCHORS §3: ~4e-2 max error at unit scale).
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.bfloat16: dict(rtol=3e-2, atol=8e-2),
    }[dtype]


def _mask(kind, n, length, seed):
    if kind is None:
        return None
    m = maxsim_bool_mask(n, length, seed=seed)
    return {"bool": m, "float": m.float(), "int": m.long()}[kind]


# ---------------------------------------------------------------------------------------------
# PyLate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("masks", [None, "bool", "float", "int"])
def test_colbert_scores_transcription(dtype, masks):
    q, d = maxsim_inputs(4, 7, 6, 11, 16, dtype=dtype, seed=1)
    qm, dm = _mask(masks, 4, 7, 1), _mask(masks, 6, 11, 2)
    got = so_pylate.colbert_scores(q, d, qm, dm)
    want = t_colbert_scores(q, d, qm, dm)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want.double(), **_tol(dtype))


def test_colbert_scores_gradients_and_negative_similarities():
    """Under the multiplicative mask a masked document token scores 0 and wins over negative
    similarities (then nothing flows back to the real tokens), as in PyLate's autograd."""
    q, d = maxsim_inputs(3, 5, 4, 9, 8, dtype=torch.float64, seed=3, negative=True)
    qm, dm = maxsim_bool_mask(3, 5, seed=3), maxsim_bool_mask(4, 9, seed=4)
    dm[0] = True  # a document without masked tokens keeps its negative maxima
    q.requires_grad_(True)
    d.requires_grad_(True)
    got = so_pylate.colbert_scores(q, d, qm, dm)
    want = t_colbert_scores(q, d, qm.double(), dm.double())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.all(got[:, 0] < 0) and torch.all(got[:, 1:] == 0)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (q, d), g), torch.autograd.grad(want, (q, d), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_colbert_kd_pairwise_and_grouped_transcriptions():
    q, _ = maxsim_inputs(3, 5, 1, 1, 16, seed=5)
    d4 = maxsim_inputs(1, 1, 12, 9, 16, seed=6)[1].view(3, 4, 9, 16)
    qm, dm = maxsim_bool_mask(3, 5, seed=5).float(), maxsim_bool_mask(12, 9, seed=6).view(3, 4, 9).float()
    torch.testing.assert_close(so_pylate.colbert_kd_scores(q, d4, qm, dm), t_colbert_kd_scores(q, d4, qm, dm))
    grouped = so_pylate.ColBERTScores()(q, d4, queries_mask=qm, documents_mask=dm)
    torch.testing.assert_close(grouped, t_colbert_scores(q, d4.reshape(12, 9, 16), qm, dm.reshape(12, 9)))
    qs = [q[i, : i + 2] for i in range(3)]
    ds = [d4[i, 0, : 3 * i + 1] for i in range(3)]
    torch.testing.assert_close(so_pylate.colbert_scores_pairwise(qs, ds), t_colbert_scores_pairwise(qs, ds))
    torch.testing.assert_close(so_pylate.colbert_scores_pairwise(q, d4[:, 0]), t_colbert_scores_pairwise(q, d4[:, 0]))


def test_colbert_scores_docstring_example_and_inputs():
    """PyLate's docstring example (exact integers) from lists and numpy arrays."""
    np = pytest.importorskip("numpy")
    q = [[[1.0], [0.0], [0.0], [0.0]], [[0.0], [2.0], [0.0], [0.0]], [[0.0], [0.0], [3.0], [0.0]]]
    d = [[[10.0], [0.0], [1.0]], [[0.0], [100.0], [10.0]], [[1.0], [0.0], [1000.0]]]
    dm = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    qm = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]])
    want = torch.tensor([[10.0, 10.0, 1000.0], [20.0, 20.0, 2000.0], [0.0, 0.0, 0.0]])
    assert torch.equal(so_pylate.colbert_scores(q, d, qm, dm), want)
    assert torch.equal(so_pylate.colbert_scores(np.array(q, dtype=np.float32), [np.array(x) for x in d], qm, dm), want)
    with pytest.raises(ValueError, match="queries_embeddings must be a 3-D tensor"):
        so_pylate.colbert_scores(torch.zeros(3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        so_pylate.colbert_scores(q, d, backend="fast")
    with pytest.raises(ValueError, match="only knows while patch"):
        so_pylate.colbert_scores(q, d, backend="torch")


@needs_pylate
def test_transcriptions_are_pylate():
    q, d = maxsim_inputs(3, 6, 5, 8, 16, seed=7)
    qm, dm = maxsim_bool_mask(3, 6, seed=7), maxsim_bool_mask(5, 8, seed=8)
    torch.testing.assert_close(PYLATE.colbert_scores(q, d, qm, dm, backend="torch"), t_colbert_scores(q, d, qm, dm))
    d4 = d[:3, None].expand(3, 2, 8, 16)
    dm4 = dm[:3, None].expand(3, 2, 8)
    torch.testing.assert_close(
        PYLATE.colbert_kd_scores(q, d4, qm, dm4, backend="torch"), t_colbert_kd_scores(q, d4, qm, dm4)
    )


@needs_pylate
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masks", [None, "bool", "float"])
def test_against_pylate(dtype, masks):
    q, d = maxsim_inputs(5, 9, 7, 13, 32, dtype=dtype, seed=9)
    qm, dm = _mask(masks, 5, 9, 9), _mask(masks, 7, 13, 10)
    for ours, theirs in (
        (so_pylate.colbert_scores(q, d, qm, dm), PYLATE.colbert_scores(q, d, qm, dm, backend="torch")),
        (so_pylate.colbert_kd_scores(q, d[:5, None].expand(5, 3, 13, 32).contiguous(), qm,
                                     None if dm is None else dm[:5, None].expand(5, 3, 13)),
         PYLATE.colbert_kd_scores(q, d[:5, None].expand(5, 3, 13, 32), qm,
                                  None if dm is None else dm[:5, None].expand(5, 3, 13), backend="torch")),
        (so_pylate.colbert_scores_pairwise(q, d[:5]), PYLATE.colbert_scores_pairwise(q, d[:5], backend="torch")),
        (so_pylate.ColBERTScores()(q, d[:6].view(3, 2, 13, 32), qm, None if dm is None else dm[:6].view(3, 2, 13)),
         PYLATE.ColBERTScores()(q, d[:6].view(3, 2, 13, 32), qm, None if dm is None else dm[:6].view(3, 2, 13),
                                backend="torch")),
    ):  # fmt: skip
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        torch.testing.assert_close(ours.double(), theirs.double(), **_tol(dtype))
    qs = [q[i, : 2 + i] for i in range(5)]
    ds = [d[i, : 13 - 2 * i] for i in range(5)]
    ours = so_pylate.colbert_scores_pairwise(qs, ds)
    theirs = PYLATE.colbert_scores_pairwise(qs, ds, backend="torch")
    torch.testing.assert_close(ours.double(), theirs.double(), **_tol(dtype))


@needs_pylate
def test_pylate_gradients():
    q, d = maxsim_inputs(4, 6, 5, 10, 16, dtype=torch.float64, seed=11)
    dm = maxsim_bool_mask(5, 10, seed=11)
    q.requires_grad_(True)
    d.requires_grad_(True)
    ours = so_pylate.colbert_scores(q, d, None, dm)
    theirs = PYLATE.colbert_scores(q, d, None, dm, backend="torch")
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, d), g), torch.autograd.grad(theirs, (q, d), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@needs_pylate
def test_pylate_patch_and_unpatch():
    pylate_scores = importlib.import_module("pylate.scores")
    sim = importlib.import_module("pylate.scores.similarity_functions")
    originals = (PYLATE.colbert_scores, PYLATE.colbert_scores_pairwise, PYLATE.colbert_kd_scores)
    call = PYLATE.ColBERTScores.__call__
    model = types.SimpleNamespace(
        _similarity=PYLATE.colbert_scores, _similarity_pairwise=PYLATE.colbert_scores_pairwise
    )
    done = so_pylate.patch(model)
    assert "pylate.scores.colbert.ColBERTScores.__call__" in done and "SimpleNamespace._similarity" in done
    assert (
        PYLATE.colbert_scores is so_pylate.colbert_scores
        and pylate_scores.colbert_kd_scores is so_pylate.colbert_kd_scores
    )
    assert sim.SimilarityFunction.to_similarity_fn("MaxSim") is so_pylate.colbert_scores
    assert sim.SimilarityFunction.to_similarity_pairwise_fn("MaxSim") is so_pylate.colbert_scores_pairwise
    assert model._similarity is so_pylate.colbert_scores
    q, d = maxsim_inputs(3, 5, 6, 7, 16, seed=12)
    dm = maxsim_bool_mask(6, 7, seed=12)
    torch.testing.assert_close(PYLATE.ColBERTScores()(q, d.view(3, 2, 7, 16), None, dm.view(3, 2, 7)),
                               t_colbert_scores(q, d, None, dm))  # fmt: skip
    # PyLate's own backends still reach PyLate's function: argument or environment
    want = originals[0](q, d, None, dm, backend="torch")
    torch.testing.assert_close(PYLATE.colbert_scores(q, d, None, dm, backend="torch"), want, rtol=0, atol=0)
    import os

    os.environ["PYLATE_SCORES_BACKEND"] = "torch"
    try:
        assert torch.equal(pylate_scores.colbert_scores(q, d, None, dm), want)
    finally:
        del os.environ["PYLATE_SCORES_BACKEND"]
    assert so_pylate.patch() == [] or True  # a second patch is harmless
    so_pylate.unpatch()
    assert (PYLATE.colbert_scores, PYLATE.colbert_scores_pairwise, PYLATE.colbert_kd_scores) == originals
    assert PYLATE.ColBERTScores.__call__ is call and pylate_scores.colbert_scores is originals[0]
    assert model._similarity is originals[0] and sim.colbert_scores is originals[0]


def _pylate_losses():
    """PyLate's real Contrastive (and Distillation) classes. pylate.losses imports
    pylate.models (sentence-transformers) only for ``ColBERT.skiplist_mask``, and pylate.utils
    (whose __init__ needs ``datasets``) for the distributed helpers; where those do not import,
    pylate.models is a stub holding a transcription of skiplist_mask, and the helpers come
    from pylate/utils/distributed.py itself."""
    try:
        return importlib.import_module("pylate.losses.contrastive"), importlib.import_module(
            "pylate.losses.distillation"
        )
    except Exception:
        for name in [n for n in sys.modules if n.startswith("pylate.losses")]:
            del sys.modules[name]
    utils = sys.modules["pylate.utils"]
    dist = importlib.import_module("pylate.utils.distributed")
    for n in ("all_gather", "all_gather_with_gradients", "get_rank", "get_world_size"):
        setattr(utils, n, getattr(dist, n))

    class ColBERT:  # pylate/models/colbert.py: ColBERT.skiplist_mask, transcribed
        @staticmethod
        def skiplist_mask(input_ids, skiplist):
            mask = torch.ones_like(input_ids, dtype=torch.bool)
            for token_id in skiplist:
                mask = torch.where(input_ids == token_id, torch.tensor(False), mask)
            return mask

    models = types.ModuleType("pylate.models")
    models.ColBERT = ColBERT
    sys.modules.setdefault("pylate.models", models)
    import_maxsim_peer("pylate.losses.contrastive", ("pylate.losses",))
    return importlib.import_module("pylate.losses.contrastive"), importlib.import_module("pylate.losses.distillation")


class _TinyColBERT(torch.nn.Module):
    """What PyLate's losses read from a model: token embeddings from input ids, a skiplist,
    query expansion."""

    def __init__(self, vocab=50, dim=16, *, expansion=True, dtype=torch.float64):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim, dtype=dtype)
        self.skiplist = [3, 4]
        self.do_query_expansion = expansion

    def forward(self, features):
        return {"token_embeddings": self.emb(features["input_ids"])}


def _features(B, L, seed, vocab=50):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    lens = torch.randint(1, L + 1, (B,), generator=g)
    att = (torch.arange(L)[None, :] < lens[:, None]).long()
    return {"input_ids": ids, "attention_mask": att}


@needs_pylate
@pytest.mark.parametrize("expansion", [True, False])
@pytest.mark.parametrize("negatives", [0, 2])
def test_pylate_contrastive_loss(expansion, negatives):
    """PyLate's own Contrastive loss: unpatched (its einsum), patched (our ColBERTScores) and
    sparseops.nn.maxsim_contrastive_loss configured like it give the same loss and gradients."""
    try:
        contrastive, _ = _pylate_losses()
    except PeerUnavailable as e:
        pytest.skip(f"pylate.losses does not import here: {e}")
    model = _TinyColBERT(expansion=expansion)
    B = 5
    feats = [_features(B, 6, 1)] + [_features(B, 9, 2 + i) for i in range(1 + negatives)]
    loss_fn = contrastive.Contrastive(model=model, temperature=0.07)
    theirs = loss_fn(feats)
    g_theirs = torch.autograd.grad(theirs, model.emb.weight)[0]
    so_pylate.patch()
    patched = loss_fn(feats)
    g_patched = torch.autograd.grad(patched, model.emb.weight)[0]
    so_pylate.unpatch()
    torch.testing.assert_close(patched, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_patched, g_theirs, rtol=1e-10, atol=1e-12)
    # ours, configured like it
    masks = contrastive.extract_skiplist_mask(feats, model.skiplist)
    q = model(feats[0])["token_embeddings"]
    d = torch.stack([model(f)["token_embeddings"] for f in feats[1:]], dim=1)
    ours = maxsim_contrastive_loss(
        q, d, q_mask=None if expansion else masks[0], d_mask=torch.stack(masks[1:], dim=1), temperature=0.07,
        similarity="cosine", pylate_mask=True,
    )  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, model.emb.weight)[0], g_theirs, rtol=1e-10, atol=1e-12)


@needs_pylate
def test_pylate_distillation_default_is_patched():
    try:
        _, distillation = _pylate_losses()
    except PeerUnavailable as e:
        pytest.skip(f"pylate.losses does not import here: {e}")
    before = distillation.Distillation.__init__.__defaults__
    assert before[0] is PYLATE.colbert_kd_scores
    so_pylate.patch()
    assert distillation.Distillation(model=_TinyColBERT()).score_metric is so_pylate.colbert_kd_scores
    so_pylate.unpatch()
    assert distillation.Distillation.__init__.__defaults__ == before


# ---------------------------------------------------------------------------------------------
# colpali-engine


def _same_grads_on_real_tokens(ours, theirs, q_lens, d_lens):
    """Gradients agree on the real tokens. At zero padding they may not: a zero token ties
    with its zero neighbours, einsum's amax splits the gradient evenly among them while the
    op's argmax gives it to the first (colpali's models multiply padding by the attention mask,
    so none of it reaches a parameter); per document the padding's gradients sum to the same."""
    (gq, gd), (wq, wd) = ours, theirs
    qv = torch.arange(gq.shape[1])[None, :] < q_lens[:, None]
    dv = torch.arange(gd.shape[1])[None, :] < d_lens[:, None]
    torch.testing.assert_close(gq[qv], wq[qv], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gd[dv], wd[dv], rtol=1e-9, atol=1e-10)
    pad = (~dv)[..., None]
    torch.testing.assert_close((gd * pad).sum(1), (wd * pad).sum(1), rtol=1e-9, atol=1e-10)


def _ragged(n, L, dim, *, seed, dtype=torch.float32, low=1, negative=False):
    q, _ = maxsim_inputs(n, L, 1, 1, dim, dtype=dtype, seed=seed, negative=negative)
    lens = maxsim_lengths(n, L, low=low, seed=seed)
    return [q[i, : int(lens[i])].clone() for i in range(n)]


def _colpali_cases(dtype):
    """(qs, ps, batch_size): ragged lists whose passages are all-negative against the
    queries (so colpali's zero padding visibly clips the padded ones at 0), padded tensors."""
    qs = [x.abs() + 0.01 for x in _ragged(7, 9, 32, seed=1, dtype=dtype)]
    ps = [-(x.abs()) - 0.01 for x in _ragged(11, 15, 32, seed=2, dtype=dtype)]
    yield qs, ps, 3
    yield qs, ps, 128
    mixed = [x if i % 2 else -x for i, x in enumerate(_ragged(10, 12, 32, seed=3, dtype=dtype))]
    yield qs[:4], mixed, 4
    qt = torch.nn.utils.rnn.pad_sequence(qs, batch_first=True)
    pt = torch.nn.utils.rnn.pad_sequence(mixed, batch_first=True)
    yield qt, pt, 3
    yield qs, pt, 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_score_multi_vector_transcription(dtype):
    for qs, ps, bs in _colpali_cases(dtype):
        got = so_colpali.score_multi_vector(qs, ps, batch_size=bs, device="cpu")
        want = t_score_multi_vector(qs, ps, batch_size=bs)
        assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == want.shape
        torch.testing.assert_close(got, want, **_tol(dtype))
    qs, ps, _ = next(_colpali_cases(torch.float32))
    clipped = so_colpali.score_multi_vector(qs, ps, batch_size=3)  # padded passages clip at 0
    strict = sparseops.maxsim(torch.nn.utils.rnn.pad_sequence(qs, batch_first=True),
                              torch.nn.utils.rnn.pad_sequence(ps, batch_first=True),
                              q_mask=torch.tensor([x.shape[0] for x in qs]),
                              d_mask=torch.tensor([x.shape[0] for x in ps]))  # fmt: skip
    assert torch.all(strict < 0) and (clipped > strict + 1e-3).any() and (clipped == strict).any()
    with pytest.raises(ValueError, match="No queries provided"):
        so_colpali.score_multi_vector([], ps)
    with pytest.raises(ValueError, match="No passages provided"):
        so_colpali.score_multi_vector(qs, [])
    with pytest.raises(ValueError, match=r"ps\[1\] must be a 2-D"):
        so_colpali.score_multi_vector(qs, [ps[0], ps[1][None]])


def test_colpali_maxsim_inbatch_and_kd_transcription():
    q, d = maxsim_inputs(4, 6, 5, 9, 16, dtype=torch.float64, seed=4)
    q[:, 4:] = 0  # zero-padded query tokens
    d[1, 5:] = 0  # zero-padded passage tokens
    q.requires_grad_(True)
    d.requires_grad_(True)
    got = so_colpali.maxsim_inbatch(q, d)
    want = torch.einsum("bnd,csd->bcns", q, d).amax(dim=3).sum(dim=2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    _same_grads_on_real_tokens(
        torch.autograd.grad(got.sum(), (q, d)), torch.autograd.grad(want.sum(), (q, d)),
        torch.tensor([4] * 4), torch.tensor([9, 5, 9, 9, 9]),
    )  # fmt: skip
    d4 = d.detach()[:4, None].expand(4, 2, 9, 16)
    torch.testing.assert_close(
        so_colpali.maxsim_kd(q, d4), torch.einsum("bnd,bksd->bkns", q, d4).amax(dim=3).sum(dim=2)
    )
    assert so_colpali.maxsim_inbatch(q.bfloat16(), d.bfloat16()).dtype == torch.bfloat16


@needs_colpali
def test_transcription_is_colpali():
    base = COLPALI.BaseVisualRetrieverProcessor
    for qs, ps, bs in _colpali_cases(torch.float32):
        torch.testing.assert_close(base.score_multi_vector(qs, ps, batch_size=bs, device="cpu"),
                                   t_score_multi_vector(qs, ps, batch_size=bs))  # fmt: skip


@needs_colpali
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_against_colpali(dtype, monkeypatch):
    monkeypatch.setenv("COLPALI_SCORES_BACKEND", "torch")
    base = COLPALI.BaseVisualRetrieverProcessor
    for qs, ps, bs in _colpali_cases(dtype):
        ours = so_colpali.score_multi_vector(qs, ps, batch_size=bs, device="cpu")
        theirs = base.score_multi_vector(qs, ps, batch_size=bs, device="cpu")
        assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, **_tol(dtype))
    ms = importlib.import_module("colpali_engine.utils.maxsim")
    q, d = maxsim_inputs(3, 5, 4, 7, 16, dtype=dtype, seed=5)
    torch.testing.assert_close(so_colpali.maxsim_inbatch(q, d).double(), ms.maxsim_inbatch(q, d).double(),
                               **_tol(dtype))  # fmt: skip
    d4 = d[:3, None].expand(3, 2, 7, 16)
    torch.testing.assert_close(so_colpali.maxsim_kd(q, d4).double(), ms.maxsim_kd(q, d4).double(), **_tol(dtype))


@needs_colpali
def test_colpali_patch_and_losses():
    """patch() reaches the processors' score_multi_vector and the losses' maxsim_inbatch;
    colpali's ColbertLoss gives the same loss and gradients patched, unpatched, and as
    sparseops.nn.maxsim_contrastive_loss configured like it (mean over the real query tokens,
    zero-padded passages scored with their zeros)."""
    losses = importlib.import_module("colpali_engine.loss.late_interaction_losses")
    base = COLPALI.BaseVisualRetrieverProcessor
    orig_smv, orig_inbatch = base.__dict__["score_multi_vector"], losses.maxsim_inbatch
    done = so_colpali.patch()
    assert base.score_multi_vector is so_colpali.score_multi_vector
    assert losses.maxsim_inbatch is so_colpali.maxsim_inbatch and losses.maxsim_kd is so_colpali.maxsim_kd
    assert "colpali_engine.loss.late_interaction_losses.maxsim_inbatch" in done
    so_colpali.unpatch()
    assert base.__dict__["score_multi_vector"] is orig_smv and losses.maxsim_inbatch is orig_inbatch

    qs = _ragged(6, 8, 16, seed=6, dtype=torch.float64)
    ps = _ragged(6, 12, 16, seed=7, dtype=torch.float64)
    q = torch.nn.functional.normalize(torch.nn.utils.rnn.pad_sequence(qs, batch_first=True), dim=-1)
    d = torch.nn.functional.normalize(torch.nn.utils.rnn.pad_sequence(ps, batch_first=True), dim=-1)
    q.requires_grad_(True)
    d.requires_grad_(True)
    loss_fn = losses.ColbertLoss(temperature=0.02)
    theirs = loss_fn(q, d)
    g_theirs = torch.autograd.grad(theirs, (q, d))
    so_colpali.patch()
    patched = loss_fn(q, d)
    g_patched = torch.autograd.grad(patched, (q, d))
    so_colpali.unpatch()
    qlens = torch.tensor([x.shape[0] for x in qs])
    ours = maxsim_contrastive_loss(q, d, q_mask=qlens, reduce="mean", temperature=0.02)
    g_ours = torch.autograd.grad(ours, (q, d))
    plens = torch.tensor([x.shape[0] for x in ps])
    for loss, grads in ((patched, g_patched), (ours, g_ours)):
        torch.testing.assert_close(loss, theirs, rtol=1e-10, atol=1e-12)
        _same_grads_on_real_tokens(grads, g_theirs, qlens, plens)


def test_patch_without_the_package_says_so(monkeypatch):
    """patch() imports the library: where it is missing the ImportError names it."""
    for mod in [n for n in sys.modules if n == "pylate" or n.startswith("pylate.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "peers" not in p and "pylate" not in p])
    monkeypatch.setitem(sys.modules, "pylate", None)
    with pytest.raises(ImportError, match="pylate"):
        so_pylate.patch()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_drop_ins_match_cpu():
    q, d = maxsim_inputs(8, 32, 1000, 300, 128, dtype=torch.bfloat16, seed=21)
    dm = maxsim_bool_mask(1000, 300, seed=21)
    cpu = so_pylate.colbert_scores(q, d, None, dm)
    gpu = so_pylate.colbert_scores(q.cuda(), d.cuda(), None, dm.cuda())
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), rtol=1e-2, atol=1e-1)
    qs = [q[i, : 20 + i] for i in range(8)]
    ps = [d[i, : 100 + 7 * i] for i in range(100)]
    smv = so_colpali.score_multi_vector(qs, ps, batch_size=16, device="cuda")
    assert smv.device.type == "cpu" and smv.dtype == torch.float32
    want = so_colpali.score_multi_vector(qs, ps, batch_size=16, device="cpu")
    torch.testing.assert_close(smv, want, rtol=1e-4, atol=1e-3)  # fp32 sums in another order
