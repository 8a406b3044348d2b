"""The fused expert computation of an MoE layer: ``sparseops.moe_mlp``.

``sparseops::moe_mlp`` is declared once, in C++ (csrc/registration.cpp), where its arguments
are parsed and checked for every backend (csrc/ops/moe.cpp); it returns the output and the
slot-major pre-activation [T*k, 2I or I] that the backward reads (with x, the weights and the
routing), never T*k*H copies of x. This module registers the fake implementation, the
autograd formula, each backend with its rank and reason (``sparseops._backend``), the Python
kernel of the reference backend, and the public function. The semantics are specified by
``sparseops.reference.moe``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _backend
from ..reference import moe as ref
from . import routing as _routing
from ._common import accumulate_dtype as _accumulate_dtype
from ._common import describe as _describe

__all__ = ["moe_mlp", "MOE_ACTIVATIONS", "prepack_moe_weights", "release_moe_weights", "moe_pack_stats"]

MOE_ACTIVATIONS = ref.ACTIVATIONS


# ---------------------------------------------------------------------------------------------
# Fake implementation: the shapes of every backend, SymInt-friendly (T stays symbolic), plus
# the Python twins of the C++ checks that shapes depend on (meta tensors and torch.compile).


def _check_moe_args(x, w13, w2, weights, ids, activation, gate_up_layout):
    if activation not in ref.ACTIVATIONS:
        raise RuntimeError(f'activation must be one of {", ".join(ref.ACTIVATIONS)}, got "{activation}"')
    if gate_up_layout not in ref.LAYOUTS:
        raise RuntimeError(f'gate_up_layout must be "concat" or "interleaved", got "{gate_up_layout}"')
    if x.dim() != 2:
        raise RuntimeError(f"x must be a 2-D tensor, got {_describe(x)}")
    for name, t in (("w13", w13), ("w2", w2)):
        if t.dim() != 3:
            raise RuntimeError(f"{name} must be a 3-D tensor, got {_describe(t)}")
    for name, t in (("w13", w13), ("w2", w2), ("weights", weights), ("ids", ids)):
        if t.device != x.device:
            raise RuntimeError(f"{name} must be on the same device as x ({x.device}), got {_describe(t)}")
    if ids.dim() != 2:
        raise RuntimeError(f"ids must be a 2-D tensor, got {_describe(ids)}")
    gated = activation in ref.GATED
    if w13.shape[1] != (2 * w2.shape[2] if gated else w2.shape[2]):
        raise RuntimeError(
            f"w13.size(1) must equal {'2 * ' if gated else ''}the intermediate size w2.size(2) for "
            f'activation "{activation}", got w13 {_describe(w13)} and w2 {_describe(w2)}'
        )


def _moe_mlp_fake(
    x,
    w13,
    w2,
    weights,
    ids,
    activation="swiglu",
    gate_up_layout="concat",
    b13=None,
    b2=None,
    alpha=1.702,
    limit=7.0,
    backend="auto",
):
    _check_moe_args(x, w13, w2, weights, ids, activation, gate_up_layout)
    T, H = x.shape
    k = ids.shape[1]
    return x.new_empty((T, H)), x.new_empty((T * k, w13.shape[1]))


# ---------------------------------------------------------------------------------------------
# Autograd. The backward is its own C++ op (sparseops::moe_mlp_backward: one opaque call for
# torch.compile; CPU kernel in csrc/cpu/moe.cpp, reference below): per expert, over the same
# expert-sorted slots as the forward, it re-applies the activation to the saved
# pre-activation, recomputes the expert output (for the routing-weight gradient
# d weights[t, j] = <dy[t], expert_out(t, j)>), and forms dw2, db2, dA, the activation
# backward, dw13, db13 (ragged-K GEMMs over the expert's rows) and dx (per slot, then summed
# over each token's k slots in slot order: deterministic).


def _act_backward(pre, da, activation, layout, alpha, limit):
    """d pre [n, P] from the pre-activation pre [n, P] and d act [n, I], at pre's dtype."""
    aten = torch.ops.aten
    if activation in ref.PLAIN:
        h = pre
        if activation == "silu":
            return aten.silu_backward(da, h)
        if activation == "gelu":
            return aten.gelu_backward(da, h, approximate="none")
        if activation == "gelu_tanh":
            return aten.gelu_backward(da, h, approximate="tanh")
        if activation == "relu":
            return da * (h > 0)
        return da * 2 * h.clamp_min(0)  # relu2
    g, u = ref.split_gate_up(pre, layout)
    if activation == "swiglu":
        dg, du = aten.silu_backward(da * u, g), da * F.silu(g)
    elif activation == "geglu":
        dg, du = aten.gelu_backward(da * u, g, approximate="none"), da * F.gelu(g)
    elif activation == "geglu_tanh":
        dg, du = aten.gelu_backward(da * u, g, approximate="tanh"), da * F.gelu(g, approximate="tanh")
    elif activation == "reglu":
        dg, du = da * u * (g > 0), da * F.relu(g)
    else:  # swiglu_oai; clamp passes the gradient where the input lies inside its bounds
        gc = g.clamp(max=limit)
        uc = u.clamp(min=-limit, max=limit)
        s = torch.sigmoid(gc * alpha)
        dg = da * (uc + 1) * (s + alpha * gc * s * (1 - s)) * (g <= limit)
        du = da * (gc * s) * ((u >= -limit) & (u <= limit))
    if layout == "interleaved":
        return torch.stack([dg, du], dim=-1).reshape(pre.shape)
    return torch.cat([dg, du], dim=-1)


def _moe_mlp_backward_ref(dy, x, w13, w2, weights, ids, pre, b13, b2, activation, gate_up_layout, alpha, limit):
    """The backward as plain torch ops, one iteration per expert over the expert-sorted slots:
    (dx, dw13, dw2, dweights at the accumulation dtype, db13 or None, db2 or None)."""
    T, H = x.shape
    k = ids.shape[1]
    E, P, _ = w13.shape
    acc = _accumulate_dtype(x.dtype)
    dx = torch.zeros((T, H), dtype=acc, device=x.device)
    dw13 = torch.zeros((E, P, H), dtype=acc, device=x.device)
    dw2 = torch.zeros(w2.shape, dtype=acc, device=x.device)
    dweights = torch.zeros(T * k, dtype=acc, device=x.device)
    db13 = torch.zeros((E, P), dtype=acc, device=x.device) if b13 is not None else None
    db2 = torch.zeros((E, H), dtype=acc, device=x.device) if b2 is not None else None
    flat = ids.reshape(-1).long()
    if flat.numel() > 0:
        key = torch.where(flat >= 0, flat, E)
        order = key.argsort(stable=True)
        counts = torch.bincount(key, minlength=E + 1)[:E].tolist()
        fw = weights.reshape(-1).to(acc)
        dya = dy.to(acc)
        xa = x.to(acc)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            slots = order[start : start + c]
            start += c
            tok = slots // k
            pe = pre[slots].to(acc)
            a = ref.activation_ref(pe, activation, gate_up_layout, alpha, limit)
            w2e = w2[e].to(acc)
            o = a @ w2e.T
            if b2 is not None:
                o = o + b2[e].to(acc)
            g = dya[tok]
            dweights[slots] = (g * o).sum(dim=1)
            do = g * fw[slots, None]
            dw2[e] = do.T @ a
            if db2 is not None:
                db2[e] = do.sum(dim=0)
            dpre = _act_backward(pe, do @ w2e, activation, gate_up_layout, alpha, limit)
            dw13[e] = dpre.T @ xa[tok]
            if db13 is not None:
                db13[e] = dpre.sum(dim=0)
            dx.index_add_(0, tok, dpre @ w13[e].to(acc))
    return dx, dw13, dw2, dweights.view(T, k), db13, db2


def _backward_reference_kernel(inputs, outputs, options) -> None:
    dy, x, w13, w2, weights, ids, pre, b13, b2 = inputs
    grads = _moe_mlp_backward_ref(
        dy, x, w13, w2, weights, ids, pre, b13, b2,
        options["activation"], options["gate_up_layout"], options["alpha"], options["limit"],
    )  # fmt: skip
    for out, g in zip(outputs, grads):
        if g is not None:
            out.copy_(g)


def _moe_mlp_backward_fake(
    dy, x, w13, w2, weights, ids, pre, b13, b2, activation, gate_up_layout, alpha, limit, backend="auto"
):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        w13.new_empty(w13.shape),
        w2.new_empty(w2.shape),
        weights.new_empty(weights.shape),
        x.new_empty(b13.shape) if b13 is not None else x.new_empty(0),
        x.new_empty(b2.shape) if b2 is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, w13, w2, weights, ids, activation, layout, b13, b2, alpha, limit, backend = inputs
    _, pre = output
    ctx.options = (activation, layout, float(alpha), float(limit))
    # The backward runs on the forward's backend where it has one, else what auto picks.
    ctx.backend = backend if backend in _MOE_BWD.backends else "auto"
    ctx.has_bias = (b13 is not None, b2 is not None)
    ctx.save_for_backward(x, w13, w2, weights, ids, pre, b13, b2)


def _backward(ctx, dy, _dpre):
    x, w13, w2, weights, ids, pre, b13, b2 = ctx.saved_tensors
    activation, layout, alpha, limit = ctx.options
    if dy is None:
        dy = torch.zeros_like(x)
    backend = ctx.backend if ctx.backend != "auto" else _MOE_BWD.choose(None, x)
    dx, dw13, dw2, dweights, db13, db2 = _moe_bwd_op(
        dy, x, w13, w2, weights, ids, pre, b13, b2, activation, layout, alpha, limit, backend
    )
    need = ctx.needs_input_grad
    return (
        dx if need[0] else None,
        dw13 if need[1] else None,
        dw2 if need[2] else None,
        dweights if need[3] else None,
        None,
        None,
        None,
        db13 if ctx.has_bias[0] and need[7] else None,
        db2 if ctx.has_bias[1] and need[8] else None,
        None,
        None,
        None,
    )


if _backend.HAS_C:
    torch.library.register_fake("sparseops::moe_mlp")(_moe_mlp_fake)
    torch.library.register_fake("sparseops::moe_mlp_backward")(_moe_mlp_backward_fake)
    torch.library.register_autograd("sparseops::moe_mlp", _backward, setup_context=_setup_context)
    _moe_op = torch.ops.sparseops.moe_mlp.default
    _moe_bwd_op = torch.ops.sparseops.moe_mlp_backward.default


# ---------------------------------------------------------------------------------------------
# Backends. "cuda" is the decode / small-T CUDA kernel (csrc/cuda/moe.cu: three launches over
# all routed slots, one C++ call); "triton" the grouped path (kernels/moe.py: routing metadata,
# GEMM-1 with gather and activation, GEMM-2 with bias and routing weight, combine; its backward
# too). The backward has a CPU kernel, the Triton kernels and the reference.


def _reference_kernel(inputs, outputs, options) -> None:
    x, w13, w2, weights, ids, b13, b2 = inputs
    y, pre = ref.moe_mlp_ref(
        x,
        w13,
        w2,
        weights,
        ids,
        activation=options["activation"],
        gate_up_layout=options["gate_up_layout"],
        b13=b13,
        b2=b2,
        alpha=options["alpha"],
        limit=options["limit"],
        return_pre=True,
    )
    outputs[0].copy_(y)
    outputs[1].copy_(pre)


def _triton_kernel(inputs, outputs, options) -> None:
    from ..kernels.moe import moe_mlp_triton

    x, w13, w2, weights, ids, b13, b2 = inputs
    meta = _routing.route_metadata(ids, w13.shape[0])
    moe_mlp_triton(
        x, w13, w2, weights, ids, b13, b2, meta.offs, meta.sorted_slots, meta.inverse, meta.tokens,
        options["activation"], options["gate_up_layout"] == "interleaved", options["alpha"], options["limit"],
        outputs[0], outputs[1],
    )  # fmt: skip


def _backward_triton_kernel(inputs, outputs, options) -> None:
    from ..kernels.moe import moe_mlp_backward_triton

    dy, x, w13, w2, weights, ids, pre, b13, b2 = inputs
    meta = _routing.route_metadata(ids, w13.shape[0])
    moe_mlp_backward_triton(
        dy, x, w13, w2, weights, ids, pre, b13, b2, meta.offs, meta.sorted_slots, meta.inverse, meta.tokens,
        options["activation"], options["gate_up_layout"] == "interleaved", options["alpha"], options["limit"],
        *outputs,
    )  # fmt: skip


# The CUDA decode kernel against the Triton grouped path, on CUDA tensors. The decode kernel
# reads all of expert e's weights once per routed slot (T*k expert reads); the grouped path
# reads each touched expert once (U of them, U ~ E (1 - (1 - 1/E)^(T k)) for random routing,
# U = k at T = 1), but costs more host time per call: one C++ op (~9.5 us) against the
# metadata op plus three Triton launches from Python (~9.5 + 3 x 19 us; DESIGN.md's H100 host
# measurements, torch 2.11, 2026-11), ~57 us more, the time an H100 streams ~170 MB of weights
# (~3 TB/s). So auto takes the decode kernel while its extra weight traffic
# (T*k - U) x (bytes of one expert's w13 + w2) stays under 170 MB: in bf16 T <= 9 for
# Qwen3-30B-A3B (9.4 MB per expert), T <= 7 for gpt-oss-120b (50 MB), T <= 4 for DeepSeek-V3
# (88 MB), T = 1 for Mixtral-8x7B (352 MB). A model of the two paths from those measured
# per-call costs; the kernels' own times still await an H100.
_DECODE_EXTRA_BYTES = 170e6


@functools.lru_cache(maxsize=256)
def _decode_max_tokens(k: int, E: int, expert_bytes: int) -> int:
    """The largest T for which auto prefers the CUDA decode kernel (0: never)."""
    best = 0
    for T in range(1, 4097):
        n = T * k
        unique = k if T == 1 else E * (1.0 - (1.0 - 1.0 / E) ** n)
        if (n - unique) * expert_bytes > _DECODE_EXTRA_BYTES:
            break
        best = T
    return best


def _moe_facts(x, w13=None, w2=None, ids=None, *_):
    device, dtype = _backend.tensor_facts("x")(x)
    if device != "cuda" or w13 is None or w2 is None or ids is None:
        return (device, dtype, None)
    expert_bytes = (w13.shape[1] * w13.shape[2] + w2.shape[1] * w2.shape[2]) * w13.element_size()
    limit = _decode_max_tokens(int(ids.shape[1]), int(w13.shape[0]), int(expert_bytes))
    return (device, dtype, bool(x.shape[0] <= limit))


def _cuda_rank(device, dtype, decode):
    return 0 if decode else 2


def _triton_reason(device, *_):
    return _backend.triton_kernels(device)


_MOE = _backend.Op("moe_mlp", _moe_facts)
_MOE.register("cuda", rank=_cuda_rank, unsupported_reason=_backend.native_cuda)
_MOE.register("triton", rank=1, unsupported_reason=_triton_reason, kernel=_triton_kernel)
_MOE.register("cpu", rank=0, unsupported_reason=_backend.native_cpu)
_MOE.register("reference", rank=9, unsupported_reason=_backend.always, kernel=_reference_kernel)
_MOE_BWD = _backend.Op("moe_mlp_backward", _backend.tensor_facts("x"))
_MOE_BWD.register("cpu", rank=0, unsupported_reason=_backend.native_cpu)
_MOE_BWD.register("triton", rank=1, unsupported_reason=_triton_reason, kernel=_backward_triton_kernel)
_MOE_BWD.register("reference", rank=9, unsupported_reason=_backend.always, kernel=_backward_reference_kernel)


# ---------------------------------------------------------------------------------------------
# Public API


def moe_mlp(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    *,
    activation: str = "swiglu",
    gate_up_layout: str = "concat",
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    alpha: float = 1.702,
    limit: float = 7.0,
    backend: str | None = None,
) -> torch.Tensor:
    """The routed expert MLPs of one MoE layer, fused: y [T, H] in x's dtype.

    y[t] = sum over slots j with e = ids[t, j] >= 0 of
    weights[t, j] * (act(x[t] @ w13[e].T + b13[e]) @ w2[e].T + b2[e]).

    Args:
        x: [T, H] token activations, fp32 / bf16 / fp16 / fp64, any strides.
        w13: [E, 2I, H] gate and up projections for the gated activations (HF transformers'
            ``gate_up_proj``), [E, I, H] for the others; x's dtype. A transposed view of an
            [E, H, 2I] tensor (gpt-oss's storage) is read without a copy.
        w2: [E, H, I] down projections (HF's ``down_proj``), x's dtype.
        weights: [T, k] routing weights (any float dtype; products at fp32), from
            ``topk_route``; differentiable (the router trains).
        ids: [T, k] int32 / int64 expert of each slot, -1 = dropped slot (contributes nothing).
            Values outside [-1, E) are an error on CPU.
        activation: gated "swiglu", "geglu" (erf GELU), "geglu_tanh", "reglu", "swiglu_oai"
            (gpt-oss: gate.clamp(max=limit), up.clamp(-limit, limit), (up + 1) * gate *
            sigmoid(alpha * gate)); not gated "silu", "gelu", "gelu_tanh", "relu", "relu2".
        gate_up_layout: "concat" (gate = rows [0, I) of w13[e], up = [I, 2I)) or
            "interleaved" (gate = even rows, up = odd rows, as gpt-oss stores them).
        b13: optional [E, 2I or I] bias of the first projection; b2: optional [E, H].
        alpha, limit: swiglu_oai's constants (gpt-oss: 1.702 and 7.0).
        backend: None/"auto", "cpu", "cuda" (a decode / small-T kernel; on CUDA tensors ids
            outside [-1, E) are treated as dropped, unchecked), "triton" (the grouped path:
            route metadata, two grouped GEMMs with the gather, activation, bias and routing
            weight fused, a deterministic combine; CPU tensors only under TRITON_INTERPRET=1)
            or "reference". Auto on CUDA tensors takes "cuda" for decode-sized T (while its
            per-slot weight reads cost less than the grouped path's host time) and "triton"
            otherwise; the backward runs on "triton" there.

    Each token's k slots are summed in slot order at fp32 (fp64 for fp64): deterministic. On
    CPU an expert with at most 48 routed rows (every expert at decode; 256 rows with weights
    given to ``prepack_moe_weights``) runs through a
    weight-stream kernel (each output element one fp32 dot product over a weight row, bf16
    pairs with AVX512_BF16 where the CPU has it): its bits depend neither on the thread count
    nor on the other tokens in the batch. Weights given to ``prepack_moe_weights`` stream from
    packed copies there (about 1.6-2.6x the bandwidth of the HF layout at decode). Experts
    with more rows run as BLAS tiles of at most 64 rows, fixed by the routing: bitwise
    identical for any thread count, except a layer
    whose only work is one such tile (49 to 64 rows, all on one expert), where MKL threads
    the two GEMMs and its fp32 results depend on the thread count in the last bits.

    Differentiable in x, w13, w2, weights, b13, b2; the backward reads x, the saved
    [T*k, 2I or I] pre-activation and the routing.
    """
    name = _MOE.choose(backend, x, w13, w2, ids)
    if _backend.HAS_C:
        return _moe_op(x, w13, w2, weights, ids, activation, gate_up_layout, b13, b2, alpha, limit, name)[0]
    return ref.moe_mlp_ref(
        x,
        w13,
        w2,
        weights,
        ids,
        activation=activation,
        gate_up_layout=gate_up_layout,
        b13=b13,
        b2=b2,
        alpha=alpha,
        limit=limit,
    )


# ---------------------------------------------------------------------------------------------
# Packed CPU weights (csrc/cpu/moe_pack.cpp)


def prepack_moe_weights(*weights: torch.Tensor) -> None:
    """Let the CPU kernel of ``moe_mlp`` read these expert weights from packed copies.

    Pass a layer's w13 [E, 2I or I, H] and w2 [E, H, I] (CPU, fp32 / bf16 / fp16, the tensors
    or views given to ``moe_mlp``; tensors of other devices are ignored). From then on the
    experts with at most 256 routed rows (decode, and prefill up to T = 4096 on a balanced
    Qwen3-30B-A3B layer) stream blocks of 64 output rows stored K-major (bf16 K-pairs
    interleaved for AVX512_BF16) on 2 MB pages: one sequential stream without horizontal
    sums, 1.6-2.6x the bandwidth of the rows of the HF layout at decode, and 1.25-1.45x the
    BLAS tiles at 64-256 rows per expert. The results
    match the unpacked kernel up to the order of the sums inside each dot product, and stay
    independent of the thread count and of the other tokens in the batch.

    Memory: each expert a forward uses is copied once, on first use, into the packed layout
    (as many bytes as its weights: a whole Qwen3-30B-A3B layer, 1.2 GB of bf16, when every
    expert has been used); ``release_moe_weights`` or freeing the weights gives it back. An
    in-place update of a weight (optimizer step, ``copy_``, ``load_state_dict``) bumps its
    version counter and the next forward repacks from the new values, so packed weights are
    meant for inference. Inference tensors (made under ``torch.inference_mode``) have no
    version counter and are refused.
    """
    if not _backend.HAS_C:
        return
    for w in weights:
        if w.device.type == "cpu":
            _backend._C.moe_pack_register(w)


def release_moe_weights(*weights: torch.Tensor) -> None:
    """Drop the packed copies of these weights (all packed copies when called without any)."""
    if not _backend.HAS_C:
        return
    if not weights:
        _backend._C.moe_pack_clear()
    for w in weights:
        if w.device.type == "cpu":
            _backend._C.moe_pack_unregister(w)


def moe_pack_stats() -> dict:
    """{"tensors": weights registered and alive, "packed_bytes": bytes of their packed experts}."""
    return dict(_backend._C.moe_pack_stats()) if _backend.HAS_C else {"tensors": 0, "packed_bytes": 0}
