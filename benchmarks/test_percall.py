"""Per-call (host overhead) micro-benchmarks under pytest-benchmark.

    python -m pytest benchmarks/test_percall.py --benchmark-json=benchmarks/results/<device>/percall.json

At decode sizes a routing call's time is mostly host overhead: Python, the dispatcher,
argument checks, allocations. These time each op at tiny sizes (T = 1 and 16, E = 8 and
128) on the default device's CPU path, with ``torch.mul`` of a tiny tensor as the
yardstick for what one dispatcher round trip costs on the same machine, in two modes:
``inference`` (under ``torch.inference_mode()``, the serving setting) and ``plain``
(autograd enabled, inputs not requiring grad: what an un-annotated call pays).

Not part of the test suite: ``pytest`` alone collects ``tests/`` only (pyproject's
``testpaths``); the demo (``python -m benchmarks.demo``) runs this file and keeps the JSON
beside the CSVs. No assertions about speed: performance goals live in the benchmark
reports, never in pass/fail tests.
"""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytest_benchmark")

import sparseops  # noqa: E402
from sparseops.testing import router_inputs, router_shape  # noqa: E402

SHAPES = ("Mixtral-8x7B", "Qwen3-30B-A3B")  # E = 8 (k 2) and E = 128 (k 8)
TOKENS = (1, 16)
OPS = ("topk_route", "route_metadata", "route")
MODES = ("inference", "plain")


def _mode(mode: str) -> contextlib.AbstractContextManager:
    return torch.inference_mode() if mode == "inference" else contextlib.nullcontext()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("shape_name", SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_percall(benchmark, op: str, shape_name: str, T: int, mode: str) -> None:
    shape = router_shape(shape_name)
    logits, kw = router_inputs(shape, T)
    E, k = shape.num_experts, shape.k
    ids = sparseops.topk_route(logits, k, **kw)[1]
    fn = {
        "topk_route": lambda: sparseops.topk_route(logits, k, **kw),
        "route_metadata": lambda: sparseops.route_metadata(ids, E),
        "route": lambda: sparseops.route(logits, k, **kw),
    }[op]
    benchmark.group = f"E={E} k={k} T={T} {mode}"
    backend = sparseops.resolve_backend("route_metadata" if op == "route_metadata" else "topk_route", logits.device)
    benchmark.extra_info.update(op=op, shape=shape_name, E=E, k=k, T=T, mode=mode, backend=backend)
    with _mode(mode):
        out = benchmark(fn)
    assert out is not None


@pytest.mark.parametrize("mode", MODES)
def test_percall_torch_mul(benchmark, mode: str) -> None:
    """The yardstick: one tiny ATen op through the dispatcher (16 fp32 elements)."""
    x = torch.ones(16)
    benchmark.group = f"yardstick {mode}"
    benchmark.extra_info.update(op="torch.mul", mode=mode, numel=16)
    with _mode(mode):
        benchmark(lambda: torch.mul(x, x))
