"""MoE routing ops: top-k routing, routing metadata, expert-choice routing, router losses.

Declarations live in two places by design:
  * ``sparseops::topk_route`` / ``route_metadata`` / ``topk_route_backward`` are C++ schemas
    (csrc/registration.cpp) with C++ CPU and CUDA kernels and C++ autograd, so a decode-size
    call never enters Python after this module's thin wrapper;
  * ``sparseops::topk_route_triton`` / ``route_metadata_triton`` are Python custom ops around
    the Triton kernels (kernels/routing.py).
This module adds their fake (meta) implementations, the Triton ops' autograd, the backend
choice and the public functions. The semantics are specified by
``sparseops.reference.routing``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import NamedTuple

import torch

from .. import _backend
from ..reference import routing as ref

__all__ = [
    "RouteMeta",
    "topk_route",
    "route_metadata",
    "route",
    "expert_choice_route",
    "load_balancing_loss",
    "router_z_loss",
]

MAX_EXPERTS = 1024
MAX_TOPK = 32
_INT32_MAX = 2**31 - 1
_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class RouteMeta(NamedTuple):
    """Routing metadata, all int32 on the ids' device (see ``route_metadata``)."""

    counts: torch.Tensor
    offs: torch.Tensor
    sorted_slots: torch.Tensor
    inverse: torch.Tensor
    tokens: torch.Tensor
    padded_slots: torch.Tensor | None = None
    block_expert: torch.Tensor | None = None
    padded_offs: torch.Tensor | None = None


def _describe(t: torch.Tensor) -> str:
    return f"shape {list(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_topk_route(logits, k, scoring, order, bias, n_group, topk_group, scale, expert_mask) -> None:
    """The C++ op's checks (csrc/ops/routing.cpp), for the backends that do not pass through it."""
    if logits.dim() != 2:
        raise RuntimeError(f"logits must be a 2-D tensor, got {_describe(logits)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise RuntimeError(f"logits must have dtype in {_LOGIT_DTYPES}, got {_describe(logits)}")
    T, E = logits.shape
    if not 1 <= E <= MAX_EXPERTS:
        raise RuntimeError(
            f"logits.size(1) (the number of experts) must be in [1, {MAX_EXPERTS}], got {_describe(logits)}"
        )
    kmax = min(E, MAX_TOPK)
    if not 1 <= k <= kmax:
        raise RuntimeError(
            f"k must be in [1, min(E, {MAX_TOPK})] = [1, {kmax}], got k = {k} for logits {_describe(logits)}"
        )
    if scoring not in ("softmax", "sigmoid"):
        raise RuntimeError(f'scoring must be "softmax" or "sigmoid", got "{scoring}"')
    if order not in ("softmax_then_topk", "topk_then_softmax"):
        raise RuntimeError(f'order must be "softmax_then_topk" or "topk_then_softmax", got "{order}"')
    if n_group < 1 or E % n_group != 0:
        raise RuntimeError(f"n_group must be >= 1 and divide E = {E}, got n_group = {n_group}")
    if not 1 <= topk_group <= n_group:
        raise RuntimeError(f"topk_group must be in [1, n_group = {n_group}], got {topk_group}")
    if k > topk_group * (E // n_group):
        raise RuntimeError(
            f"k = {k} cannot exceed the experts in the chosen groups, "
            f"topk_group * E / n_group = {topk_group * (E // n_group)}"
        )
    if not math.isfinite(scale):
        raise RuntimeError(f"scale must be finite, got {scale}")
    for name, t, dtypes in (("bias", bias, _LOGIT_DTYPES), ("expert_mask", expert_mask, (torch.bool,))):
        if t is None:
            continue
        if t.dim() != 1:
            raise RuntimeError(f"{name} must be a 1-D tensor, got {_describe(t)}")
        if t.dtype not in dtypes:
            raise RuntimeError(f"{name} must have dtype in {dtypes}, got {_describe(t)}")
        if t.shape[0] != E:
            raise RuntimeError(
                f"{name}.size(0) must equal the number of experts logits.size(1) = {E}, got {_describe(t)}"
            )
        if t.device != logits.device:
            raise RuntimeError(f"{name} must be on the same device as logits ({logits.device}), got {_describe(t)}")


def _check_route_metadata(ids: torch.Tensor, num_experts: int, block_m: int, check_values: bool) -> None:
    if ids.dim() != 2:
        raise RuntimeError(f"ids must be a 2-D tensor, got {_describe(ids)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise RuntimeError(f"ids must have dtype in (torch.int32, torch.int64), got {_describe(ids)}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise RuntimeError(f"num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}")
    if not 0 <= block_m <= 65536:
        raise RuntimeError(f"block_m must be in [0, 65536], got {block_m}")
    n = ids.numel()
    if max(n, _padded_rows(n, num_experts, block_m)) > _INT32_MAX:
        raise RuntimeError(
            f"route_metadata needs T * k (and its block-padded bound) to fit in int32, got ids {_describe(ids)}"
        )
    if check_values and n > 0 and bool(((ids < -1) | (ids >= num_experts)).any()):
        raise RuntimeError(
            f"ids must hold expert indices in [0, num_experts = {num_experts}) or -1 for a dropped slot, "
            f"got a value outside that range in ids {_describe(ids)}"
        )


def _padded_rows(n, num_experts: int, block_m: int):
    return (n + num_experts * (block_m - 1)) // block_m * block_m if block_m > 0 else 0


# ---------------------------------------------------------------------------------------------
# Fake implementations: output shapes and strides of every backend, SymInt-friendly.


def _topk_route_fake(
    logits,
    k,
    scoring="softmax",
    order="softmax_then_topk",
    renormalize=True,
    bias=None,
    n_group=1,
    topk_group=1,
    scale=1.0,
    expert_mask=None,
    group_scoring="top2_sum",
):
    acc = ref.accumulate_dtype(logits.dtype)
    T = logits.shape[0]
    return logits.new_empty((T, k), dtype=acc), logits.new_empty((T, k), dtype=torch.int32)


def _route_metadata_fake(ids, num_experts, block_m=0):
    n = ids.numel()
    P = _padded_rows(n, num_experts, block_m)
    new = lambda *shape: ids.new_empty(shape, dtype=torch.int32)
    blocks = P // block_m if block_m > 0 else 0
    return (
        new(num_experts),
        new(num_experts),
        new(n),
        new(n),
        new(n),
        new(P),
        new(blocks),
        new(num_experts if block_m > 0 else 0),
    )


if _backend.HAS_C:
    torch.library.register_fake("sparseops::topk_route")(_topk_route_fake)
    torch.library.register_fake("sparseops::route_metadata")(_route_metadata_fake)
    _topk_route_op = torch.ops.sparseops.topk_route.default
    _route_metadata_op = torch.ops.sparseops.route_metadata.default
    _topk_route_backward_op = torch.ops.sparseops.topk_route_backward.default
    _route_op = torch.ops.sparseops.route.default


# ---------------------------------------------------------------------------------------------
# Triton ops. The kernels module is imported on first use: importing triton costs ~1 s.


@torch.library.custom_op("sparseops::topk_route_triton", mutates_args=())
def _topk_route_triton(
    logits: torch.Tensor,
    k: int,
    scoring: str,
    order: str,
    renormalize: bool,
    bias: torch.Tensor | None,
    n_group: int,
    topk_group: int,
    scale: float,
    expert_mask: torch.Tensor | None,
    group_scoring: str = "top2_sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.routing import topk_route_triton

    weights, ids = _topk_route_fake(logits, k)
    if logits.shape[0] == 0:
        return weights, ids
    acc = ref.accumulate_dtype(logits.dtype)
    opts = SimpleNamespace(
        k=k,
        scoring=scoring,
        order=order,
        renormalize=renormalize,
        n_group=n_group,
        topk_group=topk_group,
        group_scoring=group_scoring,
        scale=scale,
    )
    topk_route_triton(
        logits.contiguous(),
        None if bias is None else bias.to(acc).contiguous(),
        None if expert_mask is None else expert_mask.contiguous(),
        weights,
        ids,
        opts,
    )
    return weights, ids


@torch.library.custom_op("sparseops::route_metadata_triton", mutates_args=())
def _route_metadata_triton(
    ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    from ..kernels.routing import route_metadata_triton

    out = _route_metadata_fake(ids, num_experts, block_m)
    route_metadata_triton(ids.to(torch.int32).contiguous(), num_experts, block_m, out)
    return out


_topk_route_triton.register_fake(_topk_route_fake)
_route_metadata_triton.register_fake(_route_metadata_fake)


def _topk_route_triton_setup(ctx, inputs, output):
    logits, _k, scoring, order, renormalize, _bias, _ng, _tg, scale, expert_mask = inputs[:10]
    ctx.save_for_backward(logits, output[1], expert_mask)
    ctx.args = (scoring, order, renormalize, scale)
    ctx.num_inputs = len(inputs)


def _topk_route_triton_backward(ctx, grad_weights, _grad_ids):
    logits, ids, expert_mask = ctx.saved_tensors
    grad = _route_weights_grad(grad_weights, logits, ids, *ctx.args, expert_mask)
    return (grad,) + (None,) * (ctx.num_inputs - 1)


_topk_route_triton.register_autograd(_topk_route_triton_backward, setup_context=_topk_route_triton_setup)


def _route_weights_grad(grad_weights, logits, ids, scoring, order, renormalize, scale, expert_mask):
    """d(weights)/d(logits): the fused C++ formula when built, else autograd through the reference."""
    if _backend.HAS_C:
        return _topk_route_backward_op(grad_weights, logits, ids, scoring, order, renormalize, scale, expert_mask)
    with torch.enable_grad():
        x = logits.detach().requires_grad_(True)
        w = ref.route_weights_ref(
            x, ids, scoring=scoring, order=order, renormalize=renormalize, scale=scale, expert_mask=expert_mask
        )
        return torch.autograd.grad(w, x, grad_weights)[0]


# ---------------------------------------------------------------------------------------------
# Public API


def topk_route(
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
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert routing: router logits -> (weights, expert ids) per token.

    Args:
        logits: [T, E] router logits, fp32 / bf16 / fp16 (fp64 for gradcheck), any strides.
            1 <= E <= 1024, T >= 0.
        k: experts per token, 1 <= k <= min(E, 32).
        scoring: "softmax" (Mixtral, Qwen, gpt-oss) or "sigmoid" (DeepSeek-V3).
        order: for softmax scoring, "softmax_then_topk" (softmax over all enabled experts, then
            pick) or "topk_then_softmax" (pick by logit, softmax over the k picked: Mixtral's
            and gpt-oss's formulation). Ignored for sigmoid.
        renormalize: divide the k weights by their sum (always true for topk_then_softmax).
        bias: [E] selection-only bias (DeepSeek-V3's auxiliary-loss-free balancing): added to
            the scores used to *choose* experts, never to the returned weights.
        n_group, topk_group: restrict each token to its best ``topk_group`` of ``n_group``
            equal groups of experts, each group scored as ``group_scoring`` says.
        scale: multiplies the final weights (DeepSeek-V3: 2.5).
        expert_mask: [E] bool, False = disabled (pruned or remote) expert: never selected and
            excluded from the softmax denominator.
        group_scoring: "top2_sum" (the sum of a group's two best biased scores: DeepSeek-V3)
            or "max" (its best biased score: DeepSeek-V2's group_limited_greedy).
        backend: None/"auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        weights: [T, k] fp32 (fp64 for fp64 logits), contiguous; differentiable in logits.
        ids: [T, k] int32, contiguous. Row t lists its experts by descending selection score,
            ties going to the lower expert index; a slot no enabled expert can fill holds -1
            (weight 0), which ``route_metadata`` treats as dropped.

    Selection ranks by the logit when there is no bias (exactly the order of the
    probabilities) and by fp32(score computed in fp64) + bias otherwise, so the ids are the
    same on every backend (see ``sparseops.reference.routing.selection_scores_ref``).
    """
    name = _backend.choose("topk_route", logits.device.type, backend)
    if name in ("cpu", "cuda"):
        return _topk_route_op(
            logits, k, scoring, order, renormalize, bias, n_group, topk_group, scale, expert_mask, group_scoring
        )
    _check_topk_route(logits, k, scoring, order, bias, n_group, topk_group, scale, expert_mask)
    if name == "triton":
        return _topk_route_triton(
            logits, k, scoring, order, renormalize, bias, n_group, topk_group, scale, expert_mask, group_scoring
        )
    return ref.topk_route_ref(
        logits,
        k,
        scoring=scoring,
        order=order,
        renormalize=renormalize,
        bias=bias,
        n_group=n_group,
        topk_group=topk_group,
        scale=scale,
        expert_mask=expert_mask,
        group_scoring=group_scoring,
    )


def route_metadata(ids: torch.Tensor, num_experts: int, *, block_m: int = 0, backend: str | None = None) -> RouteMeta:
    """Group the T*k routed slots by expert: what a grouped GEMM needs to gather, run, scatter.

    Args:
        ids: [T, k] int32 (or int64) expert ids from ``topk_route``; -1 marks a dropped slot.
        num_experts: E, 1 <= E <= 1024.
        block_m: if > 0, also build a layout where each expert's rows are padded to a
            multiple of block_m rows (for kernels whose tiles must not straddle experts).
        backend: None/"auto", "cuda", "triton", "cpu" or "reference".

    Returns a ``RouteMeta`` of int32 tensors on the ids' device:
        counts [E]: rows per expert. offs [E]: cumulative ends (``torch._grouped_mm``'s offs).
        sorted_slots [T*k]: flat slots t*k + j in expert-major order, ascending within an
            expert (stable), dropped slots last (at positions >= offs[-1]).
        inverse [T*k]: position of each slot in sorted_slots.
        tokens [T*k]: sorted_slots // k, the token each sorted row reads.
        With block_m > 0 (else None): padded_slots [P] with
        P = (T*k + E*(block_m-1)) // block_m * block_m, the slot of each padded row or the
        sentinel T*k; block_expert [P // block_m], the expert of each block or -1 past the
        last used block; padded_offs [E], cumulative padded ends.

    Deterministic (no atomics decide an order), no host synchronisation, every size a static
    bound: the call can be captured in a CUDA graph. Out-of-range ids raise on CPU (and on
    the reference backend); the CUDA and Triton kernels cannot check without a host sync, so
    they treat them as dropped and never touch memory out of bounds.
    """
    name = _backend.choose("route_metadata", ids.device.type, backend)
    if name in ("cpu", "cuda"):
        out = _route_metadata_op(ids, num_experts, block_m)
    else:
        _check_route_metadata(ids, num_experts, block_m, check_values=name == "reference")
        if name == "triton":
            out = _route_metadata_triton(ids, num_experts, block_m)
        else:
            out = ref.route_metadata_ref(ids, num_experts, block_m)
    if block_m > 0:
        return RouteMeta(*out)
    return RouteMeta(*out[:5])


def route(
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
    block_m: int = 0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, RouteMeta]:
    """``topk_route`` followed by ``route_metadata(ids, E, block_m=block_m)``, as one call.

    Arguments and results are those of the two functions; returns (weights, ids, meta). With
    the C++ backends the pair crosses from Python into C++ once instead of twice, which is
    what a decode step (T <= 64, kernels of a few microseconds) mostly pays for.
    """
    name = _backend.choose("topk_route", logits.device.type, backend)
    if name in ("cpu", "cuda"):
        out = _route_op(
            logits, k, scoring, order, renormalize, bias, n_group, topk_group, scale, expert_mask, group_scoring, block_m
        )
        weights, ids, meta = out[0], out[1], out[2:]
    else:
        weights, ids = topk_route(
            logits,
            k,
            scoring=scoring,
            order=order,
            renormalize=renormalize,
            bias=bias,
            n_group=n_group,
            topk_group=topk_group,
            scale=scale,
            expert_mask=expert_mask,
            group_scoring=group_scoring,
            backend=name,
        )
        meta = route_metadata(ids, logits.shape[1], block_m=block_m, backend=name)
    return weights, ids, RouteMeta(*meta) if block_m > 0 else RouteMeta(*meta[:5])


def expert_choice_route(logits: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert Choice routing (Zhou et al. 2022): each expert takes its ``capacity`` best tokens.

    Args:
        logits: [T, E] router logits (fp32 / bf16 / fp16 / fp64).
        capacity: tokens per expert, 0 <= capacity <= T.

    Returns:
        weights [E, C]: softmax-over-experts probabilities of the chosen tokens (fp32, fp64
            for fp64 logits), differentiable in logits.
        token_ids [E, C] int32: each expert's tokens by descending probability, lower token
            index first on ties.

    One device-generic implementation: the probability's bits and the reversed token index
    are packed into one int64 key, so ``torch.topk`` over unique keys is exact, tie-stable
    and deterministic on every device (a selection, not a full sort).
    """
    if logits.dim() != 2 or logits.dtype not in _LOGIT_DTYPES:
        raise RuntimeError(f"logits must be a 2-D float tensor, got {_describe(logits)}")
    T = logits.shape[0]
    if not 0 <= capacity <= T:
        raise RuntimeError(f"capacity must be in [0, T = {T}], got {capacity}")
    probs = torch.softmax(logits.to(ref.accumulate_dtype(logits.dtype)), dim=-1)
    probs_t = probs.t()
    if probs.dtype == torch.float64:
        order = probs_t.detach().sort(dim=-1, descending=True, stable=True).indices[:, :capacity]
    else:
        # Non-negative fp32 bits order like the values; T-1-t makes the lower token win ties.
        bits = probs_t.detach().contiguous().view(torch.int32).to(torch.int64)
        rev = (T - 1) - torch.arange(T, device=logits.device, dtype=torch.int64)
        keys = (bits << 32) | rev
        order = (T - 1) - keys.topk(capacity, dim=-1, sorted=True).values.bitwise_and(0xFFFFFFFF)
    return probs_t.gather(1, order), order.to(torch.int32)


def load_balancing_loss(router_probs: torch.Tensor, expert_counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch / GShard auxiliary load-balancing loss, E * sum_e f_e * P_e.

    Args:
        router_probs: [T, E] router probabilities (softmax or sigmoid scores), differentiable.
        expert_counts: [E] slots routed to each expert (``RouteMeta.counts``), any int dtype.
        top_k: experts per token, so that f_e = expert_counts[e] / (T * top_k).

    Returns a 0-dim tensor in router_probs' dtype: 1.0 for perfectly uniform routing, E for
    all tokens on one expert; 0 for T = 0. Gradients flow through router_probs only.
    """
    if router_probs.dim() != 2 or expert_counts.dim() != 1 or expert_counts.shape[0] != router_probs.shape[1]:
        raise RuntimeError(
            f"load_balancing_loss needs router_probs [T, E] and expert_counts [E], got "
            f"{_describe(router_probs)} and {_describe(expert_counts)}"
        )
    if top_k < 1:
        raise RuntimeError(f"top_k must be >= 1, got {top_k}")
    return ref.load_balancing_loss_ref(router_probs, expert_counts, top_k)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (fp32; 0 for T = 0).

    logits: [T, E] router logits. Penalises large logits, which keeps the router's softmax
    numerically stable in low precision.
    """
    if logits.dim() != 2:
        raise RuntimeError(f"logits must be a 2-D tensor [T, E], got {_describe(logits)}")
    return ref.router_z_loss_ref(logits)
