"""colpali-engine drop-ins: ``score_multi_vector`` and the losses' MaxSim on the sparseops ops,
and ``patch()``.

- ``score_multi_vector(qs, ps, batch_size=128, device=None)`` ->
  fp32 [n_queries, n_passages] on the CPU: ``BaseVisualRetrieverProcessor.score_multi_vector``
  of colpali-engine 0.3.18 (``colpali_engine/utils/processing_utils.py``).
- ``maxsim_inbatch(query, doc)`` -> [B_q, B_d] and ``maxsim_kd(query, doc)`` -> [B, N]:
  ``colpali_engine.utils.maxsim``'s two functions, which its late-interaction losses call.

colpali's convention is zero padding with no mask: a padded token is a zero vector, whose
similarity with anything is exactly 0. A zero query token therefore adds 0, and a zero
document token takes part in the max with a similarity of 0 (it clips a document's negative
maxima at 0, like PyLate's multiplicative mask). Padded tensors are scored exactly so, with
no mask (``sparseops.maxsim`` computes the same sums without forming Lq x Ld).

Lists of ragged tensors: colpali pads each batch of ``batch_size`` passages to that batch's
longest, so a passage's negative maxima are clipped at 0 exactly when it is shorter than the
longest passage of its batch. ``score_multi_vector`` reproduces that with one mask: passages
shorter than their batch's longest are scored over their zero padding (the zeros take part),
the longest ones over their real tokens only. The result is the same as colpali's for any
inputs, in one op call per block of passages instead of colpali's one einsum per pair of
batches; queries are scored over their real tokens (a zero query token adds 0 either way).

Other differences: sums are accumulated in fp32 (colpali's bf16 einsum rounds every
similarity to bf16 first); a batch of passages that are all empty scores 0 (colpali's amax
over an empty axis raises); ``device=None`` picks CUDA when available, else the CPU
(colpali's "auto" also tries MPS, which sparseops does not run on).

``patch(*objects)`` replaces ``BaseVisualRetrieverProcessor.score_multi_vector`` (every
ColPali / ColQwen / ColIdefics processor's ``score`` calls it) and every loaded
``colpali_engine.*`` module's reference to ``maxsim_inbatch`` / ``maxsim_kd`` (the
losses), plus those held by the given objects; ``unpatch()`` restores them. With
``COLPALI_SCORES_BACKEND`` set to "torch" or "lik" the patched functions call colpali's own.
This module imports nothing of colpali-engine until ``patch()``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from ..ops.maxsim import maxsim, maxsim_pairs
from ._patching import Patcher

__all__ = ["maxsim_inbatch", "maxsim_kd", "patch", "score_multi_vector", "unpatch"]

_PATCH = Patcher("colpali_engine")

# Passages scored per op call for list inputs (a multiple of batch_size): bounds the padded
# copy of the passages and the argmax the op writes ([queries, passages, Lq], int16).
_BLOCK_PASSAGES = 2048


def _original(name: str):
    """colpali's own function when COLPALI_SCORES_BACKEND asks for it (while patched)."""
    backend = os.environ.get("COLPALI_SCORES_BACKEND", "auto").lower()
    if backend in ("torch", "lik"):
        return _PATCH.originals.get(name)
    return None


def maxsim_inbatch(query: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    """colpali's ``maxsim_inbatch``: zero-padded query [B_q, L_q, d] x doc [B_d, L_d, d] ->
    [B_q, B_d] in the inputs' dtype (fp32 accumulation), differentiable."""
    original = _original("maxsim_inbatch")
    if original is not None:
        return original(query, doc)
    return maxsim(query, doc).to(query.dtype)


def maxsim_kd(query: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    """colpali's ``maxsim_kd``: zero-padded query [B, L_q, d] x candidates [B, N, L_d, d] ->
    [B, N] in the inputs' dtype (fp32 accumulation), differentiable."""
    original = _original("maxsim_kd")
    if original is not None:
        return original(query, doc)
    return maxsim_pairs(query, doc).to(query.dtype)


def _default_device() -> torch.device:
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def _lengths(xs: list[torch.Tensor], name: str) -> list[int]:
    out = []
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            what = f"shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}[{i}] must be a 2-D [sequence_length, embedding_dim] tensor, got {what}")
        out.append(x.shape[0])
    return out


def _pad(xs: list[torch.Tensor], device) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence([x.to(device) for x in xs], batch_first=True, padding_value=0)


def score_multi_vector(
    qs: torch.Tensor | list[torch.Tensor],
    ps: torch.Tensor | list[torch.Tensor],
    batch_size: int = 128,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """colpali-engine's ``score_multi_vector`` on ``sparseops.maxsim`` (module docstring).

    Args:
        qs: query embeddings, a list of [L_i, dim] tensors or one zero-padded [n_q, L, dim].
        ps: passage embeddings, the same way.
        batch_size: colpali's batch size; it decides which passages colpali pads (and so
            whose negative maxima are clipped at 0), and bounds the queries per op call.
        device: where to score (default: CUDA when available, else the CPU).

    Returns:
        fp32 [n_queries, n_passages] on the CPU.
    """
    original = _original("score_multi_vector")
    if original is not None:
        return original.__func__(qs, ps, batch_size=batch_size, device=device)
    if len(qs) == 0:
        raise ValueError("No queries provided")
    if len(ps) == 0:
        raise ValueError("No passages provided")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = torch.device(device) if device is not None else _default_device()
    q_list = not isinstance(qs, torch.Tensor)
    p_list = not isinstance(ps, torch.Tensor)
    q_lens = _lengths(qs, "qs") if q_list else None
    p_lens = _lengths(ps, "ps") if p_list else None
    nq, np_ = len(qs), len(ps)
    if not q_list and qs.dim() != 3:
        raise ValueError(f"qs must be [n_queries, L, dim] or a list of [L_i, dim] tensors, got shape {list(qs.shape)}")
    if not p_list and ps.dim() != 3:
        raise ValueError(f"ps must be [n_passages, L, dim] or a list of [L_i, dim] tensors, got shape {list(ps.shape)}")

    # The passages, as (block tensor, mask or None) per block of whole colpali batches.
    blocks = []
    if p_list:
        step = max(batch_size, _BLOCK_PASSAGES // batch_size * batch_size)
        lens = torch.tensor(p_lens, dtype=torch.int64)
        pad_to = -(-np_ // batch_size) * batch_size
        batch_max = torch.nn.functional.pad(lens, (0, pad_to - np_)).view(-1, batch_size).amax(dim=1)
        batch_max = batch_max.repeat_interleave(batch_size)[:np_]
        for j in range(0, np_, step):
            block = _pad(ps[j : j + step], device)
            # Shorter than its batch's longest: colpali pads it, so its zeros take part.
            eff = torch.where(lens[j : j + step] < batch_max[j : j + step], block.shape[1], lens[j : j + step])
            blocks.append((block, eff.to(device)))
    else:
        step = max(batch_size, _BLOCK_PASSAGES // batch_size * batch_size)
        for j in range(0, np_, step):
            blocks.append((ps[j : j + step].to(device), None))

    rows = []
    for i in range(0, nq, batch_size):
        if q_list:
            qb = _pad(qs[i : i + batch_size], device)
            qm = torch.tensor(q_lens[i : i + batch_size], dtype=torch.int64, device=device)
        else:
            qb, qm = qs[i : i + batch_size].to(device), None
        cols = []
        for block, eff in blocks:
            if block.dtype != qb.dtype:
                raise ValueError(f"qs and ps must have one dtype (colpali's einsum needs it), got {qb.dtype} and "
                                 f"{block.dtype}")  # fmt: skip
            cols.append(maxsim(qb, block, q_mask=qm, d_mask=eff))
        rows.append(torch.cat(cols, dim=1).cpu())
    return torch.cat(rows, dim=0).to(torch.float32)


def patch(*objects: Any) -> list[str]:
    """Make colpali-engine score with sparseops (module docstring). Imports
    ``colpali_engine.utils.processing_utils`` and ``colpali_engine.utils.maxsim`` (colpali-engine
    must be importable). Returns the names replaced; ``unpatch()`` undoes it."""
    pu = importlib.import_module("colpali_engine.utils.processing_utils")
    ms = importlib.import_module("colpali_engine.utils.maxsim")
    done: list[str] = []
    if not _PATCH.active:
        _PATCH.originals["maxsim_inbatch"] = ms.maxsim_inbatch
        _PATCH.originals["maxsim_kd"] = ms.maxsim_kd
        base = pu.BaseVisualRetrieverProcessor
        _PATCH.originals["score_multi_vector"] = base.__dict__["score_multi_vector"]
        _PATCH.set(base, "score_multi_vector", staticmethod(score_multi_vector))
        done.append(f"{pu.__name__}.BaseVisualRetrieverProcessor.score_multi_vector")
    mapping = {
        id(_PATCH.originals["maxsim_inbatch"]): maxsim_inbatch,
        id(_PATCH.originals["maxsim_kd"]): maxsim_kd,
    }
    done += _PATCH.swap(mapping, objects)
    return done


def unpatch() -> None:
    """Undo ``patch()``."""
    _PATCH.restore()
