"""MaxSim late-interaction modules: ``MaxSimScorer`` and the contrastive loss
(``MaxSimContrastiveLoss`` / ``maxsim_contrastive_loss``), built on the public MaxSim ops.

Scores come from ``sparseops.maxsim`` (every query x every document), ``maxsim_pairs``
(aligned pairs / K candidates per query) or ``maxsim_varlen`` (packed ragged tokens): none of
them writes the Lq x Ld similarities, and their backward reads the argmax the forward saved
(int16 below 32,768 document tokens). So the in-batch loss over B queries and B * N documents
holds the [B, B * N] fp32 scores and a [B, B * N, Lq] int16 argmax, never the
[B, B * N, Lq, Ld] similarities of the einsum formulation (B = 128, N = 2, Lq = 32, Ld = 300:
2.1 MB of argmax against 1.26 GB of fp32 similarities).

Temperature: the scorer and the loss divide the scores by a temperature, a plain float by
default (PyLate's ``Contrastive(temperature=...)``, colpali's losses), or a learnable scalar
with ``learnable_temperature=True``, stored as its logarithm (so it stays positive, as CLIP's
``logit_scale``) and clamped to ``min_temperature`` in the forward. A scorer used for
inference keeps the default 1.0: its scores are then the plain MaxSim scores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._common import describe as _describe
from ..ops.maxsim import maxsim, maxsim_pairs, maxsim_varlen

__all__ = ["MaxSimContrastiveLoss", "MaxSimScorer", "maxsim_contrastive_loss"]


class _Temperature(nn.Module):
    """A positive temperature: a float buffer, or a learnable log-temperature parameter."""

    def __init__(self, temperature: float, learnable: bool, min_temperature: float) -> None:
        super().__init__()
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if not min_temperature >= 0:
            raise ValueError(f"min_temperature must be >= 0, got {min_temperature!r}")
        self.learnable = bool(learnable)
        self.min_temperature = float(min_temperature)
        if self.learnable:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature), dtype=torch.float32))
        else:
            self.value = float(temperature)

    def forward(self) -> torch.Tensor | float:
        if self.learnable:
            return self.log_temperature.exp().clamp_min(self.min_temperature)
        return self.value

    def extra_repr(self) -> str:
        return "learnable" if self.learnable else f"{self.value}"


def _apply_temperature(scores: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    if isinstance(temperature, torch.Tensor):
        return scores / temperature.to(scores.dtype)
    return scores if temperature == 1.0 else scores / temperature


def _check_packed(q, cu_q, d, cu_d) -> None:
    if (cu_q is None) != (cu_d is None):
        raise ValueError("cu_q and cu_d go together: give both (packed tokens) or neither (padded tensors)")
    if q.dim() != 2 or d.dim() != 2:
        raise ValueError(
            f"with cu_q / cu_d, q and d must be packed tokens [total, dim], got q {_describe(q)} and d {_describe(d)}"
        )


class MaxSimScorer(nn.Module):
    """Late-interaction (ColBERT / ColPali) scoring as a module: sum_i max_j <q_i, d_j>.

    Args:
        reduce: "sum" (ColBERT) or "mean" over the real query tokens.
        similarity: "dot", or "cosine" (tokens L2-normalised before scoring, inside the
            autograd graph: PyLate's and colpali's models normalise their outputs the same way).
        pylate_mask: PyLate's multiplicative masking (masked document tokens score 0 and take
            part in the max) instead of the default (a masked token never wins).
        temperature: the scores are divided by it (default 1.0: plain scores).
        learnable_temperature: make the temperature a parameter (``log_temperature``).
        min_temperature: lower clamp of a learnable temperature (default 1e-3).
        backend: the MaxSim ops' backend (None: auto).

    ``forward(q, d, *, q_mask=None, d_mask=None, pairwise=False, cu_q=None, cu_d=None,
    pairs=None)`` picks the op from the inputs:

    - ``q`` [Nq, Lq, dim] (or [Lq, dim]), ``d`` [Nd, Ld, dim]: every query against every
      document, [Nq, Nd] (``sparseops.maxsim``).
    - ``pairwise=True`` with ``d`` [B, Ld, dim]: query b against document b, [B]; ``d``
      [B, K, Ld, dim] (always pairwise): query b against its K candidates, [B, K]
      (``sparseops.maxsim_pairs``).
    - ``cu_q``, ``cu_d`` given: packed tokens ``q`` [total_q, dim], ``d`` [total_d, dim] with
      int32 cumulative lengths; all pairs [Nq, Nd], or the [P, 2] ``pairs`` list, [P]
      (``sparseops.maxsim_varlen``).

    Masks are bool (True = real token) or lengths, as the ops take them. The scores are fp32
    (fp64 for fp64 inputs), divided by the temperature, differentiable in q and d (and the
    temperature when learnable).
    """

    def __init__(
        self,
        *,
        reduce: str = "sum",
        similarity: str = "dot",
        pylate_mask: bool = False,
        temperature: float = 1.0,
        learnable_temperature: bool = False,
        min_temperature: float = 1e-3,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if reduce not in ("sum", "mean"):
            raise ValueError(f'reduce must be "sum" or "mean", got {reduce!r}')
        if similarity not in ("dot", "cosine"):
            raise ValueError(f'similarity must be "dot" or "cosine", got {similarity!r}')
        self.reduce = reduce
        self.similarity = similarity
        self.pylate_mask = bool(pylate_mask)
        self.backend = backend
        self._temperature = _Temperature(temperature, learnable_temperature, min_temperature)

    @property
    def temperature(self) -> torch.Tensor | float:
        """The current temperature (a tensor when learnable)."""
        return self._temperature()

    def forward(
        self,
        q: torch.Tensor,
        d: torch.Tensor,
        *,
        q_mask: torch.Tensor | None = None,
        d_mask: torch.Tensor | None = None,
        pairwise: bool = False,
        cu_q: torch.Tensor | None = None,
        cu_d: torch.Tensor | None = None,
        pairs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        opts = dict(reduce=self.reduce, similarity=self.similarity, backend=self.backend)
        if cu_q is not None or cu_d is not None:
            _check_packed(q, cu_q, d, cu_d)
            if q_mask is not None or d_mask is not None:
                raise ValueError("packed tokens (cu_q / cu_d) take no masks: every packed token is real")
            scores = maxsim_varlen(q, cu_q, d, cu_d, pairs=pairs, **opts)
        elif pairs is not None:
            raise ValueError("pairs goes with packed tokens (cu_q / cu_d); use pairwise=True for aligned tensors")
        elif pairwise or d.dim() == 4:
            scores = maxsim_pairs(q, d, q_mask=q_mask, d_mask=d_mask, pylate_mask=self.pylate_mask, **opts)
        else:
            scores = maxsim(q, d, q_mask=q_mask, d_mask=d_mask, pylate_mask=self.pylate_mask, **opts)
        return _apply_temperature(scores, self.temperature)

    def extra_repr(self) -> str:
        return (
            f"reduce={self.reduce!r}, similarity={self.similarity!r}, pylate_mask={self.pylate_mask}, "
            f"backend={self.backend!r}"
        )


def _contrastive_scores(
    q, d, q_mask, d_mask, cu_q, cu_d, in_batch_negatives, reduce, similarity, pylate_mask, backend
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [B, C], labels [B] int64): C = B * N with in-batch negatives (document j * N + k
    is query j's slot k; query b's positive at column b * N), else C = N (label 0)."""
    opts = dict(reduce=reduce, similarity=similarity, backend=backend)
    if cu_q is not None or cu_d is not None:
        _check_packed(q, cu_q, d, cu_d)
        if q_mask is not None or d_mask is not None:
            raise ValueError("packed tokens (cu_q / cu_d) take no masks: every packed token is real")
        if pylate_mask:
            raise ValueError("pylate_mask has no meaning for packed tokens (there is no padding to mask)")
        B, nd = cu_q.shape[0] - 1, cu_d.shape[0] - 1
        if B <= 0 or nd % B != 0:
            raise ValueError(
                f"packed documents must be N per query (document b * N + k is query b's slot k): cu_q "
                f"{_describe(cu_q)} has {B} queries, cu_d {_describe(cu_d)} has {nd} documents"
            )
        N = nd // B
        dev = q.device
        if in_batch_negatives:
            scores = maxsim_varlen(q, cu_q, d, cu_d, **opts)
            return scores, torch.arange(B, device=dev) * N
        b = torch.arange(B, device=dev).repeat_interleave(N)
        pairs = torch.stack([b, torch.arange(B * N, device=dev)], dim=1)
        scores = maxsim_varlen(q, cu_q, d, cu_d, pairs=pairs, **opts).view(B, N)
        return scores, torch.zeros(B, dtype=torch.int64, device=dev)
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be [B, Lq, dim] query tokens (or packed with cu_q), got {_describe(q)}")
    if not isinstance(d, torch.Tensor) or d.dim() not in (3, 4) or d.shape[0] != q.shape[0]:
        raise ValueError(
            f"d must be [B, Ld, dim] positives or [B, N, Ld, dim] (slot 0 the positive, then hard "
            f"negatives) with B = q.shape[0] = {q.shape[0]}, got {_describe(d)}"
        )
    B = q.shape[0]
    if d.dim() == 3:
        d = d.unsqueeze(1)
        if d_mask is not None:
            d_mask = d_mask.unsqueeze(1)
    N, Ld, dim = d.shape[1], d.shape[2], d.shape[3]
    dev = q.device
    if in_batch_negatives:
        dm = None if d_mask is None else d_mask.reshape(B * N, *d_mask.shape[2:])
        scores = maxsim(q, d.reshape(B * N, Ld, dim), q_mask=q_mask, d_mask=dm, pylate_mask=pylate_mask, **opts)
        return scores, torch.arange(B, device=dev) * N
    scores = maxsim_pairs(q, d, q_mask=q_mask, d_mask=d_mask, pylate_mask=pylate_mask, **opts)
    return scores, torch.zeros(B, dtype=torch.int64, device=dev)


def maxsim_contrastive_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    cu_q: torch.Tensor | None = None,
    cu_d: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    in_batch_negatives: bool = True,
    reduce: str = "sum",
    similarity: str = "dot",
    pylate_mask: bool = False,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    return_scores: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Contrastive (InfoNCE) late-interaction loss with in-batch and hard negatives.

    Args:
        q: [B, Lq, dim] query tokens, or packed [total_q, dim] with ``cu_q`` int32 [B + 1].
        d: [B, Ld, dim] (one positive per query), or [B, N, Ld, dim]: query b's positive in
            slot 0 and N - 1 hard negatives after it (PyLate's stacked ``[anchor, positive,
            negative...]`` layout); or packed [total_d, dim] with ``cu_d`` int32 [B * N + 1]
            (document b * N + k is query b's slot k).
        q_mask: None, bool [B, Lq] (True = real token) or lengths [B].
        d_mask: None, bool [B, Ld] / [B, N, Ld] or lengths [B] / [B, N].
        temperature: scores are divided by it before the cross-entropy (a float or a scalar
            tensor, e.g. a learnable one).
        in_batch_negatives: True (default): each query is scored against all B * N
            documents of the batch (its own positive and negatives and every other query's),
            the logits are [B, B * N] and the target of query b is column b * N, as in
            PyLate's ``Contrastive``. False: only against its own N documents ([B, N], target
            0: hard negatives only).
        reduce, similarity, pylate_mask, backend: as in ``sparseops.maxsim``.
        reduction: "mean" (PyLate's ``size_average=True``), "sum" or "none" (per query [B]).
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        return_scores: also return the fp32 logits (scores / temperature) [B, C].

    Returns:
        the loss (a scalar, or [B] with reduction="none"); (loss, logits) when return_scores.

    Configured like PyLate's ``Contrastive`` loss (embeddings L2-normalised: similarity=
    "cosine"; its masks: pylate_mask=True with d_mask the skiplist & attention mask, q_mask
    None under query expansion; ``temperature``; ``size_average``) it computes the same loss
    and gradients (tests/test_maxsim_nn.py checks that against PyLate's own class). Memory:
    the forward keeps [B, C] scores and a [B, C, Lq] int16 argmax, never the Lq x Ld
    similarities; the backward reads the argmax (one gather / scatter-add per query token).
    With packed tokens and in_batch_negatives=False on CUDA tensors, ``maxsim_varlen`` reads
    one number back to size its argmax (a host synchronisation).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f'reduction must be "mean", "sum" or "none", got {reduction!r}')
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    scores, labels = _contrastive_scores(
        q, d, q_mask, d_mask, cu_q, cu_d, in_batch_negatives, reduce, similarity, pylate_mask, backend
    )
    logits = _apply_temperature(scores, temperature)
    loss = F.cross_entropy(logits, labels, reduction=reduction, label_smoothing=label_smoothing)
    return (loss, logits) if return_scores else loss


class MaxSimContrastiveLoss(nn.Module):
    """``maxsim_contrastive_loss`` as a module, with an optional learnable temperature.

    Args:
        temperature, learnable_temperature, min_temperature: as in ``MaxSimScorer``.
        in_batch_negatives, reduce, similarity, pylate_mask, reduction, label_smoothing,
        backend: as in ``maxsim_contrastive_loss``.

    ``forward(q, d, *, q_mask=None, d_mask=None, cu_q=None, cu_d=None)`` returns the loss.
    PyLate's ``Contrastive(model, temperature=t)`` on normalised embeddings is
    ``MaxSimContrastiveLoss(temperature=t, similarity="cosine", pylate_mask=True)`` called on
    the model's token embeddings with ``d_mask`` = the stacked document masks.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        learnable_temperature: bool = False,
        min_temperature: float = 1e-3,
        in_batch_negatives: bool = True,
        reduce: str = "sum",
        similarity: str = "dot",
        pylate_mask: bool = False,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f'reduction must be "mean", "sum" or "none", got {reduction!r}')
        if reduce not in ("sum", "mean"):
            raise ValueError(f'reduce must be "sum" or "mean", got {reduce!r}')
        if similarity not in ("dot", "cosine"):
            raise ValueError(f'similarity must be "dot" or "cosine", got {similarity!r}')
        self._temperature = _Temperature(temperature, learnable_temperature, min_temperature)
        self.in_batch_negatives = bool(in_batch_negatives)
        self.reduce = reduce
        self.similarity = similarity
        self.pylate_mask = bool(pylate_mask)
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)
        self.backend = backend

    @property
    def temperature(self) -> torch.Tensor | float:
        return self._temperature()

    def forward(
        self,
        q: torch.Tensor,
        d: torch.Tensor,
        *,
        q_mask: torch.Tensor | None = None,
        d_mask: torch.Tensor | None = None,
        cu_q: torch.Tensor | None = None,
        cu_d: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return maxsim_contrastive_loss(
            q, d, q_mask=q_mask, d_mask=d_mask, cu_q=cu_q, cu_d=cu_d, temperature=self.temperature,
            in_batch_negatives=self.in_batch_negatives, reduce=self.reduce, similarity=self.similarity,
            pylate_mask=self.pylate_mask, reduction=self.reduction, label_smoothing=self.label_smoothing,
            backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"in_batch_negatives={self.in_batch_negatives}, reduce={self.reduce!r}, similarity={self.similarity!r}, "
            f"pylate_mask={self.pylate_mask}, reduction={self.reduction!r}"
        )
