// CPU forward of moe_mlp. The routing metadata (a stable counting sort of the T*k slots by
// expert) comes from route_metadata's CPU kernel (csrc/cpu/routing.cpp, one owner). The work
// is then cut into tiles of at most kTileRows rows of one expert, fixed by the routing alone
// (never by the thread count, so results are bitwise identical for any thread count), and
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
#include <cstring>
#include <vector>

#include "sparseops/moe.h"
#include "sparseops/routing.h"

namespace sparseops {
namespace {

using at::Tensor;

// Rows per tile: large enough for the BLAS to run near its peak on [rows, H] x [H, 2I],
// small enough that a few experts with many rows still spread over every thread.
constexpr int64_t kTileRows = 64;

template <typename acc_t>
inline acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + std::exp(-v));
}

template <typename acc_t>
inline acc_t act_plain(MoeActivation a, acc_t v) {
  switch (a) {
    case MoeActivation::kSilu:
      return v * sigmoid(v);
    case MoeActivation::kGelu:
      return acc_t(0.5) * v * (acc_t(1) + std::erf(v * acc_t(M_SQRT1_2)));
    case MoeActivation::kGeluTanh: {
      const acc_t kBeta = acc_t(M_SQRT2 * M_2_SQRTPI * 0.5);  // sqrt(2 / pi)
      return acc_t(0.5) * v * (acc_t(1) + std::tanh(kBeta * (v + acc_t(0.044715) * v * v * v)));
    }
    case MoeActivation::kRelu:
      return v > acc_t(0) ? v : acc_t(0);
    case MoeActivation::kRelu2:
      return v > acc_t(0) ? v * v : acc_t(0);
    default:
      return v;
  }
}

template <typename acc_t>
inline acc_t act_gated(MoeActivation a, acc_t g, acc_t u, acc_t alpha, acc_t limit) {
  switch (a) {
    case MoeActivation::kSwiglu:
      return act_plain(MoeActivation::kSilu, g) * u;
    case MoeActivation::kGeglu:
      return act_plain(MoeActivation::kGelu, g) * u;
    case MoeActivation::kGegluTanh:
      return act_plain(MoeActivation::kGeluTanh, g) * u;
    case MoeActivation::kReglu:
      return act_plain(MoeActivation::kRelu, g) * u;
    case MoeActivation::kSwigluOai: {
      g = std::min(g, limit);
      u = std::max(std::min(u, limit), -limit);
      return (u + acc_t(1)) * (g * sigmoid(g * alpha));
    }
    default:
      return g * u;
  }
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
  const int32_t* offs = meta.offs.data_ptr<int32_t>();
  const int32_t* sorted = meta.sorted_slots.data_ptr<int32_t>();

  std::vector<Tile> tiles;
  int64_t start = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t end = offs[e];
    for (int64_t b = start; b < end; b += kTileRows) tiles.push_back({e, b, std::min(end, b + kTileRows)});
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
  const acc_t alpha = acc_t(cfg.alpha), limit = acc_t(cfg.limit);
  const bool gated = moe_gated(cfg.act);
  const bool inter = cfg.interleaved;

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
      if (gated) {
        for (int64_t c = 0; c < I; ++c) {
          const int64_t gi = inter ? 2 * c : c, ui = inter ? 2 * c + 1 : I + c;
          arow[c] = scalar_t(act_gated<acc_t>(cfg.act, acc_t(prow[gi]), acc_t(prow[ui]), alpha, limit));
        }
      } else {
        for (int64_t c = 0; c < I; ++c) arow[c] = scalar_t(act_plain<acc_t>(cfg.act, acc_t(prow[c])));
      }
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
      if (bias2) {
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

  // Combine: y[t] = sum over the kept slots j of token t, in slot order, at acc_t.
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * K));
  at::parallel_for(0, T, grain, [&](int64_t b, int64_t end) {
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

}  // namespace

void moe_mlp_cpu_kernel(const Tensor& x, const Tensor& w13, const Tensor& w2,
                        const Tensor& weights, const Tensor& ids, const Tensor& b13,
                        const Tensor& b2, const MoeConfig& cfg, Tensor& y, Tensor& pre) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_mlp_cpu", [&] {
    moe_forward<scalar_t>(x, w13, w2, weights, ids, b13, b2, cfg, y, pre);
  });
}

}  // namespace sparseops
