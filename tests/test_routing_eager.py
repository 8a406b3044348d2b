"""The routing ops' eager entry (csrc/ops/routing_eager.cpp) and the fused CPU ``route``.

The public functions call ``_C._topk_route_eager`` / ``_route_eager`` /
``_route_metadata_eager`` first: they run the op's own CPU kernel without the dispatcher when
that is all the op would run, and return NotImplemented otherwise. These tests prove that
(a) the fast path returns bitwise what the op returns (and ``route``'s fused kernel bitwise
what ``topk_route`` followed by ``route_metadata`` return), whatever the thread count; (b) the
errors are the op's, type and message; (c) it steps aside for everything the dispatcher must
see: autograd, modes, fake and meta tensors, subclasses, functorch, the profiler,
torch.compile, other backends.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparseops
from sparseops import _backend
from sparseops.reference import route_metadata_ref, topk_route_ref
from sparseops.testing import random_ids, router_bias, router_logits

pytestmark = pytest.mark.skipif(
    not hasattr(_backend._C, "_topk_route_eager"), reason="no C++ extension with the eager entry"
)

_C = _backend._C
_OPS = torch.ops.sparseops
DEFAULTS = dict(
    scoring="softmax",
    order="softmax_then_topk",
    renormalize=True,
    bias=None,
    n_group=1,
    topk_group=1,
    scale=1.0,
    expert_mask=None,
    group_scoring="top2_sum",
)


def _args(logits, k, **kw):
    a = {**DEFAULTS, **kw}
    return (logits, k, *(a[n] for n in DEFAULTS))


def _mask(E, seed=4):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(E, generator=g) < 0.6
    m[0] = True
    return m


CONFIGS = [
    (8, 2, {}),
    (8, 2, {"order": "topk_then_softmax"}),
    (8, 3, {"scoring": "sigmoid", "renormalize": False, "scale": -1.5}),
    (128, 8, {}),
    (128, 4, {"order": "topk_then_softmax"}),
    (256, 8, {"scoring": "sigmoid", "n_group": 8, "topk_group": 4, "scale": 2.5, "bias": True}),
    (64, 6, {"n_group": 8, "topk_group": 3, "group_scoring": "max", "mask": True}),
    (40, 8, {"mask": True, "bias": True}),
    (7, 7, {"mask": True}),  # 7 slots, < 7 enabled: dropped slots (id -1) in every row
    (1, 1, {}),
]


def _kw(E, kw, dtype):
    kw = dict(kw)
    if kw.pop("bias", False):
        kw["bias"] = router_bias(E).to(torch.float64 if dtype == torch.float64 else torch.float32)
    if kw.pop("mask", False):
        kw["expert_mask"] = _mask(E)
    return kw


def _bits(t):
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32) if t.is_floating_point() else t


def _same(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), (what, a, b)
    assert torch.equal(_bits(a), _bits(b)), what


@pytest.mark.parametrize("E,k,kw", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_eager_topk_route_is_the_op(E, k, kw, dtype):
    kw = _kw(E, kw, dtype)
    for T in (0, 1, 5, 16, 17, 97):
        x = router_logits(T, E, dtype=dtype, seed=T + E, ties=T % 2 == 1)
        fast = _C._topk_route_eager(*_args(x, k, **kw), "cpu")
        assert fast is not NotImplemented
        op = _OPS.topk_route(*_args(x, k, **kw), "cpu")
        _same(fast[0], op[0], f"weights T={T}")
        _same(fast[1], op[1], f"ids T={T}")
        pub = sparseops.topk_route(x, k, **kw)
        _same(pub[0], op[0], "public weights")
        _same(pub[1], op[1], "public ids")


def _two_ops(x, k, kw, block_m):
    w, ids = _OPS.topk_route(*_args(x, k, **kw), "cpu")
    meta = _OPS.route_metadata(ids, x.shape[1], block_m, "cpu")
    return w, ids, meta


@pytest.mark.parametrize("E,k,kw", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_m", [0, 4])
def test_fused_route_equals_topk_then_metadata(E, k, kw, dtype, block_m):
    """route's fused CPU kernel (from the eager entry and from torch.ops.sparseops.route) is
    bitwise topk_route followed by route_metadata, and matches the reference; T spans the
    serial and the parallel chunked paths."""
    kw = _kw(E, kw, dtype)
    for T in (0, 1, 16, 33, 300, 2049, 5000):
        x = router_logits(T, E, dtype=dtype, seed=T, ties=True)
        w, ids, meta = _two_ops(x, k, kw, block_m)
        fast = sparseops.route(x, k, block_m=block_m, **kw)
        via_op = _OPS.route(*_args(x, k, **kw), block_m, "auto")
        _same(fast[0], w, "weights")
        _same(fast[1], ids, "ids")
        _same(via_op[0], w, "op weights")
        _same(via_op[1], ids, "op ids")
        names = sparseops.RouteMeta._fields
        for i, name in enumerate(names):
            got = fast[2][i] if i < len(fast[2]) else None
            if block_m == 0 and i >= 5:
                assert got is None
                assert meta[i].numel() == 0 and via_op[2 + i].numel() == 0
                continue
            _same(got, meta[i], f"{name} T={T}")
            _same(via_op[2 + i], meta[i], f"op {name} T={T}")
        ref = route_metadata_ref(ids, E, block_m)
        for i in range(5):
            assert torch.equal(fast[2][i], ref[i])
        rw, rids = topk_route_ref(x, k, **kw)
        assert torch.equal(ids, rids)


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize(
    "E,k,kw",
    [
        (8, 2, {}),
        (128, 8, {}),
        (256, 8, {"scoring": "sigmoid", "n_group": 8, "topk_group": 4, "scale": 2.5, "bias": True}),
        (128, 4, {"order": "topk_then_softmax"}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_route_thread_count_does_not_change_bits(E, k, kw, dtype):
    kw = _kw(E, kw, dtype)
    Ts = sorted({1, 15, 16, 17, 255, 257, 2731, 4096 + 5} | {32768 // E - 1, 32768 // E + 1, 2 * (32768 // E) + 16})
    for T in Ts:
        x = router_logits(T, E, dtype=dtype, seed=T)
        a = _with_threads(1, lambda x=x: sparseops.route(x, k, block_m=16, **kw))
        b = _with_threads(2, lambda x=x: sparseops.route(x, k, block_m=16, **kw))
        _same(a[0], b[0], f"weights T={T}")
        _same(a[1], b[1], f"ids T={T}")
        for i, (p, q) in enumerate(zip(a[2], b[2])):
            _same(p, q, f"meta {i} T={T}")


@pytest.mark.parametrize("E,drop", [(8, 0.0), (128, 0.3), (1, 0.5)])
def test_eager_route_metadata_is_the_op(E, drop):
    for T, block_m in itertools.product((0, 1, 9, 5000), (0, 3)):
        ids = random_ids(T, min(E, 2), E, seed=T, drop=drop)
        for x in (ids, ids.long()):
            fast = sparseops.route_metadata(x, E, block_m=block_m)
            op = _OPS.route_metadata(x, E, block_m, "cpu")
            for i, got in enumerate(fast):
                _same(got, op[i], f"meta {i}")
            assert _C._route_metadata_eager(x, E, block_m, "cpu", sparseops.RouteMeta) is not NotImplemented


def _error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


BAD_TOPK = [
    (lambda x: ((x, 0), {}), "k = 0"),
    (lambda x: ((x, 9), {}), "k > E"),
    (lambda x: ((x, 2), {"scoring": "softmaxx"}), "scoring"),
    (lambda x: ((x, 2), {"order": "nope"}), "order"),
    (lambda x: ((x, 2), {"group_scoring": "min"}), "group_scoring"),
    (lambda x: ((x, 2), {"n_group": 3}), "n_group"),
    (lambda x: ((x, 2), {"n_group": 2, "topk_group": 3}), "topk_group"),
    (lambda x: ((x, 2), {"bias": torch.zeros(7)}), "bias shape"),
    (lambda x: ((x, 2), {"bias": torch.zeros(8, dtype=torch.int32)}), "bias dtype"),
    (lambda x: ((x, 2), {"bias": torch.zeros(8, device="meta")}), "bias device"),
    (lambda x: ((x, 2), {"expert_mask": torch.ones(8)}), "mask dtype"),
    (lambda x: ((x, 2), {"scale": float("nan")}), "scale"),
    (lambda x: ((x.int(), 2), {}), "logits dtype"),
    (lambda x: ((x[0], 2), {}), "logits dim"),
    (lambda x: ((x, 2.0), {}), "float k"),
    (lambda x: ((x.tolist(), 2), {}), "list logits"),
    (lambda x: ((x, 2), {"backend": "cuda"}), "cuda backend on CPU"),
    (lambda x: ((x, 2), {"backend": "nope"}), "unknown backend"),
]


@pytest.mark.parametrize("make,what", BAD_TOPK, ids=[w for _, w in BAD_TOPK])
def test_errors_are_the_ops(make, what):
    """The public functions raise exactly what they raised before the eager entry: the same
    exception type and message (the entry declines and the op path raises)."""
    x = router_logits(3, 8)
    args, kw = make(x)
    got = _error(lambda: sparseops.topk_route(*args, **kw))
    assert got[1], what
    # The op itself, through the dispatcher, raises the same for the arguments that reach it.
    backend = kw.pop("backend", "cpu")
    if isinstance(args[0], torch.Tensor) and backend == "cpu" and type(args[1]) is int:
        assert _error(lambda: _OPS.topk_route(*_args(*args, **kw), backend)) == got
        assert _C._topk_route_eager(*_args(*args, **kw), backend) is NotImplemented
    got_route = _error(lambda: sparseops.route(*args, **kw, backend=backend))
    assert got_route[0] is got[0]


def test_metadata_errors_are_the_ops():
    ids = torch.tensor([[0, 9]], dtype=torch.int32)
    for make in (
        lambda: sparseops.route_metadata(ids, 8),
        lambda: sparseops.route_metadata(ids.long() + 2**32, 8),
        lambda: sparseops.route_metadata(ids.float(), 8),
        lambda: sparseops.route_metadata(ids, 0),
        lambda: sparseops.route_metadata(ids.clamp(max=3), 8, block_m=-1),
    ):
        got = _error(make)
        assert got[0] is RuntimeError and got[1]
    assert _error(lambda: sparseops.route_metadata(ids, 8)) == _error(lambda: _OPS.route_metadata(ids, 8, 0, "cpu"))
    x = router_logits(3, 8)
    assert _error(lambda: sparseops.route(x, 2, block_m=70000)) == _error(
        lambda: _OPS.route(*_args(x, 2), 70000, "cpu")
    )


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_declines_whenever_the_dispatcher_must_see_the_call():
    x = router_logits(4, 8)
    args = _args(x, 2)
    assert _C._topk_route_eager(*args, None) is not NotImplemented
    assert _C._topk_route_eager(*args, "auto") is not NotImplemented
    # Other backends, other devices, subclasses, non-exact argument types.
    for backend in ("reference", "triton", "cuda", "bogus"):
        assert _C._topk_route_eager(*args, backend) is NotImplemented
    assert _C._topk_route_eager(*_args(x.to("meta"), 2), "cpu") is NotImplemented

    class Sub(torch.Tensor):
        pass

    assert _C._topk_route_eager(*_args(x.as_subclass(Sub), 2), "cpu") is NotImplemented
    assert _C._topk_route_eager(*_args(x, 2, scale=1), "cpu") is NotImplemented  # int scale
    assert _C._topk_route_eager(*_args(x, 2, renormalize=1), "cpu") is NotImplemented
    # k=True: the entry declines (not exactly an int); the op's parser takes it as 1.
    assert _C._topk_route_eager(*_args(x, True), "cpu") is NotImplemented
    _same(sparseops.topk_route(x, True)[1], _OPS.topk_route(*_args(x, True), "cpu")[1], "k=True")
    # Autograd: logits that require grad under grad mode take the op (and get a grad_fn).
    xg = x.clone().requires_grad_()
    assert _C._topk_route_eager(*_args(xg, 2), "cpu") is NotImplemented
    w, _ = sparseops.topk_route(xg, 2)
    assert w.grad_fn is not None
    w.sum().backward()
    assert xg.grad is not None
    with torch.no_grad():
        assert _C._topk_route_eager(*_args(xg, 2), "cpu") is not NotImplemented
    with torch.inference_mode():
        assert _C._topk_route_eager(*_args(x, 2), "cpu") is not NotImplemented
    # A torch dispatch mode sees the op.
    with _Recorder() as rec:
        assert _C._topk_route_eager(*args, "cpu") is NotImplemented
        sparseops.topk_route(x, 2)
        sparseops.route(x, 2)
        sparseops.route_metadata(torch.zeros(2, 2, dtype=torch.int32), 8)
    assert any("topk_route" in o for o in rec.ops) and any("route_metadata" in o for o in rec.ops), rec.ops
    # A torch function mode sees the op too (it is no dispatch key).
    from torch.overrides import TorchFunctionMode

    class FnRecorder(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.funcs = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.funcs.append(str(func))
            return func(*args, **(kwargs or {}))

    with FnRecorder() as frec:
        assert _C._topk_route_eager(*args, "cpu") is NotImplemented
        sparseops.topk_route(x, 2)
        sparseops.route(x, 2)
    assert any("topk_route" in f for f in frec.funcs) and any("route" in f for f in frec.funcs), frec.funcs
    # Fake tensors.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        assert _C._topk_route_eager(*_args(fx, 2), "cpu") is NotImplemented
        w, ids = sparseops.topk_route(fx, 2)
        assert w.shape == (4, 2)
    # functorch: vmap sees batched tensors.
    out = torch.vmap(lambda r: sparseops.topk_route(r[None], 2)[1][0])(x)
    assert torch.equal(out, sparseops.topk_route(x, 2)[1])
    # The profiler records the op.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        sparseops.topk_route(x, 2)
        sparseops.route(x, 2)
    names = {e.name for e in prof.events()}
    assert "sparseops::topk_route" in names and "sparseops::route" in names, names


def test_compile_still_traces_the_op():
    x = router_logits(5, 8)
    f = torch.compile(lambda x: sparseops.route(x, 2), fullgraph=True, dynamic=True)
    w, ids, meta = f(x)
    ref = sparseops.route(x, 2)
    _same(w, ref[0], "weights")
    _same(ids, ref[1], "ids")


def test_default_backend_is_honoured():
    x = router_logits(5, 8)
    try:
        sparseops.set_default_backend("reference")
        # With a Python-kernel default the entry declines (it only runs the native CPU kernel).
        assert _C._topk_route_eager(*_args(x, 2), _backend._default) is NotImplemented
        w, ids = sparseops.topk_route(x, 2)
        rw, rids = topk_route_ref(x, 2)
        assert torch.equal(ids, rids)
    finally:
        sparseops.set_default_backend(None)
