"""topk_route: every backend against the reference, plus opcheck, gradcheck, compile, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseops
from conftest import DEVICES, HAS_CUDA, backend_params, interpreted
from sparseops.reference import topk_route_ref
from sparseops.testing import assert_close, router_logits

BACKENDS = backend_params("topk_route")

# (E, k, route kwargs): the production routers plus awkward sizes.
CONFIGS = [
    pytest.param(8, 2, {}, id="mixtral"),
    pytest.param(8, 2, {"order": "topk_then_softmax"}, id="mixtral-topk_then_softmax"),
    pytest.param(128, 8, {}, id="qwen3"),
    pytest.param(128, 8, {"renormalize": False}, id="qwen3-no-renorm"),
    pytest.param(128, 4, {"order": "topk_then_softmax"}, id="gpt-oss"),
    pytest.param(
        256, 8, {"scoring": "sigmoid", "n_group": 8, "topk_group": 4, "scale": 2.5, "bias": True}, id="deepseek-v3"
    ),
    pytest.param(60, 4, {"scoring": "sigmoid", "n_group": 4, "topk_group": 2, "bias": True}, id="groups-of-15"),
    pytest.param(60, 6, {"bias": True}, id="softmax-bias"),
    pytest.param(1, 1, {}, id="E1"),
    pytest.param(7, 7, {}, id="k-equals-E"),
    pytest.param(257, 32, {}, id="E257-k32"),
    pytest.param(1024, 32, {"scoring": "sigmoid"}, id="E1024-sigmoid"),
]


def _kwargs(kw: dict, E: int, device, seed: int = 1) -> dict:
    kw = dict(kw)
    if kw.pop("bias", False):
        g = torch.Generator().manual_seed(seed)
        kw["bias"] = (0.1 * torch.randn(E, generator=g)).to(device)
    return kw


def _check(logits, k, kw, backend):
    w, ids = sparseops.topk_route(logits, k, backend=backend, **kw)
    w_ref, ids_ref = topk_route_ref(logits, k, **kw)
    assert ids.dtype == torch.int32 and ids.shape == (logits.shape[0], k)
    assert w.is_contiguous() and ids.is_contiguous()
    torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
    assert_close(w, w_ref)
    return w, ids


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("E,k,kw", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(device, backend, E, k, kw, dtype):
    T = 9 if interpreted(device, backend) else 97
    logits = router_logits(T, E, dtype=dtype, device=device, seed=E + k)
    _check(logits, k, _kwargs(kw, E, device), backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes(device, backend, dtype):
    logits = router_logits(13, 60, dtype=dtype, device=device, seed=3)
    w, _ = _check(logits, 5, {}, backend)
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _check(logits, 4, _kwargs({"scoring": "sigmoid", "bias": True, "n_group": 6, "topk_group": 3}, 60, device), backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("E,k,kw", [CONFIGS[0], CONFIGS[2], CONFIGS[5], CONFIGS[7]])
def test_ties_go_to_lower_index(device, backend, E, k, kw):
    """Logits on a grid of 1/4 repeat within a row; all-equal rows are the extreme case."""
    T = 8 if interpreted(device, backend) else 64
    logits = router_logits(T, E, device=device, seed=7, ties=True)
    logits[0] = 0.5
    w, ids = _check(logits, k, _kwargs(kw, E, device), backend)
    if "n_group" not in kw and "bias" not in kw:
        assert ids[0].tolist() == list(range(k))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_expert_mask(device, backend):
    E = 16
    logits = router_logits(11, E, device=device, seed=5)
    mask = torch.zeros(E, dtype=torch.bool, device=device)
    mask[[1, 4, 5, 9, 15]] = True
    w, ids = _check(logits, 4, {"expert_mask": mask}, backend)
    assert set(ids.flatten().tolist()) <= {1, 4, 5, 9, 15}
    # Fewer enabled experts than k: the leftover slots are dropped (-1, weight 0).
    mask.zero_()
    mask[[3, 12]] = True
    w, ids = _check(logits, 4, {"expert_mask": mask}, backend)
    assert (ids[:, 2:] == -1).all() and (w[:, 2:] == 0).all()
    assert_close(w.sum(-1), torch.ones(11, device=device))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("T", [0, 1, 7])
def test_small_T_and_noncontiguous(device, backend, T):
    logits = router_logits(T, 60, device=device, seed=T, noncontiguous=True)
    assert not logits.is_contiguous() or T <= 1
    _check(logits, 8, {}, backend)
    _check(logits.to(torch.bfloat16), 8, _kwargs(CONFIGS[6].values[2], 60, device), backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_extreme_logits(device, backend):
    """Large and -inf logits: saturated sigmoids, underflowing softmax, ranks still exact."""
    logits = router_logits(6, 32, device=device, seed=11) * 40
    logits[1, :5] = float("-inf")
    for kw in ({}, {"order": "topk_then_softmax"}, {"scoring": "sigmoid"}):
        _check(logits, 6, kw, backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nonfinite_logits_with_groups_and_bias(device, backend):
    """NaN and +-inf logits: ranks and group scores follow the reference's nan_to_num rules."""
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(16, 16, generator=g)
    r = torch.rand(16, 16, generator=g)
    logits[r < 0.1] = float("inf")
    logits[(r >= 0.1) & (r < 0.2)] = float("-inf")
    logits[(r >= 0.2) & (r < 0.25)] = float("nan")
    logits = logits.to(device)
    bias = torch.randn(16, generator=g).to(device)
    for kw in (
        {"order": "topk_then_softmax", "n_group": 4, "topk_group": 2, "bias": bias},
        {"scoring": "sigmoid", "n_group": 4, "topk_group": 2, "bias": bias},
        {"n_group": 4, "topk_group": 2},
    ):
        w, ids = sparseops.topk_route(logits, 3, backend=backend, **kw)
        w_ref, ids_ref = topk_route_ref(logits, 3, **kw)
        torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
        torch.testing.assert_close(w, w_ref, equal_nan=True)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_weights_semantics(device, backend):
    """Independent of the reference: renormalised weights sum to scale; the bias moves ids, not weights."""
    E = 64
    logits = router_logits(10, E, device=device, seed=2)
    w, ids = sparseops.topk_route(logits, 6, scale=2.5, backend=backend)
    assert_close(w.sum(-1), torch.full((10,), 2.5, device=device))
    bias = torch.zeros(E, device=device)
    bias[E - 6 :] = 100.0
    w, ids = sparseops.topk_route(logits, 6, scoring="sigmoid", bias=bias, renormalize=False, backend=backend)
    assert sorted(ids[0].tolist()) == list(range(E - 6, E))
    assert_close(w, torch.sigmoid(logits.float()).gather(1, ids.long()))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic(device, backend):
    logits = router_logits(33, 128, dtype=torch.bfloat16, device=device, seed=9)
    a = sparseops.topk_route(logits, 8, backend=backend)
    b = sparseops.topk_route(logits, 8, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"renormalize": False},
        {"order": "topk_then_softmax"},
        {"scoring": "sigmoid"},
        {"scoring": "sigmoid", "renormalize": False, "scale": 2.5},
        {"expert_mask": "mask"},
    ],
    ids=["softmax", "no-renorm", "topk_then_softmax", "sigmoid", "sigmoid-raw-scaled", "mask"],
)
def test_gradcheck(device, backend, kw):
    kw = dict(kw)
    if kw.get("expert_mask") == "mask":
        kw["expert_mask"] = torch.tensor([True, False, True, True, False, True, True, True, True, False], device=device)
    logits = router_logits(5, 10, dtype=torch.float64, device=device, seed=4).requires_grad_(True)
    fn = lambda x: sparseops.topk_route(x, 3, backend=backend, **kw)[0]
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7)
    # The backward agrees with autograd through the reference too.
    g = torch.randn(5, 3, dtype=torch.float64, device=device)
    (grad,) = torch.autograd.grad(fn(logits), logits, g)
    (grad_ref,) = torch.autograd.grad(topk_route_ref(logits, 3, **kw)[0], logits, g)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_backward_low_precision_and_broadcast_grad(device, backend):
    """bf16 logits get bf16 grads; out.sum().backward() hands in a stride-0 gradient."""
    logits = router_logits(17, 32, dtype=torch.bfloat16, device=device, seed=6).requires_grad_(True)
    w, _ = sparseops.topk_route(logits, 4, backend=backend)
    (w * torch.arange(4, device=device)).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    (topk_route_ref(ref_logits, 4)[0] * torch.arange(4, device=device)).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1.6e-2, atol=1e-3)


def _opcheck_cases(device, backend):
    logits = router_logits(7, 12, device=device, seed=8)
    bias = torch.randn(12, device=device)
    mask = torch.ones(12, dtype=torch.bool, device=device)
    mask[3] = False
    return [
        (logits, 3, "softmax", "softmax_then_topk", True, None, 1, 1, 1.0, None, "top2_sum", backend),
        (logits.clone().requires_grad_(True), 3, "sigmoid", "softmax_then_topk", True, bias, 4, 2, 2.5, mask, "max",
         backend),
        (logits.clone().requires_grad_(True), 2, "softmax", "topk_then_softmax", False, None, 1, 1, 1.0, mask,
         "top2_sum", backend),
    ]


@pytest.mark.skipif(not sparseops.build_info()["extension"], reason="C++ extension not built")
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck_every_backend(device, backend):
    """The one schema reaches every backend, and opcheck passes for each (fake, autograd, AOT)."""
    for args in _opcheck_cases(device, backend):
        torch.library.opcheck(torch.ops.sparseops.topk_route.default, args)


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if "triton" not in p.id or HAS_CUDA])
def test_torch_compile_fullgraph_dynamic(device, backend):
    torch._dynamo.reset()

    def route(x, bias):
        w, ids = sparseops.topk_route(
            x, 4, scoring="sigmoid", bias=bias, n_group=4, topk_group=2, scale=2.5, backend=backend
        )
        # The reference metadata reads a device value for the padded layout (a graph break):
        # the compiled pair uses the default kernel there.
        meta_backend = None if backend == "reference" else backend
        meta = sparseops.route_metadata(ids, x.shape[1], block_m=8, backend=meta_backend)
        return w * 2, meta.offs, meta.padded_slots

    compiled = torch.compile(route, fullgraph=True, dynamic=True)
    bias = torch.randn(32, device=device)
    for T in (5, 19):
        x = router_logits(T, 32, device=device, seed=T).requires_grad_(True)
        w, offs, padded = compiled(x, bias)
        w_ref, offs_ref, padded_ref = route(x, bias)
        assert_close(w, w_ref)
        assert torch.equal(offs, offs_ref) and torch.equal(padded, padded_ref)
        w.sum().backward()


# ---------------------------------------------------------------------------------------------
# Bad inputs: every backend raises a clear error naming the argument.

BAD_CASES = [
    ("rank", lambda d: (torch.randn(4, 8, 2, device=d), 2, {}), "logits must be a 2-D tensor"),
    ("dtype", lambda d: (torch.randint(0, 5, (4, 8), device=d), 2, {}), "logits must have dtype"),
    ("k>E", lambda d: (torch.randn(4, 8, device=d), 9, {}), "k must be in"),
    ("k=0", lambda d: (torch.randn(4, 8, device=d), 0, {}), "k must be in"),
    ("k>32", lambda d: (torch.randn(4, 64, device=d), 33, {}), "k must be in"),
    ("E>1024", lambda d: (torch.randn(2, 1025, device=d), 2, {}), "number of experts"),
    ("scoring", lambda d: (torch.randn(4, 8, device=d), 2, {"scoring": "relu"}), "scoring must be"),
    ("order", lambda d: (torch.randn(4, 8, device=d), 2, {"order": "whatever"}), "order must be"),
    ("n_group", lambda d: (torch.randn(4, 10, device=d), 2, {"n_group": 3}), "n_group must"),
    ("topk_group", lambda d: (torch.randn(4, 8, device=d), 2, {"n_group": 4, "topk_group": 5}), "topk_group must"),
    (
        "k>group experts",
        lambda d: (torch.randn(4, 8, device=d), 3, {"n_group": 4, "topk_group": 1}),
        "cannot exceed the experts",
    ),
    ("bias shape", lambda d: (torch.randn(4, 8, device=d), 2, {"bias": torch.randn(7, device=d)}), "bias.size"),
    (
        "mask dtype",
        lambda d: (torch.randn(4, 8, device=d), 2, {"expert_mask": torch.ones(8, device=d)}),
        "expert_mask must have dtype",
    ),
    ("scale", lambda d: (torch.randn(4, 8, device=d), 2, {"scale": float("nan")}), "scale must be finite"),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name,make,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_inputs(device, backend, name, make, message):
    logits, k, kw = make(device)
    with pytest.raises(RuntimeError, match=message):
        sparseops.topk_route(logits, k, backend=backend, **kw)


@pytest.mark.gpu
def test_wrong_device_bias():
    logits = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        sparseops.topk_route(logits, 2, bias=torch.randn(8))


def test_forced_backend_that_cannot_run_says_why():
    with pytest.raises(RuntimeError, match="backend .cuda. cannot take these inputs.*takes CUDA tensors"):
        sparseops.topk_route(torch.randn(3, 8), 2, backend="cuda")
    with pytest.raises(RuntimeError, match="unknown backend"):
        sparseops.topk_route(torch.randn(3, 8), 2, backend="tpu")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(0, 40),
    E=st.integers(1, 300),
    k_frac=st.floats(0.0, 1.0),
    scoring=st.sampled_from(["softmax", "sigmoid"]),
    order=st.sampled_from(["softmax_then_topk", "topk_then_softmax"]),
    renormalize=st.booleans(),
    use_bias=st.booleans(),
    masked=st.booleans(),
    grid=st.sampled_from([0.0, 0.25]),
    seed=st.integers(0, 2**16),
)
def test_invariants(T, E, k_frac, scoring, order, renormalize, use_bias, masked, grid, seed):
    """Properties of any routing, checked without the reference (default CPU backend)."""
    k = 1 + int(k_frac * (min(E, 32) - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, E, generator=g)
    if grid:
        x = (x / grid).round() * grid  # many exact ties
    bias = 0.1 * torch.randn(E, generator=g) if use_bias else None
    mask = torch.rand(E, generator=g) < 0.7 if masked else None
    w, ids = sparseops.topk_route(
        x, k, scoring=scoring, order=order, renormalize=renormalize, bias=bias, expert_mask=mask
    )
    enabled = torch.ones(E, dtype=torch.bool) if mask is None else mask
    n_enabled = int(enabled.sum())
    valid = ids >= 0
    # Exactly min(k, enabled) experts per row, distinct, enabled, valid slots first.
    assert (valid.sum(-1) == min(k, n_enabled)).all()
    assert (valid[:, :-1] >= valid[:, 1:]).all()
    for t in range(T):
        row = ids[t][valid[t]].long()
        assert len(set(row.tolist())) == len(row)
        assert enabled[row].all()
        # Descending rank, lower index first on ties; nothing outside beats the last pick.
        rank = x[t] if bias is None else (torch.sigmoid(x[t].double()) if scoring == "sigmoid" else None)
        if rank is not None and len(row):
            rank = rank.float() + (0 if bias is None else bias)
            r = rank[row]
            assert ((r[:-1] > r[1:]) | ((r[:-1] == r[1:]) & (row[:-1] < row[1:]))).all()
            others = enabled.clone()
            others[row] = False
            last_r, last_e = r[-1], row[-1]
            beats = (rank > last_r) | ((rank == last_r) & (torch.arange(E) < last_e))
            assert not (beats & others).any()
    assert (w[~valid] == 0).all() and (w >= 0).all()
    if renormalize or (scoring == "softmax" and order == "topk_then_softmax"):
        sums = w.sum(-1)
        assert torch.allclose(sums[valid.any(-1)], torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("block_m", [0, 16])
def test_route_is_the_pair_in_one_call(device, backend, block_m):
    logits = router_logits(13, 64, device=device, seed=21).requires_grad_(True)
    kw = dict(scoring="sigmoid", bias=torch.randn(64, device=device), n_group=8, topk_group=4, scale=2.5)
    w, ids, meta = sparseops.route(logits, 8, block_m=block_m, backend=backend, **kw)
    w_ref, ids_ref = topk_route_ref(logits, 8, **kw)
    torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
    assert_close(w, w_ref)
    expected = sparseops.route_metadata(ids_ref, 64, block_m=block_m, backend="reference" if block_m == 0 else None)
    for got, want in zip(meta, expected):
        assert (got is None and want is None) or torch.equal(got, want)
    (grad,) = torch.autograd.grad(w.sum(), logits)
    (grad_ref,) = torch.autograd.grad(w_ref.sum(), logits)
    assert_close(grad, grad_ref)


@pytest.mark.skipif(not sparseops.build_info()["extension"], reason="C++ extension not built")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_route(device):
    logits = router_logits(7, 12, device=device, seed=8).requires_grad_(True)
    bias = torch.randn(12, device=device)
    args = (logits, 3, "sigmoid", "softmax_then_topk", True, bias, 4, 2, 2.5, None, "top2_sum", 4, "auto")
    torch.library.opcheck(torch.ops.sparseops.route.default, args)
