"""MoE routing ops: top-k routing, routing metadata, expert-choice routing, router losses.

``sparseops::topk_route``, ``route_metadata`` and ``route`` are declared once, in C++
(csrc/registration.cpp), where their arguments are parsed and checked for every backend and
where ``topk_route``'s autograd lives (csrc/ops/routing.cpp). This module registers, per op:
the fake implementation (output shapes for meta tensors and torch.compile), each backend
with its rank and reason (``sparseops._backend``), the Python kernels that the C++ op calls
for the Triton and reference backends, and the public functions. The semantics are
specified by ``sparseops.reference.routing``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _backend
from ..reference import routing as ref
from ._common import accumulate_dtype as _accumulate_dtype
from ._common import describe as _describe

__all__ = [
    "RouteMeta",
    "TopkRouteOptions",
    "topk_route",
    "route_metadata",
    "route",
    "expert_choice_route",
    "load_balancing_loss",
    "router_z_loss",
]

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class TopkRouteOptions(NamedTuple):
    """topk_route's scalar options as the C++ op parsed them (csrc/ops/routing.cpp
    ``python_options``): what the Triton launcher and the reference kernel receive."""

    k: int
    scoring: str = "softmax"
    order: str = "softmax_then_topk"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    group_scoring: str = "top2_sum"
    scale: float = 1.0


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

    @classmethod
    def from_outputs(cls, out, block_m: int) -> RouteMeta:
        """The op's eight outputs; the padded three only when they were asked for."""
        return cls(*out) if block_m > 0 else cls(*out[:5])


def _padded_rows(n, num_experts: int, block_m: int):
    # The Python twin of padded_route_rows (csrc/include/sparseops/routing.h), SymInt-friendly.
    return (n + num_experts * (block_m - 1)) // block_m * block_m if block_m > 0 else 0


# ---------------------------------------------------------------------------------------------
# Fake implementations: output shapes and strides of every backend, SymInt-friendly. They also
# catch what the dispatcher would otherwise route here silently: a tensor on another device
# (a meta bias with CPU logits selects the Meta kernel, which is this function).


def _check_same_device(like: torch.Tensor, like_name: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != like.device:
            raise RuntimeError(f"{name} must be on the same device as {like_name} ({like.device}), got {_describe(t)}")


# The limits the C++ checks enforce (csrc/include/sparseops/routing.h), for the Python twins
# of those checks below: the fakes and the no-extension fallback have no C++ to check.
_MAX_EXPERTS, _MAX_TOPK = 1024, 32
_CHOICES = {
    "scoring": ("softmax", "sigmoid"),
    "order": ("softmax_then_topk", "topk_then_softmax"),
    "group_scoring": ("top2_sum", "max"),
}


def _check_topk_route_args(logits, k, scoring, order, bias, n_group, topk_group, scale, expert_mask, group_scoring):
    """The checks of parse_topk_route (csrc/ops/routing.cpp), with the same messages, for what
    no C++ sees: meta tensors and torch.compile (the fake) and an install without _C. Without
    them a meta call with k > E returned [T, k] outputs that the real call refuses. Only the
    expert dim is compared (a guard on E, never on T, so the token count stays symbolic)."""
    for arg, value in (("scoring", scoring), ("order", order), ("group_scoring", group_scoring)):
        if value not in _CHOICES[arg]:
            choices = " or ".join(f'"{c}"' for c in _CHOICES[arg])
            raise RuntimeError(f'{arg} must be {choices}, got "{value}"')
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise RuntimeError(f"scale must be finite, got {scale}")
    if logits.dim() != 2:
        raise RuntimeError(f"logits must be a 2-D tensor, got {_describe(logits)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise RuntimeError(f"logits must have dtype in {_LOGIT_DTYPES}, got {_describe(logits)}")
    E = logits.shape[1]
    if not 1 <= E <= _MAX_EXPERTS:
        raise RuntimeError(
            f"logits.size(1) (the number of experts) must be in [1, {_MAX_EXPERTS}], got {_describe(logits)}"
        )
    # Two comparisons, not min(E, 32): min() on a symbolic E guards on E < 32, so a second
    # expert count on the other side of 32 would recompile.
    if not (1 <= k <= _MAX_TOPK and k <= E):
        raise RuntimeError(
            f"k must be in [1, min(E, {_MAX_TOPK})] = [1, {min(E, _MAX_TOPK)}], got k = {k} "
            f"for logits {_describe(logits)}"
        )
    if n_group < 1 or E % n_group != 0:
        raise RuntimeError(f"n_group must be >= 1 and divide E = {E}, got n_group = {n_group}")
    if not 1 <= topk_group <= n_group:
        raise RuntimeError(f"topk_group must be in [1, n_group = {n_group}], got {topk_group}")
    if k > topk_group * (E // n_group):
        raise RuntimeError(
            f"k = {k} cannot exceed the experts in the chosen groups, topk_group * E / n_group = "
            f"{topk_group * (E // n_group)}"
        )
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
    _check_same_device(logits, "logits", bias=bias, expert_mask=expert_mask)


def _check_backend_name(op: str, backend: str) -> None:
    """runs_native's name check (csrc/ops/python_kernels.cpp), for the fakes: a meta call or a
    torch.compile trace of torch.ops.sparseops.<op> with a misspelt backend must fail too."""
    if backend != "auto" and backend not in _backend.BACKENDS:
        raise RuntimeError(
            f'sparseops.{op}: backend must be one of auto, cuda, triton, cpu, reference, got "{backend}"'
        )


def _check_route_metadata_args(ids, num_experts, block_m):
    """The checks of route_metadata (csrc/ops/routing.cpp) for the fake and the fallback."""
    if ids.dim() != 2:
        raise RuntimeError(f"ids must be a 2-D tensor, got {_describe(ids)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise RuntimeError(f"ids must have dtype in (torch.int32, torch.int64), got {_describe(ids)}")
    if not 1 <= num_experts <= _MAX_EXPERTS:
        raise RuntimeError(f"num_experts must be in [1, {_MAX_EXPERTS}], got {num_experts}")
    if not 0 <= block_m <= 65536:
        raise RuntimeError(f"block_m must be in [0, 65536], got {block_m}")


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
    backend="auto",
):
    _check_topk_route_args(logits, k, scoring, order, bias, n_group, topk_group, scale, expert_mask, group_scoring)
    _check_backend_name("topk_route", backend)
    T = logits.shape[0]
    acc = _accumulate_dtype(logits.dtype)
    return logits.new_empty((T, k), dtype=acc), logits.new_empty((T, k), dtype=torch.int32)


def _route_metadata_fake(ids, num_experts, block_m=0, backend="auto"):
    _check_route_metadata_args(ids, num_experts, block_m)
    _check_backend_name("route_metadata", backend)
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
    _route_op = torch.ops.sparseops.route.default

# The eager entry (csrc/ops/routing_eager.cpp): called first by the public functions below. It
# runs the op's own CPU kernel without the dispatcher when that is all the op would run (CPU
# tensors, nothing for autograd to record, no mode, transform, tracer or profiler) and
# returns NotImplemented otherwise, or on any error, so that the op itself runs and raises.
# At T = 1 it is ~1 us where the op is ~4-5 us (benchmarks/percall_breakdown.py). It is
# skipped while torch.compile traces (Dynamo cannot trace into a C function: the op's
# schema and fake are what a graph records).
_topk_route_eager = getattr(_backend._C, "_topk_route_eager", None)
_route_eager = getattr(_backend._C, "_route_eager", None)
_route_metadata_eager = getattr(_backend._C, "_route_metadata_eager", None)
_is_compiling = torch.compiler.is_compiling


# ---------------------------------------------------------------------------------------------
# Python kernels: what the C++ op runs for the Triton and reference backends, on the inputs it
# prepared (contiguous; bias in the accumulate dtype) and the outputs it allocated. The Triton
# kernels module is imported on first use: importing triton costs ~1 s.


def _topk_route_reference(logits, opts: TopkRouteOptions, bias=None, expert_mask=None):
    return ref.topk_route_ref(logits, bias=bias, expert_mask=expert_mask, **opts._asdict())


def _topk_route_triton_kernel(inputs, outputs, options) -> None:
    from ..kernels.routing import topk_route_triton

    logits, bias, expert_mask = inputs
    topk_route_triton(logits, bias, expert_mask, *outputs, TopkRouteOptions(**options))


def _topk_route_reference_kernel(inputs, outputs, options) -> None:
    logits, bias, expert_mask = inputs
    for out, value in zip(outputs, _topk_route_reference(logits, TopkRouteOptions(**options), bias, expert_mask)):
        out.copy_(value)


def _route_metadata_triton_kernel(inputs, outputs, options) -> None:
    from ..kernels.routing import route_metadata_triton

    route_metadata_triton(inputs[0], options["num_experts"], options["block_m"], outputs)


def _route_metadata_reference_kernel(inputs, outputs, options) -> None:
    ids, E = inputs[0], options["num_experts"]
    if ids.is_cuda:
        # As the CUDA and Triton kernels (which cannot raise without a host sync): an id
        # outside [-1, E) is a dropped slot. On CPU the op layer has already raised.
        ids = torch.where((ids >= -1) & (ids < E), ids, -1)
    for out, value in zip(outputs, ref.route_metadata_ref(ids, E, options["block_m"])):
        out.copy_(value)


_TOPK_ROUTE = _backend.Op("topk_route", _backend.tensor_facts("logits"))
_ROUTE_METADATA = _backend.Op("route_metadata", _backend.tensor_facts("ids"))
for _op, _triton_kernel, _reference_kernel in (
    (_TOPK_ROUTE, _topk_route_triton_kernel, _topk_route_reference_kernel),
    (_ROUTE_METADATA, _route_metadata_triton_kernel, _route_metadata_reference_kernel),
):
    # Why C++ before Triton on CUDA: measured on an H100 host (torch 2.11, 2026-11) a C++ op
    # costs ~9.5 us per call and a Triton launch from Python ~19 us more, and these kernels
    # run for a few us. Re-rank from benchmarks/results once GPU numbers exist for large T.
    _op.register("cuda", rank=0, unsupported_reason=_backend.native_cuda)
    _op.register("cpu", rank=0, unsupported_reason=_backend.native_cpu)
    _op.register("triton", rank=1, unsupported_reason=_backend.triton_kernels, kernel=_triton_kernel)
    _op.register("reference", rank=9, unsupported_reason=_backend.always, kernel=_reference_kernel)


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
            the scores used to *choose* experts, never to the returned weights. Same device
            as logits.
        n_group, topk_group: restrict each token to its best ``topk_group`` of ``n_group``
            equal groups of experts, each group scored as ``group_scoring`` says.
        scale: multiplies the final weights (DeepSeek-V3: 2.5).
        expert_mask: [E] bool, False = disabled (pruned or remote) expert: never selected and
            excluded from the softmax denominator. Same device as logits.
        group_scoring: "top2_sum" (the sum of a group's two best biased scores: DeepSeek-V3)
            or "max" (its best biased score: DeepSeek-V2's group_limited_greedy).
        backend: None/"auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        weights: [T, k] fp32 (fp64 for fp64 logits), contiguous; differentiable in logits
            (twice: the backward is differentiable too).
        ids: [T, k] int32, contiguous. Row t lists its experts by descending selection score,
            ties going to the lower expert index; a slot no enabled expert can fill holds -1
            (weight 0), which ``route_metadata`` treats as dropped.

    Selection ranks by the logit when there is no bias (exactly the order of the
    probabilities) and by fp32(score computed in fp64) + bias otherwise, so the ids are the
    same on every backend (see ``sparseops.reference.routing.selection_scores_ref``). A NaN
    logit ranks as -inf; its weights follow the reference formulas exactly.
    """
    if _topk_route_eager is not None and not _is_compiling():
        out = _topk_route_eager(
            logits,
            k,
            scoring,
            order,
            renormalize,
            bias,
            n_group,
            topk_group,
            scale,
            expert_mask,
            group_scoring,
            _backend._default if backend is None else backend,
        )
        if out is not NotImplemented:
            return out
    name = _TOPK_ROUTE.choose(backend, logits)
    if _backend.HAS_C:
        return _topk_route_op(
            logits, k, scoring, order, renormalize, bias, n_group, topk_group, scale, expert_mask, group_scoring, name
        )
    _check_topk_route_args(logits, k, scoring, order, bias, n_group, topk_group, scale, expert_mask, group_scoring)
    opts = TopkRouteOptions(k, scoring, order, renormalize, n_group, topk_group, group_scoring, scale)
    return _topk_route_reference(logits, opts, bias, expert_mask)


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
    bound: the call can be captured in a CUDA graph. An id outside [-1, E) raises on CPU
    tensors, whatever the backend (int64 ids are checked before they are narrowed to
    int32); on CUDA tensors the kernels cannot check without a host sync, so every backend
    treats such an id as dropped and never touches memory out of bounds.
    """
    if _route_metadata_eager is not None and not _is_compiling():
        out = _route_metadata_eager(
            ids, num_experts, block_m, _backend._default if backend is None else backend, RouteMeta
        )
        if out is not NotImplemented:
            return out
    name = _ROUTE_METADATA.choose(backend, ids)
    if _backend.HAS_C:
        return RouteMeta.from_outputs(_route_metadata_op(ids, num_experts, block_m, name), block_m)
    _check_route_metadata_args(ids, num_experts, block_m)
    return RouteMeta.from_outputs(ref.route_metadata_ref(ids, num_experts, block_m), block_m)


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
    if _route_eager is not None and not _is_compiling():
        out = _route_eager(
            logits,
            k,
            scoring,
            order,
            renormalize,
            bias,
            n_group,
            topk_group,
            scale,
            expert_mask,
            group_scoring,
            block_m,
            _backend._default if backend is None else backend,
            RouteMeta,
        )
        if out is not NotImplemented:
            return out
    name = _TOPK_ROUTE.choose(backend, logits)
    if torch.compiler.is_compiling():
        # Traced as its two parts: tracing through the C++ composite specialises on T (a
        # new graph per token count), the two Python fakes keep T symbolic.
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
        return weights, ids, route_metadata(ids, logits.shape[1], block_m=block_m, backend=name)
    if _backend.HAS_C:
        out = _route_op(
            logits,
            k,
            scoring,
            order,
            renormalize,
            bias,
            n_group,
            topk_group,
            scale,
            expert_mask,
            group_scoring,
            block_m,
            name,
        )
    else:
        _check_topk_route_args(logits, k, scoring, order, bias, n_group, topk_group, scale, expert_mask, group_scoring)
        if not 0 <= block_m <= 65536:
            raise RuntimeError(f"block_m must be in [0, 65536], got {block_m}")
        opts = TopkRouteOptions(k, scoring, order, renormalize, n_group, topk_group, group_scoring, scale)
        weights, ids = _topk_route_reference(logits, opts, bias, expert_mask)
        out = (weights, ids, *ref.route_metadata_ref(ids, logits.shape[1], block_m))
    return out[0], out[1], RouteMeta.from_outputs(out[2:], block_m)


def expert_choice_route(logits: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert Choice routing (Zhou et al. 2022): each expert takes its ``capacity`` best tokens.

    Args:
        logits: [T, E] router logits (fp32 / bf16 / fp16 / fp64).
        capacity: tokens per expert, 0 <= capacity <= T.

    Returns:
        weights [E, C]: softmax-over-experts probabilities of the chosen tokens (fp32, fp64
            for fp64 logits), differentiable in logits.
        token_ids [E, C] int32: each expert's tokens by descending probability, lower token
            index first on ties. A NaN probability (a row of NaN logits) ranks above every
            number, as ``torch.sort`` orders it.

    One device-generic implementation: the probability's bits and the reversed token index
    are packed into one int64 key, so ``torch.topk`` over unique keys is exact, tie-stable
    and deterministic on every device (a selection, not a full sort).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.dtype not in _LOGIT_DTYPES:
        raise RuntimeError(f"logits must be a 2-D float tensor, got {_describe(logits)}")
    T = logits.shape[0]
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 0 <= capacity <= T:
        raise RuntimeError(f"capacity must be in [0, T = {T}] (an int), got {capacity!r}")
    probs = torch.softmax(logits.to(_accumulate_dtype(logits.dtype)), dim=-1)
    probs_t = probs.t()
    if probs.dtype == torch.float64:
        order = probs_t.detach().sort(dim=-1, descending=True, stable=True).indices[:, :capacity]
    else:
        # Non-negative fp32 bits order like the values; every NaN (whatever its sign bit) is
        # given the canonical positive NaN's bits, which order above +inf as sort puts NaN
        # first; T-1-t makes the lower token win ties.
        p = probs_t.detach().contiguous()
        bits = torch.where(p.isnan(), 0x7FC00000, p.view(torch.int32)).to(torch.int64)
        rev = (T - 1) - torch.arange(T, device=logits.device, dtype=torch.int64)
        keys = (bits << 32) | rev
        order = (T - 1) - keys.topk(capacity, dim=-1, sorted=True).values.bitwise_and(0xFFFFFFFF)
    return probs_t.gather(1, order), order.to(torch.int32)


def load_balancing_loss(
    router_probs: torch.Tensor, expert_counts: torch.Tensor, top_k: int, *, normalize: str = "slots"
) -> torch.Tensor:
    """Switch / GShard auxiliary load-balancing loss, E * sum_e f_e * P_e.

    Args:
        router_probs: [T, E] router probabilities (softmax or sigmoid scores), differentiable.
        expert_counts: [E] slots routed to each expert (``RouteMeta.counts``), any int dtype.
        top_k: experts per token.
        normalize: "slots" (default): f_e = expert_counts[e] / (T * top_k), the fraction of
            routed slots, so uniform routing gives 1.0 and all tokens on one expert E.
            "tokens": f_e = expert_counts[e] / T, Hugging Face transformers'
            ``load_balancing_loss_func`` (Mixtral, Qwen-MoE, OLMoE ...), which is top_k times
            the "slots" value.

    To reproduce a transformers model's ``router_aux_loss_coef * aux_loss``, use
    ``normalize="tokens"`` with the model's coefficient, or the default with
    ``router_aux_loss_coef * top_k``.

    Returns a 0-dim tensor in router_probs' dtype; 0 for T = 0. Gradients flow through
    router_probs only.
    """
    if (
        not isinstance(router_probs, torch.Tensor)
        or not isinstance(expert_counts, torch.Tensor)
        or router_probs.dim() != 2
        or expert_counts.dim() != 1
        or expert_counts.shape[0] != router_probs.shape[1]
    ):
        raise RuntimeError(
            f"load_balancing_loss needs router_probs [T, E] and expert_counts [E], got "
            f"{_describe(router_probs)} and {_describe(expert_counts)}"
        )
    if not router_probs.dtype.is_floating_point:
        raise RuntimeError(f"router_probs must be a floating-point tensor, got {_describe(router_probs)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise RuntimeError(f"top_k must be >= 1 (an int), got {top_k!r}")
    if normalize not in ("slots", "tokens"):
        raise RuntimeError(f'normalize must be "slots" or "tokens", got {normalize!r}')
    loss = ref.load_balancing_loss_ref(router_probs, expert_counts, top_k)
    return loss * top_k if normalize == "tokens" else loss


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (fp32; 0 for T = 0).

    logits: [T, E] router logits. Penalises large logits, which keeps the router's softmax
    numerically stable in low precision.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise RuntimeError(f"logits must be a 2-D tensor [T, E], got {_describe(logits)}")
    return ref.router_z_loss_ref(logits)
