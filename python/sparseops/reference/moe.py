"""Reference for ``sparseops.moe_mlp``: the routed expert MLPs of one MoE layer, as the torch
layer users write today (Hugging Face transformers 5's Mixtral / Qwen-MoE / gpt-oss experts:
a loop over the experts that received tokens, a gather of their token rows, two matmuls with
the activation between, the routing weight, and an accumulation into the output).

Semantics (every backend matches them):
    for each token t and slot j with e = ids[t, j] >= 0:
        h = x[t] @ w13[e].T (+ b13[e])                      # [2I] (gated) or [I]
        a = act(h)                                          # [I]
        o = a @ w2[e].T (+ b2[e])                           # [H]
        y[t] += weights[t, j] * o                           # summed over j in slot order
    a slot with ids[t, j] == -1 (dropped) contributes nothing.

Gated activations split h into gate and up: "concat" layout = h[:I] is gate, h[I:] is up
(HF's gate_up_proj [E, 2I, H] then ``.chunk(2, -1)``); "interleaved" = gate h[0::2], up h[1::2]
(gpt-oss). The products are computed at the accumulation dtype (fp32; fp64 for fp64 inputs)
from the inputs rounded to their dtype; y is returned in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GATED = ("swiglu", "geglu", "geglu_tanh", "reglu", "swiglu_oai")
PLAIN = ("silu", "gelu", "gelu_tanh", "relu", "relu2")
ACTIVATIONS = GATED + PLAIN
LAYOUTS = ("concat", "interleaved")


def split_gate_up(h: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) of the pre-activation h [..., 2I] in the given layout."""
    if layout == "interleaved":
        return h[..., 0::2], h[..., 1::2]
    inter = h.shape[-1] // 2
    return h[..., :inter], h[..., inter:]


def activation_ref(h: torch.Tensor, activation: str, layout: str = "concat", alpha: float = 1.702, limit: float = 7.0):
    """act(h): [..., 2I] -> [..., I] for the gated activations, [..., I] -> [..., I] otherwise.

    swiglu_oai is gpt-oss's clamped SwiGLU (transformers' GptOssExperts):
    gate = gate.clamp(max=limit); up = up.clamp(-limit, limit);
    out = (up + 1) * gate * sigmoid(alpha * gate).
    """
    if activation in PLAIN:
        if activation == "silu":
            return F.silu(h)
        if activation == "gelu":
            return F.gelu(h)
        if activation == "gelu_tanh":
            return F.gelu(h, approximate="tanh")
        if activation == "relu":
            return F.relu(h)
        return F.relu(h).square()  # relu2
    if activation not in GATED:
        raise RuntimeError(f'activation must be one of {", ".join(ACTIVATIONS)}, got "{activation}"')
    gate, up = split_gate_up(h, layout)
    if activation == "swiglu":
        return F.silu(gate) * up
    if activation == "geglu":
        return F.gelu(gate) * up
    if activation == "geglu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if activation == "reglu":
        return F.relu(gate) * up
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def moe_mlp_ref(
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
    return_pre: bool = False,
):
    """Reference moe_mlp (see the module docstring). Differentiable by torch autograd in every
    input. With return_pre, also returns the pre-activation of every slot [T*k, 2I or I] in
    x's dtype, slot s = t*k + j, zero rows for dropped slots (what the op saves for backward)."""
    T, H = x.shape
    k = ids.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    flat_ids = ids.reshape(-1).long()
    flat_w = weights.reshape(-1).to(acc)
    slot_out = x.new_zeros((T * k, H), dtype=acc)
    pre = x.new_zeros((T * k, w13.shape[1]), dtype=x.dtype) if return_pre else None
    hit = torch.unique(flat_ids[flat_ids >= 0]).tolist() if flat_ids.numel() else []
    for e in hit:
        slots = torch.nonzero(flat_ids == e).flatten()
        tok = slots // k
        h = xa[tok] @ w13[e].to(acc).T
        if b13 is not None:
            h = h + b13[e].to(acc)
        if pre is not None:
            pre = pre.index_copy(0, slots, h.to(x.dtype))
        a = activation_ref(h, activation, gate_up_layout, alpha, limit)
        o = a @ w2[e].to(acc).T
        if b2 is not None:
            o = o + b2[e].to(acc)
        slot_out = slot_out.index_copy(0, slots, o * flat_w[slots, None])
    y = slot_out.view(T, k, H).sum(dim=1).to(x.dtype)
    return (y, pre) if return_pre else y


def moe_mlp_hf_loop(x, w13, w2, weights, ids, act=F.silu):
    """The layer exactly as transformers 5 writes it (MixtralExperts.forward): one-hot expert
    mask, a loop over the experts hit, gate/up chunk, act(gate) * up, down projection, the
    routing weight and index_add_ into the output, all in the input dtype. The benchmark's
    baseline; not the specification (it accumulates in x's dtype, in expert order)."""
    final = torch.zeros_like(x)
    num_experts = w13.shape[0]
    with torch.no_grad():
        expert_mask = F.one_hot(ids.long().clamp_min(0), num_classes=num_experts).permute(2, 1, 0)
        expert_mask = expert_mask * (ids >= 0).T[None]
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        e = int(expert_idx[0])
        top_k_pos, token_idx = torch.where(expert_mask[e])
        current_state = x[token_idx]
        gate, up = F.linear(current_state, w13[e]).chunk(2, dim=-1)
        current = act(gate) * up
        current = F.linear(current, w2[e])
        current = current * weights[token_idx, top_k_pos, None].to(current.dtype)
        final.index_add_(0, token_idx, current.to(final.dtype))
    return final
