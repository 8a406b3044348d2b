"""TopKRouter: the gate of an MoE layer (linear -> top-k routing -> metadata) as one module."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..ops.routing import RouteMeta, load_balancing_loss, route, router_z_loss


class RouterOutput(NamedTuple):
    weights: torch.Tensor  # [T, k] fp32 routing weights
    ids: torch.Tensor  # [T, k] int32 expert ids
    meta: RouteMeta  # expert-major layout of the T*k slots
    logits: torch.Tensor  # [T, E] router logits
    aux_loss: torch.Tensor  # load-balancing loss (0-dim), 0 when aux_loss_coef == 0
    z_loss: torch.Tensor  # router z-loss (0-dim), 0 when z_loss_coef == 0


class TopKRouter(nn.Module):
    """Router for an MoE block: ``x [..., H] -> RouterOutput`` over ``num_experts`` experts.

    Covers Mixtral / Qwen-MoE (softmax, renormalised top-k), gpt-oss (topk_then_softmax,
    ``gate_bias=True``) and DeepSeek-V3 (sigmoid, selection bias ``e_score_correction_bias``,
    groups, scale). The coefficients only scale the returned losses; adding them to the
    training loss is the caller's choice.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        scoring: str = "softmax",
        order: str = "softmax_then_topk",
        renormalize: bool = True,
        n_group: int = 1,
        topk_group: int = 1,
        scale: float = 1.0,
        selection_bias: bool = False,
        gate_bias: bool = False,
        block_m: int = 0,
        aux_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=gate_bias, device=device, dtype=dtype)
        self.num_experts, self.top_k = num_experts, top_k
        self.route_kwargs = dict(
            scoring=scoring, order=order, renormalize=renormalize, n_group=n_group, topk_group=topk_group, scale=scale
        )
        # DeepSeek-V3 keeps its balancing bias out of the optimiser: a buffer, updated by the trainer.
        self.register_buffer(
            "selection_bias",
            torch.zeros(num_experts, device=device, dtype=torch.float32) if selection_bias else None,
        )
        self.block_m = block_m
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef

    def _apply(self, fn, recurse=True):
        # module.to(torch.bfloat16) / .half() cast every float buffer: the selection bias
        # rounded to bf16 (about 3 significant digits) picks other experts than the fp32 bias
        # it was trained as (DeepSeek-V3 keeps e_score_correction_bias in fp32), and a later
        # load_state_dict of fp32 values was rounded again. Moves apply; dtype casts do not.
        bias = self.selection_bias
        out = super()._apply(fn, recurse)
        if bias is not None and self.selection_bias.dtype != bias.dtype:
            self.selection_bias = bias.to(device=self.selection_bias.device)
        return out

    def forward(self, x: torch.Tensor, expert_mask: torch.Tensor | None = None) -> RouterOutput:
        logits = self.gate(x.reshape(-1, x.shape[-1]))
        weights, ids, meta = route(
            logits,
            self.top_k,
            bias=self.selection_bias,
            expert_mask=expert_mask,
            block_m=self.block_m,
            **self.route_kwargs,
        )
        zero = logits.new_zeros((), dtype=torch.float32)
        aux = zero
        if self.aux_loss_coef:
            if self.route_kwargs["scoring"] == "sigmoid":
                probs = torch.sigmoid(logits.float())
                probs = probs / probs.sum(-1, keepdim=True)
            else:
                probs = torch.softmax(logits.float(), dim=-1)
            aux = self.aux_loss_coef * load_balancing_loss(probs, meta.counts, self.top_k)
        z = self.z_loss_coef * router_z_loss(logits) if self.z_loss_coef else zero
        return RouterOutput(weights, ids, meta, logits, aux, z)
