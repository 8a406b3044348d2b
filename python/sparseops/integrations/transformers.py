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


# Per-expert module lists (transformers 4.x): (gate, up, down) attribute names of one expert.
_LIST_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _list_names(experts: nn.Module):
    if not isinstance(experts, nn.ModuleList) or len(experts) == 0:
        return None
    for names in _LIST_NAMES:
        if all(
            all(isinstance(getattr(e, n, None), nn.Linear) and getattr(e, n).bias is None for n in names)
            for e in experts
        ):
            return names
    return None


def _is_fused(experts) -> bool:
    return (
        isinstance(experts, nn.Module)
        and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(experts, "down_proj", None), torch.Tensor)
        and experts.gate_up_proj.dim() == 3
    )


def is_hf_moe_block(block: nn.Module) -> bool:
    """True for a transformers sparse MoE block that ``MoE.from_hf`` understands: a router
    with a [E, H] weight and either fused experts (transformers 5.x: ``experts.gate_up_proj``
    / ``experts.down_proj`` 3-D parameters) or a list of per-expert gated MLPs (4.x:
    gate_proj / up_proj / down_proj or Mixtral's w1 / w3 / w2 ``nn.Linear`` layers)."""
    experts = getattr(block, "experts", None)
    return _router_of(block) is not None and (_is_fused(experts) or _list_names(experts) is not None)


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
    names = None if _is_fused(experts) else _list_names(experts)
    gpt_oss = names is None and (hasattr(experts, "gate_up_proj_bias") or hasattr(experts, "limit"))
    kw: dict = {}
    if names is not None:
        inter = getattr(experts[0], names[0]).weight.shape[0]
        kw.update(activation=_activation_name(getattr(experts[0], "act_fn", None)))
        if getattr(router, "bias", None) is not None:
            kw["router_bias"] = True
    elif gpt_oss:
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
    elif isinstance(getattr(getattr(router, "moe_statics", None), "e_score_correction_bias", None), torch.Tensor):
        # ERNIE-4.5-MoE: softmax probabilities + a [1, E] statistics bias choose, the plain
        # probabilities (renormalised) weigh.
        kw.update(selection_bias=True, renormalize=True)
    if not gpt_oss and "renormalize" not in kw:
        kw["renormalize"] = bool(getattr(router, "norm_topk_prob", getattr(block, "norm_topk_prob", True)))
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
        if hasattr(router, "e_score_correction_bias"):
            moe.router.selection_bias = router.e_score_correction_bias
        else:  # ERNIE's [1, E] parameter (requires_grad=False): its [E] view, shared
            moe.router.selection_bias = router.moe_statics.e_score_correction_bias.detach().view(-1)
    if names is None:
        moe.w13, moe.w2 = experts.gate_up_proj, experts.down_proj
        moe._w13_t = moe._w2_t = gpt_oss
    else:
        # One [E, 2I, H] tensor cannot alias E separate nn.Linear weights: copied (see docstring).
        g, u, d = names
        with torch.no_grad():
            w13 = torch.stack([torch.cat([getattr(e, g).weight, getattr(e, u).weight], 0) for e in experts])
            w2 = torch.stack([getattr(e, d).weight for e in experts])
        moe.w13, moe.w2 = nn.Parameter(w13), nn.Parameter(w2)
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


def _what_it_returns(block: nn.Module, moe) -> str:
    """ "tensor", "scores" ((hidden, [T, k] routing weights): gpt-oss) or "logits" ((hidden,
    [T, E] router logits): the 4.x blocks), found by running the block on one token."""
    p = next(block.parameters())
    was_training = block.training
    block.eval()
    try:
        with torch.no_grad():
            out = block(torch.zeros(1, 1, moe.hidden, device=p.device, dtype=p.dtype))
    finally:
        block.train(was_training)
    if not isinstance(out, tuple):
        return "tensor"
    if len(out) == 2 and isinstance(out[1], torch.Tensor) and out[1].shape[-1] in (moe.num_experts, moe.top_k):
        return "logits" if out[1].shape[-1] == moe.num_experts and moe.num_experts != moe.top_k else "scores"
    raise NotImplementedError(f"{type(block).__name__} returns {type(out).__name__} of {len(out)}: not understood")


class HFMoEBlock(nn.Module):
    """A transformers sparse MoE block computed by ``sparseops.nn.MoE``; returns what the
    block it replaced returned. ``last_aux`` holds the latest ``MoEAux`` (losses, counts)."""

    def __init__(self, moe: nn.Module, original: nn.Module) -> None:
        super().__init__()
        self.moe = moe
        router = _router_of(original)
        self.returns = _what_it_returns(original, moe)
        self.jitter_noise = float(getattr(original, "jitter_noise", 0.0) or 0.0)
        object.__setattr__(self, "_original", original)  # not a child: not in state_dict / parameters
        # A plain nn.Linear gate (the 4.x blocks, which return their logits) needs no probe.
        self.router_probe = None if type(router) is nn.Linear else _probe_class(type(router))()
        self._init_probe(router)
        self.last_aux = None

    def _init_probe(self, router: nn.Module) -> None:
        if self.router_probe is None:
            return
        # transformers' _init_weights (model.init_weights()) matches the router class too:
        # plain (unregistered) attributes lead it to the shared tensors, not to a crash.
        for attr in ("weight", "bias", "e_score_correction_bias"):
            if isinstance(getattr(router, attr, None), torch.Tensor):
                object.__setattr__(self.router_probe, attr, getattr(router, attr))
        # Hooks already installed on the replaced router (transformers installs its recorder
        # hooks lazily, at the model's first forward) move to the probe.
        self.router_probe._forward_hooks.update(router._forward_hooks)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        y, aux = self.moe(hidden_states)
        self.last_aux = aux
        if self.router_probe is not None:
            self.router_probe(aux.logits, aux.weights, aux.ids)
        if self.returns == "scores":  # gpt-oss: (hidden, router_scores [T, k])
            return y, aux.weights.to(aux.logits.dtype)
        if self.returns == "logits":  # transformers 4.x Mixtral / Qwen2-MoE / OLMoE: (hidden, router_logits)
            return y, aux.logits
        return y


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _agrees(block: nn.Module, wrapper: HFMoEBlock) -> tuple[bool, float]:
    """Run the block and its replacement on 8 random tokens (eval mode, no grad)."""
    w13 = wrapper.moe.w13
    if w13.is_meta:
        return True, 0.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, wrapper.moe.hidden, generator=g).to(device=w13.device, dtype=w13.dtype)
    modes = block.training, wrapper.training
    block.eval()
    wrapper.eval()
    try:
        with torch.no_grad():
            want, got = _first(block(x)).float(), _first(wrapper(x)).float()
    finally:
        block.train(modes[0])
        wrapper.train(modes[1])
        wrapper.moe.reset_expert_counts()
        wrapper.last_aux = None
    tol = 1e-3 if w13.dtype in (torch.float32, torch.float64) else 5e-2
    err = float((got - want).abs().max()) / (float(want.abs().max()) + 1e-6)
    return err <= tol, err


def patch(model: nn.Module, *, verify: bool = True) -> list[str]:
    """Replace every recognised sparse MoE block of ``model`` in place; returns their names.

    The blocks share their parameters with the new modules (see the module docstring); an
    already patched model is left as it is (an empty list). With ``verify`` (default) each
    replacement is first run against the block on 8 random tokens: a block whose structure
    matched but whose semantics differ (a router variant this module does not model, e.g.
    ERNIE-4.5's moe_statics bias) is left in place with a warning and not listed.
    """
    import warnings

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
        try:
            wrapper = HFMoEBlock(MoE.from_hf(block), block)
        except NotImplementedError as exc:
            warnings.warn(f"sparseops patch: {name} ({type(block).__name__}) left as it is: {exc}", stacklevel=2)
            continue
        wrapper.train(block.training)
        if verify:
            ok, err = _agrees(block, wrapper)
            if not ok:
                warnings.warn(
                    f"sparseops patch: {name} ({type(block).__name__}) left as it is: the sparseops MoE differs "
                    f"from it by {err:.2e} (relative) on random tokens",
                    stacklevel=2,
                )
                continue
        setattr(parent, child, wrapper)
        replaced.append(name)
    return replaced


def unpatch(model: nn.Module) -> list[str]:
    """Put the original transformers blocks back (they share the trained parameters; a 4.x
    expert list gets the copied expert weights written back)."""
    replaced = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, HFMoEBlock):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            orig = mod._original
            orig.train(mod.training)
            # .to(device) replaces buffers (parameters are moved in place): hand them back.
            router = _router_of(orig)
            names = None if _is_fused(orig.experts) else _list_names(orig.experts)
            if names is not None:  # the copied 4.x expert weights go back to their Linears
                g, u, d = names
                w13, w2 = mod.moe.expert_weights
                inter = getattr(orig.experts[0], g).weight.shape[0]
                with torch.no_grad():
                    for e, ex in enumerate(orig.experts):
                        getattr(ex, g).weight.copy_(w13[e, :inter])
                        getattr(ex, u).weight.copy_(w13[e, inter:])
                        getattr(ex, d).weight.copy_(w2[e])
            if mod.moe.router.selection_bias is not None and hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias = mod.moe.router.selection_bias
            setattr(parent, child, orig)
            replaced.append(name)
    return replaced
