"""The N:M Triton launchers (kernels/nm_sparse.py) called directly, against an oracle written
here from the format's definition (NM_FORMAT), independent of sparseops' own N:M code.

On CPU they run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay small; the
``gpu`` tests rerun the same checks compiled on CUDA tensors at larger shapes.
"""

from __future__ import annotations

import pytest
import torch

from sparseops.kernels.nm_sparse import _super_block, meta_bits, nm_compress_triton, nm_linear_triton

pytestmark = pytest.mark.triton

HAS_CUDA = torch.cuda.is_available()
PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8), (8, 16), (1, 2), (3, 4), (1, 8), (7, 8), (5, 16)]
PATTERN_IDS = [f"{n}of{m}" for n, m in PATTERNS]
BITS = {2: 1, 4: 2, 8: 4, 16: 4}
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


# --------------------------------------------------------------------------------------
# Oracle: the format's definition in plain loops / torch.


def oracle_keep(w: torch.Tensor, n: int, m: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [NO, K]: per group the n best scores (|w| default): NaN above every number, larger
    first, ties to the lower index. Element i is kept iff fewer than n members rank before it."""
    NO, K = w.shape
    s = (w.abs() if scores is None else scores).to(torch.float64).reshape(NO, K // m, m)
    si, sq = s[..., :, None], s[..., None, :]  # i along dim -2, competitor q along -1
    nan_i, nan_q = torch.isnan(si), torch.isnan(sq)
    idx = torch.arange(m, device=w.device)
    q_lower = idx[None, :] < idx[:, None]
    before = (nan_q & ~nan_i) | (sq > si) | (((sq == si) | (nan_q & nan_i)) & q_lower)
    return (before.sum(-1) < n).reshape(NO, K)


def oracle_pack(w: torch.Tensor, keep: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, meta) of w at ``keep`` (exactly n per group), by the format's definition: the
    kept values of group g in position order at j = g*n + slot, position p of value j in bits
    (j*b) % 8 of byte (j*b) // 8."""
    w, keep = w.cpu(), keep.cpu()
    NO, K = w.shape
    G, b, kept = K // m, BITS[m], K // m * n
    keep3 = keep.reshape(NO, G, m)
    assert bool((keep3.sum(-1) == n).all())
    slot = keep3.to(torch.int64).cumsum(-1) - 1  # [NO, G, m]
    j = torch.arange(G)[None, :, None] * n + slot
    pos = torch.arange(m).expand(NO, G, m)
    rows = torch.arange(NO)[:, None, None].expand(NO, G, m)
    jk, pk, rk = j[keep3], pos[keep3], rows[keep3]
    values = torch.zeros(NO, kept, dtype=w.dtype)
    values[rk, jk] = w.reshape(NO, G, m)[keep3]
    meta = torch.zeros(NO, (kept * b + 7) // 8, dtype=torch.int64)
    meta.index_put_((rk, (jk * b) // 8), pk << ((jk * b) % 8), accumulate=True)  # bits never overlap
    return values, meta.to(torch.uint8)


def oracle_dense(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, K: int) -> torch.Tensor:
    """decompress(values, meta): value j of row r at column (j // n) * m + its position."""
    NO, kept = values.shape
    b = BITS[m]
    j = torch.arange(kept)
    byte = meta.cpu().to(torch.int64)[:, (j * b) // 8]
    pos = (byte >> ((j * b) % 8)) & ((1 << b) - 1)
    cols = (j // n) * m + pos
    dense = torch.zeros(NO, K, dtype=torch.float64)
    dense.scatter_(1, cols, values.cpu().to(torch.float64))
    return dense


def random_nm(NO: int, K: int, n: int, m: int, dtype=torch.float32, seed: int = 0):
    """A random N:M weight in compressed form: (values, meta, masked dense fp64)."""
    g = torch.Generator().manual_seed(seed)
    G = K // m
    # n distinct positions per group: the n smallest of m random keys.
    pos = torch.rand(NO, G, m, generator=g).argsort(-1)[..., :n].sort(-1).values
    keep = torch.zeros(NO, G, m, dtype=torch.bool).scatter_(-1, pos, True).reshape(NO, K)
    w = torch.randn(NO, K, generator=g).to(dtype)
    values, meta = oracle_pack(w, keep, n, m)
    return values, meta, (w.to(torch.float64) * keep)


def expected_linear(x, dense, bias):
    y = x.cpu().to(torch.float64) @ dense.T
    if bias is not None:
        y = y + bias.cpu().to(torch.float64)
    return y


def assert_linear_close(out: torch.Tensor, ref: torch.Tensor, K: int) -> None:
    """out (rounded once from an fp32 accumulator) within 2 ulp of its dtype of the fp64 result
    plus the fp32 accumulation error of K products."""
    eps = EPS[out.dtype]
    acc_eps = 2.0**-52 if out.dtype == torch.float64 else 2.0**-23
    err = (out.cpu().to(torch.float64) - ref).abs()
    tol = 2 * eps * ref.abs() + 4 * acc_eps * max(K, 1) * 4 + 1e-30
    worst = (err - tol).max().item() if err.numel() else 0.0
    assert worst <= 0, f"max error {err.max().item():.3e} exceeds tolerance (dtype {out.dtype})"


def run_linear(x, values, meta, bias, n, m, path):
    out = torch.full((x.shape[0], values.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    nm_linear_triton(x, values, meta, bias, out, n, m, path=path)
    return out


def run_compress(w, scores, n, m, with_mask=True):
    NO, K = w.shape
    kept = K // m * n
    values = torch.full((NO, kept), float("nan"), dtype=w.dtype, device=w.device)
    meta = torch.full((NO, (kept * BITS[m] + 7) // 8), 0xAB, dtype=torch.uint8, device=w.device)
    mask = torch.zeros(NO, K, dtype=torch.bool, device=w.device) if with_mask else None
    nm_compress_triton(w, scores, n, m, values, meta, mask)
    return values, meta, mask


# --------------------------------------------------------------------------------------
# nm_linear_triton


@pytest.mark.parametrize("path", ["gather", "tile"])
@pytest.mark.parametrize(("n", "m"), PATTERNS, ids=PATTERN_IDS)
def test_linear_patterns(n, m, path):
    NO, K, R = 7, 5 * m, 3
    values, meta, dense = random_nm(NO, K, n, m, seed=n * 31 + m)
    x = torch.randn(R, K)
    bias = torch.randn(NO)
    out = run_linear(x, values, meta, bias, n, m, path)
    assert_linear_close(out, expected_linear(x, dense, bias), K)


@pytest.mark.parametrize("path", ["gather", "tile", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_linear_dtypes_bias(dtype, has_bias, path):
    n, m = 2, 4
    NO, K, R = 97, 36, 7
    values, meta, dense = random_nm(NO, K, n, m, dtype=dtype, seed=3)
    x = torch.randn(R, K).to(dtype)
    bias = torch.randn(NO).to(dtype) if has_bias else None
    out = run_linear(x, values, meta, bias, n, m, path)
    assert out.dtype == dtype
    assert_linear_close(out, expected_linear(x, dense, bias), K)


@pytest.mark.parametrize(("R", "NO"), [(1, 1), (1, 7), (17, 5), (33, 97)])
@pytest.mark.parametrize("path", ["gather", "tile", None])
def test_linear_odd_shapes(R, NO, path):
    n, m = 1, 4
    K = 4 * 13  # 13 groups: no K tile is full
    values, meta, dense = random_nm(NO, K, n, m, seed=R + NO)
    x = torch.randn(R, K)
    out = run_linear(x, values, meta, None, n, m, path)
    assert_linear_close(out, expected_linear(x, dense, None), K)


def test_linear_large_k_loops():
    """K spanning several kernel K steps on both paths (the while loops over K)."""
    n, m = 2, 8
    NO, K, R = 5, 8 * 40, 2
    values, meta, dense = random_nm(NO, K, n, m, seed=11)
    x = torch.randn(R, K)
    for path in ("gather", "tile"):
        out = run_linear(x, values, meta, None, n, m, path)
        assert_linear_close(out, expected_linear(x, dense, None), K)


@pytest.mark.parametrize("path", ["gather", "tile"])
def test_linear_empty(path):
    n, m = 2, 4
    values, meta, _ = random_nm(3, 8, n, m)
    out = torch.empty(0, 3)
    nm_linear_triton(torch.empty(0, 8), values, meta, None, out, n, m, path=path)
    assert out.shape == (0, 3)
    # in_features = 0: y = bias
    v0, m0 = torch.empty(3, 0), torch.empty(3, 0, dtype=torch.uint8)
    bias = torch.randn(3)
    y = run_linear(torch.empty(2, 0), v0, m0, bias, n, m, path)
    assert torch.equal(y, bias.expand(2, 3))
    y = run_linear(torch.empty(2, 0), v0, m0, None, n, m, path)
    assert torch.equal(y, torch.zeros(2, 3))


def test_linear_explicit_zero_values():
    """Kept zeros (a group padded with explicit zeros) contribute nothing; meta still decodes."""
    n, m = 2, 4
    values, meta, dense = random_nm(4, 16, n, m, seed=5)
    values[:, ::3] = 0
    dense = oracle_dense(values, meta, n, m, 16)
    x = torch.randn(3, 16)
    for path in ("gather", "tile"):
        assert_linear_close(run_linear(x, values, meta, None, n, m, path), expected_linear(x, dense, None), 16)


def test_linear_rejects_bad_path():
    values, meta, _ = random_nm(2, 8, 2, 4)
    with pytest.raises(ValueError, match="path"):
        nm_linear_triton(torch.randn(1, 8), values, meta, None, torch.empty(1, 2), 2, 4, path="dense")


# --------------------------------------------------------------------------------------
# nm_compress_triton


@pytest.mark.parametrize(("n", "m"), PATTERNS, ids=PATTERN_IDS)
def test_compress_patterns(n, m):
    NO, K = 5, 7 * m  # 7 groups: a partial super-block for most patterns
    w = torch.randn(NO, K)
    values, meta, mask = run_compress(w, None, n, m)
    keep = oracle_keep(w, n, m)
    assert torch.equal(mask, keep)
    ev, em = oracle_pack(w, keep, n, m)
    assert torch.equal(values, ev)
    assert torch.equal(meta, em)  # bit for bit, unused high bits of the last byte 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("score_dtype", [None, torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_compress_dtypes_scores(dtype, score_dtype):
    n, m = 2, 4
    NO, K = 9, 44
    w = torch.randn(NO, K).to(dtype)
    scores = None if score_dtype is None else torch.randn(NO, K).to(score_dtype)
    values, meta, mask = run_compress(w, scores, n, m)
    keep = oracle_keep(w, n, m, scores)
    assert torch.equal(mask, keep)
    ev, em = oracle_pack(w, keep, n, m)
    assert values.dtype == dtype and torch.equal(values, ev)
    assert torch.equal(meta, em)


def test_compress_ties_and_nan():
    n, m = 2, 4
    w = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0, -2.0, 2.0, 0.0, 2.0],  # all tied -> 0, 1; |-2| ties 2 -> 4, 5
            [0.0, 0.0, 0.0, 0.0, 3.0, float("nan"), 1.0, float("nan")],  # zeros -> 0, 1; NaNs first
            [-0.0, 0.0, 5.0, -0.0, float("nan"), float("nan"), float("nan"), 1.0],  # three NaN: lowest two
        ]
    )
    values, meta, mask = run_compress(w, None, n, m)
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 1, 1, 0, 0],
            [1, 1, 0, 0, 0, 1, 0, 1],
            [1, 0, 1, 0, 1, 1, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    assert torch.equal(mask, oracle_keep(w, n, m))
    ev, em = oracle_pack(w, expected, n, m)
    assert torch.allclose(values, ev, equal_nan=True)
    assert torch.equal(meta, em)


def test_compress_mask_as_scores_pads_lowest_unkept():
    """The op layer hands a keep mask as scores 1 / 0: a group keeping fewer than n gets its
    lowest unkept positions, holding w's zeros there."""
    n, m = 2, 4
    keep_in = torch.tensor([[0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    w = torch.randn(1, 12) * keep_in
    values, meta, mask = run_compress(w, keep_in.to(torch.float32), n, m)
    assert mask.tolist() == [[True, False, True, False, True, True, False, False, True, True, False, False]]
    ev, em = oracle_pack(w, mask, n, m)
    assert torch.equal(values, ev) and torch.equal(meta, em)
    assert torch.equal(oracle_dense(values, meta, n, m, 12), w.to(torch.float64))


def test_compress_without_mask_out_and_odd_rows():
    n, m = 4, 8
    w = torch.randn(13, 24)
    values, meta, mask = run_compress(w, None, n, m, with_mask=False)
    assert mask is None
    ev, em = oracle_pack(w, oracle_keep(w, n, m), n, m)
    assert torch.equal(values, ev) and torch.equal(meta, em)


def test_compress_empty():
    for NO, K in ((0, 8), (3, 0)):
        values, meta, mask = run_compress(torch.randn(NO, K), None, 2, 4)
        assert values.shape == (NO, K // 2) and meta.shape == (NO, (K // 2 * 2 + 7) // 8)


@pytest.mark.parametrize(("n", "m"), PATTERNS, ids=PATTERN_IDS)
def test_compress_then_linear_round_trip(n, m):
    """The two launchers agree on the format: compress a weight, multiply with it."""
    w = torch.randn(6, 3 * m)
    values, meta, mask = run_compress(w, None, n, m)
    dense = w.to(torch.float64) * mask
    assert torch.equal(oracle_dense(values, meta, n, m, 3 * m), dense)
    x = torch.randn(2, 3 * m)
    assert_linear_close(run_linear(x, values, meta, None, n, m, None), expected_linear(x, dense, None), 3 * m)


def test_super_block_arithmetic():
    # (values per byte, groups, bytes) per super-block: whole groups filling whole bytes.
    assert _super_block(2, 4) == (4, 2, 1)
    assert _super_block(1, 4) == (4, 4, 1)
    assert _super_block(4, 8) == (2, 1, 2)
    assert _super_block(3, 4) == (4, 4, 3)
    assert _super_block(7, 8) == (2, 2, 7)
    assert _super_block(8, 16) == (2, 1, 4)
    for n, m in PATTERNS:
        vpb, gs, bs = _super_block(n, m)
        assert gs * n * meta_bits(m) == bs * 8


# --------------------------------------------------------------------------------------
# Compiled on a GPU (skipped here; scripts/gpu_check.sh runs them)


@pytest.mark.gpu
@pytest.mark.parametrize("R", [1, 3, 16, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8), (4, 8), (8, 16), (3, 4)], ids=str)
def test_gpu_linear(n, m, dtype, R):
    NO, K = 300, 64 * m + 3 * m
    values, meta, dense = random_nm(NO, K, n, m, dtype=dtype, seed=R)
    x = torch.randn(R, K).to(dtype)
    bias = torch.randn(NO).to(dtype)
    ref = expected_linear(x, dense, bias)
    for path in ("gather", "tile", None):
        out = run_linear(x.cuda(), values.cuda(), meta.cuda(), bias.cuda(), n, m, path)
        if dtype == torch.float32 or path == "gather":
            assert_linear_close(out, ref, K)
        else:  # tensor-core fp16 / bf16 operands: products exact, fp32 accumulation order differs
            torch.testing.assert_close(out.cpu().to(torch.float64), ref, rtol=2 * EPS[dtype], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "m"), PATTERNS, ids=PATTERN_IDS)
def test_gpu_compress(n, m):
    NO, K = 257, 97 * m
    w = torch.randn(NO, K).to(torch.bfloat16)
    w[0, :m] = float("nan")
    w[1, :m] = 1.0
    values, meta, mask = run_compress(w.cuda(), None, n, m)
    keep = oracle_keep(w, n, m)
    assert torch.equal(mask.cpu(), keep)
    ev, em = oracle_pack(w, keep, n, m)
    assert torch.equal(meta.cpu(), em)
    assert torch.allclose(values.cpu(), ev, equal_nan=True)
