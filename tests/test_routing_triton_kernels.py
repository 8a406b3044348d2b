"""The Triton routing kernels (kernels/routing.py) against the pure-PyTorch reference.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` on CPU tensors; the variable is
set here, before anything imports Triton kernels (a conftest may have set it already).
The interpreter runs programs one after another and is slow, so shapes stay small: the
whole file takes well under two minutes on two CPU cores. With a GPU the same tests run on
CUDA tensors, plus a few GPU-only ones (large shapes, CUDA-graph capture).

Integer outputs (ids, every metadata tensor) must match exactly; weights within the
``sparseops.testing`` tolerances of their (accumulate) dtype: fp32, also for fp16 / bf16
logits, and fp64.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

try:  # installed: kernels/ is sparseops.kernels
    from sparseops.kernels import routing as kr  # noqa: E402
except ModuleNotFoundError as err:  # a source checkout run with PYTHONPATH=python:.
    if err.name not in ("sparseops", "sparseops.kernels"):
        raise
    from kernels import routing as kr  # noqa: E402

import sparseops  # noqa: E402
from sparseops import RouteMeta  # noqa: E402
from sparseops.reference.routing import route_metadata_ref, topk_route_ref  # noqa: E402
from sparseops.testing import assert_close, router_logits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def gpu_only(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")(fn))


pytestmark = [pytest.mark.triton]
if not ON_GPU:
    # The interpreter evaluates kernels with numpy, which warns where the kernels compute
    # the NaNs the reference computes too (inf - inf in a softmax, all-NaN reductions).
    pytestmark += [
        pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
        pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
    ]

FP32 = torch.float32
FP64 = torch.float64

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
STT = "softmax_then_topk"
TTS = "topk_then_softmax"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(T: int, E: int, dtype: torch.dtype = FP32, seed: int = 0, ties: bool = False) -> torch.Tensor:
    return router_logits(T, E, dtype=dtype, device=DEVICE, seed=seed, ties=ties)


def _bias(E: int, dtype: torch.dtype = FP32, seed: int = 1) -> torch.Tensor:
    acc = FP64 if dtype == FP64 else FP32
    return (0.5 * torch.randn(E, generator=_gen(seed), dtype=FP64)).to(acc).to(DEVICE)


def _mask(E: int, frac: float = 0.5, seed: int = 2) -> torch.Tensor:
    return (torch.rand(E, generator=_gen(seed)) < frac).to(DEVICE)


def _topk_triton(logits: torch.Tensor, k: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The launcher under its contract: preallocated outputs, options as attributes."""
    args = {**DEFAULTS, **kw}
    bias, mask = args.pop("bias"), args.pop("expert_mask")
    acc = FP64 if logits.dtype == FP64 else FP32
    T = logits.shape[0]
    # Filled with garbage: the launcher must write every element.
    w = torch.full((T, k), float("nan"), dtype=acc, device=logits.device)
    ids = torch.full((T, k), -7, dtype=torch.int32, device=logits.device)
    kr.topk_route_triton(logits, bias, mask, w, ids, SimpleNamespace(k=k, **args))
    return w, ids


def _check_topk(logits: torch.Tensor, k: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    args = {**DEFAULTS, **kw}
    w, ids = _topk_triton(logits, k, **kw)
    w_ref, ids_ref = topk_route_ref(logits, k, **args)
    assert ids.dtype == torch.int32 and ids.shape == ids_ref.shape
    assert torch.equal(ids, ids_ref), f"ids differ\n{ids}\n{ids_ref}"
    assert w.dtype == w_ref.dtype and w.shape == w_ref.shape
    assert_close(w, w_ref)
    return w, ids


# ------------------------------------------------------------------ topk_route: shapes


def _shape_cases():
    for E in (1, 7, 8, 60, 128, 257):
        for k in sorted({1, 2, 8, min(E, 32)}):
            if k <= E:
                yield E, k


@pytest.mark.parametrize("order", [STT, TTS])
@pytest.mark.parametrize(("E", "k"), list(_shape_cases()))
def test_topk_shapes(E: int, k: int, order: str) -> None:
    _check_topk(_logits(7, E, seed=E * 100 + k), k, order=order)


@pytest.mark.parametrize("T", [1, 7, 97])
def test_topk_tokens(T: int) -> None:
    # T = 1: one-token programs; T = 97: several programs and a partial last one.
    _check_topk(_logits(T, 128, seed=T), 8)
    _check_topk(_logits(T, 60, seed=T + 1), 2, scoring="sigmoid", bias=_bias(60))


# ------------------------------------------------------------------ dtypes, scoring, bias

SCORINGS = [("softmax", STT), ("softmax", TTS), ("sigmoid", STT)]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("scoring", "order"), SCORINGS)
@pytest.mark.parametrize("dtype", [FP32, torch.bfloat16, torch.float16, FP64])
def test_topk_dtypes_scoring_bias(dtype: torch.dtype, scoring: str, order: str, with_bias: bool) -> None:
    bias = _bias(60, dtype) if with_bias else None
    _check_topk(_logits(7, 60, dtype, seed=3), 8, scoring=scoring, order=order, bias=bias)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize(("scoring", "order"), SCORINGS)
def test_topk_renormalize_scale(scoring: str, order: str, renormalize: bool) -> None:
    for dtype in (FP32, FP64):
        _check_topk(
            _logits(7, 128, dtype, seed=4),
            8,
            scoring=scoring,
            order=order,
            renormalize=renormalize,
            scale=2.5,
        )
    # A scale that is not an fp32 value: fp64 weights must use it in full precision.
    _check_topk(_logits(7, 8, FP64, seed=5), 2, scoring=scoring, order=order, renormalize=renormalize, scale=0.1)


# ------------------------------------------------------------------ groups


@pytest.mark.parametrize("dtype", [FP32, torch.bfloat16])
def test_topk_groups_deepseek_v3(dtype: torch.dtype) -> None:
    # DeepSeek-V3: 256 experts, sigmoid + selection bias, 8 groups, top-4 groups, scale 2.5.
    _check_topk(
        _logits(97, 256, dtype, seed=6),
        8,
        scoring="sigmoid",
        bias=_bias(256, dtype, seed=7),
        n_group=8,
        topk_group=4,
        scale=2.5,
    )


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("scoring", "order"), SCORINGS)
def test_topk_groups_non_power_of_two(scoring: str, order: str, with_bias: bool) -> None:
    # E = 60, 4 groups of 15; fp64 too (its scores are not rounded).
    for dtype in (FP32, FP64):
        bias = _bias(60, dtype, seed=8) if with_bias else None
        _check_topk(_logits(7, 60, dtype, seed=9), 6, scoring=scoring, order=order, bias=bias, n_group=4, topk_group=2)


def test_topk_groups_misc() -> None:
    # Softmax groups without a bias: groups rank by the score, experts by the logit.
    _check_topk(_logits(7, 256, seed=10), 8, n_group=8, topk_group=4)
    # Groups of one expert (a group scores its only expert), k above the chosen experts.
    for k in (3, 5):
        _check_topk(_logits(7, 8, seed=11), k, scoring="sigmoid", n_group=8, topk_group=3)
    # Every group kept.
    _check_topk(_logits(7, 60, seed=12), 8, n_group=4, topk_group=4, bias=_bias(60))
    # Disabled experts: groups with fewer than two enabled experts score -inf.
    mask = _mask(60, 0.3, seed=13)
    _check_topk(
        _logits(7, 60, seed=14),
        8,
        scoring="sigmoid",
        bias=_bias(60),
        n_group=4,
        topk_group=2,
        expert_mask=mask,
    )
    _check_topk(_logits(7, 60, seed=15), 8, n_group=6, topk_group=2, expert_mask=mask)


# ------------------------------------------------------------------ group_scoring="max"


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("scoring", "order"), SCORINGS)
def test_topk_group_scoring_max(scoring: str, order: str, with_bias: bool) -> None:
    # DeepSeek-V2 group_limited_greedy: a group scores its best biased score. E = 60 in 4
    # groups of 15 (a loop over non-power-of-two groups); fp64 scores are not rounded.
    for dtype in (FP32, FP64):
        bias = _bias(60, dtype, seed=30) if with_bias else None
        _check_topk(
            _logits(7, 60, dtype, seed=31),
            6,
            scoring=scoring,
            order=order,
            bias=bias,
            n_group=4,
            topk_group=2,
            group_scoring="max",
        )


def test_topk_group_scoring_max_differs_from_top2_sum() -> None:
    # Group 0 holds the single best expert, group 1 the best pair: "max" keeps group 0,
    # "top2_sum" keeps group 1, so the flag must reach the kernel.
    x = torch.tensor([[3.0, -2.0, 2.0, 1.9], [-1.0, 1.0, 2.5, 2.4]], device=DEVICE)
    _, ids_max = _check_topk(x, 2, scoring="sigmoid", n_group=2, topk_group=1, group_scoring="max")
    _, ids_sum = _check_topk(x, 2, scoring="sigmoid", n_group=2, topk_group=1, group_scoring="top2_sum")
    assert ids_max.tolist() == [[0, 1], [2, 3]] and ids_sum.tolist() == [[2, 3], [2, 3]]


@pytest.mark.parametrize(("scoring", "order"), SCORINGS)
def test_topk_group_scoring_max_ties(scoring: str, order: str) -> None:
    # Logits and bias on a coarse grid: equal group maxima, broken by the lower group index,
    # then equal experts, broken by the lower expert index.
    coarse = _logits(7, 64, ties=True, seed=32)
    coarse_bias = (torch.randint(-1, 2, (64,), generator=_gen(33)).float() * 0.25).to(DEVICE)
    kw = dict(scoring=scoring, order=order, n_group=8, topk_group=3, group_scoring="max")
    _check_topk(coarse, 8, **kw)
    _check_topk(coarse, 8, bias=coarse_bias, **kw)
    _check_topk(coarse.to(torch.bfloat16), 8, bias=coarse_bias, **kw)
    # All-equal rows: every group ties, groups 0..2 and then experts 0..7 win.
    equal = torch.full((3, 64), 0.25, device=DEVICE)
    _, ids = _check_topk(equal, 8, bias=torch.zeros(64, device=DEVICE), **kw)
    assert (ids == torch.arange(8, dtype=torch.int32, device=DEVICE)).all()


def test_topk_group_scoring_max_masks_and_small_groups() -> None:
    # A group with a single enabled expert scores that expert under "max" (-inf under
    # top2_sum); a group with none scores -inf; groups of one expert.
    mask = torch.ones(16, dtype=torch.bool, device=DEVICE)
    mask[[1, 2, 3, 8, 9, 10, 11]] = False  # group 0 keeps expert 0 only, group 2 has none
    x = _logits(7, 16, seed=34)
    x[:, 0] = 4.0  # expert 0 is everyone's best
    for k, topk_group in ((2, 2), (5, 3)):
        _check_topk(x, k, scoring="sigmoid", bias=_bias(16), n_group=4, topk_group=topk_group,
                    expert_mask=mask, group_scoring="max")  # fmt: skip
    for k in (3, 5):
        _check_topk(_logits(7, 8, seed=35), k, n_group=8, topk_group=5, group_scoring="max")
    # Non-finite scores: NaN counts as -inf, +inf as the largest finite value.
    x = _logits(4, 16, seed=36)
    x[0, 3], x[1, 9], x[2, :4], x[3, 12] = float("nan"), float("inf"), float("-inf"), float("nan")
    _check_topk(x, 4, scoring="sigmoid", bias=_bias(16), n_group=4, topk_group=2, group_scoring="max")


def test_topk_group_scoring_max_public_api() -> None:
    # sparseops.topk_route(..., backend="triton") passes group_scoring through its custom op.
    x = _logits(7, 64, seed=37)
    bias = _bias(64, seed=38)
    kw = dict(scoring="sigmoid", bias=bias, n_group=8, topk_group=3, scale=2.5)
    for group_scoring in ("max", "top2_sum"):
        w, ids = sparseops.topk_route(x, 4, group_scoring=group_scoring, backend="triton", **kw)
        w_ref, ids_ref = topk_route_ref(x, 4, group_scoring=group_scoring, **kw)
        assert torch.equal(ids, ids_ref), group_scoring
        assert_close(w, w_ref)


# ------------------------------------------------------------------ expert_mask


@pytest.mark.parametrize(("scoring", "order"), SCORINGS)
def test_topk_expert_mask(scoring: str, order: str) -> None:
    logits = _logits(7, 60, seed=16)
    _check_topk(logits, 8, scoring=scoring, order=order, expert_mask=_mask(60, 0.5))
    _check_topk(logits, 8, scoring=scoring, order=order, expert_mask=_mask(60, 0.5), bias=_bias(60))
    # Fewer enabled experts than k: the rest of the slots get -1 and weight 0.
    few = torch.zeros(60, dtype=torch.bool, device=DEVICE)
    few[[3, 17, 42]] = True
    w, ids = _check_topk(logits, 8, scoring=scoring, order=order, expert_mask=few)
    assert (ids[:, 3:] == -1).all() and (w[:, 3:] == 0).all()
    assert set(ids[:, :3].flatten().tolist()) == {3, 17, 42}
    # No enabled expert at all.
    none = torch.zeros(60, dtype=torch.bool, device=DEVICE)
    w, ids = _check_topk(logits, 2, scoring=scoring, order=order, expert_mask=none, bias=_bias(60))
    assert (ids == -1).all() and (w == 0).all()


# ------------------------------------------------------------------ ties and non-finite values


@pytest.mark.parametrize(("scoring", "order"), SCORINGS)
def test_topk_ties(scoring: str, order: str) -> None:
    # Logits on a coarse grid: many exact ties, broken by the lower expert index.
    coarse = (torch.randint(-2, 3, (7, 128), generator=_gen(17)).double() * 0.5).float().to(DEVICE)
    _check_topk(coarse, 8, scoring=scoring, order=order)
    _check_topk(coarse.to(torch.bfloat16), 8, scoring=scoring, order=order)
    coarse_bias = (torch.randint(-1, 2, (128,), generator=_gen(18)).float() * 0.25).to(DEVICE)
    _check_topk(coarse, 8, scoring=scoring, order=order, bias=coarse_bias)
    _check_topk(coarse, 8, scoring=scoring, order=order, bias=coarse_bias, n_group=8, topk_group=3)
    # All-equal rows: ids 0..k-1.
    equal = torch.full((3, 60), 0.25, device=DEVICE)
    _, ids = _check_topk(equal, 8, scoring=scoring, order=order)
    assert (ids == torch.arange(8, dtype=torch.int32, device=DEVICE)).all()
    _check_topk(equal, 8, scoring=scoring, order=order, bias=torch.zeros(60, device=DEVICE), n_group=4, topk_group=2)


@pytest.mark.parametrize(("scoring", "order"), SCORINGS)
def test_topk_non_finite(scoring: str, order: str) -> None:
    # NaN ranks -inf; a row with a NaN or +inf logit has an all-NaN softmax, i.e. zeros.
    x = _logits(6, 16, seed=19)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2, :] = float("-inf")
    x[3, ::2] = float("-inf")
    x[4, 7] = float("-inf")
    x[5, :] = float("nan")
    _check_topk(x, 4, scoring=scoring, order=order)
    _check_topk(x, 4, scoring=scoring, order=order, bias=_bias(16))


def test_topk_launch_config() -> None:
    for e_pad in kr._TOPK_LAUNCH:
        for T in (1, 7, 97, 4096):
            for on_gpu in (False, True):
                block_t, num_warps = kr._topk_launch_config(T, e_pad, on_gpu)
                assert 1 <= block_t <= max(1, 2048 // e_pad) and block_t & (block_t - 1) == 0
                assert 1 <= num_warps <= 8 and block_t <= kr.next_pow2(T)


# ------------------------------------------------------------------ route_metadata


def _metadata_triton(ids: torch.Tensor, E: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """The launcher under its contract: 8 preallocated outputs, filled with garbage first."""
    n = ids.numel()
    P = (n + E * (block_m - 1)) // block_m * block_m if block_m > 0 else 0
    sizes = (E, E, n, n, n, P, P // block_m if block_m > 0 else 0, E if block_m > 0 else 0)
    out = tuple(torch.full((size,), -7, dtype=torch.int32, device=ids.device) for size in sizes)
    kr.route_metadata_triton(ids, E, block_m, out)
    return out


def _check_metadata(ids: torch.Tensor, E: int, block_m: int, ref_ids: torch.Tensor | None = None) -> tuple:
    out = _metadata_triton(ids, E, block_m)
    ref = route_metadata_ref(ids if ref_ids is None else ref_ids, E, block_m)
    assert len(out) == 8
    for name, a, b in zip(RouteMeta._fields, out, ref, strict=True):
        assert a.dtype == torch.int32 and a.shape == b.shape, (name, a.shape, b.shape)
        assert torch.equal(a, b.to(a.device)), f"{name} differs\n{a}\n{b}"
    return out


def _ids(T: int, k: int, E: int, drop: float = 0.1, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    ids[torch.rand(T, k, generator=g) < drop] = -1
    return ids.to(DEVICE)


@pytest.mark.parametrize("block_m", [0, 1, 4, 16])
@pytest.mark.parametrize(("T", "k", "E"), [(0, 8, 8), (5, 0, 8), (0, 2, 1), (0, 4, 60)])
def test_metadata_empty(T: int, k: int, E: int, block_m: int) -> None:
    ids = torch.empty(T, k, dtype=torch.int32, device=DEVICE)
    out = _check_metadata(ids, E, block_m)
    if block_m > 1:
        assert (out[6] == -1).all()  # no used block


@pytest.mark.parametrize("block_m", [0, 1, 4, 16])
@pytest.mark.parametrize(
    ("T", "k", "E"),
    [
        (1, 1, 1),
        (7, 2, 7),
        (97, 8, 60),  # 776 slots: 4 tiles, the last one partial
        (300, 8, 257),  # 2400 slots: 10 tiles
        (64, 4, 128),
        (33, 3, 1024),  # many empty experts
    ],
)
def test_metadata_random(T: int, k: int, E: int, block_m: int) -> None:
    ids = _ids(T, k, E, seed=T * 7 + E)
    out = _check_metadata(ids, E, block_m)
    sorted_slots, inverse = out[2].long(), out[3].long()
    n = T * k
    assert torch.equal(inverse[sorted_slots], torch.arange(n, device=ids.device))


@pytest.mark.parametrize("block_m", [0, 1, 4, 16])
def test_metadata_skewed(block_m: int) -> None:
    E = 8
    _check_metadata(torch.full((300, 4), 5, dtype=torch.int32, device=DEVICE), E, block_m)  # one expert
    _check_metadata(torch.full((150, 4), -1, dtype=torch.int32, device=DEVICE), E, block_m)  # all dropped
    _check_metadata(_ids(150, 4, 2, drop=0.7, seed=20), E, block_m)  # mostly dropped, experts 0-1 only
    ids = _ids(97, 8, E, drop=0.0, seed=21)
    ids[::3, :] = 7
    _check_metadata(ids, E, block_m)


def test_metadata_scan_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # The per-expert scan over tiles loops in chunks of at most _META_SCAN_CHUNK tiles; a tiny
    # chunk makes 2400 slots (10 tiles) take several steps, as 300k slots do on a GPU.
    monkeypatch.setattr(kr, "_META_SCAN_CHUNK", 4)
    _check_metadata(_ids(300, 8, 60, seed=24), 60, 16)


def test_metadata_block_m_not_power_of_two() -> None:
    for block_m in (3, 7):
        _check_metadata(_ids(97, 8, 60, seed=22), 60, block_m)


def test_metadata_out_of_range_ids_are_dropped() -> None:
    # The kernel contract: values outside [-1, E) count as dropped and never index memory.
    ids = _ids(97, 8, 60, seed=23)
    bad = ids.clone()
    bad[0, 0], bad[5, 3], bad[50, 7], bad[96, 1] = 60, 1000, -2, -(2**31)
    _check_metadata(bad, 60, 16, ref_ids=torch.where((bad >= 0) & (bad < 60), bad, -1))


# ------------------------------------------------------------------ GPU only


@gpu_only
@pytest.mark.parametrize(
    ("T", "E", "k", "kw"),
    [
        (4096, 256, 8, dict(scoring="sigmoid", n_group=8, topk_group=4, scale=2.5, with_bias=True)),
        (4096, 128, 8, dict()),
        (1000, 1024, 32, dict(order=TTS)),
        (1000, 1024, 32, dict(with_bias=True, n_group=16, topk_group=4)),
        (64, 8, 2, dict()),
    ],
)
def test_topk_gpu_large(T: int, E: int, k: int, kw: dict) -> None:
    kw = dict(kw)
    for dtype in (torch.bfloat16, FP32, FP64):
        if kw.get("with_bias"):
            kw["bias"] = _bias(E, dtype)
        _check_topk(_logits(T, E, dtype, seed=T + E), k, **{key: v for key, v in kw.items() if key != "with_bias"})


@gpu_only
@pytest.mark.parametrize(("T", "k", "E"), [(32768, 8, 256), (4096, 8, 1024), (300_000, 2, 8)])
def test_metadata_gpu_large(T: int, k: int, E: int) -> None:
    for block_m in (0, 64, 128):
        _check_metadata(_ids(T, k, E, drop=0.05, seed=T), E, block_m)


@gpu_only
def test_cuda_graph_capture() -> None:
    logits = _logits(64, 256)
    bias = _bias(256)
    ids = _ids(64, 8, 256)
    kw = {**DEFAULTS, "scoring": "sigmoid", "bias": bias, "n_group": 8, "topk_group": 4}
    _topk_triton(logits, 8, **kw)  # compile outside the capture
    _metadata_triton(ids, 256, 16)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, top = _topk_triton(logits, 8, **kw)
        meta = _metadata_triton(ids, 256, 16)
    logits.copy_(_logits(64, 256, seed=99))
    ids.copy_(_ids(64, 8, 256, seed=99))
    graph.replay()
    torch.cuda.synchronize()
    w_ref, top_ref = topk_route_ref(logits, 8, **kw)
    assert torch.equal(top, top_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(meta, route_metadata_ref(ids, 256, 16), strict=True):
        assert torch.equal(a, b)
