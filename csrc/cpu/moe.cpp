// CPU forward of moe_mlp. The routing metadata (a stable counting sort of the T*k slots by
// expert) comes from route_metadata's CPU kernel (csrc/cpu/routing.cpp, one owner). The work
// is then cut into tiles of at most kTileRows rows of one expert, fixed by the routing alone
// (never by the thread count, so with two or more tiles results are bitwise identical for
// any thread count; a one-tile layer lets MKL thread its GEMMs, whose fp32 bits then depend
// on the thread count: MKL's torch.mm itself differs between 1 and 2 threads), and
// at::parallel_for runs the tiles. A tile: gather its token rows of x into a local buffer,
// GEMM1 through ATen's BLAS (at::mm_out on the buffer and the expert's w13 view; the BLAS runs
// single-threaded inside the parallel region, and threaded when the layer is one tile), the
// bias and activation on the tile at the accumulation dtype, writing the pre-activation rows
// the backward reads, GEMM2, then bias and routing weight into a [T*k, H] fp32 slot buffer.
// The combine sums each token's k slots in slot order at fp32 (fp64 for fp64): deterministic,
// no atomics. bf16 / fp16 GEMMs accumulate in fp32 inside the BLAS and round their outputs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "sparseops/moe.h"
#include "sparseops/moe_cpu.h"
#include "sparseops/routing.h"

namespace sparseops {
namespace {

using at::Tensor;

// Rows per tile: large enough for the BLAS to run near its peak on [rows, H] x [H, 2I],
// small enough that a few experts with many rows still spread over every thread.
constexpr int64_t kTileRows = 64;
// Routed rows up to which an expert takes the weight-stream kernel (csrc/cpu/moe_stream.cpp),
// on the HF layout and on packed copies (sparseops.prepack_moe_weights). The packed kernel is
// a 6 x 64 register tile over L1-sized K chunks: against the BLAS tiles on the full
// Qwen3-30B-A3B layer (1 thread CPU time, load 7-9, 2026-12-07) it took 447-485 vs 610-618 ms
// at T = 1024 bf16 (64 rows per expert), 905 vs 1325 ms fp32, 1949 vs 2459 ms at T = 4096
// bf16 (256 rows); beyond that x's rows, re-read per 64-column block, outgrow the caches.
constexpr int64_t kStreamRows = 48;
constexpr int64_t kPackedStreamRows = 256;

// kStreamRows / kPackedStreamRows, or SPARSEOPS_MOE_STREAM_ROWS for both (read once per
// process; 0 = BLAS tiles only): the tests send every expert down one path with it.
int64_t stream_rows(bool packed) {
  static const int64_t rows = [] {
    const char* v = std::getenv("SPARSEOPS_MOE_STREAM_ROWS");
    return v != nullptr && *v != '\0' ? std::max<int64_t>(0, std::atoll(v)) : int64_t(-1);
  }();
  return rows >= 0 ? rows : packed ? kPackedStreamRows : kStreamRows;
}

RouteMetadata route_meta(const Tensor& ids, int64_t E, int64_t n) {
  RouteMetadata meta;
  const auto iopts = ids.options();
  meta.counts = at::empty({E}, iopts);
  meta.offs = at::empty({E}, iopts);
  meta.sorted_slots = at::empty({n}, iopts);
  meta.inverse = at::empty({n}, iopts);
  meta.tokens = at::empty({n}, iopts);
  meta.padded_slots = at::empty({0}, iopts);
  meta.block_expert = at::empty({0}, iopts);
  meta.padded_offs = at::empty({0}, iopts);
  route_metadata_cpu_kernel(ids, E, 0, meta);
  return meta;
}

using moe_cpu::kVectorType;
using moe_cpu::use_avx512;

#if SPARSEOPS_MOE_AVX512_PATH
// dst[c] = (o[c] + bias[c]) * w (bias may be null), fp32 out.
template <typename scalar_t>
SPARSEOPS_MOE_AVX512 void scale_avx512(const scalar_t* o, const scalar_t* bias, float w, float* dst,
                                       int64_t n) {
  const __m512 wv = _mm512_set1_ps(w);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = lanes_below(n - c);
    __m512 v = load16(o + c, m);
    if (bias) v = _mm512_add_ps(v, load16(bias + c, m));
    _mm512_mask_storeu_ps(dst + c, m, _mm512_mul_ps(v, wv));
  }
}
#endif

// out[t] = sum over the kept slots j of token t of slot_buf[t*K + j], in slot order, at acc_t.
template <typename scalar_t, typename acc_t>
void combine_slots(const acc_t* sbp, const int32_t* idp, int64_t T, int64_t K, int64_t H,
                   scalar_t* yp) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * K));
  at::parallel_for(0, T, grain, [&](int64_t b, int64_t end) {
#if SPARSEOPS_MOE_AVX512_PATH
    if constexpr (kVectorType<scalar_t>) {
      if (use_avx512()) {
        for (int64_t t = b; t < end; ++t)
          moe_cpu::combine_row_avx512(sbp + t * K * H, idp + t * K, K, H, 0, H, yp + t * H);
        return;
      }
    }
#endif
    std::vector<acc_t> acc(H);
    for (int64_t t = b; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < K; ++j) {
        if (idp[t * K + j] < 0) continue;
        const acc_t* srow = sbp + (t * K + j) * H;
        for (int64_t c = 0; c < H; ++c) acc[c] += srow[c];
      }
      scalar_t* yrow = yp + t * H;
      for (int64_t c = 0; c < H; ++c) yrow[c] = scalar_t(acc[c]);
    }
  });
}

struct Tile {
  int64_t expert, begin, end;  // rows [begin, end) of the expert-sorted slots
};

template <typename scalar_t>
void moe_forward(const Tensor& x, const Tensor& w13, const Tensor& w2, const Tensor& weights,
                 const Tensor& ids, const Tensor& b13, const Tensor& b2, const MoeConfig& cfg,
                 Tensor& y, Tensor& pre) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = cfg.t, H = cfg.h, E = cfg.e, K = cfg.k, I = cfg.inter, P = cfg.p;
  const int64_t n = T * K;

  RouteMetadata meta = route_meta(ids, E, n);
  const int32_t* offs = meta.offs.data_ptr<int32_t>();
  const int32_t* sorted = meta.sorted_slots.data_ptr<int32_t>();

  // Experts with at most stream_rows() routed rows take the weight-stream kernel (a choice
  // made by the routing alone); the others are cut into BLAS tiles.
  const bool can_stream = moe_cpu::stream_supported(w13, w2);
  const int64_t max_stream_rows =
      stream_rows(can_stream && moe_cpu::pack_registered(w13) && moe_cpu::pack_registered(w2));
  std::vector<char> stream(E, 0);
  int64_t num_stream = 0;
  std::vector<Tile> tiles;
  int64_t start = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t end = offs[e];
    if (can_stream && end > start && end - start <= max_stream_rows) {
      stream[e] = 1;
      ++num_stream;
    } else {
      for (int64_t b = start; b < end; b += kTileRows) tiles.push_back({e, b, std::min(end, b + kTileRows)});
    }
    start = end;
  }
  const int64_t kept = start;

  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  Tensor slot_buf = at::empty({n, H}, x.options().dtype(acc_type));
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* wp = weights.data_ptr<acc_t>();
  const int32_t* idp = ids.data_ptr<int32_t>();
  scalar_t* prep = pre.data_ptr<scalar_t>();
  acc_t* sbp = slot_buf.data_ptr<acc_t>();
  const scalar_t* b13p = cfg.has_b13 ? b13.data_ptr<scalar_t>() : nullptr;
  const scalar_t* b2p = cfg.has_b2 ? b2.data_ptr<scalar_t>() : nullptr;
  const bool vec = kVectorType<scalar_t> && use_avx512();

  // Dropped slots: zero pre-activation rows (their slot-buffer rows are never read).
  for (int64_t r = kept; r < n; ++r) std::memset(prep + int64_t(sorted[r]) * P, 0, P * sizeof(scalar_t));

  auto run_tile = [&](const Tile& tile) {
    // The weights may require grad (the op's autograd wraps this kernel); the BLAS calls
    // below are plain kernels. GradMode is thread-local: set it on every worker thread.
    at::NoGradGuard no_grad;
    const int64_t m = tile.end - tile.begin;
    const int64_t e = tile.expert;
    Tensor xb = at::empty({m, H}, x.options());
    scalar_t* xbp = xb.data_ptr<scalar_t>();
    for (int64_t r = 0; r < m; ++r) {
      const int64_t tok = sorted[tile.begin + r] / K;
      std::memcpy(xbp + r * H, xp + tok * H, H * sizeof(scalar_t));
    }
    Tensor hb = at::empty({m, P}, x.options());
    at::mm_out(hb, xb, w13.select(0, e).t());
    Tensor ab = at::empty({m, I}, x.options());
    const scalar_t* hp = hb.data_ptr<scalar_t>();
    scalar_t* ap = ab.data_ptr<scalar_t>();
    const scalar_t* bias1 = b13p ? b13p + e * P : nullptr;
    for (int64_t r = 0; r < m; ++r) {
      const int64_t slot = sorted[tile.begin + r];
      const scalar_t* hrow = hp + r * P;
      scalar_t* prow = prep + slot * P;
      if (bias1) {
        for (int64_t c = 0; c < P; ++c) prow[c] = scalar_t(acc_t(hrow[c]) + acc_t(bias1[c]));
      } else {
        std::memcpy(prow, hrow, P * sizeof(scalar_t));
      }
      scalar_t* arow = ap + r * I;
      moe_cpu::activate_row(cfg, vec, prow, arow, 0, I);
    }
    Tensor ob = at::empty({m, H}, x.options());
    at::mm_out(ob, ab, w2.select(0, e).t());
    const scalar_t* op = ob.data_ptr<scalar_t>();
    const scalar_t* bias2 = b2p ? b2p + e * H : nullptr;
    for (int64_t r = 0; r < m; ++r) {
      const int64_t slot = sorted[tile.begin + r];
      const acc_t w = wp[slot];
      const scalar_t* orow = op + r * H;
      acc_t* srow = sbp + slot * H;
      if (vec) {
#if SPARSEOPS_MOE_AVX512_PATH
        if constexpr (kVectorType<scalar_t>) scale_avx512(orow, bias2, w, srow, H);
#endif
      } else if (bias2) {
        for (int64_t c = 0; c < H; ++c) srow[c] = (acc_t(orow[c]) + acc_t(bias2[c])) * w;
      } else {
        for (int64_t c = 0; c < H; ++c) srow[c] = acc_t(orow[c]) * w;
      }
    }
  };

  const int64_t num_tiles = static_cast<int64_t>(tiles.size());
  if (num_tiles == 1) {
    run_tile(tiles[0]);  // outside a parallel region: the BLAS threads the two GEMMs
  } else if (num_tiles > 1) {
    at::parallel_for(0, num_tiles, 1, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) run_tile(tiles[i]);
    });
  }

  if (num_stream > 0) {
    if constexpr (std::is_same_v<acc_t, float>) {  // stream_supported: never fp64
      const moe_cpu::StreamWork work{offs, sorted, stream.data(), num_stream};
      moe_cpu::moe_stream_forward(x, w13, w2, weights, ids, b13, b2, cfg, work, sbp, y, pre);
    }
  } else {
    combine_slots<scalar_t, acc_t>(sbp, idp, T, K, H, y.data_ptr<scalar_t>());
  }
}

template <typename scalar_t>
void moe_backward(const Tensor& dy, const Tensor& x, const Tensor& w13, const Tensor& w2,
                  const Tensor& weights, const Tensor& ids, const Tensor& pre, const Tensor& b13,
                  const Tensor& b2, const MoeConfig& cfg, Tensor& dx, Tensor& dw13, Tensor& dw2,
                  Tensor& dweights, Tensor& db13, Tensor& db2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = cfg.t, H = cfg.h, E = cfg.e, K = cfg.k, I = cfg.inter, P = cfg.p;
  const int64_t n = T * K;
  RouteMetadata meta = route_meta(ids, E, n);
  const int32_t* offs = meta.offs.data_ptr<int32_t>();
  const int32_t* sorted = meta.sorted_slots.data_ptr<int32_t>();
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e) {
    if (offs[e] > (e ? offs[e - 1] : 0)) {
      active.push_back(e);
    } else {  // the op layer leaves dw13 / dw2 uninitialised: a full-size memset costs
      dw13.select(0, e).zero_();  // as much as a pass over the weights
      dw2.select(0, e).zero_();
    }
  }

  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  Tensor dslot = at::empty({n, H}, x.options().dtype(acc_type));  // d x per slot
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* dyp = dy.data_ptr<scalar_t>();
  const scalar_t* prep = pre.data_ptr<scalar_t>();
  const acc_t* wp = weights.data_ptr<acc_t>();
  const int32_t* idp = ids.data_ptr<int32_t>();
  acc_t* dsp = dslot.data_ptr<acc_t>();
  acc_t* dwp = dweights.data_ptr<acc_t>();
  const scalar_t* b2p = cfg.has_b2 ? b2.data_ptr<scalar_t>() : nullptr;
  scalar_t* db13p = cfg.has_b13 ? db13.data_ptr<scalar_t>() : nullptr;
  scalar_t* db2p = cfg.has_b2 ? db2.data_ptr<scalar_t>() : nullptr;
  const acc_t alpha = acc_t(cfg.alpha), limit = acc_t(cfg.limit);
  const bool gated = moe_gated(cfg.act);
  const bool inter = cfg.interleaved;

  // One expert at a time per thread: its weight gradients are GEMMs over all its rows
  // (ragged K), written once, so no reduction across threads decides the order.
  auto run_expert = [&](int64_t e) {
    at::NoGradGuard no_grad;
    const int64_t begin = e ? offs[e - 1] : 0, m = offs[e] - begin;
    const auto opts = x.options();
    Tensor xb = at::empty({m, H}, opts), dyb = at::empty({m, H}, opts);
    Tensor ab = at::empty({m, I}, opts);
    scalar_t* xbp = xb.data_ptr<scalar_t>();
    scalar_t* dybp = dyb.data_ptr<scalar_t>();
    scalar_t* ap = ab.data_ptr<scalar_t>();
    for (int64_t r = 0; r < m; ++r) {
      const int64_t slot = sorted[begin + r], tok = slot / K;
      std::memcpy(xbp + r * H, xp + tok * H, H * sizeof(scalar_t));
      std::memcpy(dybp + r * H, dyp + tok * H, H * sizeof(scalar_t));
      const scalar_t* prow = prep + slot * P;
      scalar_t* arow = ap + r * I;
      moe_cpu::activate_row(cfg, false, prow, arow, 0, I);
    }
    // g = dy @ w2[e] (unweighted, [m, I]) gives both the routing-weight gradient
    // d weights = <dy, act @ w2[e].T + b2> = <g, act> + <dy, b2> and d act = w * g, so the
    // expert output is never recomputed: four GEMMs per expert, as many as autograd runs.
    const Tensor w2e = w2.select(0, e);
    Tensor gb = at::mm(dyb, w2e);
    const scalar_t* gp = gb.data_ptr<scalar_t>();
    const scalar_t* bias2 = b2p ? b2p + e * H : nullptr;
    std::vector<acc_t> dbias2(b2p ? H : 0, acc_t(0));
    Tensor dab = at::empty({m, I}, opts);  // d act
    scalar_t* dapw = dab.data_ptr<scalar_t>();
    for (int64_t r = 0; r < m; ++r) {
      const int64_t slot = sorted[begin + r];
      const acc_t w = wp[slot];
      const scalar_t* grow = gp + r * I;
      const scalar_t* arow = ap + r * I;
      scalar_t* darow = dapw + r * I;
      acc_t dot = 0;
      for (int64_t c = 0; c < I; ++c) {
        const acc_t g = acc_t(grow[c]);
        dot += g * acc_t(arow[c]);
        darow[c] = scalar_t(g * w);
      }
      scalar_t* drow = dybp + r * H;
      for (int64_t c = 0; c < H; ++c) {
        const acc_t g = acc_t(drow[c]);
        if (bias2) dot += g * acc_t(bias2[c]);
        const acc_t d = g * w;
        if (bias2) dbias2[c] += d;
        drow[c] = scalar_t(d);  // dyb now holds d out
      }
      dwp[slot] = dot;
    }
    if (bias2)
      for (int64_t c = 0; c < H; ++c) db2p[e * H + c] = scalar_t(dbias2[c]);
    Tensor dw2e = dw2.select(0, e);
    at::mm_out(dw2e, dyb.t(), ab);
    const scalar_t* dap = dab.data_ptr<scalar_t>();
    Tensor dpre = at::empty({m, P}, opts);
    scalar_t* dpp = dpre.data_ptr<scalar_t>();
    std::vector<acc_t> dbias1(db13p ? P : 0, acc_t(0));
    for (int64_t r = 0; r < m; ++r) {
      const int64_t slot = sorted[begin + r];
      const scalar_t* prow = prep + slot * P;
      const scalar_t* darow = dap + r * I;
      scalar_t* dprow = dpp + r * P;
      if (gated) {
        for (int64_t c = 0; c < I; ++c) {
          const int64_t gi = inter ? 2 * c : c, ui = inter ? 2 * c + 1 : I + c;
          acc_t dg, du;
          dact_gated<acc_t>(cfg.act, acc_t(prow[gi]), acc_t(prow[ui]), acc_t(darow[c]), alpha, limit, dg, du);
          dprow[gi] = scalar_t(dg);
          dprow[ui] = scalar_t(du);
        }
      } else {
        for (int64_t c = 0; c < I; ++c)
          dprow[c] = scalar_t(acc_t(darow[c]) * dact_plain<acc_t>(cfg.act, acc_t(prow[c])));
      }
      if (db13p)
        for (int64_t c = 0; c < P; ++c) dbias1[c] += acc_t(dprow[c]);
    }
    if (db13p)
      for (int64_t c = 0; c < P; ++c) db13p[e * P + c] = scalar_t(dbias1[c]);
    Tensor dw13e = dw13.select(0, e);
    at::mm_out(dw13e, dpre.t(), xb);
    Tensor dxb = at::mm(dpre, w13.select(0, e));  // [m, H]
    const scalar_t* dxp = dxb.data_ptr<scalar_t>();
    for (int64_t r = 0; r < m; ++r) {
      const int64_t slot = sorted[begin + r];
      acc_t* srow = dsp + slot * H;
      const scalar_t* drow = dxp + r * H;
      for (int64_t c = 0; c < H; ++c) srow[c] = acc_t(drow[c]);
    }
  };

  const int64_t na = static_cast<int64_t>(active.size());
  if (na == 1) {
    run_expert(active[0]);  // the BLAS threads the GEMMs
  } else if (na > 1) {
    at::parallel_for(0, na, 1, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) run_expert(active[i]);
    });
  }
  combine_slots<scalar_t, acc_t>(dsp, idp, T, K, H, dx.data_ptr<scalar_t>());
}

}  // namespace

void moe_mlp_cpu_kernel(const Tensor& x, const Tensor& w13, const Tensor& w2,
                        const Tensor& weights, const Tensor& ids, const Tensor& b13,
                        const Tensor& b2, const MoeConfig& cfg, Tensor& y, Tensor& pre) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_mlp_cpu", [&] {
    moe_forward<scalar_t>(x, w13, w2, weights, ids, b13, b2, cfg, y, pre);
  });
}

void moe_mlp_backward_cpu_kernel(const Tensor& dy, const Tensor& x, const Tensor& w13,
                                 const Tensor& w2, const Tensor& weights, const Tensor& ids,
                                 const Tensor& pre, const Tensor& b13, const Tensor& b2,
                                 const MoeConfig& cfg, Tensor& dx, Tensor& dw13, Tensor& dw2,
                                 Tensor& dweights, Tensor& db13, Tensor& db2) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_mlp_cpu_bwd", [&] {
    moe_backward<scalar_t>(dy, x, w13, w2, weights, ids, pre, b13, b2, cfg, dx, dw13, dw2,
                           dweights, db13, db2);
  });
}

}  // namespace sparseops
