"""PyLate drop-ins: ``pylate.scores``' MaxSim functions on the sparseops ops, and ``patch()``.

Functions with the signatures and semantics of PyLate 1.6's (``pylate/scores/colbert.py``):

- ``colbert_scores(queries_embeddings, documents_embeddings, queries_mask=None,
  documents_mask=None, backend=None)`` -> [A, B]: every query against every document.
- ``colbert_scores_pairwise(queries_embeddings, documents_embeddings, backend=None)`` -> [B]:
  query b against document b (tensors, or lists of ragged [L_b, H] tensors).
- ``colbert_kd_scores(queries_embeddings, documents_embeddings, queries_mask=None,
  documents_mask=None, backend=None)`` -> [A, N]: query a against its N candidates
  ``documents_embeddings[a]`` ([A, N, T, H]).
- ``ColBERTScores`` (the contrastive losses' default ``score_metric``): queries [Q, Qt, H]
  against stacked groups [D, N, Dt, H] -> [Q, D * N], query-major (column j * N + k is group
  j's slot k) - one ``sparseops.maxsim`` call instead of PyLate's N.

Semantics kept from PyLate: inputs may be tensors, numpy arrays or lists (converted as
``pylate.utils.convert_to_tensor`` does); masks are multiplicative (``pylate_mask=True``: a
masked document token scores 0 and takes part in the max, a masked query token adds 0); the
result has the dtype PyLate's einsum-and-mask computation has (the embeddings' dtype, promoted
with a floating mask's dtype) and is differentiable in the embeddings. What differs:
the scores are accumulated in fp32 before that cast (PyLate's bf16 einsum rounds every
similarity to bf16 first, ANCHORS §3: ~4e-2 max error), nothing of size Lq x Ld is written,
a document with no tokens scores 0 (PyLate's max over an empty axis raises), and masks are
read as ``mask != 0`` (PyLate would scale similarities by a non-binary mask; PyLate itself
only builds 0/1 masks).

``backend``: None reads ``PYLATE_SCORES_BACKEND`` as PyLate does. "auto" (PyLate's default)
runs sparseops with its own automatic backend choice; sparseops' names ("cpu", "triton",
"reference") force one of ours; PyLate's "torch", "flash" and "lik" call PyLate's original
function (only while patched, when it is known).

``patch(*objects)`` makes an imported PyLate use these: every loaded ``pylate.*`` module's
reference to the three functions (``pylate.scores``, ``pylate.scores.colbert``,
``similarity_functions``, ``rank``, the evaluators, ``losses.distillation`` and the defaults
of its ``Distillation.__init__``), ``ColBERTScores.__call__`` (so existing and future
``Contrastive`` / ``CachedContrastive`` losses use one sparseops call), and the same functions
held by the given objects (a ``pylate.models.ColBERT`` built before the patch caches
``_similarity`` / ``_similarity_pairwise``; a ``Distillation`` loss keeps ``score_metric``).
``unpatch()`` restores all of it. This module imports nothing of PyLate until ``patch()``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from ..ops.maxsim import maxsim, maxsim_pairs, maxsim_varlen
from ._patching import Patcher

__all__ = [
    "ColBERTScores",
    "colbert_kd_scores",
    "colbert_scores",
    "colbert_scores_pairwise",
    "convert_to_tensor",
    "patch",
    "unpatch",
]

_PYLATE_BACKENDS = ("torch", "flash", "lik")
_OUR_BACKENDS = ("auto", "cpu", "triton", "reference", "cuda")
_PATCH = Patcher("pylate")
_NAMES = ("colbert_scores", "colbert_scores_pairwise", "colbert_kd_scores")


def convert_to_tensor(x: Any) -> torch.Tensor:
    """``pylate.utils.convert_to_tensor``: a tensor as it is; a numpy array shared; an empty
    list -> fp32 tensor([]); a list of arrays or of lists -> fp32; a list of tensors stacked."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, list):
        if not x:
            return torch.tensor([], dtype=torch.float32)
        if isinstance(x[0], torch.Tensor):
            return torch.stack(x)
        if isinstance(x[0], list):
            return torch.tensor(x, dtype=torch.float32)
        return torch.stack([torch.as_tensor(a, dtype=torch.float32) for a in x])
    if hasattr(x, "__array__"):
        return torch.as_tensor(x)
    return x


def _backend(backend: str | None, name: str):
    """(sparseops backend or None, PyLate original or None) for a call."""
    if backend is None:
        backend = os.environ.get("PYLATE_SCORES_BACKEND", "auto")
    b = backend.lower()
    if b in _PYLATE_BACKENDS:
        original = _PATCH.originals.get(name)
        if original is None:
            raise ValueError(
                f"backend={backend!r} is one of PyLate's own backends: it runs PyLate's function, which "
                "sparseops only knows while patch() is active; use 'auto' or a sparseops backend "
                f"({', '.join(_OUR_BACKENDS)})"
            )
        return None, original
    if b not in _OUR_BACKENDS:
        raise ValueError(f"backend must be one of {_OUR_BACKENDS + _PYLATE_BACKENDS}, got {backend!r}")
    return (None if b == "auto" else b), None


def _mask(mask: Any) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = convert_to_tensor(mask)
    return mask if mask.dtype == torch.bool else mask != 0


def _out_dtype(q: torch.Tensor, *masks: Any) -> torch.dtype:
    """The dtype of PyLate's result: einsum keeps the embeddings' dtype, and multiplying by
    a floating mask promotes it (bf16 scores * an fp32 mask = fp32)."""
    dtype = q.dtype
    for m in masks:
        if isinstance(m, torch.Tensor) and m.is_floating_point():
            dtype = torch.promote_types(dtype, m.dtype)
    return dtype


def _check(x: torch.Tensor, name: str, dims: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != dims:
        what = f"a {x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a {dims}-D tensor (as PyLate's einsum needs), got {what}")


def colbert_scores(
    queries_embeddings: Any,
    documents_embeddings: Any,
    queries_mask: torch.Tensor | None = None,
    documents_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``pylate.scores.colbert_scores`` on ``sparseops.maxsim``: queries [A, S, H] against
    documents [B, T, H] -> [A, B], masks [A, S] / [B, T] multiplicative (module docstring)."""
    ours, original = _backend(backend, "colbert_scores")
    if original is not None:
        return original(queries_embeddings, documents_embeddings, queries_mask, documents_mask, backend=backend)
    q, d = convert_to_tensor(queries_embeddings), convert_to_tensor(documents_embeddings)
    _check(q, "queries_embeddings", 3)
    _check(d, "documents_embeddings", 3)
    qm, dm = convert_to_tensor(queries_mask), convert_to_tensor(documents_mask)
    scores = maxsim(q, d, q_mask=_mask(qm), d_mask=_mask(dm), pylate_mask=True, backend=ours)
    return scores.to(_out_dtype(q, qm, dm))


def colbert_kd_scores(
    queries_embeddings: Any,
    documents_embeddings: Any,
    queries_mask: torch.Tensor | None = None,
    documents_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``pylate.scores.colbert_kd_scores`` on ``sparseops.maxsim_pairs``: queries [A, S, H],
    each against its own candidates [A, N, T, H] -> [A, N]; masks [A, S] / [A, N, T]."""
    ours, original = _backend(backend, "colbert_kd_scores")
    if original is not None:
        return original(queries_embeddings, documents_embeddings, queries_mask, documents_mask, backend=backend)
    q, d = convert_to_tensor(queries_embeddings), convert_to_tensor(documents_embeddings)
    _check(q, "queries_embeddings", 3)
    _check(d, "documents_embeddings", 4)
    qm, dm = convert_to_tensor(queries_mask), convert_to_tensor(documents_mask)
    scores = maxsim_pairs(q, d, q_mask=_mask(qm), d_mask=_mask(dm), pylate_mask=True, backend=ours)
    return scores.to(_out_dtype(q, qm, dm))


def colbert_scores_pairwise(
    queries_embeddings: Any,
    documents_embeddings: Any,
    backend: str | None = None,
) -> torch.Tensor:
    """``pylate.scores.colbert_scores_pairwise``: query b against document b -> [B], no masks.
    Tensors [B, S, H] / [B, T, H] go to ``sparseops.maxsim_pairs``; lists of tensors of
    different lengths (PyLate zips them) are packed once and scored by ``maxsim_varlen`` with
    the pair list (b, b): no padding, no per-pair Python call."""
    ours, original = _backend(backend, "colbert_scores_pairwise")
    if original is not None:
        return original(queries_embeddings, documents_embeddings, backend=backend)
    q, d = queries_embeddings, documents_embeddings
    if isinstance(q, torch.Tensor) and isinstance(d, torch.Tensor):
        _check(q, "queries_embeddings", 3)
        _check(d, "documents_embeddings", 3)
        n = min(q.shape[0], d.shape[0])  # PyLate zips: the shorter batch decides
        return maxsim_pairs(q[:n], d[:n], backend=ours).to(q.dtype)
    qs = [convert_to_tensor(x) for x in q]
    ds = [convert_to_tensor(x) for x in d]
    n = min(len(qs), len(ds))  # PyLate zips: the shorter list decides
    if n == 0:
        raise ValueError("colbert_scores_pairwise needs at least one (query, document) pair (PyLate stacks none)")
    qs, ds = qs[:n], ds[:n]
    for name, xs in (("queries_embeddings", qs), ("documents_embeddings", ds)):
        for i, x in enumerate(xs):
            if x.dim() != 2:
                raise ValueError(f"{name}[{i}] must be a 2-D [tokens, dim] tensor, got shape {list(x.shape)}")
    qp, cu_q = _pack(qs)
    dp, cu_d = _pack(ds)
    ar = torch.arange(n, device=qp.device)
    return maxsim_varlen(qp, cu_q, dp.to(qp.dtype), cu_d, pairs=torch.stack([ar, ar], 1), backend=ours).to(qp.dtype)


def _pack(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of [L_i, dim] tensors -> (tokens [sum L_i, dim], int32 cu_seqlens [n + 1])."""
    lens = torch.tensor([x.shape[0] for x in xs], dtype=torch.int64)
    cu = torch.zeros(len(xs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    tokens = torch.cat(xs, 0)
    return tokens, cu.to(tokens.device)


class ColBERTScores:
    """``pylate.scores.ColBERTScores``: queries [Q, Qt, H] against stacked document groups
    [D, N, Dt, H] (masks [Q, Qt] / [D, N, Dt]) -> [Q, D * N] with query-major columns
    (group j's slot k at column j * N + k), in one ``sparseops.maxsim`` call."""

    def __call__(
        self,
        queries_embeddings: Any,
        documents_embeddings: Any,
        queries_mask: torch.Tensor | None = None,
        documents_mask: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        return _colbert_scores_grouped(self, queries_embeddings, documents_embeddings, queries_mask, documents_mask,
                                       backend)  # fmt: skip


def _colbert_scores_grouped(self, queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                            backend=None) -> torch.Tensor:  # fmt: skip
    """The body of ``ColBERTScores.__call__`` (also installed on PyLate's class by patch())."""
    ours, original = _backend(backend, "ColBERTScores.__call__")
    if original is not None:
        return original(self, queries_embeddings, documents_embeddings, queries_mask, documents_mask, backend=backend)
    d = convert_to_tensor(documents_embeddings)
    _check(d, "documents_embeddings", 4)
    D, N, Dt, H = d.shape
    dm = convert_to_tensor(documents_mask)
    flat_mask = None if dm is None else dm.reshape(D * N, *dm.shape[2:])
    return colbert_scores(queries_embeddings, d.reshape(D * N, Dt, H), queries_mask, flat_mask, backend=ours or "auto")


def patch(*objects: Any) -> list[str]:
    """Make PyLate score with sparseops (module docstring). Imports ``pylate.scores.colbert``
    (PyLate must be importable). ``objects``: models / losses built before the patch whose
    attributes hold PyLate's functions. Returns the names replaced. Patching twice is a no-op
    for the modules (objects given later are still swapped); ``unpatch()`` undoes it."""
    colbert_mod = importlib.import_module("pylate.scores.colbert")
    ours = {
        "colbert_scores": colbert_scores,
        "colbert_scores_pairwise": colbert_scores_pairwise,
        "colbert_kd_scores": colbert_kd_scores,
    }
    done: list[str] = []
    if not _PATCH.active:
        for name in _NAMES:
            _PATCH.originals[name] = getattr(colbert_mod, name)
        cls = colbert_mod.ColBERTScores
        _PATCH.originals["ColBERTScores.__call__"] = cls.__call__
        _PATCH.set(cls, "__call__", _colbert_scores_grouped)
        done.append("pylate.scores.colbert.ColBERTScores.__call__")
    # Swapping by identity is idempotent: a second patch() swaps what was loaded since.
    done += _PATCH.swap({id(_PATCH.originals[n]): ours[n] for n in _NAMES}, objects)
    return done


def unpatch() -> None:
    """Undo ``patch()``: PyLate's modules, class and the patched objects get their functions back."""
    _PATCH.restore()
