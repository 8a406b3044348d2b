"""MoE: a sparse mixture-of-experts layer (router + routed experts + shared experts) as one module.

Built only on the public sparseops functions: ``route`` (top-k routing and its metadata),
``moe_mlp`` (the fused expert computation), ``load_balancing_loss`` and ``router_z_loss``.
``MoE.from_hf`` builds one from a Hugging Face transformers sparse MoE block (sharing its
parameters) and ``MoE.from_dense`` upcycles a dense gate/up/down MLP.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.moe import moe_mlp, prepack_moe_weights
from ..ops.routing import load_balancing_loss, route, router_z_loss
from .router import TopKRouter

__all__ = ["MoE", "MoEAux", "GatedMLP"]

# activation -> (gated, elementwise function of the gate half). Gated activations use
# w13 = [gate; up] (2I rows) and compute act(gate) * up; the others use w13 with I rows.
_GATED = {
    "swiglu": F.silu,
    "geglu": lambda g: F.gelu(g),
    "geglu_tanh": lambda g: F.gelu(g, approximate="tanh"),
    "reglu": F.relu,
}
_PLAIN = {
    "silu": F.silu,
    "gelu": lambda h: F.gelu(h),
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda h: F.relu(h).square(),
}
ACTIVATIONS = (*_GATED, "swiglu_oai", *_PLAIN)


def is_gated(activation: str) -> bool:
    """True when the activation consumes a gate and an up half (w13 has 2I rows)."""
    return activation in _GATED or activation == "swiglu_oai"


def _apply_activation(h: torch.Tensor, activation: str, layout: str, alpha: float, limit: float) -> torch.Tensor:
    # h [..., 2I] (gated) or [..., I]; the torch formula moe_mlp implements.
    if not is_gated(activation):
        return _PLAIN[activation](h)
    if layout == "interleaved":
        gate, up = h[..., 0::2], h[..., 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    if activation == "swiglu_oai":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    return _GATED[activation](gate) * up


class MoEAux(NamedTuple):
    """What ``MoE.forward`` returns beside the output.

    ``load_balancing_loss`` is the Switch/GShard loss with the module's ``aux_loss_normalize``
    ("slots": uniform routing gives 1; "tokens": Hugging Face's ``load_balancing_loss_func``
    convention, top_k times "slots"); ``z_loss`` the ST-MoE router z-loss; both without
    coefficients. ``loss`` = aux_loss_coef * load_balancing_loss + z_loss_coef * z_loss, the
    term to add to the training loss.
    """

    loss: torch.Tensor  # 0-dim, coefficient-weighted sum of the two losses
    load_balancing_loss: torch.Tensor  # 0-dim fp32
    z_loss: torch.Tensor  # 0-dim fp32
    counts: torch.Tensor  # [E] int32 slots routed to each expert in this call
    logits: torch.Tensor  # [T, E] router logits
    weights: torch.Tensor  # [T, k] fp32 routing weights
    ids: torch.Tensor  # [T, k] int32 expert ids (-1 = dropped)


class GatedMLP(nn.Module):
    """A dense (shared-expert) MLP: down(act(gate(x)) * up(x)), or down(act(up(x))) when not gated.

    Same parameter names as the LLaMA / Qwen / DeepSeek MLPs (gate_proj, up_proj, down_proj), so
    ``MoE.from_hf`` shares those modules as they are.
    """

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        activation: str = "swiglu",
        *,
        alpha=1.702,
        limit=7.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.activation, self.alpha, self.limit = activation, alpha, limit
        self.gate_proj = nn.Linear(hidden, intermediate, **kw) if is_gated(activation) else None
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(_PLAIN[self.activation](self.up_proj(x)))
        h = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        return self.down_proj(_apply_activation(h, self.activation, "concat", self.alpha, self.limit))


class MoE(nn.Module):
    """Sparse MoE layer: ``x [..., H] -> (y [..., H], MoEAux)``.

    Args:
        hidden, intermediate, num_experts, top_k: H, I (per routed expert), E, k.
        activation: one of swiglu, geglu, geglu_tanh, reglu, swiglu_oai (gpt-oss's clamped
            swiglu, ``alpha``, ``limit``), silu, gelu, gelu_tanh, relu, relu2. Gated ones use
            w13 [E, 2I, H] (gate and up halves laid out as ``gate_up_layout`` says:
            "concat" = [gate; up] as HF transformers stores them, or "interleaved" = gate, up
            alternating rows as gpt-oss does), the others w13 [E, I, H].
        scoring, order, renormalize, n_group, topk_group, group_scoring, scale: the routing
            variant (``sparseops.topk_route``): Mixtral / Qwen / OLMoE = softmax,
            softmax_then_topk (renormalize = norm_topk_prob); gpt-oss = topk_then_softmax with
            ``router_bias``; DeepSeek-V3 / GLM4-MoE = sigmoid with a selection bias, groups and
            scale = routed_scaling_factor.
        selection_bias: keep a [E] fp32 selection-only bias buffer (DeepSeek-V3's
            e_score_correction_bias); default: on when bias_update_rate > 0.
        bias_update_rate: > 0 enables auxiliary-loss-free balancing (DeepSeek-V3): after every
            training forward, ``selection_bias += rate * sign(mean(load) - load)`` with load =
            this call's per-expert slot counts, on device, without a host synchronisation.
        num_shared_experts, shared_intermediate: dense experts every token goes through, held
            as one ``GatedMLP`` of intermediate num_shared_experts * shared_intermediate
            (default ``intermediate``), as DeepSeek-V3 fuses them.
        shared_gate: Qwen2-MoE's sigmoid gate on the shared experts' output (a Linear(H, 1)).
        router_bias: a bias on the router's linear layer (gpt-oss).
        expert_bias: per-expert biases b13 [E, 2I] and b2 [E, H] (gpt-oss).
        aux_loss_coef, z_loss_coef, aux_loss_normalize: see ``MoEAux``.

    Buffers: ``expert_counts`` [E] int64, slots routed to each expert summed over every
    forward since construction or ``reset_expert_counts()``.
    """

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        num_experts: int,
        top_k: int,
        *,
        activation: str = "swiglu",
        gate_up_layout: str = "concat",
        scoring: str = "softmax",
        order: str = "softmax_then_topk",
        renormalize: bool = True,
        n_group: int = 1,
        topk_group: int = 1,
        group_scoring: str = "top2_sum",
        scale: float = 1.0,
        selection_bias: bool | None = None,
        bias_update_rate: float = 0.0,
        num_shared_experts: int = 0,
        shared_intermediate: int | None = None,
        shared_gate: bool = False,
        router_bias: bool = False,
        expert_bias: bool = False,
        aux_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        aux_loss_normalize: str = "slots",
        alpha: float = 1.702,
        limit: float = 7.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if gate_up_layout not in ("concat", "interleaved"):
            raise ValueError(f'gate_up_layout must be "concat" or "interleaved", got {gate_up_layout!r}')
        if aux_loss_normalize not in ("slots", "tokens"):
            raise ValueError(f'aux_loss_normalize must be "slots" or "tokens", got {aux_loss_normalize!r}')
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts = {num_experts}], got {top_k}")
        if bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate}")
        if selection_bias is None:
            selection_bias = bias_update_rate > 0
        if bias_update_rate > 0 and not selection_bias:
            raise ValueError("bias_update_rate > 0 needs selection_bias=True")
        self.hidden, self.intermediate, self.num_experts, self.top_k = hidden, intermediate, num_experts, top_k
        self.activation, self.gate_up_layout, self.alpha, self.limit = activation, gate_up_layout, alpha, limit
        self.bias_update_rate = float(bias_update_rate)
        self.aux_loss_coef, self.z_loss_coef, self.aux_loss_normalize = aux_loss_coef, z_loss_coef, aux_loss_normalize
        # Weights as moe_mlp takes them; ``_w13_t`` / ``_w2_t``: the parameter holds the
        # transpose (gpt-oss's [E, H, 2I] / [E, I, H], shared by from_hf) and forward passes a view.
        self._w13_t = self._w2_t = False
        self.router = TopKRouter(
            hidden,
            num_experts,
            top_k,
            scoring=scoring,
            order=order,
            renormalize=renormalize,
            n_group=n_group,
            topk_group=topk_group,
            scale=scale,
            selection_bias=selection_bias,
            gate_bias=router_bias,
            device=device,
            dtype=dtype,
        )
        self.router.route_kwargs["group_scoring"] = group_scoring
        rows = 2 * intermediate if is_gated(activation) else intermediate
        kw = dict(device=device, dtype=dtype)
        self.w13 = nn.Parameter(torch.empty(num_experts, rows, hidden, **kw))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate, **kw))
        self.b13 = nn.Parameter(torch.zeros(num_experts, rows, **kw)) if expert_bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, hidden, **kw)) if expert_bias else None
        if num_shared_experts > 0:
            si = num_shared_experts * (shared_intermediate or intermediate)
            self.shared_experts = GatedMLP(hidden, si, activation, alpha=alpha, limit=limit, **kw)
        else:
            self.shared_experts = None
        self.shared_gate = nn.Linear(hidden, 1, bias=False, **kw) if shared_gate else None
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.int64, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform like nn.Linear for every expert matrix; zero biases."""
        with torch.no_grad():
            for w, fan_in in ((self.w13, self.hidden), (self.w2, self.intermediate)):
                bound = 1.0 / math.sqrt(fan_in)
                w.uniform_(-bound, bound)
            for b in (self.b13, self.b2):
                if b is not None:
                    b.zero_()

    def reset_expert_counts(self) -> None:
        self.expert_counts.zero_()

    @property
    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [E, 2I or I, H], w2 [E, H, I]) as moe_mlp takes them (views when shared transposed)."""
        w13 = self.w13.transpose(1, 2) if self._w13_t else self.w13
        w2 = self.w2.transpose(1, 2) if self._w2_t else self.w2
        return w13, w2

    def prepack_weights(self) -> None:
        """Give the expert weights packed CPU copies for inference (``sparseops.prepack_moe_weights``)."""
        prepack_moe_weights(*self.expert_weights)

    def router_logits(self, x2: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, E]: computed in the router weight's dtype (DeepSeek keeps it fp32)."""
        gate = self.router.gate
        return F.linear(x2.to(gate.weight.dtype), gate.weight, gate.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        shape = x.shape
        if x.dim() < 1 or shape[-1] != self.hidden:
            raise ValueError(f"x must be [..., hidden = {self.hidden}], got shape {tuple(shape)}")
        x2 = x.reshape(-1, shape[-1])
        logits = self.router_logits(x2)
        r = self.router
        weights, ids, meta = route(logits, self.top_k, bias=r.selection_bias, **r.route_kwargs)
        w13, w2 = self.expert_weights
        y = moe_mlp(
            x2,
            w13,
            w2,
            weights,
            ids,
            activation=self.activation,
            gate_up_layout=self.gate_up_layout,
            b13=self.b13,
            b2=self.b2,
            alpha=self.alpha,
            limit=self.limit,
        )
        if self.shared_experts is not None:
            s = self.shared_experts(x2)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x2)) * s
            y = y + s.to(y.dtype)
        counts = meta.counts
        with torch.no_grad():
            self.expert_counts += counts
            if self.training and self.bias_update_rate > 0:
                load = counts.float()
                r.selection_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        aux = self._losses(logits, counts)
        return y.reshape(shape), MoEAux(aux[0], aux[1], aux[2], counts, logits, weights, ids)

    def _losses(self, logits: torch.Tensor, counts: torch.Tensor):
        lf = logits.float()
        if self.router.route_kwargs["scoring"] == "sigmoid":
            probs = torch.sigmoid(lf)
            probs = probs / probs.sum(-1, keepdim=True)
        else:
            probs = torch.softmax(lf, dim=-1)
        lb = load_balancing_loss(probs, counts, self.top_k, normalize=self.aux_loss_normalize)
        z = router_z_loss(logits)
        return self.aux_loss_coef * lb + self.z_loss_coef * z, lb, z

    def extra_repr(self) -> str:
        kw = self.router.route_kwargs
        return (
            f"hidden={self.hidden}, intermediate={self.intermediate}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, activation={self.activation}, scoring={kw['scoring']}, order={kw['order']}"
        )

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, block: nn.Module) -> MoE:
        """An MoE equivalent to a Hugging Face transformers sparse MoE block, sharing its weights.

        Recognised (transformers 5.x fused-expert blocks): Mixtral, Qwen2-MoE (shared expert +
        sigmoid gate), Qwen3-MoE, OLMoE, gpt-oss (router bias, expert biases, clamped swiglu,
        interleaved [E, H, 2I] gate_up), DeepSeek-V3 and GLM4-MoE (sigmoid, groups,
        e_score_correction_bias, routed_scaling_factor, shared experts), ERNIE-4.5-MoE
        (softmax with a selection bias), and the 4.x blocks
        whose experts are a list of gated MLPs (gate_proj / up_proj / down_proj or Mixtral's
        w1 / w3 / w2). The returned module holds the *same* Parameter / buffer objects as the
        block (no copy): training either trains both. The one exception is a 4.x expert list,
        whose E separate weights are copied once into w13 / w2 (the router and shared experts
        are still shared). Its forward returns (y, aux); use
        ``sparseops.integrations.transformers.patch`` to swap it into a model with the
        block's own return convention.
        """
        from ..integrations.transformers import moe_from_hf_block

        return moe_from_hf_block(cls, block)

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_experts: int, top_k: int, *, mode: str = "copy", activation=None) -> MoE:
        """Upcycle a LLaMA-style dense MLP (gate_proj, up_proj, down_proj; no biases) to an MoE.

        Routing is softmax then top-k, renormalised (what sparse upcycling found best). The
        router starts at zero (uniform routing: every expert ties, the lowest ids win).

        mode="copy": every expert is a copy of the dense FFN (weights copied, not shared).
            With renormalised weights summing to 1 over identical experts, y == dense(x)
            exactly at initialisation (up to float summation order), whatever the router.
        mode="split": the intermediate dimension I is split into num_experts contiguous
            fine-grained experts of I / num_experts each; dense(x) = sum of all experts'
            outputs, so top_k = num_experts with weights fixed at 1 reproduces it: the module
            is built with renormalize=False and scale = num_experts (so the uniform initial
            router's 1/E weights become 1); with top_k < num_experts it is an approximation
            that training recovers.
        ``activation`` defaults to swiglu (LLaMA's SiLU); pass geglu etc. for other MLPs.
        """
        if mode not in ("copy", "split"):
            raise ValueError(f'mode must be "copy" or "split", got {mode!r}')
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        inter, hidden = gate.shape
        if mode == "split" and inter % num_experts:
            raise ValueError(f"split needs num_experts ({num_experts}) to divide intermediate ({inter})")
        act = activation or "swiglu"
        if mode == "copy":
            moe = cls(
                hidden,
                inter,
                num_experts,
                top_k,
                activation=act,
                renormalize=True,
                device=gate.device,
                dtype=gate.dtype,
            )
            with torch.no_grad():
                moe.w13.copy_(torch.cat([gate, up], 0).expand(num_experts, -1, -1))
                moe.w2.copy_(down.expand(num_experts, -1, -1))
        else:
            ie = inter // num_experts
            moe = cls(
                hidden,
                ie,
                num_experts,
                top_k,
                activation=act,
                renormalize=False,
                scale=float(num_experts),
                device=gate.device,
                dtype=gate.dtype,
            )
            with torch.no_grad():
                g = gate.reshape(num_experts, ie, hidden)
                u = up.reshape(num_experts, ie, hidden)
                moe.w13.copy_(torch.cat([g, u], 1))
                moe.w2.copy_(down.reshape(hidden, num_experts, ie).permute(1, 0, 2))
        with torch.no_grad():
            moe.router.gate.weight.zero_()
        return moe
