"""expert_choice_route, the router losses, TopKRouter, build_info and backend selection."""

from __future__ import annotations

import pytest
import torch

import sparseops
from conftest import DEVICES
from sparseops.nn import TopKRouter
from sparseops.reference import (
    expert_choice_route_ref,
    load_balancing_loss_ref,
    route_metadata_ref,
    router_z_loss_ref,
    topk_route_ref,
)
from sparseops.testing import assert_close, router_logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,E,C", [(1, 1, 1), (7, 4, 3), (97, 8, 25), (300, 60, 300), (5, 3, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_expert_choice_matches_reference(device, T, E, C, dtype):
    logits = router_logits(T, E, dtype=dtype, device=device, seed=T + E, ties=True)
    w, ids = sparseops.expert_choice_route(logits, C)
    w_ref, ids_ref = expert_choice_route_ref(logits, C)
    assert ids.dtype == torch.int32 and ids.shape == (E, C)
    torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
    assert_close(w, w_ref)


def test_expert_choice_ties_and_grad():
    logits = torch.zeros(6, 3, dtype=torch.float64)  # every token ties for every expert
    _, ids = sparseops.expert_choice_route(logits, 4)
    assert ids.tolist() == [[0, 1, 2, 3]] * 3
    x = router_logits(6, 3, dtype=torch.float64, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: sparseops.expert_choice_route(t, 2)[0], (x,))


def test_expert_choice_errors():
    with pytest.raises(RuntimeError, match="capacity must be in"):
        sparseops.expert_choice_route(torch.randn(4, 3), 5)
    with pytest.raises(RuntimeError, match="2-D float"):
        sparseops.expert_choice_route(torch.randn(4, 3, 2), 1)


def test_expert_choice_compiles():
    torch._dynamo.reset()
    f = torch.compile(lambda x: sparseops.expert_choice_route(x, 3), fullgraph=True, dynamic=True)
    for T in (5, 11):
        x = router_logits(T, 4, seed=T)
        w, ids = f(x)
        w_ref, ids_ref = expert_choice_route_ref(x, 3)
        assert torch.equal(ids, ids_ref)
        assert_close(w, w_ref)


def test_load_balancing_loss():
    T, E, k = 64, 8, 2
    # Perfectly uniform routing gives exactly 1.
    probs = torch.full((T, E), 1.0 / E)
    counts = torch.full((E,), T * k // E, dtype=torch.int32)
    assert_close(sparseops.load_balancing_loss(probs, counts, k), torch.tensor(1.0))
    # All slots on one expert whose probability is 1 gives E.
    probs = torch.zeros(T, E)
    probs[:, 3] = 1
    counts = torch.zeros(E, dtype=torch.int32)
    counts[3] = T * k
    assert_close(sparseops.load_balancing_loss(probs, counts, k), torch.tensor(float(E)))
    # Random routing: matches the reference and is differentiable in the probabilities.
    logits = router_logits(T, E, seed=3).requires_grad_(True)
    p = torch.softmax(logits, -1)
    _, ids = sparseops.topk_route(logits, k)
    counts = sparseops.route_metadata(ids, E).counts
    loss = sparseops.load_balancing_loss(p, counts, k)
    assert_close(loss, load_balancing_loss_ref(p, counts, k))
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert sparseops.load_balancing_loss(torch.zeros(0, E), torch.zeros(E, dtype=torch.int32), k) == 0
    with pytest.raises(RuntimeError, match="router_probs"):
        sparseops.load_balancing_loss(torch.zeros(4, E), torch.zeros(E + 1), k)


def test_router_z_loss():
    logits = router_logits(33, 16, seed=5, dtype=torch.bfloat16)
    z = torch.logsumexp(logits.float(), -1)
    assert_close(sparseops.router_z_loss(logits), (z * z).mean())
    assert_close(sparseops.router_z_loss(logits), router_z_loss_ref(logits))
    assert sparseops.router_z_loss(torch.zeros(0, 16)) == 0
    x = router_logits(4, 5, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(sparseops.router_z_loss, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_topk_router_module(device):
    torch.manual_seed(0)
    router = TopKRouter(
        32,
        16,
        4,
        scoring="sigmoid",
        n_group=4,
        topk_group=2,
        scale=2.5,
        selection_bias=True,
        block_m=8,
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
        device=device,
    )
    router.selection_bias.copy_(torch.randn(16) * 0.1)
    x = torch.randn(3, 5, 32, device=device)
    out = router(x)
    logits = router.gate(x.reshape(-1, 32))
    w_ref, ids_ref = topk_route_ref(
        logits, 4, scoring="sigmoid", n_group=4, topk_group=2, scale=2.5, bias=router.selection_bias
    )
    assert torch.equal(out.ids, ids_ref)
    assert_close(out.weights, w_ref)
    assert torch.equal(out.meta.padded_slots, route_metadata_ref(ids_ref, 16, 8)[5])
    (out.weights.sum() + out.aux_loss + out.z_loss).backward()
    assert router.gate.weight.grad is not None
    assert out.aux_loss > 0 and out.z_loss > 0


def test_build_info_and_backend_listing():
    info = sparseops.build_info()
    for key in ("torch_version", "cuda", "cuda_version", "cuda_arches", "extension", "triton", "backends"):
        assert key in info
    for op in ("topk_route", "route_metadata"):
        assert "reference" in info["backends"][op]["cpu"]
    assert "reference" in sparseops.available_backends("topk_route", torch.device("cpu"))
    expected = "cpu" if info["extension"] else "reference"
    assert sparseops.resolve_backend("topk_route", torch.device("cpu")) == expected
    assert sparseops.resolve_backend("route_metadata", "cpu", backend="reference") == "reference"


def test_default_backend_switch():
    x = router_logits(4, 8)
    try:
        sparseops.set_default_backend("reference")
        w, ids = sparseops.topk_route(x, 2)
        assert torch.equal(ids, topk_route_ref(x, 2)[1])
        with pytest.raises(ValueError, match="backend must be one of"):
            sparseops.set_default_backend("gpu")
    finally:
        sparseops.set_default_backend(None)


def test_without_extension_falls_back_to_reference_with_one_warning():
    """An install with no compiler has no _C: every op still works, through the references."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["sparseops._C"] = None  # what a failed build leaves: importing _C fails
        import torch, sparseops
        from sparseops.reference import topk_route_ref, route_metadata_ref
        assert not sparseops.build_info()["extension"]
        x = torch.randn(9, 16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            w, ids = sparseops.topk_route(x, 4)
            meta = sparseops.route_metadata(ids, 16)
            sparseops.topk_route(x, 4)
        assert sum("fall back" in str(c.message) for c in caught) == 1, [str(c.message) for c in caught]
        assert torch.equal(ids, topk_route_ref(x, 4)[1])
        assert torch.equal(meta.sorted_slots, route_metadata_ref(ids, 16)[2])
        x.requires_grad_(True)
        sparseops.topk_route(x, 4)[0].sum().backward()
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
