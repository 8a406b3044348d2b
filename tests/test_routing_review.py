"""Adversarial review of the routing op layer: each test pins a problem that was found (and
fixed) or a behaviour a demanding user relies on that nothing else pinned."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sparseops
import sparseops._backend as _backend
import sparseops.ops.routing as routing
from sparseops.reference import route_metadata_ref, topk_route_ref
from sparseops.testing import assert_close, random_ids, router_logits


def _run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, env=full_env
    )


# --------------------------------------------------------------------------- meta / fake checks
# The fake ran no check at all: a meta call (model init on the meta device, shape inference,
# torch.compile's trace) with k > E, a bad scoring name or a wrong-sized bias returned
# outputs that the real call refuses.


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=9), r"k must be in \[1, min\(E, 32\)\] = \[1, 8\], got k = 9 for logits shape \[5, 8\]"),
        (dict(k=0), r"k must be in \[1, min\(E, 32\)\]"),
        (dict(k=2, scoring="tanh"), r'scoring must be "softmax" or "sigmoid", got "tanh"'),
        (dict(k=2, order="x"), r"order must be"),
        (dict(k=2, group_scoring="min"), r"group_scoring must be"),
        (dict(k=2, n_group=3), r"n_group must be >= 1 and divide E = 8, got n_group = 3"),
        (dict(k=2, n_group=4, topk_group=5), r"topk_group must be in \[1, n_group = 4\], got 5"),
        (dict(k=5, n_group=4, topk_group=2), r"k = 5 cannot exceed the experts in the chosen groups"),
        (dict(k=2, scale=float("inf")), r"scale must be finite"),
        (dict(k=2, bias=torch.zeros(7)), r"bias.size\(0\) must equal .* = 8, got shape \[7\]"),
        # C++ and Python spell dtypes differently (Long / torch.int64); both name it.
        (
            dict(k=2, bias=torch.zeros(8, dtype=torch.int64)),
            r"bias must have dtype in .*, got shape \[8\], dtype (Long|torch.int64)",
        ),
        (
            dict(k=2, expert_mask=torch.ones(8)),
            r"expert_mask must have dtype in .*, got shape \[8\], dtype (Float|torch.float32)",
        ),
        (
            dict(k=2, expert_mask=torch.ones(2, 4, dtype=torch.bool)),
            r"expert_mask must be a 1-D tensor, got shape \[2, 4\]",
        ),
    ],
)
def test_meta_topk_route_checks_like_the_real_op(kwargs, message):
    cpu = router_logits(5, 8)
    # The real op refuses these arguments (the C++ message, same wording)...
    with pytest.raises(RuntimeError, match=message):
        sparseops.topk_route(cpu, **kwargs)
    # ...and so must the meta call, whose kernel is the fake.
    meta_kwargs = {key: v.to("meta") if isinstance(v, torch.Tensor) else v for key, v in kwargs.items()}
    with pytest.raises(RuntimeError, match=message):
        sparseops.topk_route(cpu.to("meta"), **meta_kwargs)


def test_meta_logits_rank_and_dtype_checked():
    for bad in (torch.zeros(8, device="meta"), torch.zeros(3, 8, dtype=torch.int32, device="meta")):
        with pytest.raises(RuntimeError, match=r"logits must .*got shape"):
            sparseops.topk_route(bad, 2)
    with pytest.raises(RuntimeError, match=r"number of experts\) must be in \[1, 1024\]"):
        sparseops.topk_route(torch.zeros(3, 1025, device="meta"), 2)
    w, ids = sparseops.topk_route(torch.zeros(3, 8, device="meta"), 2)
    assert w.shape == ids.shape == (3, 2) and ids.dtype == torch.int32


def test_meta_route_metadata_checks_like_the_real_op():
    for ids, E, block_m, message in [
        (torch.zeros(3, 2), 8, 0, r"ids must have dtype in .*got shape \[3, 2\], dtype (Float|torch.float32)"),
        (torch.zeros(6, dtype=torch.int32), 8, 0, r"ids must be a 2-D tensor, got shape \[6\]"),
        (torch.zeros(3, 2, dtype=torch.int32), 0, 0, r"num_experts must be in \[1, 1024\], got 0"),
        (torch.zeros(3, 2, dtype=torch.int32), 8, 65537, r"block_m must be in \[0, 65536\], got 65537"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            sparseops.route_metadata(ids, E, block_m=block_m)
        with pytest.raises(RuntimeError, match=message):
            sparseops.route_metadata(ids.to("meta"), E, block_m=block_m)


def test_meta_direct_op_call_checks_the_backend_name():
    # The fake is the meta kernel: a misspelt backend passed straight to torch.ops was
    # accepted on meta tensors (and in a torch.compile trace) while the CPU op refuses it.
    message = r'backend must be one of auto, cuda, triton, cpu, reference, got "gpu"'
    for device in ("cpu", "meta"):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.sparseops.topk_route(router_logits(4, 8).to(device), 2, backend="gpu")
        with pytest.raises(RuntimeError, match=message):
            torch.ops.sparseops.route_metadata(random_ids(4, 2, 8).to(device), 8, 0, "gpu")


def test_compile_sees_bad_k_at_trace_time():
    # The fake is what torch.compile traces: a bad k now fails while tracing, naming k, not
    # with a shape error in some later op of the graph.
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    f = torch.compile(lambda x: sparseops.topk_route(x, 9), fullgraph=True, dynamic=True, backend=counter)
    with pytest.raises(Exception, match=r"k must be in \[1, min\(E, 32\)\]"):
        f(router_logits(5, 8))
    # Raised while tracing: no graph was handed to the backend (before, one was, and the
    # error came from the C++ op when the compiled graph ran).
    assert counter.frame_count == 0


# --------------------------------------------------------------------------- load-balancing loss


def test_load_balancing_loss_half_precision_does_not_overflow():
    # T = 40000 tokens, k = 8, E = 4, uniform: 80000 slots per expert. Casting the counts to
    # fp16 made them inf (fp16 max 65504), so the loss was inf instead of 1.
    T, E, k = 40000, 4, 8
    counts = torch.full((E,), T * k // E, dtype=torch.int32)
    for dtype in (torch.float16, torch.bfloat16):
        probs = torch.full((T, E), 1.0 / E, dtype=dtype)
        loss = sparseops.load_balancing_loss(probs, counts, k)
        assert loss.dtype == dtype
        assert loss.item() == 1.0, dtype
        assert sparseops.load_balancing_loss(probs, counts, k, normalize="tokens").item() == float(k)


def test_load_balancing_loss_rejects_integer_probs():
    with pytest.raises(
        RuntimeError, match=r"router_probs must be a floating-point tensor, got shape \[3, 4\], dtype torch.int64"
    ):
        sparseops.load_balancing_loss(torch.ones(3, 4, dtype=torch.int64), torch.ones(4, dtype=torch.int32), 1)


# --------------------------------------------------------------------------- Python-kernel bridge


def test_python_kernel_error_names_op_and_backend(monkeypatch):
    entry = routing._TOPK_ROUTE.backends["reference"]

    def boom(inputs, outputs, options):
        raise ValueError("boom inside kernel")

    monkeypatch.setitem(routing._TOPK_ROUTE.backends, "reference", entry._replace(kernel=boom))
    x = router_logits(4, 8)
    with pytest.raises(
        RuntimeError, match=r'sparseops.topk_route \(backend "reference"\): ValueError: boom inside kernel'
    ):
        sparseops.topk_route(x, 2, backend="reference")
    monkeypatch.setitem(routing._TOPK_ROUTE.backends, "reference", entry)
    # No deadlock and no stale state after the exception: the next call works.
    assert torch.equal(sparseops.topk_route(x, 2, backend="reference")[1], topk_route_ref(x, 2)[1])


@pytest.mark.triton
def test_direct_torch_ops_call_checks_the_backend_reason(monkeypatch):
    # torch.ops.sparseops.topk_route(..., backend="triton") skips choose(): on CPU tensors
    # without TRITON_INTERPRET=1 it went straight into the Triton launcher. The bridge now
    # checks the registry's reason. (TRITON_INTERPRET is read once at import; patch the flag.)
    monkeypatch.setattr(_backend, "TRITON_INTERPRET", False)
    x = router_logits(4, 8)
    with pytest.raises(RuntimeError, match="runs CPU tensors only under TRITON_INTERPRET=1"):
        torch.ops.sparseops.topk_route(x, 2, backend="triton")
    with pytest.raises(RuntimeError, match="runs CPU tensors only under TRITON_INTERPRET=1"):
        torch.ops.sparseops.route_metadata(random_ids(4, 2, 8), 8, 0, "triton")


# --------------------------------------------------------------------------- torch.compile


def test_direct_route_op_compiles_once_across_token_counts():
    # torch.ops.sparseops.route's C++ composite read logits.size(1) on a fake tensor, which
    # guarded every dim of logits: one graph per token count under dynamic=True.
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(
        lambda x: torch.ops.sparseops.route(x, 2, block_m=4), fullgraph=True, dynamic=True, backend=counter
    )
    for T in (3, 5, 9):
        x = router_logits(T, 8, seed=T)
        out = f(x)
        w_ref, ids_ref = topk_route_ref(x, 2)
        assert torch.equal(out[1], ids_ref)
        assert_close(out[0], w_ref)
        assert torch.equal(out[7], route_metadata_ref(ids_ref, 8, 4)[5])
    assert counter.frame_count == 1


# --------------------------------------------------------------------------- environment, fallback


def test_bad_sparseops_backend_variable_fails_at_import_naming_it():
    out = _run_python("import sparseops", env={"SPARSEOPS_BACKEND": "gpu"})
    assert out.returncode != 0
    assert "SPARSEOPS_BACKEND must be one of" in out.stderr and "'gpu'" in out.stderr, out.stderr


def test_without_extension_bad_input_errors_like_the_op():
    # With no _C the public functions ran the reference unchecked: k > E returned ids of
    # shape [T, E] (the reference's [..., :k] slice), not an error.
    out = _run_python(
        """
        import sys, warnings
        sys.modules["sparseops._C"] = None
        warnings.simplefilter("ignore")
        import torch, sparseops
        x = torch.randn(5, 8)
        for call, msg in [
            (lambda: sparseops.topk_route(x, 9), "k must be in [1, min(E, 32)]"),
            (lambda: sparseops.topk_route(x, 2, scoring="tanh"), 'scoring must be "softmax" or "sigmoid"'),
            (lambda: sparseops.route(x, 2, bias=torch.zeros(7)), "bias.size(0) must equal"),
            (lambda: sparseops.route_metadata(torch.zeros(3, 2), 8), "ids must have dtype in"),
            (lambda: sparseops.route(x, 2, block_m=-1), "block_m must be in [0, 65536]"),
        ]:
            try:
                call()
            except RuntimeError as e:
                assert msg in str(e), (msg, str(e))
            else:
                raise AssertionError("no error: " + msg)
        print("ok")
        """
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# --------------------------------------------------------------------------- torch.func


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(order="topk_then_softmax"),
        dict(scoring="sigmoid", scale=2.5),
        dict(renormalize=False, expert_mask=torch.tensor([True, False, True, True, False, True, True, True])),
        dict(scoring="sigmoid", n_group=4, topk_group=2, bias=torch.linspace(-0.1, 0.1, 8)),
    ],
)
def test_torch_func_grad_and_vjp(backend, kwargs):
    # The C++ autograd Function made torch.func.grad / vjp / jacrev raise "cannot use C++
    # torch::autograd::Function with functorch transforms"; under a transform the op now
    # recomputes the weights from the kernel's ids in ATen ops. Same values, same gradient.
    x = router_logits(6, 8, dtype=torch.float64, seed=11)
    w_ref, ids_ref = topk_route_ref(x, 3, **kwargs)
    cot = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def f(t):
        return sparseops.topk_route(t, 3, backend=backend, **kwargs)

    w, vjp_fn, ids = torch.func.vjp(f, x, has_aux=True)  # ids (int) as the aux output
    assert torch.equal(ids, ids_ref)
    assert_close(w, w_ref)
    xr = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(topk_route_ref(xr, 3, **kwargs)[0], xr, cot)[0]
    assert_close(vjp_fn(cot)[0], expected)
    g = torch.func.grad(lambda t: (f(t)[0] * cot).sum())(x)
    assert_close(g, expected)
    # Second order through torch.func too (the ATen formula is differentiable).
    hess = torch.func.jacrev(torch.func.grad(lambda t: (f(t)[0] * cot).sum()))(x)
    xr2 = x.clone().requires_grad_(True)
    hess_ref = torch.autograd.functional.hessian(lambda t: (topk_route_ref(t, 3, **kwargs)[0] * cot).sum(), xr2)
    assert_close(hess, hess_ref)


# --------------------------------------------------------------------------- TopKRouter


def test_topk_router_keeps_selection_bias_fp32_under_dtype_casts():
    from sparseops.nn import TopKRouter

    torch.manual_seed(0)
    router = TopKRouter(32, 16, 4, scoring="sigmoid", n_group=4, topk_group=2, selection_bias=True)
    bias = torch.randn(16, generator=torch.Generator().manual_seed(2)) * 1e-2 + 0.1234567
    router.selection_bias.copy_(bias)
    router = router.to(torch.bfloat16)
    assert router.gate.weight.dtype == torch.bfloat16
    # Exactly the fp32 values: a bf16 cast would round 0.1234567 + noise to ~3 digits.
    assert router.selection_bias.dtype == torch.float32 and torch.equal(router.selection_bias, bias)
    # A fp32 state dict loads without rounding either.
    router.load_state_dict({**router.state_dict(), "selection_bias": bias + 1e-4})
    assert torch.equal(router.selection_bias, bias + 1e-4)
    x = torch.randn(7, 32, dtype=torch.bfloat16)
    out = router(x)
    _, ids_ref = topk_route_ref(router.gate(x), 4, scoring="sigmoid", n_group=4, topk_group=2, bias=bias + 1e-4)
    assert torch.equal(out.ids, ids_ref)
    # Moves still apply (meta stands in for another device).
    assert router.to("meta").selection_bias.device.type == "meta"


def test_fake_checks_do_not_specialise_the_expert_count():
    # The fake's checks compare k with the symbolic E; they must not guard E to one side of
    # a constant (min(E, 32) did), or a second router size recompiles under dynamic=True.
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda x: sparseops.topk_route(x, 2), fullgraph=True, dynamic=True, backend=counter)
    first = None
    for T, E in ((5, 8), (9, 64), (3, 17)):
        x = router_logits(T, E, seed=E)
        assert torch.equal(f(x)[1], topk_route_ref(x, 2)[1])
        first = counter.frame_count if first is None else first
    # Compared with the count after the first call (the first call also compiles an empty
    # frame on this torch, so the absolute count is not 1): no recompile after it.
    assert counter.frame_count == first
