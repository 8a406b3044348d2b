"""The C++ CPU routing kernels against the reference: NaN / inf rows, subnormal totals,
thread-count determinism, group_scoring="max", and the fast paths' edge cases (every
order x scoring x bias x groups x mask, lengths around the vector widths)."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import sparseops
from conftest import rerun_in_subprocess
from sparseops.reference import route_metadata_ref, topk_route_ref
from sparseops.testing import assert_close, random_ids, router_logits

pytestmark = pytest.mark.skipif(
    "cpu" not in sparseops.available_backends("topk_route", "cpu"), reason="no C++ CPU backend"
)


def _compare(logits, k, **kw):
    w, ids = sparseops.topk_route(logits, k, backend="cpu", **kw)
    w_ref, ids_ref = topk_route_ref(logits, k, **kw)
    torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0, msg=lambda m: f"ids {kw}\n{m}")
    # equal_nan: the reference gives NaN weights where a selected sigmoid logit is NaN and
    # nothing renormalises it; that is the documented answer the kernel must return.
    rtol, atol = sparseops.testing.TOLERANCES[w_ref.dtype]
    torch.testing.assert_close(w, w_ref, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"weights {kw}\n{m}")
    return w, ids


def _bias(E, seed=3, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(E, generator=g)


def _mask(E, seed=4):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(E, generator=g) < 0.7
    m[0] = True
    return m


ORDERS = ["softmax_then_topk", "topk_then_softmax"]
SCORINGS = ["softmax", "sigmoid"]


def _special_logits(T, E, dtype, seed, frac=0.2, with_inf=True):
    """Random logits with NaN (and +-inf) sprinkled in, plus whole NaN / -inf rows."""
    x = router_logits(T, E, dtype=torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    u = torch.rand(T, E, generator=g)
    x[u < frac] = float("nan")
    if with_inf:
        x[(u >= frac) & (u < frac + 0.05)] = float("inf")
        x[(u >= frac + 0.05) & (u < frac + 0.1)] = float("-inf")
    x[0] = float("nan")
    if T > 1:
        x[1] = float("-inf")
    if T > 2:
        x[2, : E // 2] = float("nan")  # fewer finite candidates than k in some configs
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("order,scoring", list(itertools.product(ORDERS, SCORINGS)))
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(
    "E,k,extra",
    [
        (8, 2, {}),
        (8, 6, {}),
        (16, 4, {"bias": True}),
        (32, 8, {"n_group": 4, "topk_group": 2}),
        (32, 8, {"n_group": 4, "topk_group": 2, "bias": True}),
        (40, 5, {"mask": True}),
        (40, 5, {"mask": True, "bias": True, "n_group": 4, "topk_group": 3}),
        (256, 8, {"n_group": 8, "topk_group": 4, "bias": True, "scale": 2.5}),
    ],
)
def test_nan_and_inf_rows_match_reference(dtype, order, scoring, renormalize, E, k, extra):
    """Bug 1: a NaN logit of a selected expert. The old kernel zeroed the NaN weight and
    renormalised the rest; the reference zeroes the whole softmax (topk_then_softmax) or
    the whole renormalised row (sigmoid), and keeps NaN for sigmoid without renormalising."""
    extra = dict(extra)
    kw = {"order": order, "scoring": scoring, "renormalize": renormalize}
    if extra.pop("bias", False):
        kw["bias"] = _bias(E).to(torch.float64 if dtype == torch.float64 else torch.float32)
    if extra.pop("mask", False):
        kw["expert_mask"] = _mask(E)
    kw.update(extra)
    for seed, frac in [(0, 0.05), (1, 0.3), (2, 0.7)]:
        _compare(_special_logits(37, E, dtype, seed, frac), k, **kw)


def test_nan_selected_sigmoid_topk_then_softmax_exact():
    """The two orders of the documented answer on a hand-made row."""
    x = torch.tensor([[float("nan"), 1.0, 0.5, -1.0]])
    w, ids = sparseops.topk_route(x, 2, order="topk_then_softmax", backend="cpu")
    assert ids.tolist() == [[1, 2]]  # NaN ranks as -inf
    x = torch.tensor([[float("nan"), 1.0, float("nan"), float("nan")]])
    w, ids = sparseops.topk_route(x, 2, order="topk_then_softmax", backend="cpu")
    assert ids.tolist() == [[1, 0]] and w.tolist() == [[0.0, 0.0]]  # softmax of a NaN -> 0
    w, ids = sparseops.topk_route(x, 2, scoring="sigmoid", renormalize=False, backend="cpu")
    assert ids.tolist() == [[1, 0]] and w[0, 0] > 0 and torch.isnan(w[0, 1])
    w, ids = sparseops.topk_route(x, 2, scoring="sigmoid", renormalize=True, backend="cpu")
    assert w.tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_subnormal_total(k, scale):
    """Bug 2: a bias forces the choice of experts whose probabilities are ~1e-39 (subnormal);
    scale / total overflowed to inf where w / total * scale is finite."""
    E = 16
    x = torch.zeros(4, E)
    x[:, 0] = 90.0  # p(expert 0) ~ 1, the others ~ exp(-90) ~ 8e-40
    x[1, 1:] = torch.linspace(-0.5, 0.5, E - 1)
    x[2, 1:] = -1.0
    x[3, 1:] = 0.25
    bias = torch.zeros(E)
    bias[0] = -10.0  # never chosen
    w, ids = _compare(x, k, bias=bias, scale=scale)
    assert torch.isfinite(w).all() and (ids != 0).all()
    assert_close(w.sum(-1), torch.full((4,), scale))
    # And a probability of ~1e-44 (a handful of subnormal ulps) alone: w / w = 1.
    x = torch.zeros(2, E)
    x[:, 0] = 101.0
    w, ids = _compare(x, 1, bias=bias, scale=scale)
    assert w.flatten().tolist() == [scale, scale]


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
        (64, 6, {"bias": True}),
        (128, 8, {}),
        (256, 8, {"scoring": "sigmoid", "n_group": 8, "topk_group": 4, "bias": True, "scale": 2.5}),
        (8, 2, {"order": "topk_then_softmax"}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thread_count_does_not_change_bits(E, k, kw, dtype):
    """Bug 3: the scalar-vs-ATen choice depended on how parallel_for split the rows, so 1 and
    2 threads gave weights 1 ulp apart at small T. Many T, including T around the old block
    thresholds (512 logits, 32768 / E rows) and the row grain (64)."""
    if kw.get("bias") is True:
        kw = {**kw, "bias": _bias(E)}
    Ts = sorted({1, 2, 3, 7, 31, 32, 33, 63, 64, 65, 66, 127, 128, 129, 130, 255, 257, 1000, 1025, 4099}
                | {512 // E, 512 // E + 1, 1024 // E + 1, 32768 // E, 32768 // E + 1, 2 * (32768 // E) + 3})
    for T in Ts:
        if T < 1:
            continue
        x = router_logits(T, E, dtype=dtype, seed=T)
        run = lambda x=x: sparseops.topk_route(x, k, backend="cpu", **kw)
        w1, i1 = _with_threads(1, run)
        w2, i2 = _with_threads(2, run)
        assert torch.equal(i1, i2), f"T={T}"
        assert torch.equal(w1.view(torch.int32), w2.view(torch.int32)), f"T={T}: weights differ in bits"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    "E,k,n_group,topk_group,scoring",
    [(256, 8, 8, 4, "sigmoid"), (64, 6, 8, 3, "softmax"), (60, 4, 4, 2, "sigmoid"), (16, 2, 16, 3, "sigmoid")],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_group_scoring_max(dtype, ties, E, k, n_group, topk_group, scoring, with_bias):
    """group_scoring="max": a group scores by its best biased score (DeepSeek-V2)."""
    kw = {"scoring": scoring, "n_group": n_group, "topk_group": topk_group, "group_scoring": "max"}
    if with_bias:
        b = _bias(E, scale=0.25)
        kw["bias"] = ((b * 4).round() / 4 if ties else b).to(torch.float64 if dtype == torch.float64 else torch.float32)
    for seed in range(4):
        x = router_logits(53, E, dtype=dtype, seed=seed, ties=ties)
        _compare(x, k, **kw)
        _compare(x, k, expert_mask=_mask(E, seed), **kw)


def test_group_scoring_max_differs_from_top2_sum():
    """A group with one strong expert wins under max and loses under top2_sum."""
    x = torch.tensor([[3.0, -5.0, 1.0, 1.0, -5.0, -5.0, 0.0, 0.0]])
    kw = {"scoring": "sigmoid", "n_group": 4, "topk_group": 1}
    _, ids_max = _compare(x, 2, group_scoring="max", **kw)
    _, ids_sum = _compare(x, 2, group_scoring="top2_sum", **kw)
    assert ids_max.tolist() == [[0, 1]] and ids_sum.tolist() == [[2, 3]]
    # Ties between groups go to the lower group.
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]])
    _, ids = _compare(x, 2, group_scoring="max", **kw)
    assert ids.tolist() == [[0, 1]]


CONFIGS = [
    (8, 2, {}),
    (8, 2, {"order": "topk_then_softmax"}),
    (128, 8, {}),
    (128, 8, {"renormalize": False, "scale": 1.5}),
    (128, 4, {"order": "topk_then_softmax"}),
    (256, 8, {"scoring": "sigmoid", "n_group": 8, "topk_group": 4, "scale": 2.5, "bias": True}),
    (256, 8, {"scoring": "sigmoid", "n_group": 8, "topk_group": 4}),
    (60, 4, {"scoring": "sigmoid", "n_group": 4, "topk_group": 2, "bias": True}),
    (60, 6, {"bias": True}),
    (60, 6, {"bias": True, "order": "topk_then_softmax"}),
    (1, 1, {}),
    (3, 3, {"scoring": "sigmoid"}),
    (7, 7, {}),
    (17, 5, {"mask": True}),
    (33, 9, {"mask": True, "bias": True}),
    (257, 32, {}),
    (1024, 32, {"scoring": "sigmoid"}),
    (1024, 32, {"scoring": "sigmoid", "bias": True, "n_group": 1024, "topk_group": 40}),
]


@pytest.mark.parametrize("E,k,kw", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
def test_many_seeds_bitwise_ids(E, k, kw, dtype, ties):
    """Ids bitwise equal to the reference over many seeds (the fp64 score path included)."""
    kw = dict(kw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if kw.pop("bias", False):
        kw["bias"] = _bias(E, seed=E).to(acc)
    if kw.pop("mask", False):
        kw["expert_mask"] = _mask(E)
    T = 1 if E >= 1024 else 67
    for seed in range(6):
        x = router_logits(T if seed else 1, E, dtype=dtype, seed=seed, ties=ties)
        _compare(x, k, **kw)


def test_many_seeds_large_deepseek():
    """Around 2M fp64-scored values of DeepSeek-V3 routing: ids bitwise, both dtypes."""
    E = 256
    kw = {"scoring": "sigmoid", "n_group": 8, "topk_group": 4, "scale": 2.5, "bias": _bias(E, seed=9, scale=0.05)}
    for dtype in [torch.float32, torch.bfloat16]:
        for seed in range(2):
            _compare(router_logits(4096, E, dtype=dtype, seed=seed), 8, **kw)
    kw = {"bias": _bias(128, seed=9, scale=0.001)}
    _compare(router_logits(8192, 128, seed=5), 8, **kw)


@pytest.mark.parametrize("n,E,block_m", [(1, 1, 0), (5, 3, 4), (1000, 8, 0), (70000, 128, 16), (300001, 7, 3)])
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_metadata_matches_reference_and_threads(n, E, block_m, drop):
    k = 1 if n % 2 else 2
    T = max(1, n // k)
    k = min(k, E)
    ids = random_ids(T, k, E, seed=n, drop=drop, skew=0.5)
    ref = route_metadata_ref(ids, E, block_m)
    for threads in [1, 2]:
        out = _with_threads(threads, lambda: sparseops.route_metadata(ids, E, block_m=block_m, backend="cpu"))
        for a, b in zip(out, ref):
            if a is None:  # RouteMeta leaves the padded layout out when block_m == 0
                assert b.numel() == 0
                continue
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "E,k,kw",
    [
        (8, 2, {}),
        (8, 2, {"order": "topk_then_softmax"}),
        (8, 3, {"scoring": "sigmoid", "renormalize": False, "scale": -1.5}),
        (16, 5, {"mask": True}),
        (13, 1, {}),
        (4, 4, {"scoring": "sigmoid"}),
        (16, 16, {"order": "topk_then_softmax", "scale": 2.0}),
        # E >= 32, k <= 16: rows in groups of 4 (interleaved top-k) inside a batch, alone otherwise
        (128, 8, {}),
        (64, 16, {"order": "topk_then_softmax"}),
        (40, 5, {"mask": True, "scoring": "sigmoid", "bias": True}),
        (256, 8, {"scoring": "sigmoid", "n_group": 8, "topk_group": 4, "scale": 2.5, "bias": True}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_bits_do_not_depend_on_batch(E, k, kw, dtype):
    """Small-E routers take a 16-rows-at-once path inside long batches, routers with E >= 32
    groups of 4 rows, and single rows and batch tails the per-row path: the same row must get
    the same bits either way."""
    kw = dict(kw)
    if kw.pop("mask", False):
        kw["expert_mask"] = _mask(E)
    if kw.get("bias") is True:
        kw["bias"] = _bias(E)
    T = 100
    x = _special_logits(T, E, dtype, seed=E + k, frac=0.03)
    x[5:] = router_logits(T - 5, E, dtype=dtype, seed=k, ties=True)
    x[40:44] = x[40:44] * 40  # large logits: saturated softmax, tiny weights
    w, ids = _compare(x, k, **kw)
    for t in range(T):
        w1, i1 = sparseops.topk_route(x[t : t + 1], k, backend="cpu", **kw)
        assert torch.equal(i1[0], ids[t]), t
        assert torch.equal(w1[0].view(torch.int32), w[t].view(torch.int32)), (t, w1[0], w[t])


@pytest.mark.skipif(bool(os.environ.get("SPARSEOPS_CPU_NO_AVX512")), reason="already the scalar path")
def test_scalar_fallback_path():
    """Machines without AVX-512 run the portable scalar path; force it in a subprocess
    (the choice is made once per process) and rerun the reference comparisons there."""
    selection = (
        "test_subnormal_total or test_nan_selected or test_group_scoring_max_differs"
        " or (test_many_seeds_bitwise_ids and float32) or (test_nan_and_inf_rows and dtype1)"
    )
    rerun_in_subprocess(__file__, selection, SPARSEOPS_CPU_NO_AVX512="1")


def _deepseek_near_tie_rows(T, seed, spread):
    """[T, 256] fp32 logits whose biased sigmoid scores all lie within ~spread of each other:
    bias = -sigmoid(y), logits = y + noise, so every group cut and top-k boundary is a near
    tie that the CPU kernel's approximate scores cannot decide (its exact fallbacks run)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(256, generator=g, dtype=torch.float64)
    bias = (0.5 - torch.sigmoid(y)).float()
    x = (y + spread * torch.randn(T, 256, generator=g, dtype=torch.float64)).float()
    return x, bias


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_deepseek_exact_candidates_bitwise(threads, dtype):
    """DeepSeek-V3 ranks by exact scores of candidate experts only (a cheap
    approximate sigmoid rules the others out with a proven margin): ids bitwise equal to the
    reference on ~2.6M random values over bias / logit scales, on near-tie rows whose scores
    differ by 1e-7..1e-3 (group cuts and k-th boundaries the margin cannot decide), with NaN
    / inf rows, |bias| past the path's bound, and group_scoring="max"."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    small = threads == 2 or dtype != torch.float32
    try:
        E, k = 256, 8
        base = {"scoring": "sigmoid", "n_group": 8, "topk_group": 4, "scale": 2.5}
        for i, (bscale, xscale) in enumerate([(0.05, 1.0), (1.0, 0.1), (30.0, 4.0), (999.0, 20.0), (2000.0, 1.0)]):
            x = (xscale * router_logits(512 if small else 2048, E, seed=10 + i)).to(dtype)
            _compare(x, k, bias=_bias(E, seed=i, scale=bscale), **base)
        for i, spread in enumerate([1e-7, 1e-5, 1e-4, 3e-4, 1e-3, 1e-2]):
            x, bias = _deepseek_near_tie_rows(128 if small else 512, seed=i, spread=spread)
            x = x.to(dtype)
            _compare(x, k, bias=bias, **base)
            _compare(x, k, bias=bias, **{**base, "group_scoring": "max"})
            _compare(x, k, bias=bias, **{**base, "topk_group": 8})
        x = router_logits(300, E, seed=3).to(dtype)
        x[5, 7] = float("nan")
        x[9, :] = float("inf")
        x[11, 100] = float("-inf")
        x[12, 3:40] = 0.25  # exact ties
        _compare(x, k, bias=_bias(E, seed=5), **base)
    finally:
        torch.set_num_threads(old)


def _bf16_key_rows(T, E, seed):
    """[T, E] bf16 logits for the 16-bit-key path: random rows, rows on a coarse grid (ties,
    among them ties at the k-th place), near-tie rows (every value one of a few adjacent
    bf16 values, so more than 16 keys sit at the floor), rows mixing -0 and +0 at the top,
    rows with +-inf, all -inf and all-equal rows, and NaN rows."""
    x = router_logits(T, E, dtype=torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    x[1::7] = (x[1::7] * 2).round() / 2
    base = torch.tensor(1.0, dtype=torch.bfloat16).float()
    near = torch.randint(0, 3, (T, E), generator=g).float() * 2.0**-7  # 1, 1+2^-7, 1+2^-6: adjacent bf16
    x[2::7] = (base + near)[2::7]
    x[3::7] = -torch.rand(x[3::7].shape, generator=g) - 0.5
    x[3::7, ::5] = 0.0
    x[3::7, 1::5] = -0.0
    x[4::7, ::9] = float("inf")
    x[4::7, 1::11] = float("-inf")
    x[5] = float("-inf")
    x[6] = 0.5
    x[8, E // 3] = float("nan")
    x[10] = float("nan")
    x[12, ::3] = float("inf")  # more than k infinite logits: softmax NaN -> zeros
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("E", [32, 64, 96, 128, 256])
@pytest.mark.parametrize(
    "k,kw",
    [
        (1, {}),
        (8, {}),
        (16, {}),
        (4, {"order": "topk_then_softmax"}),
        (13, {"order": "topk_then_softmax", "scale": 2.0}),
        (8, {"scoring": "sigmoid", "renormalize": False, "scale": -1.5}),
        (6, {"scoring": "sigmoid"}),
    ],
)
def test_bf16_key_path_bitwise(E, k, kw):
    """bf16 routers ranked by their logits (Qwen3, gpt-oss) rank 16-bit keys of the raw bf16
    patterns in groups of 4 rows: ids bitwise equal to the reference on random, tied,
    near-tie (> 16 keys at the floor), +-0, +-inf and NaN rows, and every row's weights
    bitwise equal to the per-row fp32-key path (a row routed alone takes it)."""
    T = 71  # 17 groups of 4 rows and a tail of 3 on the per-row path
    x = _bf16_key_rows(T, E, seed=E + k)
    w, ids = _compare(x, k, **kw)
    w1 = torch.empty_like(w)
    for t in range(T):
        w_row, i_row = sparseops.topk_route(x[t : t + 1], k, backend="cpu", **kw)
        assert torch.equal(i_row[0], ids[t]), t
        w1[t] = w_row[0]
    assert torch.equal(w.view(torch.int32), w1.view(torch.int32))
    # The pair: the same ids and weights, and the metadata of those ids.
    w2, ids2, meta = sparseops.route(x, k, backend="cpu", **kw)
    assert torch.equal(ids2, ids) and torch.equal(w2.view(torch.int32), w.view(torch.int32))
    for a, b in zip(meta, route_metadata_ref(ids, E, 0)):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
