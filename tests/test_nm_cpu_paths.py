"""The CPU N:M kernel's batch paths and its vectorised prune, against the reference.

csrc/cpu/nm_sparse.cpp runs nm_linear by the rows R of x: x gathered by the kept columns (R = 1,
fp32 / bf16, m / n in {2, 4, 8}, AVX-512 VBMI), weight rows expanded in registers (R = 1 otherwise,
and every R for the generic decodes 3:4 / 15:16 below the tables), weight rows in lanes (bf16 2:4 /
1:4 / 2:8 with avx512_bf16, fp32 n:m with m in {4, 8}, n in {1, 2, 4}; from R = 4, fp32 2:4 and 4:8
from R = 16; 16 weight rows per vector, the x values they keep picked by vpshufb / vpermilps /
vpermps; blocks of 64 steps, 16 (R <= 8: 8, R <= 4: 4) rows of x at a time; bf16 1:4 needs an even
group count), register blocks of 3 weight rows x 8 rows of x (the other fp32 2 <= R < 64, bf16 with
avx512_bf16 2 <= R < 48; x split into column blocks where it outgrows 256 KB), x laid out in fp32
column tables with sparse arithmetic (fp16, 12 <= R < 64), decompressed tiles through BLAS
(R >= 64; 16-bit tiles through oneDNN from 8 rows for fp16 and from 48 rows for the other bf16
patterns). These tests pin each path at the batch sizes around
the crossovers, at widths that cross the tables' column chunks (2048), the register blocks'
column blocks and partial 16 / 32-column chunks, odd group counts, bias, non-contiguous x,
bit-identical results for 1 and 2 threads, and (register blocks) a row's bits independent of
the batch it is in. The prune (nm_compress(prune=True) / nm_mask) takes a vectorised path for
|w| and fp32 / bf16 / fp16 scores (16-bit weights by |w|: 32 columns per step): ties, NaN,
infinities, signed zeros and negative scores against the reference.
"""

import pytest
import torch

import sparseops
from sparseops.reference import nm_sparse as ref
from sparseops.testing import nm_weight

pytestmark = pytest.mark.skipif(not sparseops.build_info()["extension"], reason="needs the C++ extension")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# byte-table decodes (every pattern with 8 % (n * bits) == 0 or (n * bits) % 8 == 0) and the
# generic decode (3:4, 15:16: the expand path below the tiles)
PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8), (1, 8), (1, 2), (8, 16), (3, 4), (15, 16)]


def _x(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _check(x, nmw, bias, dense):
    """Error vs fp64 at most 2x torch's own F.linear error in that dtype plus a few fp32 ulps
    of the row norms (the rule of tests/test_nm_sparse.py)."""
    y = sparseops.nm_linear(x, nmw, bias, backend="cpu")
    assert y.dtype == x.dtype and y.shape == (x.shape[0], nmw.shape[0])
    b64 = None if bias is None else bias.double()
    exact = torch.nn.functional.linear(x.double(), dense.double(), b64)
    own = torch.nn.functional.linear(x, dense, bias).double()
    own_err = (own - exact).abs().max().item()
    floor = 1e-5 * (1 + (x.double().abs() @ dense.double().abs().T).max().item())
    err = (y.double() - exact).abs().max().item()
    assert err <= 2 * own_err + floor, (err, own_err, floor)
    return y


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_table_path_patterns(n, m, dtype):
    # in: 5 or 7 groups past a multiple of 32 (partial chunks, an odd number of groups)
    k = 32 * m + (5 if m < 16 else 1) * m
    dense, nmw = nm_weight(37, k, n, m, dtype=dtype, seed=n + m)
    for R in (3, 11, 12, 16, 17, 40, 63, 64):
        _check(_x(R, k, dtype=dtype, seed=R), nmw, None, dense)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 8), (8, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_path_wide_rows_and_bias(n, m, dtype):
    # wider than two 2048-column chunks, with a partial third
    k = 2 * 2048 + 8 * m
    dense, nmw = nm_weight(19, k, n, m, dtype=dtype, seed=3)
    bias = _x(19, dtype=dtype, seed=4)
    for R in (1, 8, 16, 33):
        _check(_x(R, k, dtype=dtype, seed=R), nmw, bias, dense)


# every pattern the register blocks take (the byte-table decodes)
REG_PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8), (1, 8), (1, 2), (8, 16), (1, 16), (6, 8)]
# R = 1..20, then around the block edges (8), the bf16 tiles (48) and the fp32 tiles (64), up to 130
REG_ROWS = [*range(1, 21), 23, 31, 33, 47, 48, 49, 63, 64, 65, 96, 127, 128, 129, 130]


@pytest.mark.parametrize("n,m", REG_PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_register_blocks_every_batch(n, m, dtype):
    # out = 3 * 9 + 2 (a block of one weight row at the end), in: a partial 32-column chunk
    k = 32 * m + (3 if m < 16 else 1) * m
    dense, nmw = nm_weight(29, k, n, m, dtype=dtype, seed=n * m)
    bias = _x(29, dtype=dtype, seed=7)
    x = _x(max(REG_ROWS), k, dtype=dtype, seed=m)
    for R in REG_ROWS:
        _check(x[:R], nmw, bias if R % 2 else None, dense)


# batch 1 with avx512_vbmi (fp32; bf16 with avx512_bf16): x gathered by the kept columns in
# blocks of 16 fp32 / 32 bf16 kept values, for m / n in {2, 4, 8}; the other patterns (3:4, 6:8,
# 1:16, 15:16) and fp16 keep the expand path
BATCH1_PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8), (1, 8), (1, 2), (8, 16), (4, 16), (2, 16), (1, 16), (3, 4), (6, 8)]


@pytest.mark.parametrize("n,m", BATCH1_PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch1_every_pattern(n, m, dtype):
    # kept per row = 4 blocks (the unrolled loop) + 0..3 whole blocks + a partial block of every
    # size class; out 1 (no neighbouring row to read into), 7, 97 (threads' row blocks)
    lanes = 16 if dtype == torch.float32 else 32
    for extra in (0, 1, n, lanes - n, 2 * lanes + 3 * n):
        groups = (4 * lanes + extra) // n + 1
        k = groups * m
        for out in (1, 7, 97):
            dense, nmw = nm_weight(out, k, n, m, dtype=dtype, seed=out + extra)
            bias = _x(out, dtype=dtype, seed=extra) if out != 7 else None
            _check(_x(1, k, dtype=dtype, seed=k), nmw, bias, dense)
    # a single group (kept < one block)
    dense, nmw = nm_weight(5, m, n, m, dtype=dtype, seed=1)
    _check(_x(1, m, dtype=dtype, seed=2), nmw, None, dense)


@pytest.mark.parametrize("n,m,k", [(2, 4, 4104), (1, 4, 1208), (2, 8, 4160)])
def test_batch1_row_pairs_same_bits_as_single_rows(n, m, k):
    """fp32 batch 1 runs weight rows in pairs where x is wide (> 16 KB) or a block permutes from
    4+ x registers: every row's bits equal those of the row alone (a 1-row weight)."""
    dense, nmw = nm_weight(9, k, n, m, dtype=torch.float32, seed=k)
    x = _x(1, k, seed=n)
    y = sparseops.nm_linear(x, nmw, backend="cpu")
    _check(x, nmw, None, dense)
    for i in range(9):
        row = sparseops.nm_compress(dense[i : i + 1], n, m)
        assert torch.equal(sparseops.nm_linear(x, row, backend="cpu")[0, 0], y[0, i]), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch1_noncontiguous_zeros_and_threads(dtype):
    k = 8 * 151  # an odd number of groups of every m
    for n, m in [(2, 4), (1, 4), (2, 8), (1, 8)]:
        dense, nmw = nm_weight(203, k, n, m, dtype=dtype, seed=m)
        dense[3] = 0  # a zero weight row
        dense[5, : 16 * m] = 0  # explicit zeros (groups keeping fewer than n non-zeros)
        nmw = sparseops.nm_compress(dense, n, m)
        bias = _x(203, dtype=dtype, seed=n)
        base = _x(k, 3, dtype=dtype, seed=m)
        x = base.T[1:2]  # [1, k], stride (1, 3)
        assert not x.is_contiguous()
        outs = []
        prev = torch.get_num_threads()
        try:
            for t in (1, 2):
                torch.set_num_threads(t)
                outs.append(_check(x, nmw, bias, dense))
        finally:
            torch.set_num_threads(prev)
        assert torch.equal(outs[0], outs[1]), (n, m)
        assert (outs[0][:, 3] == bias[3]).all()
        assert torch.equal(outs[0], sparseops.nm_linear(x.contiguous(), nmw, bias, backend="cpu"))
        # leading dims: [1, 1, k] and a 1-D x
        assert torch.equal(sparseops.nm_linear(x[None], nmw, bias, backend="cpu")[0], outs[0])
        assert torch.equal(sparseops.nm_linear(x[0], nmw, bias, backend="cpu"), outs[0][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_register_blocks_column_blocks(dtype):
    # x of R rows outgrows 256 KB: the columns are split into blocks and the partial sums wait
    # in the thread's buffer (in = 4104: several blocks and a partial last chunk)
    k = 4096 + 8
    for n, m in [(2, 4), (1, 8)]:
        dense, nmw = nm_weight(31, k, n, m, dtype=dtype, seed=m)
        for R in (40, 47, 63, 100):
            _check(_x(R, k, dtype=dtype, seed=R), nmw, _x(31, dtype=dtype, seed=2), dense)


@pytest.mark.parametrize(
    "dtype,n,m,slices",
    [
        (torch.float32, 1, 2, [(0, 2), (5, 8), (13, 30), (30, 47)]),  # register blocks
        (torch.float32, 2, 4, [(0, 16), (5, 21), (13, 30), (30, 47)]),  # weight rows in lanes
        (torch.bfloat16, 1, 4, [(0, 2), (5, 8), (13, 30), (30, 47)]),  # register blocks
        (torch.bfloat16, 2, 4, [(0, 12), (3, 16), (13, 30), (20, 47)]),  # weight rows in lanes
    ],
)
def test_rows_independent_of_batch(dtype, n, m, slices):
    # Per (weight row, x row) accumulators fed in column order: a row's bits do not depend on
    # the other rows, the block shapes or the column blocks (within one path)
    k = 4096 + 68
    _, nmw = nm_weight(11, k, n, m, dtype=dtype, seed=1)
    x = _x(47, k, dtype=dtype, seed=3)  # below the tiles of both dtypes
    full = sparseops.nm_linear(x, nmw, backend="cpu")
    for r0, r1 in slices:
        assert torch.equal(sparseops.nm_linear(x[r0:r1], nmw, backend="cpu"), full[r0:r1]), (r0, r1)


LANE_SHAPES = [(600, 8 * 151, 21), (37, 8 * (64 + 37), 150), (16, 64, 12), (40, 8 * 70, 5), (17, 64, 4)]
LANE_CASES = (
    [(torch.bfloat16, 2, 4, 600, 4 * 301, 21)]
    + [(torch.bfloat16, n, m, *shape) for n, m in [(2, 4), (1, 4), (2, 8)] for shape in LANE_SHAPES]
    + [(torch.float32, n, m, *shape) for n, m in [(1, 4), (2, 8), (1, 8)] for shape in LANE_SHAPES[:4]]
    + [(torch.float32, n, m, *shape) for n, m in [(2, 4), (4, 8)] for shape in [*LANE_SHAPES[:2], (16, 64, 16)]]
)


@pytest.mark.parametrize("dtype,n,m,out_features,k,R", LANE_CASES)
def test_lanes_threads_ties_and_zeros(dtype, n, m, out_features, k, R):
    # weight rows in lanes (bf16 2:4 / 1:4 / 2:8, fp32 m in {4, 8}): partial 16-row weight blocks,
    # several 64-step column blocks with a short last one (2:4: an odd group count), rows of x past
    # a multiple of 16 and past a 128-row pass, register blocks of 4, 8 and 16 rows of x, over 1
    # and 2 threads; explicit zeros (a group keeping fewer than n non-zeros stores zeros at its
    # lowest unkept positions), a zero weight row, a zero x row, an inf in x where no weight row
    # keeps a value; a row's bits do not depend on the batch
    lanes_from = 16 if dtype == torch.float32 and 2 * n == m else 4
    dense, nmw = nm_weight(out_features, k, n, m, dtype=dtype, seed=8)
    dense[7 % out_features] = 0
    dense[9 % out_features, :40] = 0
    dense[11 % out_features, 1::4] = 0
    dense[:, 2] = 0
    nmw = sparseops.nm_compress(dense, n, m)
    x = _x(R, k, dtype=dtype, seed=9)
    x[min(4, R - 1)] = 0
    bias = _x(out_features, dtype=dtype, seed=10)
    prev = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(_check(x, nmw, bias, dense))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(outs[0], outs[1])
    assert (outs[0][:, 7 % out_features] == bias[7 % out_features]).all() and (outs[0][min(4, R - 1)] == bias).all()
    slices = [(0, R - 1), (1, R), (R - lanes_from, R), (0, min(R, 12))]
    for r0, r1 in [(r0, r1) for r0, r1 in slices if r1 - r0 >= lanes_from]:  # the lanes too
        assert torch.equal(sparseops.nm_linear(x[r0:r1], nmw, bias, backend="cpu"), outs[0][r0:r1]), (r0, r1)
    if not nmw.mask()[:, 2].any():  # column 2 is zero in every row; kept only where a group is all zero
        x[1, 2] = float("inf")  # never multiplied: the same bits
        assert torch.equal(sparseops.nm_linear(x, nmw, bias, backend="cpu"), outs[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_register_blocks_noncontiguous_x(dtype):
    dense, nmw = nm_weight(13, 200, 2, 4, dtype=dtype, seed=4)
    base = _x(200, 16 * 3, dtype=dtype, seed=5)
    x = base.T[::3]  # [16, 200], strides (3, 48)
    assert not x.is_contiguous()
    y = _check(x, nmw, None, dense)
    assert torch.equal(y, sparseops.nm_linear(x.contiguous(), nmw, backend="cpu"))
    x3 = _x(2, 5, 200, dtype=dtype, seed=6).transpose(0, 1)  # leading dims, non-contiguous
    y3 = sparseops.nm_linear(x3, nmw, backend="cpu")
    assert y3.shape == (5, 2, 13)
    assert torch.equal(y3, sparseops.nm_linear(x3.contiguous(), nmw, backend="cpu"))


def test_table_path_zero_and_odd_values():
    # Explicit zeros (short groups), a weight row of zeros, and x with a zero row
    dense, nmw = nm_weight(9, 96, 2, 4, dtype=torch.bfloat16, seed=5)
    dense[3] = 0
    dense[4, :8] = 0
    nmw = sparseops.nm_compress(dense, 2, 4)
    x = _x(12, 96, dtype=torch.bfloat16, seed=6)
    x[5] = 0
    y = _check(x, nmw, None, dense)
    assert (y[:, 3] == 0).all() and (y[5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitwise_independent_of_threads(dtype):
    prev = torch.get_num_threads()
    try:
        for n, m in [(2, 4), (1, 4), (2, 8), (8, 16)]:
            _, nmw = nm_weight(203, 2048 + 256, n, m, dtype=dtype, seed=m)
            for R in (1, 4, 12, 16, 23, 64):
                x = _x(R, 2048 + 256, dtype=dtype, seed=R)
                outs = []
                for t in (1, 2):
                    torch.set_num_threads(t)
                    outs.append(sparseops.nm_linear(x, nmw, backend="cpu"))
                assert torch.equal(outs[0], outs[1]), (n, m, R, dtype)
    finally:
        torch.set_num_threads(prev)


# ---------------------------------------------------------------------------------------------
# vectorised prune


def _special(out, k, dtype, seed):
    w = _x(out, k, dtype=dtype, seed=seed)
    w[0, :8] = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, -2.0, -2.0, 2.0])  # ties of |w|
    w[1, :4] = torch.tensor([0.0, -0.0, 0.0, -0.0])
    w[2, :4] = torch.tensor([float("inf"), float("nan"), -float("inf"), float("nan")])
    w[3] = w[3].round()  # many ties everywhere
    return w


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("last", ["one-group", "all-but-one-group"])
def test_prune_special_values(n, m, dtype, last):
    # The row's last 16-column step holds m columns, or 16 - m (more than 8 columns for m <= 4:
    # both halves of the 8-column meta tables; m = 16 gets a full step).
    k = 3 * 16 + (m if last == "one-group" else 16 - m)
    w = _special(6, max(k, 16), dtype, seed=n * m)
    k = w.shape[1]
    scores_f = _x(6, k, seed=9)  # negative scores too
    scores_f[0, :4] = torch.tensor([-0.0, 0.0, -1.0, float("nan")])
    scores_f[1, :4] = torch.tensor([-float("inf"), -3.0, -3.0, -0.5])
    for s in (None, scores_f, scores_f.to(torch.bfloat16), scores_f.to(torch.float16), scores_f.double()):
        want_mask = ref.nm_mask_ref(w, n, m, scores=s)
        values, meta, _ = ref.nm_compress_ref(w, n, m, mask=want_mask)
        got = sparseops.nm_compress(w, n, m, prune=True, scores=s, backend="cpu")
        assert torch.equal(got.values.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           values.view(torch.int16 if dtype != torch.float32 else torch.int32))  # fmt: skip
        assert torch.equal(got.meta, meta)
        assert torch.equal(sparseops.nm_mask(w, n, m, scores=s, backend="cpu"), want_mask)


def test_prune_large_rows_match_reference():
    w = _x(33, 4096 + 48, dtype=torch.bfloat16, seed=11)
    for n, m in [(2, 4), (1, 4), (2, 8), (4, 16)]:
        want_mask = ref.nm_mask_ref(w, n, m)
        got = sparseops.nm_compress(w, n, m, prune=True, backend="cpu")
        values, meta, _ = ref.nm_compress_ref(w, n, m, mask=want_mask)
        assert torch.equal(got.values, values) and torch.equal(got.meta, meta)
