"""sparseops.nn.MoE: module semantics against a plain-torch MoE, losses, bias update, upcycling."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseops.nn import MoE

ACT = {
    "swiglu": lambda g, u: F.silu(g) * u,
    "geglu": lambda g, u: F.gelu(g) * u,
    "geglu_tanh": lambda g, u: F.gelu(g, approximate="tanh") * u,
    "reglu": lambda g, u: F.relu(g) * u,
}
PLAIN = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "relu2": lambda h: F.relu(h) ** 2}


class TorchMoE(nn.Module):
    """The MoE layer as users write it in plain torch (HF's per-expert loop), parameters copied
    from an ``MoE`` so the two can be compared value for value and gradient for gradient."""

    def __init__(self, m: MoE):
        super().__init__()
        self.m = copy.deepcopy(m)  # same parameter names; computed below without sparseops

    def forward(self, x):
        m = self.m
        kw = m.router.route_kwargs
        x2 = x.reshape(-1, x.shape[-1])
        logits = F.linear(x2, m.router.gate.weight, m.router.gate.bias)
        E, k = m.num_experts, m.top_k
        if kw["scoring"] == "sigmoid":
            scores = logits.sigmoid()
            choice = scores + (m.router.selection_bias if m.router.selection_bias is not None else 0)
            ng, tg = kw["n_group"], kw["topk_group"]
            gs = choice.view(-1, ng, E // ng).topk(2, dim=-1)[0].sum(-1)
            gmask = torch.zeros_like(gs).scatter_(1, gs.topk(tg, dim=-1)[1], 1)
            smask = gmask.unsqueeze(-1).expand(-1, ng, E // ng).reshape(-1, E)
            ids = choice.masked_fill(smask == 0, float("-inf")).topk(k, dim=-1)[1]
            w = scores.gather(1, ids)
            if kw["renormalize"]:
                w = w / w.sum(-1, keepdim=True)
        elif kw["order"] == "topk_then_softmax":
            top, ids = logits.topk(k, dim=-1)
            w = torch.softmax(top, dim=-1)
        else:
            probs = torch.softmax(logits, dim=-1)
            w, ids = probs.topk(k, dim=-1)
            if kw["renormalize"]:
                w = w / w.sum(-1, keepdim=True)
        w = w * kw["scale"]
        w13, w2 = m.expert_weights
        y = torch.zeros_like(x2)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            if tok.numel() == 0:
                continue
            h = x2[tok] @ w13[e].t()
            if m.b13 is not None:
                h = h + m.b13[e]
            if m.activation in PLAIN:
                a = PLAIN[m.activation](h)
            else:
                g, u = (h[:, 0::2], h[:, 1::2]) if m.gate_up_layout == "interleaved" else h.chunk(2, dim=-1)
                if m.activation == "swiglu_oai":
                    g, u = g.clamp(max=m.limit), u.clamp(-m.limit, m.limit)
                    a = (u + 1) * g * torch.sigmoid(g * m.alpha)
                else:
                    a = ACT[m.activation](g, u)
            o = a @ w2[e].t()
            if m.b2 is not None:
                o = o + m.b2[e]
            y = y.index_add(0, tok, o * w[tok, slot, None])
        if m.shared_experts is not None:
            s = m.shared_experts
            g, u = s.gate_proj(x2), s.up_proj(x2)
            sh = s.down_proj(ACT[m.activation](g, u))
            if m.shared_gate is not None:
                sh = torch.sigmoid(m.shared_gate(x2)) * sh
            y = y + sh
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        return y.reshape(x.shape), logits, counts


CONFIGS = {
    "mixtral": dict(),
    "qwen3_no_renorm": dict(renormalize=False),
    "geglu": dict(activation="geglu_tanh"),
    "relu2_plain": dict(activation="relu2"),
    "gpt_oss": dict(
        activation="swiglu_oai",
        gate_up_layout="interleaved",
        order="topk_then_softmax",
        router_bias=True,
        expert_bias=True,
        limit=0.5,  # small so the clamps bite at unit scale
    ),
    "deepseek": dict(
        scoring="sigmoid",
        selection_bias=True,
        n_group=2,
        topk_group=1,
        scale=2.5,
        num_shared_experts=2,
        shared_intermediate=5,
    ),
    "qwen2_shared_gate": dict(num_shared_experts=1, shared_intermediate=11, shared_gate=True, renormalize=False),
}


def _make(name, H=24, inter=7, E=8, k=2, seed=0):
    torch.manual_seed(seed)
    m = MoE(H, inter, E, k, **CONFIGS[name])
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
        if m.router.selection_bias is not None:
            m.router.selection_bias.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_and_training_step_match_torch_layer(name):
    m = _make(name)
    ref = TorchMoE(m)
    x = torch.randn(3, 13, 24)
    xr = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    y, aux = m(x)
    yr, logits_r, counts_r = ref(xr)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux.logits, logits_r.reshape(-1, 8))
    assert torch.equal(aux.counts.long(), counts_r)
    assert aux.weights.shape == aux.ids.shape == (39, 2)
    # one training step: output loss through every parameter, router included
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    rp = dict(ref.m.named_parameters())
    for n, p in m.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, rp[n].grad, rtol=1e-4, atol=1e-5, msg=n)


def test_losses_follow_the_formulas_and_hf_convention():
    m = _make("mixtral")
    m.aux_loss_coef, m.z_loss_coef = 0.01, 0.001
    x = torch.randn(50, 24)
    y, aux = m(x)
    probs = torch.softmax(aux.logits, -1)
    f = torch.bincount(aux.ids.reshape(-1).long(), minlength=8).float() / (50 * 2)
    lb = 8 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(aux.load_balancing_loss, lb)
    z = torch.logsumexp(aux.logits, -1).square().mean()
    torch.testing.assert_close(aux.z_loss, z)
    torch.testing.assert_close(aux.loss, 0.01 * lb + 0.001 * z)
    # HF's load_balancing_loss_func: f per token (not per slot), i.e. top_k x ours
    m.aux_loss_normalize = "tokens"
    _, aux_t = m(x)
    torch.testing.assert_close(aux_t.load_balancing_loss, 2 * lb)
    # the aux loss trains the router
    aux.loss.backward()
    assert m.router.gate.weight.grad.abs().sum() > 0


def test_expert_counts_and_bias_update_without_host_sync():
    torch.manual_seed(1)
    m = MoE(16, 4, 6, 2, bias_update_rate=0.01)
    assert m.router.selection_bias is not None
    x = torch.randn(40, 16)
    _, aux = m(x)
    load = aux.counts.float()
    expect = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(m.router.selection_bias, expect)
    assert torch.equal(m.expert_counts, aux.counts.long())
    # eval: counts accumulate, the bias stays
    m.eval()
    _, aux2 = m(x)
    torch.testing.assert_close(m.router.selection_bias, expect)
    assert torch.equal(m.expert_counts, aux.counts.long() + aux2.counts.long())
    assert int(m.expert_counts.sum()) == 2 * 40 * 2
    m.reset_expert_counts()
    assert int(m.expert_counts.sum()) == 0
    # the selection bias chooses, it never weighs: a huge bias on expert 5 selects it everywhere
    m.router.selection_bias.zero_()
    m.router.selection_bias[5] = 100.0
    _, aux3 = m(x)
    assert bool((aux3.ids == 5).any(-1).all())
    torch.testing.assert_close(aux3.weights.sum(-1), torch.ones(40))


def test_bias_update_balances_a_skewed_router():
    torch.manual_seed(2)
    m = MoE(16, 4, 8, 2, bias_update_rate=0.02)
    with torch.no_grad():
        m.router.gate.weight[0] += 0.5  # expert 0 favoured
    x = torch.randn(256, 16)
    _, first = m(x)
    for _ in range(60):
        _, last = m(x)
    assert last.counts.max() < first.counts.max()
    assert last.counts.float().std() < first.counts.float().std()


def test_compiles_fullgraph_with_the_bias_update():
    torch.manual_seed(5)
    eager = MoE(16, 4, 4, 2, bias_update_rate=0.01, num_shared_experts=1)
    compiled_mod = copy.deepcopy(eager)
    fn = torch.compile(compiled_mod, fullgraph=True, dynamic=True)
    for T in (9, 13):
        x = torch.randn(T, 16)
        y, aux = fn(x)
        ye, auxe = eager(x)
        torch.testing.assert_close(y, ye, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(aux.load_balancing_loss, auxe.load_balancing_loss)
        torch.testing.assert_close(compiled_mod.router.selection_bias, eager.router.selection_bias)
        assert torch.equal(compiled_mod.expert_counts, eager.expert_counts)
    assert eager.router.selection_bias.abs().sum() > 0


@pytest.mark.parametrize("k", [1, 2, 4])
def test_from_dense_copy_equals_dense(k):
    torch.manual_seed(3)
    dense = _Dense(20, 12)
    x = torch.randn(2, 9, 20)
    moe = MoE.from_dense(dense, 4, k, mode="copy")
    y, _ = moe(x)
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)
    # still the dense output after the router has learnt something (renormalised weights sum to 1)
    with torch.no_grad():
        moe.router.gate.weight.normal_()
    torch.testing.assert_close(moe(x)[0], dense(x), rtol=1e-5, atol=1e-6)
    # copies, not shared
    assert moe.w13.data_ptr() != dense.gate_proj.weight.data_ptr()


def test_from_dense_split_equals_dense():
    torch.manual_seed(4)
    dense = _Dense(20, 12)
    x = torch.randn(17, 20)
    moe = MoE.from_dense(dense, 4, 4, mode="split")
    assert moe.w13.shape == (4, 6, 20) and moe.w2.shape == (4, 20, 3)
    y, _ = moe(x)
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)
    # fewer experts per token: a different (approximate) function
    part = MoE.from_dense(dense, 4, 2, mode="split")
    assert not torch.allclose(part(x)[0], dense(x), atol=1e-3)
    with pytest.raises(ValueError, match="divide"):
        MoE.from_dense(dense, 5, 2, mode="split")
    with pytest.raises(ValueError, match="mode"):
        MoE.from_dense(dense, 4, 2, mode="nope")


class _Dense(nn.Module):
    def __init__(self, H, inter):
        super().__init__()
        self.gate_proj = nn.Linear(H, inter, bias=False)
        self.up_proj = nn.Linear(H, inter, bias=False)
        self.down_proj = nn.Linear(inter, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="activation"):
        MoE(8, 4, 4, 2, activation="tanh")
    with pytest.raises(ValueError, match="gate_up_layout"):
        MoE(8, 4, 4, 2, gate_up_layout="split")
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, 4, 4, 5)
    with pytest.raises(ValueError, match="aux_loss_normalize"):
        MoE(8, 4, 4, 2, aux_loss_normalize="rows")
    with pytest.raises(ValueError, match="selection_bias"):
        MoE(8, 4, 4, 2, bias_update_rate=0.1, selection_bias=False)
    with pytest.raises(ValueError, match="bias_update_rate"):
        MoE(8, 4, 4, 2, bias_update_rate=-1.0)
    with pytest.raises(ValueError, match="hidden = 8"):
        MoE(8, 4, 4, 2)(torch.randn(3, 7))


def test_empty_batch_and_dtype():
    m = MoE(8, 4, 4, 2)
    y, aux = m(torch.randn(0, 8))
    assert y.shape == (0, 8) and int(aux.counts.sum()) == 0
    mb = MoE(8, 4, 4, 2, dtype=torch.bfloat16)
    y, _ = mb(torch.randn(5, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


class _LegacyExpert(nn.Module):  # transformers 4.x MixtralBlockSparseTop2MLP
    def __init__(self, H, inter):
        super().__init__()
        self.w1 = nn.Linear(H, inter, bias=False)
        self.w2 = nn.Linear(inter, H, bias=False)
        self.w3 = nn.Linear(H, inter, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class _LegacyMixtralBlock(nn.Module):  # transformers 4.x MixtralSparseMoeBlock: returns (hidden, router_logits)
    def __init__(self, H=16, inter=12, E=4, k=2):
        super().__init__()
        self.top_k = k
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(_LegacyExpert(H, inter) for _ in range(E))

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        logits = self.gate(x)
        w = F.softmax(logits, dim=1, dtype=torch.float)
        w, sel = torch.topk(w, self.top_k, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(sel == e)
            out = out.index_add(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out.reshape(b, s, h), logits


def test_patch_legacy_expert_list_block_copies_and_writes_back():
    from sparseops.integrations.transformers import HFMoEBlock, patch, unpatch

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 16), _LegacyMixtralBlock())
    ref = copy.deepcopy(model)
    assert patch(model) == ["1"] and isinstance(model[1], HFMoEBlock)
    x = torch.randn(2, 5, 16)
    (y, logits), (yr, logits_r) = model(x), ref(x)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, logits_r)
    (y.square().sum() + logits.sum()).backward()
    (yr.square().sum() + logits_r.sum()).backward()
    moe = model[1].moe
    g = torch.stack([torch.cat([e.w1.weight.grad, e.w3.weight.grad]) for e in ref[1].experts])
    torch.testing.assert_close(moe.w13.grad, g, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(moe.router.gate.weight.grad, ref[1].gate.weight.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        moe.w13.mul_(2.0)  # "training" on the copy ...
    unpatch(model)  # ... is written back to the Linears
    torch.testing.assert_close(model[1].experts[2].w3.weight, 2 * ref[1].experts[2].w3.weight)
