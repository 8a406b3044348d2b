"""Swap the sparse MoE blocks of Hugging Face transformers models for ``sparseops.nn.MoE``.

``patch(model)`` replaces every recognised block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
gpt-oss, DeepSeek-V3, GLM4-MoE and blocks built the same way: a router with a [E, H]
``weight`` and fused 3-D ``experts.gate_up_proj`` / ``experts.down_proj``) by an
``HFMoEBlock`` that

- holds an ``MoE`` sharing the block's parameters and buffers (the same tensor objects, no
  copy; gpt-oss's [E, H, 2I] gate_up is passed to the kernels as a transposed view),
- returns exactly what the replaced block returned (a tensor, or gpt-oss's
  ``(hidden, router_scores)`` tuple),
- reports its router logits to transformers' output recorder (``output_router_logits=True``)
  through a probe module of the replaced router's class, so the model's own
  ``load_balancing_loss_func`` aux loss still works (per layer it equals top_k times
  ``MoEAux.load_balancing_loss`` with the default ``aux_loss_normalize="slots"``),
- keeps Mixtral's training-time router jitter.

The replaced blocks' parameters live on under new names (``...mlp.moe.w13`` ...):
``unpatch(model)`` puts the original blocks back (with whatever the shared parameters
learnt) before ``save_pretrained``. transformers is imported only by the caller: this module
works on module attributes and never imports it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HFMoEBlock", "patch", "unpatch", "moe_from_hf_block", "is_hf_moe_block"]

_PROBE_CLASSES: dict[type, type] = {}


def _router_of(block: nn.Module) -> nn.Module | None:
    for name in ("gate", "router"):
        r = getattr(block, name, None)
        if isinstance(r, nn.Module) and isinstance(getattr(r, "weight", None), torch.Tensor) and r.weight.dim() == 2:
            return r
    return None


def is_hf_moe_block(block: nn.Module) -> bool:
    """True for a transformers sparse MoE block that ``MoE.from_hf`` understands."""
    experts = getattr(block, "experts", None)
    return (
        _router_of(block) is not None
        and isinstance(experts, nn.Module)
        and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(experts, "down_proj", None), torch.Tensor)
        and experts.gate_up_proj.dim() == 3
    )


def _activation_name(act_fn: nn.Module | None) -> str:
    """Identify an HF ``act_fn`` by what it computes (class names differ between versions)."""
    if act_fn is None:
        return "swiglu"
    x = torch.linspace(-6, 6, 97, dtype=torch.float64)
    with torch.no_grad():
        y = act_fn(x)
    for name, fn in (
        ("swiglu", F.silu),
        ("geglu", F.gelu),
        ("geglu_tanh", lambda t: F.gelu(t, approximate="tanh")),
        ("reglu", F.relu),
    ):
        if torch.allclose(y, fn(x), rtol=1e-6, atol=1e-7):
            return name
    raise NotImplementedError(f"unsupported expert activation {act_fn!r}")


def moe_from_hf_block(cls, block: nn.Module):
    """``MoE.from_hf``: see its docstring."""
    if not is_hf_moe_block(block):
        raise TypeError(
            f"{type(block).__name__} is not a recognised transformers sparse MoE block (a gate/router with a "
            "[E, H] weight and experts.gate_up_proj / experts.down_proj 3-D parameters)"
        )
    router, experts = _router_of(block), block.experts
    E, H = router.weight.shape
    k = int(getattr(router, "top_k", None) or block.top_k)
    gpt_oss = hasattr(experts, "gate_up_proj_bias") or hasattr(experts, "limit")
    kw: dict = {}
    if gpt_oss:
        # gate_up_proj [E, H, 2I] with gate / up in alternating columns, down_proj [E, I, H].
        inter = experts.down_proj.shape[1]
        kw.update(
            activation="swiglu_oai",
            gate_up_layout="interleaved",
            order="topk_then_softmax",
            router_bias=getattr(router, "bias", None) is not None,
            expert_bias=getattr(experts, "gate_up_proj_bias", None) is not None,
            alpha=float(experts.alpha),
            limit=float(experts.limit),
        )
    else:
        inter = experts.down_proj.shape[2]
        kw.update(activation=_activation_name(getattr(experts, "act_fn", None)))
        if getattr(router, "bias", None) is not None:
            kw["router_bias"] = True
    if hasattr(router, "e_score_correction_bias"):
        kw.update(
            scoring="sigmoid",
            selection_bias=True,
            n_group=int(getattr(router, "num_group", 1) or 1),
            topk_group=int(getattr(router, "topk_group", 1) or 1),
            scale=float(getattr(router, "routed_scaling_factor", 1.0) or 1.0),
            renormalize=bool(getattr(router, "norm_topk_prob", True)),
        )
    elif not gpt_oss:
        kw["renormalize"] = bool(getattr(router, "norm_topk_prob", True))
    shared = getattr(block, "shared_experts", None)
    if shared is None:
        shared = getattr(block, "shared_expert", None)
    if shared is not None:
        kw.update(num_shared_experts=1, shared_intermediate=shared.down_proj.weight.shape[1])
    kw["shared_gate"] = isinstance(getattr(block, "shared_expert_gate", None), nn.Module)
    p = router.weight
    moe = cls(H, inter, E, k, device="meta", dtype=p.dtype, **kw)
    # Share, never copy: the same Parameter / buffer objects as the block.
    moe.router.gate.weight = router.weight
    if kw.get("router_bias"):
        moe.router.gate.bias = router.bias
    if "selection_bias" in kw:
        moe.router.selection_bias = router.e_score_correction_bias
    moe.w13, moe.w2 = experts.gate_up_proj, experts.down_proj
    moe._w13_t = moe._w2_t = gpt_oss
    if kw.get("expert_bias"):
        moe.b13, moe.b2 = experts.gate_up_proj_bias, experts.down_proj_bias
    if shared is not None:
        if getattr(shared, "gate_proj", None) is None:
            raise NotImplementedError(f"shared expert {type(shared).__name__} has no gate_proj")
        moe.shared_experts.gate_proj = shared.gate_proj
        moe.shared_experts.up_proj = shared.up_proj
        moe.shared_experts.down_proj = shared.down_proj
        moe.shared_experts.activation = _activation_name(getattr(shared, "act_fn", None))
    if kw["shared_gate"]:
        moe.shared_gate = block.shared_expert_gate
    moe.expert_counts = torch.zeros(E, dtype=torch.int64, device=p.device)
    for name, t in list(moe.named_parameters()) + list(moe.named_buffers()):
        if t.is_meta:
            raise RuntimeError(f"MoE.from_hf left {name} unshared (internal error)")
    return moe


def _probe_class(router_cls: type) -> type:
    """A subclass of the replaced router's class (so transformers' output recorder, which
    matches by isinstance, hooks it) whose forward passes the logits through."""
    if router_cls not in _PROBE_CLASSES:

        def __init__(self):
            nn.Module.__init__(self)

        def forward(self, logits, weights, ids):
            return logits, weights, ids

        _PROBE_CLASSES[router_cls] = type(
            f"SparseopsProbe{router_cls.__name__}",
            (router_cls,),
            {"__init__": __init__, "forward": forward, "__module__": __name__},
        )
    return _PROBE_CLASSES[router_cls]


class HFMoEBlock(nn.Module):
    """A transformers sparse MoE block computed by ``sparseops.nn.MoE``; returns what the
    block it replaced returned. ``last_aux`` holds the latest ``MoEAux`` (losses, counts)."""

    def __init__(self, moe: nn.Module, original: nn.Module) -> None:
        super().__init__()
        self.moe = moe
        router = _router_of(original)
        self.router_probe = _probe_class(type(router))()
        # transformers' _init_weights (model.init_weights()) matches the router class too:
        # plain (unregistered) attributes lead it to the shared tensors, not to a crash.
        for attr in ("weight", "bias", "e_score_correction_bias"):
            if isinstance(getattr(router, attr, None), torch.Tensor):
                object.__setattr__(self.router_probe, attr, getattr(router, attr))
        # Hooks already installed on the replaced router (transformers installs its recorder
        # hooks lazily, at the model's first forward) move to the probe.
        self.router_probe._forward_hooks.update(router._forward_hooks)
        self.returns_scores = hasattr(original.experts, "gate_up_proj_bias") or hasattr(original.experts, "limit")
        self.jitter_noise = float(getattr(original, "jitter_noise", 0.0) or 0.0)
        object.__setattr__(self, "_original", original)  # not a child: not in state_dict / parameters
        self.last_aux = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        y, aux = self.moe(hidden_states)
        self.last_aux = aux
        self.router_probe(aux.logits, aux.weights, aux.ids)
        if self.returns_scores:
            return y, aux.weights.to(aux.logits.dtype)
        return y


def patch(model: nn.Module) -> list[str]:
    """Replace every recognised sparse MoE block of ``model`` in place; returns their names.

    The blocks share their parameters with the new modules (see the module docstring); an
    already patched model is left as it is (an empty list).
    """
    from ..nn.moe import MoE

    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if name and not isinstance(mod, HFMoEBlock) and is_hf_moe_block(mod)
    ]
    replaced = []
    for name, block in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = HFMoEBlock(MoE.from_hf(block), block)
        wrapper.train(block.training)
        setattr(parent, child, wrapper)
        replaced.append(name)
    return replaced


def unpatch(model: nn.Module) -> list[str]:
    """Put the original transformers blocks back (they share the trained parameters)."""
    replaced = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, HFMoEBlock):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            orig = mod._original
            orig.train(mod.training)
            # .to(device) replaces buffers (parameters are moved in place): hand them back.
            router = _router_of(orig)
            if mod.moe.router.selection_bias is not None and hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias = mod.moe.router.selection_bias
            setattr(parent, child, orig)
            replaced.append(name)
    return replaced
