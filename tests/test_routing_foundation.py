"""The op pattern (one schema reaching every backend, the registry, compile, double backward)
and one test per class of routing bug found on the landed code (2026-12-01)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import sparseops
from conftest import DEVICES, backend_params
from sparseops.reference.routing import expert_choice_route_ref, route_metadata_ref, topk_route_ref
from sparseops.testing import assert_close, random_ids, router_logits

TOPK = backend_params("topk_route")
META = backend_params("route_metadata")
HAS_C = sparseops.build_info()["extension"]
needs_c = pytest.mark.skipif(not HAS_C, reason="C++ extension not built")


# ---------------------------------------------------------------------------------------------
# The registry and the one dispatcher


def test_registry_answers_for_real_inputs():
    x = router_logits(3, 8)
    assert sparseops.resolve_backend("topk_route", x) == ("cpu" if HAS_C else "reference")
    assert sparseops.available_backends("topk_route", x)[0] == sparseops.resolve_backend("topk_route", x)
    assert sparseops.resolve_backend("topk_route", x, backend="reference") == "reference"
    assert "reference" in sparseops.available_backends("route_metadata", random_ids(3, 2, 8))


def test_forced_backend_error_lists_every_reason():
    with pytest.raises(RuntimeError) as info:
        sparseops.topk_route(router_logits(3, 8), 2, backend="cuda")
    msg = str(info.value)
    for name in ("cuda:", "triton:", "cpu:", "reference:"):
        assert name in msg, msg
    with pytest.raises(RuntimeError, match="unknown backend 'tpu'"):
        sparseops.route_metadata(random_ids(3, 2, 8), 8, backend="tpu")


@needs_c
@pytest.mark.parametrize("device,backend", TOPK)
def test_torch_ops_reaches_every_backend(device, backend):
    """``torch.ops.sparseops.topk_route`` is the only schema: backend= reaches each kernel."""
    x = router_logits(5, 16, device=device, seed=1)
    w, ids = torch.ops.sparseops.topk_route(x, 4, backend=backend)
    rw, rids = topk_route_ref(x, 4)
    assert torch.equal(ids, rids)
    assert_close(w, rw)


@needs_c
def test_torch_ops_rejects_a_native_backend_of_another_device():
    with pytest.raises(RuntimeError, match='backend "cuda" cannot take cpu tensors'):
        torch.ops.sparseops.topk_route(router_logits(3, 8), 2, backend="cuda")
    with pytest.raises(RuntimeError, match="backend must be one of"):
        torch.ops.sparseops.route_metadata(random_ids(3, 2, 8), 8, 0, "gpu")


def test_non_tensor_and_float_arguments_are_named():
    with pytest.raises(TypeError, match="sparseops.topk_route: logits must be a torch.Tensor, got list"):
        sparseops.topk_route([[1.0, 2.0]], 1)
    with pytest.raises(TypeError, match="sparseops.route_metadata: ids must be a torch.Tensor, got list"):
        sparseops.route_metadata([[0, 1]], 4)
    if HAS_C:
        with pytest.raises(RuntimeError, match="argument 'k'"):
            sparseops.topk_route(router_logits(3, 8), 2.0)
        with pytest.raises(RuntimeError, match="argument 'num_experts'"):
            sparseops.route_metadata(random_ids(3, 2, 8), 8.0)


def test_import_sparseops_makes_nn_available():
    code = "import sparseops; print(sparseops.nn.TopKRouter.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "TopKRouter"


# ---------------------------------------------------------------------------------------------
# int64 ids are range-checked before they are narrowed to int32


@pytest.mark.parametrize("device,backend", [p for p in META if p.values[0] == "cpu"])
@pytest.mark.parametrize("bad", [2**32 + 1, 2**31, -(2**32) + 1, -2])
def test_int64_ids_out_of_range_raise_before_narrowing(device, backend, bad):
    ids = random_ids(4, 2, 8).to(torch.int64)
    ids[1, 1] = bad
    with pytest.raises(RuntimeError, match="ids must hold expert indices in"):
        sparseops.route_metadata(ids, 8, backend=backend)
    with pytest.raises(RuntimeError, match="ids must hold expert indices in"):
        route_metadata_ref(ids, 8)


@pytest.mark.parametrize("device,backend", [p for p in META if p.values[0] == "cpu"])
def test_int32_ids_out_of_range_raise_on_cpu_for_every_backend(device, backend):
    ids = random_ids(4, 2, 8)
    ids[2, 0] = 8
    with pytest.raises(RuntimeError, match="ids must hold expert indices in"):
        sparseops.route_metadata(ids, 8, backend=backend)


@pytest.mark.parametrize("device,backend", [p for p in META if p.values[0] == "cuda"])
def test_int64_ids_out_of_range_are_dropped_on_cuda(device, backend):
    """CUDA cannot raise without a host sync: every backend drops the slot, none wraps it."""
    ids = random_ids(64, 4, 16, seed=3).to(torch.int64)
    ids[3, 1], ids[7, 0], ids[9, 2] = 2**32 + 1, -(2**32), 16
    expected = route_metadata_ref(torch.where((ids >= -1) & (ids < 16), ids, -1), 16, 8)
    got = sparseops.route_metadata(ids.to(device), 16, block_m=8, backend=backend)
    for g, e in zip(got, expected):
        assert torch.equal(g.cpu(), e)


# ---------------------------------------------------------------------------------------------
# A tensor on another device is an error, never uninitialised memory


@pytest.mark.parametrize("device,backend", TOPK)
@pytest.mark.parametrize("other", ["meta"] + (["cpu", "cuda"] if torch.cuda.is_available() else []))
def test_bias_or_mask_on_another_device_raises(device, backend, other):
    if other == device:
        pytest.skip("same device")
    x = router_logits(4, 8, device=device)
    with pytest.raises(RuntimeError, match="bias must be on the same device as logits"):
        sparseops.topk_route(x, 2, bias=torch.zeros(8, device=other), backend=backend)
    with pytest.raises(RuntimeError, match="expert_mask must be on the same device as logits"):
        sparseops.topk_route(x, 2, expert_mask=torch.ones(8, dtype=torch.bool, device=other), backend=backend)
    with pytest.raises(RuntimeError, match="bias must be on the same device as logits"):
        sparseops.route(x, 2, bias=torch.zeros(8, device=other), backend=backend)


# ---------------------------------------------------------------------------------------------
# torch.compile(dynamic=True) keeps T symbolic: one graph for every token count


def _frames(fn, inputs) -> int:
    counter = CompileCounter()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    for x in inputs:
        compiled(x)
    return counter.frame_count


@pytest.mark.parametrize("device,backend", [p for p in TOPK if "triton" not in p.id or torch.cuda.is_available()])
def test_compile_route_does_not_specialise_on_tokens(device, backend):
    def f(x):
        w, ids, meta = sparseops.route(x, 2, scale=1.5, block_m=4, backend=backend)
        return w * 2, meta.padded_slots

    torch._dynamo.reset()
    assert _frames(f, [router_logits(T, 8, device=device, seed=T) for T in (5, 7, 9, 33)]) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_compile_router_module_does_not_specialise_on_tokens(device):
    router = sparseops.nn.TopKRouter(16, 8, 2, aux_loss_coef=0.01, z_loss_coef=1e-3, device=device)

    def step(x):
        out = router(x)
        return out.weights.sum() + out.aux_loss + out.z_loss

    torch._dynamo.reset()
    inputs = [torch.randn(T, 16, device=device) for T in (5, 7, 9, 33)]
    assert _frames(step, inputs) == 1


# ---------------------------------------------------------------------------------------------
# Double backward through topk_route is a real autograd formula, not the fallback


@needs_c
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(order="topk_then_softmax"),
        dict(scoring="sigmoid", n_group=2, topk_group=1, scale=2.5),
        dict(renormalize=False),
    ],
)
def test_double_backward(kw):
    x = router_logits(5, 8, dtype=torch.float64, seed=3).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecated fallback warns; that must not happen
        torch.autograd.gradgradcheck(lambda t: sparseops.topk_route(t, 3, **kw)[0], (x,))


# ---------------------------------------------------------------------------------------------
# expert_choice_route orders NaN as torch.sort does, whatever its sign bit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_expert_choice_nan_rows(device, sign):
    logits = router_logits(9, 4, device=device, seed=4)
    nan = torch.tensor(sign * float("nan"))  # -nan has the sign bit set
    logits[2] = nan.to(device)
    logits[6, 1] = nan.to(device)
    w, ids = sparseops.expert_choice_route(logits, 4)
    rw, rids = expert_choice_route_ref(logits, 4)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# group_scoring="max" (DeepSeek-V2 group_limited_greedy) and HF's aux-loss normalisation


def _v2_group_limited_greedy(logits, k, n_group, topk_group):
    """DeepSeek-V2's router as its modelling code writes it (softmax, group max, top-k)."""
    scores = logits.softmax(dim=-1)
    T, E = scores.shape
    group_scores = scores.view(T, n_group, -1).max(dim=-1).values
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, -1)
    tmp = scores.masked_fill(~score_mask.bool(), 0.0)
    return torch.topk(tmp, k=k, dim=-1, sorted=False)


@pytest.mark.parametrize("device,backend", TOPK)
def test_group_scoring_max_is_deepseek_v2(device, backend):
    logits = router_logits(33, 64, device=device, seed=5)
    w, ids = sparseops.topk_route(
        logits, 6, n_group=8, topk_group=3, group_scoring="max", renormalize=False, bias=None, backend=backend
    )
    # Groups need fp64 scores: the reference and every backend choose by them.
    rw, rids = topk_route_ref(logits, 6, n_group=8, topk_group=3, group_scoring="max", renormalize=False)
    assert torch.equal(ids, rids)
    assert_close(w, rw)
    v2_w, v2_ids = _v2_group_limited_greedy(logits.double(), 6, 8, 3)
    assert torch.equal(ids.long().sort(dim=-1).values, v2_ids.sort(dim=-1).values)
    torch.testing.assert_close(w.double().sort(dim=-1).values, v2_w.sort(dim=-1).values, rtol=1e-6, atol=1e-7)


def test_group_scoring_differs_from_top2_sum():
    # Group 0 has one strong expert, group 1 two good ones: max picks group 0, top2_sum group 1.
    logits = torch.tensor([[4.0, -9.0, 3.5, 3.5]])  # group scores are softmax probabilities
    _, by_max = sparseops.topk_route(logits, 1, n_group=2, topk_group=1, group_scoring="max")
    _, by_sum = sparseops.topk_route(logits, 1, n_group=2, topk_group=1)
    assert by_max.tolist() == [[0]] and by_sum.tolist() == [[2]]
    with pytest.raises(RuntimeError, match='group_scoring must be "top2_sum" or "max"'):
        sparseops.topk_route(logits, 1, n_group=2, group_scoring="mean")


def _hf_load_balancing_loss(gate_logits, num_experts, top_k):
    """transformers' load_balancing_loss_func without attention mask (Mixtral, Qwen-MoE, OLMoE)."""
    routing_weights = torch.softmax(gate_logits, dim=-1)
    _, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    expert_mask = torch.nn.functional.one_hot(selected_experts, num_experts)
    tokens_per_expert = torch.mean(expert_mask.float(), dim=0)
    router_prob_per_expert = torch.mean(routing_weights, dim=0)
    return torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * num_experts


@pytest.mark.parametrize("E,k", [(8, 2), (60, 4), (128, 8)])
def test_load_balancing_loss_hf_normalisation(E, k):
    logits = router_logits(97, E, seed=E)
    _, _, meta = sparseops.route(logits, k)
    probs = torch.softmax(logits, dim=-1)
    hf = _hf_load_balancing_loss(logits, E, k)
    ours = sparseops.load_balancing_loss(probs, meta.counts, k)
    torch.testing.assert_close(sparseops.load_balancing_loss(probs, meta.counts, k, normalize="tokens"), hf)
    torch.testing.assert_close(ours * k, hf)
    with pytest.raises(RuntimeError, match='normalize must be "slots" or "tokens"'):
        sparseops.load_balancing_loss(probs, meta.counts, k, normalize="batch")
