"""Real client: tiny Hugging Face transformers models sparsified end to end with sparseops.

Randomly initialised LLaMA-, Qwen2- (q/k/v biases) and Qwen3-style (q/k norms) causal LMs
built from local config objects (no downloads), every Linear but ``lm_head`` pruned with
``sparseops.sparsify_`` to 2:4 and 1:4, by |w| or by Wanda scores from calibration batches run
through the model with forward hooks. Checked against the masked-dense model (the same
weights, zeroed where the mask drops them, run by torch): logits, greedy ``generate()``,
``save_pretrained`` + ``nm_from_pretrained`` (compressed tensors, n, m and logits kept), and a
training step (the kept values get the masked-dense gradient; pruned positions stay zero).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparseops
from sparseops.nn import NMLinear, apply_nm_layout_, nm_from_pretrained, nm_layout, wanda_scores

transformers = pytest.importorskip("transformers")

VOCAB = 96
EXCLUDE = "lm_head"  # as Wanda / SparseGPT do: the output head stays dense


def _config(kind: str):
    # initializer_range 0.2 (not HF's 0.02): logits far enough apart that greedy decoding is
    # not decided by fp32 rounding of near-ties.
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False,
    )  # fmt: skip
    if kind == "llama":
        return transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    if kind == "qwen2":  # q/k/v projections with bias: the bias path of nm_linear
        return transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    if kind == "qwen3":  # head_dim set apart from hidden / heads, q/k RMS norms
        return transformers.Qwen3Config(**common, head_dim=32), transformers.Qwen3ForCausalLM
    raise AssertionError(kind)


def _model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    cfg, cls = _config(kind)
    torch.manual_seed(seed)
    # built under the default dtype, as from_pretrained(dtype=...) does (RoPE frequencies stay fp32)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return cls(cfg).eval()
    finally:
        torch.set_default_dtype(prev)


def _ids(seed: int, batch: int = 2, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def _targets(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and n != EXCLUDE]


def _masked_dense(model: nn.Module, n: int, m: int, scores=None) -> nn.Module:
    """A copy of the dense model with every target weight zeroed off its N:M mask (torch only)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name in _targets(out):
            lin = out.get_submodule(name)
            s = None if scores is None else scores[name]
            lin.weight.mul_(sparseops.nm_mask(lin.weight, n, m, scores=s))
    return out


def _sparsified(kind: str, pattern: str, wanda: bool, dtype=torch.float32):
    """(dense, masked-dense, sparsified) models of one kind; Wanda scores from 3 batches."""
    n, m = (int(v) for v in pattern.split(":"))
    dense = _model(kind, dtype=dtype)
    scores = None
    if wanda:
        calib = [{"input_ids": _ids(100 + i, batch=2, length=16)} for i in range(3)]
        scores = wanda_scores(dense, calib, exclude=EXCLUDE)
        assert sorted(scores) == sorted(_targets(dense))
        # Wanda reorders the ranking somewhere (else the test would not test the scores)
        name = _targets(dense)[0]
        w = dense.get_submodule(name).weight
        assert not torch.equal(sparseops.nm_mask(w, n, m), sparseops.nm_mask(w, n, m, scores=scores[name]))
    masked = _masked_dense(dense, n, m, scores)
    sparse = copy.deepcopy(dense)
    sparseops.sparsify_(sparse, pattern, exclude=EXCLUDE, scores=scores)
    return dense, masked, sparse


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("wanda", [False, True], ids=["magnitude", "wanda"])
@pytest.mark.parametrize("pattern", ["2:4", "1:4"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_logits_and_greedy_generate_match_masked_dense(kind, pattern, wanda):
    n, m = (int(v) for v in pattern.split(":"))
    dense, masked, sparse = _sparsified(kind, pattern, wanda)
    targets = _targets(dense)
    assert sparse.nm_sparsified == targets
    assert nm_layout(sparse) == dict.fromkeys(targets, pattern)
    assert type(sparse.lm_head) is nn.Linear
    for name in targets:
        mod = sparse.get_submodule(name)
        assert isinstance(mod, NMLinear) and (mod.n, mod.m) == (n, m)
        torch.testing.assert_close(mod.weight, masked.get_submodule(name).weight, rtol=0, atol=0)
    ids = _ids(1)
    want, got = _logits(masked, ids), _logits(sparse, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # pruning changed the model (so the comparison above is not dense against dense)
    assert (_logits(dense, ids) - want).abs().max() > 100 * (got - want).abs().max()

    prompt = _ids(2, batch=2, length=5)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(sparse.generate(prompt, **kw), masked.generate(prompt, **kw), rtol=0, atol=0)


def test_bf16_logits_within_bf16_error():
    # The bf16 kernels (vdpbf16ps rows, bf16 tiles) inside a real model: error against the fp32
    # masked-dense model at most 2x that of torch running the same masked model in bf16.
    dense, masked, sparse = _sparsified("llama", "2:4", wanda=False)
    ids = _ids(3)
    want = _logits(masked, ids)
    err_sparse = (_logits(sparse.to(torch.bfloat16), ids).float() - want).abs().max()
    err_torch = (_logits(copy.deepcopy(masked).to(torch.bfloat16), ids).float() - want).abs().max()
    assert err_sparse <= 2 * err_torch + 1e-3, (err_sparse, err_torch)


@pytest.mark.parametrize(("kind", "pattern", "dtype"), [
    ("llama", "2:4", torch.float32), ("qwen2", "1:4", torch.float32), ("qwen3", "2:4", torch.bfloat16),
])  # fmt: skip
def test_save_pretrained_and_reload_keep_compressed_weights(kind, pattern, dtype, tmp_path):
    n, m = (int(v) for v in pattern.split(":"))
    _, _, sparse = _sparsified(kind, pattern, wanda=True, dtype=dtype)
    sparse.save_pretrained(tmp_path)
    cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert cfg.sparseops_nm["modules"] == nm_layout(sparse)

    _, cls = _config(kind)
    for loader in (cls, transformers.AutoModelForCausalLM):
        back = nm_from_pretrained(loader, tmp_path)
        assert type(back) is type(sparse) and not back.training
        assert nm_layout(back) == nm_layout(sparse)
        for name in _targets(sparse):
            a, b = sparse.get_submodule(name), back.get_submodule(name)
            assert (b.n, b.m, b.values.dtype) == (n, m, dtype)
            assert torch.equal(a.values, b.values) and torch.equal(a.meta, b.meta)
            assert (a.bias is None) == (b.bias is None) and (a.bias is None or torch.equal(a.bias, b.bias))
        ids = _ids(4)
        assert torch.equal(_logits(back, ids), _logits(sparse, ids))

    # transformers' own from_pretrained builds dense Linears: the compressed tensors are not its keys
    plain = cls.from_pretrained(tmp_path)
    assert not nm_layout(plain)


def test_reload_errors(tmp_path):
    dense = _model("llama")
    dense.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no 'sparseops_nm' layout"):
        nm_from_pretrained(transformers.LlamaForCausalLM, tmp_path)
    with pytest.raises(ValueError, match="no module 'model.nope'"):
        apply_nm_layout_(_model("llama"), {"model.nope": "2:4"})
    with pytest.raises(ValueError, match="not an nn.Linear"):
        apply_nm_layout_(_model("llama"), {"model.norm": "2:4"})


@pytest.mark.parametrize(("kind", "pattern"), [("llama", "2:4"), ("qwen2", "1:4"), ("qwen3", "2:4")])
def test_training_step_keeps_pruned_positions_zero(kind, pattern):
    n, m = (int(v) for v in pattern.split(":"))
    _, masked, sparse = _sparsified(kind, pattern, wanda=True)
    sparse.train()
    masked.train()
    ids = _ids(5, batch=3, length=10)
    loss = sparse(input_ids=ids, labels=ids).loss
    loss.backward()
    want_loss = masked(input_ids=ids, labels=ids).loss
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    opt = torch.optim.AdamW(sparse.parameters(), lr=1e-2)
    before = {name: sparse.get_submodule(name).weight.detach().clone() for name in _targets(sparse)}
    for name in _targets(sparse):
        mod = sparse.get_submodule(name)
        keep = mod.nm_weight.mask()
        # the kept values' gradient is the masked-dense weight gradient at the kept positions
        dense_grad = masked.get_submodule(name).weight.grad
        torch.testing.assert_close(mod.values.grad, dense_grad[keep].view_as(mod.values), rtol=1e-4, atol=1e-6)
    opt.step()
    opt.zero_grad()
    for name in _targets(sparse):
        w, keep = sparse.get_submodule(name).weight, before[name] != 0
        assert (w[~keep] == 0).all()  # pruned positions stay zero
        assert not torch.equal(w, before[name])  # the kept ones moved
    # and it still runs and learns on the next step
    loss2 = sparse(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss2) and loss2 < loss
