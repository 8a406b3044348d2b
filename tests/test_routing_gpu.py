"""GPU-only routing checks: production sizes, CUDA graphs, launch counts, backend agreement.

Skipped without a GPU. scripts/gpu_check.sh also runs these under compute-sanitizer.
"""

from __future__ import annotations

import pytest
import torch

import sparseops
from sparseops.reference import route_metadata_ref, topk_route_ref
from sparseops.testing import assert_close, random_ids, router_logits

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["cuda", "triton"]
DEEPSEEK = dict(scoring="sigmoid", n_group=8, topk_group=4, scale=2.5)


def _backends():
    return [b for b in GPU_BACKENDS if b in sparseops.available_backends("topk_route", "cuda")]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    "T,E,k,kw",
    [
        (16384, 128, 8, {}),
        (4096, 256, 8, DEEPSEEK),
        (16384, 8, 2, {"order": "topk_then_softmax"}),
        (3000, 1024, 32, {"scoring": "sigmoid"}),
        (70000, 60, 4, {}),
        (4096, 160, 6, {"n_group": 8, "topk_group": 3, "group_scoring": "max", "renormalize": False}),
    ],
    ids=["qwen3-16k", "deepseek-4k", "mixtral-16k", "E1024-k32", "T70000-E60", "deepseek-v2-4k"],
)
def test_production_sizes(backend, T, E, k, kw):
    if backend not in _backends():
        pytest.skip(f"{backend} unavailable")
    logits = router_logits(T, E, dtype=torch.bfloat16, device="cuda", seed=T)
    if kw.get("scoring") == "sigmoid" and "n_group" in kw:
        kw = dict(kw, bias=0.1 * torch.randn(E, device="cuda"))
    w, ids = sparseops.topk_route(logits, k, backend=backend, **kw)
    w_ref, ids_ref = topk_route_ref(logits, k, **kw)
    torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
    assert_close(w, w_ref)
    meta = sparseops.route_metadata(ids, E, block_m=64, backend=backend)
    for got, want in zip(meta, route_metadata_ref(ids, E, 64)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_metadata_millions_of_slots(backend):
    if backend not in _backends():
        pytest.skip(f"{backend} unavailable")
    ids = random_ids(400_000, 8, 256, device="cuda", seed=1, skew=2.0, drop=0.001)
    meta = sparseops.route_metadata(ids, 256, block_m=128, backend=backend)
    for got, want in zip(meta, route_metadata_ref(ids, 256, 128)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("group_scoring", ["top2_sum", "max"])
def test_cuda_and_triton_agree_bitwise(group_scoring):
    if len(_backends()) < 2:
        pytest.skip("needs both GPU backends")
    logits = router_logits(5000, 256, dtype=torch.float32, device="cuda", seed=3)
    bias = 0.05 * torch.randn(256, device="cuda")
    kw = dict(DEEPSEEK, group_scoring=group_scoring)
    a = sparseops.topk_route(logits, 8, bias=bias, backend="cuda", **kw)
    b = sparseops.topk_route(logits, 8, bias=bias, backend="triton", **kw)
    assert torch.equal(a[1], b[1])
    assert_close(a[0], b[0])
    ma = sparseops.route_metadata(a[1], 256, block_m=16, backend="cuda")
    mb = sparseops.route_metadata(a[1], 256, block_m=16, backend="triton")
    assert all(torch.equal(x, y) for x, y in zip(ma, mb))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("T", [1, 64, 4096])
def test_cuda_graph_capture_and_replay(backend, T):
    """Static shapes, no host sync: the pair captures; replays follow new input values."""
    if backend not in _backends():
        pytest.skip(f"{backend} unavailable")
    E, k = 128, 8
    logits = router_logits(T, E, dtype=torch.bfloat16, device="cuda", seed=0)

    def pair():
        w, ids = sparseops.topk_route(logits, k, backend=backend)
        meta = sparseops.route_metadata(ids, E, block_m=16, backend=backend)
        return w, ids, meta

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up (Triton compiles, allocator pools) outside the capture
            pair()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pair()
    for seed in (1, 2):
        logits.copy_(router_logits(T, E, dtype=torch.bfloat16, device="cuda", seed=seed))
        graph.replay()
        w_ref, ids_ref = topk_route_ref(logits, k)
        torch.testing.assert_close(out[1], ids_ref, rtol=0, atol=0)
        assert_close(out[0], w_ref)
        for got, want in zip(out[2], route_metadata_ref(ids_ref, E, 16)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("T", [1, 16, 64])
def test_decode_pair_is_two_kernel_launches(T):
    """Performance contract at T <= 64: topk_route + route_metadata cost at most two launches."""
    if "cuda" not in _backends():
        pytest.skip("cuda backend unavailable")
    logits = router_logits(T, 128, dtype=torch.bfloat16, device="cuda", seed=0)
    bias = torch.zeros(128, device="cuda")
    for kw in ({}, dict(DEEPSEEK, bias=bias, n_group=8)):
        sparseops.route_metadata(sparseops.topk_route(logits, 8, **kw)[1], 128, block_m=16)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            w, ids = sparseops.topk_route(logits, 8, **kw)
            sparseops.route_metadata(ids, 128, block_m=16)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert len(kernels) <= 2, [e.name for e in kernels]


def test_non_default_stream_and_out_of_range_ids_are_memory_safe():
    """CUDA kernels cannot raise on bad ids without a sync: they drop them and stay in bounds."""
    if "cuda" not in _backends():
        pytest.skip("cuda backend unavailable")
    ids = random_ids(1000, 4, 32, device="cuda", seed=5)
    ids[10, 2] = 77
    ids[20, 0] = -5
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        meta = sparseops.route_metadata(ids, 32, block_m=8)
    stream.synchronize()
    dropped = ids.clone()
    dropped[(ids < -1) | (ids >= 32)] = -1
    for got, want in zip(meta, route_metadata_ref(dropped, 32, 8)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
