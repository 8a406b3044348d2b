"""Pure-PyTorch references for MoE routing: the test oracle and the benchmark baseline.

Every backend (C++ CPU, CUDA, Triton) must reproduce these functions: integer outputs
bit for bit, floating outputs within ``sparseops.testing`` tolerances. The semantics
written here are the specification; the public docstrings in ``sparseops.ops.routing``
repeat them for users.
"""

from __future__ import annotations

import torch

__all__ = [
    "accumulate_dtype",
    "selection_scores_ref",
    "topk_route_ref",
    "route_weights_ref",
    "route_metadata_ref",
    "expert_choice_route_ref",
    "load_balancing_loss_ref",
    "router_z_loss_ref",
]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 logits are routed in fp64 (for gradcheck); every other dtype in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _score(x64: torch.Tensor, scoring: str, order: str, enabled: torch.Tensor) -> torch.Tensor:
    """Router scores computed in fp64: sigmoid, softmax over enabled experts, or the logit."""
    if scoring == "sigmoid":
        return torch.sigmoid(x64)
    if order == "softmax_then_topk":
        p = torch.softmax(x64.masked_fill(~enabled, float("-inf")), dim=-1)
        return p.nan_to_num(nan=0.0)  # a row with no enabled expert
    return x64


def selection_scores_ref(
    logits: torch.Tensor,
    *,
    scoring: str = "softmax",
    order: str = "softmax_then_topk",
    bias: torch.Tensor | None = None,
    n_group: int = 1,
    expert_mask: torch.Tensor | None = None,
    group_scoring: str = "top2_sum",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The keys every backend ranks by, as (rank [T, E], group_score [T, n_group], enabled [E]).

    Why fp64-then-round: with a bias or groups the ranking depends on exp(). Different exp
    implementations (glibc, CUDA libdevice, Sleef) disagree in the last fp32 bit, which would
    flip near-ties between backends. Each backend computes the score in fp64 and rounds it
    to the accumulate dtype, so all of them agree except when an fp64 value lies within an
    fp64 ulp of an fp32 rounding boundary (about 1 in 2^29 values). Without a bias the rank is
    the logit itself, which orders experts exactly as softmax or sigmoid would.
    """
    acc = accumulate_dtype(logits.dtype)
    T, E = logits.shape
    enabled = (
        torch.ones(E, dtype=torch.bool, device=logits.device)
        if expert_mask is None
        else expert_mask.to(device=logits.device, dtype=torch.bool)
    )
    x = logits.to(acc)
    need_score = bias is not None or n_group > 1
    score = _score(logits.double(), scoring, order, enabled).to(acc) if need_score else x
    biased = score if bias is None else score + bias.to(device=logits.device, dtype=acc)
    rank = x if bias is None else biased
    rank = rank.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    rank = rank.masked_fill(~enabled, float("-inf"))
    if n_group > 1:
        # group_scoring "top2_sum": a group's score is the sum of its two best (biased)
        # scores (DeepSeek-V3 / vLLM grouped_topk); a disabled expert scores -inf, so a group
        # with fewer than two enabled experts scores -inf. "max": its best biased score
        # (DeepSeek-V2 group_limited_greedy).
        gs = E // n_group
        per_group = biased.nan_to_num(nan=float("-inf")).masked_fill(~enabled, float("-inf"))
        width = 1 if group_scoring == "max" else min(2, gs)
        group_score = per_group.view(T, n_group, gs).topk(width, dim=-1).values.sum(dim=-1)
    else:
        group_score = torch.zeros(T, 1, dtype=acc, device=logits.device)
    return rank, group_score, enabled


def _topk_lowest_index(key: torch.Tensor, candidate: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``key`` along the last dim among ``candidate`` entries.

    Candidates come before non-candidates, larger keys first, lower index first on ties.
    Returns (indices [.., k], valid [.., k]) where valid is False past the last candidate.
    """
    by_key = key.sort(dim=-1, descending=True, stable=True).indices
    cand = candidate.gather(-1, by_key).to(torch.int8)
    by_cand = cand.sort(dim=-1, descending=True, stable=True).indices
    idx = by_key.gather(-1, by_cand)[..., :k]
    return idx, candidate.gather(-1, idx)


def topk_route_ref(
    logits: torch.Tensor,
    k: int,
    *,
    scoring: str = "softmax",
    order: str = "softmax_then_topk",
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scale: float = 1.0,
    expert_mask: torch.Tensor | None = None,
    group_scoring: str = "top2_sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``sparseops.topk_route``; differentiable through the weights.

    Selection: each token keeps its ``topk_group`` best groups (when ``n_group > 1``), then
    the ``k`` best enabled experts inside them, by descending rank (see
    ``selection_scores_ref``), lower expert index first on ties. Slots left over when fewer
    than ``k`` experts can be chosen get id -1 and weight 0.

    Weights (from unbiased scores, accumulate dtype):
      softmax + softmax_then_topk: p = softmax over enabled experts; w = p[ids],
          divided by their sum when ``renormalize``;
      softmax + topk_then_softmax: w = softmax of the selected logits (already sums to 1);
      sigmoid: w = sigmoid(logit)[ids], divided by their sum when ``renormalize``.
      Finally w *= scale. A zero sum leaves zeros.
    """
    T, E = logits.shape
    rank, group_score, enabled = selection_scores_ref(
        logits,
        scoring=scoring,
        order=order,
        bias=bias,
        n_group=n_group,
        expert_mask=expert_mask,
        group_scoring=group_scoring,
    )
    candidate = enabled.expand(T, E)
    if n_group > 1:
        groups, _ = _topk_lowest_index(group_score, torch.ones_like(group_score, dtype=torch.bool), topk_group)
        in_group = torch.zeros(T, n_group, dtype=torch.bool, device=logits.device)
        in_group.scatter_(1, groups, True)
        candidate = candidate & in_group.repeat_interleave(E // n_group, dim=1)
    idx, valid = _topk_lowest_index(rank, candidate, k)
    ids = torch.where(valid, idx, -1).to(torch.int32)
    weights = route_weights_ref(
        logits,
        ids,
        scoring=scoring,
        order=order,
        renormalize=renormalize,
        scale=scale,
        expert_mask=expert_mask,
    )
    return weights, ids


def route_weights_ref(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    scoring: str = "softmax",
    order: str = "softmax_then_topk",
    renormalize: bool = True,
    scale: float = 1.0,
    expert_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The routing weights of chosen experts ``ids`` [T, k] (-1 = none), differentiable in logits.

    This is the half of ``topk_route_ref`` that autograd sees: the backward of every backend
    is the gradient of this function with the ids held fixed.
    """
    acc = accumulate_dtype(logits.dtype)
    x = logits.to(acc)
    valid = ids >= 0
    idx = ids.clamp_min(0).long()
    if scoring == "softmax" and order == "topk_then_softmax":
        sel = x.gather(1, idx).masked_fill(~valid, float("-inf"))
        w = torch.softmax(sel, dim=-1).nan_to_num(nan=0.0)
    else:
        if scoring == "sigmoid":
            p = torch.sigmoid(x)
        else:
            if expert_mask is not None:
                x = x.masked_fill(~expert_mask.to(device=x.device, dtype=torch.bool), float("-inf"))
            p = torch.softmax(x, dim=-1).nan_to_num(nan=0.0)
        w = torch.where(valid, p.gather(1, idx), 0)  # not gather * valid: NaN * 0 is NaN
        if renormalize:
            total = w.sum(dim=-1, keepdim=True)
            w = torch.where(total > 0, w / torch.where(total > 0, total, 1), 0)
    return w * scale


def route_metadata_ref(ids: torch.Tensor, num_experts: int, block_m: int = 0) -> tuple[torch.Tensor, ...]:
    """Reference for ``sparseops.route_metadata``: a stable counting sort of slots by expert.

    ids [T, k] int32 with values in [-1, E) (anything else raises); -1 marks a dropped slot. Returns int32 tensors
    (counts [E], offs [E], sorted_slots [T*k], inverse [T*k], tokens [T*k], padded_slots [P],
    block_expert [P / block_m], padded_offs [E]), the last three empty when block_m == 0.

    sorted_slots lists the flat slots t*k + j expert by expert, ascending within an expert,
    dropped slots last; offs are the cumulative ends of the kept rows (torch._grouped_mm's
    offs). With block_m > 0 each expert's rows are padded to a multiple of block_m:
    P = (T*k + E*(block_m - 1)) // block_m * block_m bounds the padded length; padded_slots
    holds the slot of each padded row or the sentinel T*k; block_expert the expert of each
    block of block_m rows, -1 past the last used block; padded_offs the padded ends.
    """
    T, k = ids.shape
    E = num_experts
    n = T * k
    dev = ids.device
    flat = ids.reshape(-1).long()
    if n > 0 and bool(((flat < -1) | (flat >= E)).any()):
        raise RuntimeError(
            f"ids must hold expert indices in [0, num_experts = {E}) or -1 for a dropped slot, "
            f"got values in [{int(flat.min())}, {int(flat.max())}]"
        )
    kept = flat >= 0
    counts = torch.bincount(flat[kept], minlength=E)[:E]
    offs = counts.cumsum(0)
    key = torch.where(kept, flat, E)
    sorted_slots = key.sort(stable=True).indices
    inverse = torch.empty_like(sorted_slots)
    inverse[sorted_slots] = torch.arange(n, device=dev)
    tokens = sorted_slots // max(k, 1)
    i32 = torch.int32
    out = [counts.to(i32), offs.to(i32), sorted_slots.to(i32), inverse.to(i32), tokens.to(i32)]
    if block_m <= 0:
        empty = torch.empty(0, dtype=i32, device=dev)
        return (*out, empty, empty, empty)

    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_offs = padded_counts.cumsum(0)
    num_blocks = (n + E * (block_m - 1)) // block_m
    padded_slots = torch.full((num_blocks * block_m,), n, dtype=torch.long, device=dev)
    kept_rows = int(offs[-1])
    rows = torch.arange(kept_rows, device=dev)
    row_expert = torch.repeat_interleave(torch.arange(E, device=dev), counts)
    padded_start = padded_offs - padded_counts
    padded_rows = padded_start[row_expert] + rows - (offs - counts)[row_expert]
    padded_slots[padded_rows] = sorted_slots[:kept_rows]
    block_start = torch.arange(num_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(padded_offs, block_start, right=True)
    block_expert = torch.where(block_expert < E, block_expert, -1)
    return (*out, padded_slots.to(i32), block_expert.to(i32), padded_offs.to(i32))


def expert_choice_route_ref(logits: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``sparseops.expert_choice_route`` (Zhou et al. 2022, Expert Choice).

    probs = softmax(logits) over experts per token (accumulate dtype); each expert e takes
    the ``capacity`` tokens with the largest probs[:, e], larger first, lower token index
    first on ties. Returns (weights [E, C], token_ids [E, C] int32).
    """
    probs = torch.softmax(logits.to(accumulate_dtype(logits.dtype)), dim=-1)
    order = probs.t().sort(dim=-1, descending=True, stable=True).indices[:, :capacity]
    return probs.t().gather(1, order), order.to(torch.int32)


def load_balancing_loss_ref(router_probs: torch.Tensor, expert_counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch / GShard auxiliary loss: E * sum_e f_e * P_e.

    f_e = expert_counts[e] / (T * top_k) is the fraction of routed slots that expert e got,
    P_e = mean over tokens of router_probs[:, e]. Gradients flow through router_probs only.
    Equals 1 under perfectly uniform routing; 0 for T = 0.
    """
    T, E = router_probs.shape
    if T == 0:
        return router_probs.sum() * 0
    # In the accumulate dtype, returned in router_probs' dtype: a count above 65504 is inf in
    # fp16 (T = 32768 tokens, k = 8, E = 4 gives 65536 slots per expert) and bf16 rounds
    # counts above 256, so casting the counts to a half dtype made the loss inf or off.
    acc = accumulate_dtype(router_probs.dtype)
    f = expert_counts.to(acc) / (T * top_k)
    return (E * (f * router_probs.to(acc).mean(dim=0)).sum()).to(router_probs.dtype)


def router_z_loss_ref(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (accumulate dtype); 0 for T = 0."""
    z = torch.logsumexp(logits.to(accumulate_dtype(logits.dtype)), dim=-1)
    return (z * z).mean() if z.numel() > 0 else z.sum()
