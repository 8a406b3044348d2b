"""Real clients: tiny randomly initialised transformers MoE models, patched with sparseops.nn.MoE.

Local configs only (no downloads): hidden 32, 2 layers, 4-8 experts. After ``patch`` the
logits match the original model's, greedy generate() gives the same tokens, and one training
step (with the model's own aux loss) gives the same gradients for every parameter.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sparseops.integrations.transformers import HFMoEBlock, is_hf_moe_block, patch, unpatch
from sparseops.nn import MoE

tf = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    router_aux_loss_coef=0.05,
)
MODELS = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            intermediate_size=48,
            moe_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=8,
        ),
    ),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2, eos_token_id=1)),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            sliding_window=16,
            swiglu_limit=0.4,  # small, so the clamps bite at this scale
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            num_key_value_heads=4,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            routed_scaling_factor=2.5,
        ),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=0,
            head_dim=8,
            routed_scaling_factor=1.5,
        ),
    ),
}
ALWAYS = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3")  # must exist in the installed transformers


def _tiny(name: str, seed: int = 0):
    cls_name, kw = MODELS[name]
    cfg_cls = getattr(tf, cls_name, None)
    if cfg_cls is None:
        if name in ALWAYS:
            raise AssertionError(f"transformers {tf.__version__} has no {cls_name}")
        pytest.skip(f"transformers {tf.__version__} has no {cls_name}")
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**COMMON, **kw})
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    # HF's init (std 0.02) makes the experts' contribution and the router's preferences tiny:
    # scale them up so routing decisions and expert outputs matter in the comparison.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".mlp." in n and ("experts" in n or "gate" in n or "router" in n):
                p.normal_(0, 0.3 if p.dim() < 3 else 0.15)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.2)
    return model


def _params_by_name(model):
    return dict(model.named_parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_patch_matches_original(name):
    model = _tiny(name)
    ref = copy.deepcopy(model)
    before = _params_by_name(model)  # the Parameter objects, which patch shares
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ref_out = ref(ids, output_router_logits=True)
    replaced = patch(model)
    n_moe = sum(1 for m in ref.modules() if is_hf_moe_block(m))
    assert len(replaced) == n_moe > 0
    assert all(isinstance(model.get_submodule(r), HFMoEBlock) for r in replaced)
    assert patch(model) == []  # idempotent

    # inference: logits and router logits (so HF's aux loss) as the original
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=1e-4, atol=1e-5)
    if getattr(ref_out, "router_logits", None) is not None:
        assert len(out.router_logits) == len(ref_out.router_logits) == n_moe
        for a, b in zip(out.router_logits, ref_out.router_logits):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if getattr(ref_out, "aux_loss", None) is not None:
        torch.testing.assert_close(out.aux_loss, ref_out.aux_loss, rtol=1e-5, atol=1e-6)

    # greedy decoding with the KV cache: same tokens
    gen_kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    prompt = ids[:1, :5]
    torch.testing.assert_close(model.generate(prompt, **gen_kw), ref.generate(prompt, **gen_kw), rtol=0, atol=0)

    # one training step, LM loss + the model's aux loss: same loss, same gradient everywhere
    model.train()
    ref.train()
    labels = torch.randint(0, 97, ids.shape)
    loss = model(ids, labels=labels, output_router_logits=True).loss
    ref_loss = ref(ids, labels=labels, output_router_logits=True).loss
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    ref_params = _params_by_name(ref)
    checked = 0
    for n, p in before.items():
        rg = ref_params[n].grad
        if rg is None:
            assert p.grad is None or not p.grad.any(), n
            continue
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, rg, rtol=1e-4, atol=1e-6, msg=n)
        checked += ".mlp." in n
    assert checked >= 2 * n_moe  # router and experts of every MoE layer at least

    # the patched model trains the original parameters; unpatch puts the blocks back
    assert unpatch(model) == replaced
    assert not any(isinstance(m, HFMoEBlock) for m in model.modules())
    assert _params_by_name(model).keys() == before.keys()


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_from_hf_block_shares_weights_and_aux_convention(name):
    model = _tiny(name, seed=1)
    block = next(m for m in model.modules() if is_hf_moe_block(m))
    moe = MoE.from_hf(block)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        want = block(x)
        want = want[0] if isinstance(want, tuple) else want
        y, aux = moe(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    owned = {id(p) for p in block.parameters()}
    assert all(id(p) in owned for p in moe.parameters())  # shared, not copied
    if moe.router.route_kwargs["scoring"] == "softmax":
        # HF's load_balancing_loss_func on one layer == top_k x ours ("slots")
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        hf = load_balancing_loss_func((aux.logits,), moe.num_experts, moe.top_k)
        torch.testing.assert_close(hf, moe.top_k * aux.load_balancing_loss, rtol=1e-5, atol=1e-6)


def test_from_hf_rejects_other_modules():
    model = _tiny("deepseek_v3")
    dense = model.model.layers[0].mlp  # first_k_dense_replace = 1: a dense MLP
    assert not is_hf_moe_block(dense)
    with pytest.raises(TypeError, match="not a recognised"):
        MoE.from_hf(dense)


def test_jitter_noise_in_training_only():
    cls_name, kw = MODELS["mixtral"]
    cfg = tf.MixtralConfig(**{**COMMON, **kw, "router_jitter_noise": 0.1})
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    ref = copy.deepcopy(model)
    patch(model)
    ids = torch.randint(0, 97, (1, 6))
    model.train()
    ref.train()
    torch.manual_seed(5)
    a = model(ids).logits
    torch.manual_seed(5)
    b = ref(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # same random stream, same multiplier
    model.eval()
    with torch.no_grad():
        c, d = model(ids).logits, model(ids).logits
    assert torch.equal(c, d)


def _compare_on(name, device, dtype, tol):
    model = _tiny(name).to(device=device, dtype=dtype)
    ref = copy.deepcopy(model)
    patch(model)
    ids = torch.randint(0, 97, (2, 9), device=device)
    with torch.no_grad():
        got, want = model(ids).logits.float(), ref(ids).logits.float()
    # bf16 can flip a near-tie expert choice: compare the bulk, bound the rest
    close = ((got - want).abs() <= tol * (1 + want.abs())).float().mean()
    assert close > 0.98, f"{name} {dtype} on {device}: only {close:.3f} of the logits within {tol}"
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_patch_in_bf16(name):
    _compare_on(name, "cpu", torch.bfloat16, 0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_patch_on_cuda(name, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _compare_on(name, "cuda", dtype, 1e-4 if dtype == torch.float32 else 0.05)


def test_patch_ernie_selection_bias_on_softmax():
    # ERNIE-4.5-MoE: a statistics bias added to the softmax probabilities chooses the experts.
    cfg_cls = getattr(tf, "Ernie4_5_MoeConfig", None)
    if cfg_cls is None:
        pytest.skip(f"transformers {tf.__version__} has no Ernie4_5_MoeConfig")
    torch.manual_seed(0)
    cfg = cfg_cls(
        **{k: v for k, v in COMMON.items() if k != "router_aux_loss_coef"},
        intermediate_size=48,
        moe_intermediate_size=16,
        moe_num_experts=8,
        moe_k=2,
        moe_layer_start_index=0,
        moe_num_shared_experts=1,
    )
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "moe_statics" in n:
                p.normal_(0, 0.1)
            elif ".mlp." in n:
                p.normal_(0, 0.3 if p.dim() < 3 else 0.15)
    ref = copy.deepcopy(model)
    blocks = [n for n, m in model.named_modules() if is_hf_moe_block(m)]
    assert patch(model) == blocks and blocks
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
    # the selection bias is the model's own parameter (a view of it)
    stat = ref.model.layers[0].mlp.gate.moe_statics.e_score_correction_bias
    moe = model.get_submodule(blocks[0]).moe
    assert moe.router.selection_bias.shape == (8,)
    torch.testing.assert_close(moe.router.selection_bias, stat.view(-1))


def test_patch_leaves_an_unmodelled_router_variant_alone():
    # A router whose semantics this module does not model (here: a block whose router
    # forward is replaced by one that ignores the top-k renormalisation): patch notices on
    # random tokens and keeps the original.
    model = _tiny("qwen3_moe")
    for m in model.modules():
        if is_hf_moe_block(m):
            m.gate.norm_topk_prob = True  # what from_hf reads ...
            orig = type(m.gate).forward

            def forward(self, h, _orig=orig):
                logits, w, i = _orig(self, h)
                return logits, w * 0.5, i  # ... but the router does something else

            m.gate.forward = forward.__get__(m.gate)
    with pytest.warns(UserWarning, match="left as it is"):
        assert patch(model) == []
    assert not any(isinstance(m, HFMoEBlock) for m in model.modules())


def test_patched_model_compiles_in_one_graph():
    model = _tiny("qwen3_moe")
    ref = copy.deepcopy(model)
    patch(model)
    ids = torch.randint(0, 97, (2, 9))
    fn = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(fn(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
