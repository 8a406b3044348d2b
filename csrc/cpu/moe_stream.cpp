// The weight-stream forward of moe_mlp on CPU: the path of experts with few routed rows
// (decode and small prefill), where the layer is a stream of the touched experts' weights and
// a BLAS call per expert tile would pay for packing and threading on a few rows.
//
// Both GEMMs are dot products along a weight row: w13[e] is [P, H] and w2[e] is [H, I] with
// unit inner stride (HF's layout, read as it is: no packed copy to cache or invalidate), so
// each output element h[t, p] = <x[t], w13[e, p]> reads one weight row once for all of the
// expert's rows. Four weight rows stream at a time; for each 64-byte chunk of them the
// expert's token rows (up to six per pass, from L1) are multiplied in (no software prefetch:
// a stand-alone stream of 75 MB, Qwen3-30B-A3B's decode, read 5.3-5.4 GB/s with prefetches
// 1 KB ahead against 5.9-6.4 GB/s without, one thread of the shared 2-core EPYC at load 17): bf16
// with vdpbf16ps (AVX512_BF16: pairs of bf16 products summed into fp32 lanes, bf16 subnormals read
// as zero, as oneDNN's bf16 GEMM), fp32 and fp16 (and bf16 without AVX512_BF16) with FMA at fp32.
// Every output element is one accumulator summed chunk by chunk in order and reduced once,
// whatever the number of tokens it was computed beside: the bits of a token's output do not
// depend on the thread count, on which other tokens share its expert, or on the batch.
//
// The threads split the columns, not the experts: in GEMM1 thread j owns the intermediate
// columns [c0, c1) of every stream expert (gate and up rows of those columns, so it applies
// the bias and activation itself), in GEMM2 the hidden columns [h0, h1) of every stream
// expert, and then it sums those columns of every token's k slots (the combine, slot order at
// fp32). Each thread thus reads the same share of every expert's bytes: with k = 8 of 128
// experts touched at decode, a split over experts could not balance 8 experts over the
// threads, and with skewed routing it would balance rows, not bytes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "sparseops/moe_cpu.h"

namespace sparseops {
namespace moe_cpu {

Isa isa() {
#if SPARSEOPS_MOE_AVX512_PATH
  static const Isa level = [] {
    auto set = [](const char* name) {
      const char* v = std::getenv(name);
      return v != nullptr && *v != '\0' && *v != '0';
    };
    if (!cpu_avx512_enabled() || !__builtin_cpu_supports("bmi") || !__builtin_cpu_supports("bmi2"))
      return Isa::kPortable;
    if (!set("SPARSEOPS_CPU_NO_AVX512BF16") && __builtin_cpu_supports("avx512bf16"))
      return Isa::kAvx512Bf16;
    return Isa::kAvx512;
  }();
  return level;
#else
  return Isa::kPortable;
#endif
}

bool stream_supported(const at::Tensor& w13, const at::Tensor& w2) {
  const auto dt = w13.scalar_type();
  return use_avx512() && (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf) &&
         w13.stride(2) == 1 && w2.stride(2) == 1;
}

#if SPARSEOPS_MOE_AVX512_PATH
namespace {

constexpr int kRows = 4;    // weight rows streamed together
constexpr int kMaxTok = 6;  // token rows per pass over them (4 x 6 accumulators)

// out[t][r] = <x[t], w[r]> over K elements, bf16 pairs with vdpbf16ps.
template <int NT>
SPARSEOPS_MOE_AVX512BF16 void dot4_bf16(const c10::BFloat16* const* w,
                                        const c10::BFloat16* const* x, int64_t K,
                                        float (*out)[kRows]) {
  __m512 acc[NT][kRows];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) acc[t][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[kRows];
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) wv[r] = _mm512_loadu_si512(w[r] + k);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m512i xv = _mm512_loadu_si512(x[t] + k);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r)
        acc[t][r] = _mm512_dpbf16_ps(acc[t][r], (__m512bh)xv, (__m512bh)wv[r]);
    }
  }
  if (k < K) {
    const __mmask32 m = static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512i wv[kRows];
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) wv[r] = _mm512_maskz_loadu_epi16(m, w[r] + k);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m512i xv = _mm512_maskz_loadu_epi16(m, x[t] + k);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r)
        acc[t][r] = _mm512_dpbf16_ps(acc[t][r], (__m512bh)xv, (__m512bh)wv[r]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) out[t][r] = _mm512_reduce_add_ps(acc[t][r]);
}

// The same with fp32 FMA, 16 elements per step, inputs widened to fp32 as they are loaded.
template <typename T, int NT>
SPARSEOPS_MOE_AVX512 void dot4_fma(const T* const* w, const T* const* x, int64_t K,
                                   float (*out)[kRows]) {
  __m512 acc[NT][kRows];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = lanes_below(K - k);
    __m512 wv[kRows];
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) wv[r] = load16(w[r] + k, m);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m512 xv = load16(x[t] + k, m);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) out[t][r] = _mm512_reduce_add_ps(acc[t][r]);
}

template <typename scalar_t, int NT>
inline void dot4(bool bf16dp, const scalar_t* const* w, const scalar_t* const* x, int64_t K,
                 float (*out)[kRows]) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (bf16dp) return dot4_bf16<NT>(w, x, K, out);
  }
  dot4_fma<scalar_t, NT>(w, x, K, out);
}

// out[t][r] = <x[t], w[r]> for nt <= kMaxTok token rows.
template <typename scalar_t>
void dot4_tokens(bool bf16dp, const scalar_t* const* w, const scalar_t* const* x, int nt, int64_t K,
                 float (*out)[kRows]) {
  switch (nt) {
    case 1:
      return dot4<scalar_t, 1>(bf16dp, w, x, K, out);
    case 2:
      return dot4<scalar_t, 2>(bf16dp, w, x, K, out);
    case 3:
      return dot4<scalar_t, 3>(bf16dp, w, x, K, out);
    case 4:
      return dot4<scalar_t, 4>(bf16dp, w, x, K, out);
    case 5:
      return dot4<scalar_t, 5>(bf16dp, w, x, K, out);
    default:
      return dot4<scalar_t, kMaxTok>(bf16dp, w, x, K, out);
  }
}

// v rounded to scalar_t and back: the GEMM outputs are rounded where a BLAS call in x's dtype
// (the tile path, and transformers' layer) rounds them, so the two CPU paths differ only in
// the order of the sums inside each dot product (keeping them at fp32 moved 2 % of a tiny bf16
// Qwen3-MoE's logits past the 0.05 of tests/test_moe_transformers.py).
template <typename scalar_t>
inline float round_to(float v) {
  return static_cast<float>(static_cast<scalar_t>(v));
}

// [lo, hi) of n columns for part j of parts, boundaries multiples of 16.
inline void split_columns(int64_t n, int64_t parts, int64_t j, int64_t& lo, int64_t& hi) {
  const int64_t per = ((n + parts - 1) / parts + 15) / 16 * 16;
  lo = std::min(n, j * per);
  hi = std::min(n, lo + per);
}

// ---- The packed-weight kernels (layout in sparseops/moe_cpu.h, cache in moe_pack.cpp): each
// step loads one k (one k-pair with vnni) of 64 output rows, 4 vectors, and multiplies it
// into every token's 4 accumulators with x broadcast; the sums run in k order in each lane,
// one fp32 accumulator per output, never reduced across lanes, so a token's bits depend
// neither on the threads nor on the other tokens (a pass of several tokens stores and reloads
// its fp32 accumulators between K chunks: exact).
constexpr int kPackTok = 6;          // token rows per pass: 6 x 4 accumulators + 4 weights
constexpr int64_t kPackChunk = 128;  // k steps per chunk when a block takes several passes
constexpr int kPackVec = kPackCols / 16;

// acc[t][0, 64) (+)= sum over k-pairs [q0, q1) of x[t] pair q . block pair q (vdpbf16ps).
template <int NT>
SPARSEOPS_MOE_AVX512BF16 void packed_vnni(const c10::BFloat16* blk, int64_t q0, int64_t q1,
                                          const int32_t* const* x, float* acc_io, bool init) {
  __m512 acc[NT][kPackVec];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
    for (int j = 0; j < kPackVec; ++j)
      acc[t][j] = init ? _mm512_setzero_ps() : _mm512_loadu_ps(acc_io + t * kPackCols + 16 * j);
  for (int64_t q = q0; q < q1; ++q) {
    const c10::BFloat16* wq = blk + q * 2 * kPackCols;
    __m512i wv[kPackVec];
#pragma GCC unroll 4
    for (int j = 0; j < kPackVec; ++j) wv[j] = _mm512_loadu_si512(wq + 32 * j);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m512i xb = _mm512_set1_epi32(x[t][q]);
#pragma GCC unroll 4
      for (int j = 0; j < kPackVec; ++j)
        acc[t][j] = _mm512_dpbf16_ps(acc[t][j], (__m512bh)xb, (__m512bh)wv[j]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
    for (int j = 0; j < kPackVec; ++j) _mm512_storeu_ps(acc_io + t * kPackCols + 16 * j, acc[t][j]);
}

// The same with fp32 FMA over k in [q0, q1), weights widened to fp32 as they are loaded.
template <typename T, int NT>
SPARSEOPS_MOE_AVX512 void packed_fma(const T* blk, int64_t q0, int64_t q1, const float* const* x,
                                     float* acc_io, bool init) {
  __m512 acc[NT][kPackVec];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
    for (int j = 0; j < kPackVec; ++j)
      acc[t][j] = init ? _mm512_setzero_ps() : _mm512_loadu_ps(acc_io + t * kPackCols + 16 * j);
  for (int64_t q = q0; q < q1; ++q) {
    const T* wq = blk + q * kPackCols;
    __m512 wv[kPackVec];
#pragma GCC unroll 4
    for (int j = 0; j < kPackVec; ++j) wv[j] = load16(wq + 16 * j, __mmask16(0xffff));
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m512 xb = _mm512_set1_ps(x[t][q]);
#pragma GCC unroll 4
      for (int j = 0; j < kPackVec; ++j) acc[t][j] = _mm512_fmadd_ps(xb, wv[j], acc[t][j]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
    for (int j = 0; j < kPackVec; ++j) _mm512_storeu_ps(acc_io + t * kPackCols + 16 * j, acc[t][j]);
}

// stage_t: the staged token rows (bf16 pairs read as int32 with vnni, fp32 otherwise).
template <typename W, typename X, int NT>
inline void packed_pass(const W* blk, int64_t q0, int64_t q1, const X* const* x, float* acc,
                        bool init) {
  if constexpr (std::is_same_v<X, int32_t>) {
    packed_vnni<NT>(blk, q0, q1, x, acc, init);
  } else {
    packed_fma<W, NT>(blk, q0, q1, x, acc, init);
  }
}

// acc[t][0, 64) = the 64 outputs of one packed block for the R token rows x[0, R), over
// steps k (k-pairs with vnni) in [0, steps).
template <typename W, typename X>
void packed_block(const W* blk, int64_t steps, const X* const* x, int64_t R, float* acc) {
  const int64_t chunk = R <= kPackTok ? steps : kPackChunk;
  for (int64_t q0 = 0; q0 < steps; q0 += chunk) {
    const int64_t q1 = std::min(steps, q0 + chunk);
    for (int64_t t0 = 0; t0 < R; t0 += kPackTok) {
      const X* const* xt = x + t0;
      float* at = acc + t0 * kPackCols;
      const bool init = q0 == 0;
      switch (std::min<int64_t>(kPackTok, R - t0)) {
        case 1:
          packed_pass<W, X, 1>(blk, q0, q1, xt, at, init);
          break;
        case 2:
          packed_pass<W, X, 2>(blk, q0, q1, xt, at, init);
          break;
        case 3:
          packed_pass<W, X, 3>(blk, q0, q1, xt, at, init);
          break;
        case 4:
          packed_pass<W, X, 4>(blk, q0, q1, xt, at, init);
          break;
        case 5:
          packed_pass<W, X, 5>(blk, q0, q1, xt, at, init);
          break;
        default:
          packed_pass<W, X, kPackTok>(blk, q0, q1, xt, at, init);
          break;
      }
    }
  }
  if (steps == 0) std::fill(acc, acc + R * kPackCols, 0.0f);
}

// stream_forward on the packed copies pw13 / pw2 of the weights: the same work split, the same
// rounding points and the same outputs, up to the order of the sums inside each dot product.
// The token rows of the stream experts (and their activations) are staged once in the
// kernels' operand type: bf16 rows of even length with vnni, fp32 rows otherwise.
template <typename scalar_t, bool kVnni>
void stream_forward_packed(const at::Tensor& x, const PackedWeight& pw13, const PackedWeight& pw2,
                           const at::Tensor& weights, const at::Tensor& ids, const at::Tensor& b13,
                           const at::Tensor& b2, const MoeConfig& cfg,
                           const std::vector<int64_t>& experts, const int32_t* offs,
                           const int32_t* sorted, float* sbuf, at::Tensor& y, at::Tensor& pre) {
  using X = std::conditional_t<kVnni, int32_t, float>;        // operand as the kernels read it
  using S = std::conditional_t<kVnni, c10::BFloat16, float>;  // staged element
  const int64_t T = cfg.t, H = cfg.h, K = cfg.k, I = cfg.inter, P = cfg.p;
  const int64_t n = T * K;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const float* wp = weights.data_ptr<float>();
  const int32_t* idp = ids.data_ptr<int32_t>();
  const scalar_t* b13p = cfg.has_b13 ? b13.data_ptr<scalar_t>() : nullptr;
  const scalar_t* b2p = cfg.has_b2 ? b2.data_ptr<scalar_t>() : nullptr;
  scalar_t* prep = pre.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const bool gated = moe_gated(cfg.act);
  const bool inter = cfg.interleaved;
  const int64_t Hs = kVnni ? (H + 1) / 2 * 2 : H, Is = kVnni ? (I + 1) / 2 * 2 : I;
  const int64_t rows = std::max<int64_t>(n, 1);
  const auto sopt = x.options().dtype(kVnni ? at::kBFloat16 : at::kFloat);
  at::Tensor xs = at::empty({rows, Hs}, sopt), as = at::empty({rows, Is}, sopt);
  S* xsp = static_cast<S*>(xs.data_ptr());
  S* asp = static_cast<S*>(as.data_ptr());
  // The activations in x's dtype (the rounding point of the BLAS path), then staged.
  at::Tensor act = at::empty({rows, I}, x.options());
  scalar_t* ap = act.data_ptr<scalar_t>();
  int64_t max_rows = 0;
  for (const int64_t e : experts) {
    const int64_t begin = e ? offs[e - 1] : 0;
    max_rows = std::max<int64_t>(max_rows, offs[e] - begin);
    for (int64_t r = begin; r < offs[e]; ++r) {
      const scalar_t* src = xp + (sorted[r] / K) * H;
      S* dst = xsp + r * Hs;
      for (int64_t c = 0; c < H; ++c) dst[c] = static_cast<S>(static_cast<float>(src[c]));
      if (Hs > H) dst[H] = S(0.0f);
      if (Is > I) asp[r * Is + I] = S(0.0f);
    }
  }
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (std::max(I, H) + kPackCols - 1) / kPackCols));
  auto split = [&](int64_t total, int64_t j, int64_t& lo, int64_t& hi) {
    const int64_t per = ((total + parts - 1) / parts + kPackCols - 1) / kPackCols * kPackCols;
    lo = std::min(total, j * per);
    hi = std::min(total, lo + per);
  };
  const int64_t steps13 = kVnni ? pw13.kp / 2 : pw13.kp, steps2 = kVnni ? pw2.kp / 2 : pw2.kp;

  // Rows [r0, r1) of group g of w13[e] for the expert's R rows: pre = x-dtype(h + b13).
  auto gemm1_rows = [&](int64_t e, int64_t begin, int64_t R, int64_t g, int64_t r0, int64_t r1,
                        std::vector<const X*>& xr, std::vector<float>& acc) {
    const scalar_t* bias = b13p ? b13p + e * P : nullptr;
    for (int64_t t = 0; t < R; ++t) xr[t] = reinterpret_cast<const X*>(xsp + (begin + t) * Hs);
    for (int64_t b = r0 / kPackCols; b * kPackCols < r1; ++b) {
      packed_block(static_cast<const scalar_t*>(pw13.block(e, g, b)), steps13, xr.data(), R,
                   acc.data());
      const int64_t c0 = b * kPackCols, nc = std::min<int64_t>(kPackCols, r1 - c0);
      const int64_t col = g * pw13.group_rows + c0;
      for (int64_t t = 0; t < R; ++t) {
        scalar_t* prow = prep + int64_t(sorted[begin + t]) * P + col;
        const float* o = acc.data() + t * kPackCols;
        for (int64_t i = 0; i < nc; ++i)
          prow[i] = bias ? static_cast<scalar_t>(round_to<scalar_t>(o[i]) +
                                                 static_cast<float>(bias[col + i]))
                         : static_cast<scalar_t>(o[i]);
      }
    }
  };

  auto gemm1 = [&](int64_t c0, int64_t c1) {
    if (c0 >= c1) return;
    std::vector<const X*> xr(max_rows);
    std::vector<float> acc(max_rows * kPackCols);
    for (const int64_t e : experts) {
      const int64_t begin = e ? offs[e - 1] : 0, R = offs[e] - begin;
      if (!gated) {
        gemm1_rows(e, begin, R, 0, c0, c1, xr, acc);
      } else if (inter) {
        gemm1_rows(e, begin, R, 0, 2 * c0, 2 * c1, xr, acc);
      } else {
        gemm1_rows(e, begin, R, 0, c0, c1, xr, acc);
        gemm1_rows(e, begin, R, 1, c0, c1, xr, acc);
      }
      for (int64_t r = 0; r < R; ++r) {
        const scalar_t* prow = prep + int64_t(sorted[begin + r]) * P;
        scalar_t* arow = ap + (begin + r) * I;
        activate_row(cfg, true, prow, arow, c0, c1);
        S* srow = asp + (begin + r) * Is;
        for (int64_t c = c0; c < c1; ++c) srow[c] = static_cast<S>(static_cast<float>(arow[c]));
      }
    }
  };

  auto gemm2 = [&](int64_t h0, int64_t h1) {
    if (h0 >= h1) return;
    std::vector<const X*> xr(max_rows);
    std::vector<float> acc(max_rows * kPackCols);
    for (const int64_t e : experts) {
      const int64_t begin = e ? offs[e - 1] : 0, R = offs[e] - begin;
      const scalar_t* bias = b2p ? b2p + e * H : nullptr;
      for (int64_t t = 0; t < R; ++t) xr[t] = reinterpret_cast<const X*>(asp + (begin + t) * Is);
      for (int64_t b = h0 / kPackCols; b * kPackCols < h1; ++b) {
        packed_block(static_cast<const scalar_t*>(pw2.block(e, 0, b)), steps2, xr.data(), R,
                     acc.data());
        const int64_t c0 = b * kPackCols, nc = std::min<int64_t>(kPackCols, h1 - c0);
        for (int64_t t = 0; t < R; ++t) {
          const int64_t slot = sorted[begin + t];
          const float w = wp[slot];
          float* srow = sbuf + slot * H + c0;
          const float* o = acc.data() + t * kPackCols;
          for (int64_t i = 0; i < nc; ++i)
            srow[i] = (bias ? round_to<scalar_t>(o[i]) + static_cast<float>(bias[c0 + i])
                            : round_to<scalar_t>(o[i])) *
                      w;
        }
      }
    }
    for (int64_t t = 0; t < T; ++t)
      combine_row_avx512(sbuf + t * K * H, idp + t * K, K, H, h0, h1, yp + t * H);
  };

  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t end) {
    for (int64_t j = b; j < end; ++j) {
      int64_t c0, c1;
      split(I, j, c0, c1);
      gemm1(c0, c1);
    }
  });
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t end) {
    for (int64_t j = b; j < end; ++j) {
      int64_t h0, h1;
      split(H, j, h0, h1);
      gemm2(h0, h1);
    }
  });
}

template <typename scalar_t>
void stream_forward(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                    const at::Tensor& weights, const at::Tensor& ids, const at::Tensor& b13,
                    const at::Tensor& b2, const MoeConfig& cfg, const StreamWork& work, float* sbuf,
                    at::Tensor& y, at::Tensor& pre) {
  const int64_t T = cfg.t, H = cfg.h, E = cfg.e, K = cfg.k, I = cfg.inter, P = cfg.p;
  const bool bf16dp = isa() == Isa::kAvx512Bf16;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* w13p = w13.data_ptr<scalar_t>();
  const scalar_t* w2p = w2.data_ptr<scalar_t>();
  const int64_t s13e = w13.stride(0), s13r = w13.stride(1), s2e = w2.stride(0), s2r = w2.stride(1);
  const float* wp = weights.data_ptr<float>();
  const int32_t* idp = ids.data_ptr<int32_t>();
  const scalar_t* b13p = cfg.has_b13 ? b13.data_ptr<scalar_t>() : nullptr;
  const scalar_t* b2p = cfg.has_b2 ? b2.data_ptr<scalar_t>() : nullptr;
  scalar_t* prep = pre.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const bool gated = moe_gated(cfg.act);
  const bool inter = cfg.interleaved;
  const int32_t* offs = work.offs;
  const int32_t* sorted = work.sorted;

  std::vector<int64_t> experts;
  for (int64_t e = 0; e < E; ++e)
    if (work.stream[e]) experts.push_back(e);
  {  // Weights registered with prepack_moe_weights run on their packed copies.
    const bool vnni = std::is_same_v<scalar_t, c10::BFloat16> && bf16dp;
    PackedWeight pw13, pw2;
    if (packed_weight(w13, gated && !inter ? 2 : 1, vnni, experts, pw13) &&
        packed_weight(w2, 1, vnni, experts, pw2)) {
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (vnni)
          return stream_forward_packed<scalar_t, true>(x, pw13, pw2, weights, ids, b13, b2, cfg,
                                                       experts, offs, sorted, sbuf, y, pre);
      }
      return stream_forward_packed<scalar_t, false>(x, pw13, pw2, weights, ids, b13, b2, cfg,
                                                    experts, offs, sorted, sbuf, y, pre);
    }
  }
  const int64_t n = T * K;
  // The activations of the stream experts' rows, at the positions of the expert-sorted order.
  at::Tensor act = at::empty({std::max<int64_t>(n, 1), I}, x.options());
  scalar_t* ap = act.data_ptr<scalar_t>();
  const int64_t parts =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (std::max(I, H) + 15) / 16));

  // Rows [p0, p1) of w13[e] for every token row of e: pre = bf16/fp16/fp32(h + b13).
  auto gemm1_rows = [&](int64_t e, int64_t begin, int64_t R, int64_t p0, int64_t p1) {
    const scalar_t* we = w13p + e * s13e;
    const scalar_t* bias = b13p ? b13p + e * P : nullptr;
    for (int64_t p = p0; p < p1; p += kRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kRows, p1 - p));
      const scalar_t* wr[kRows];
      for (int r = 0; r < kRows; ++r) wr[r] = we + (p + std::min(r, nr - 1)) * s13r;
      for (int64_t t0 = 0; t0 < R; t0 += kMaxTok) {
        const int nt = static_cast<int>(std::min<int64_t>(kMaxTok, R - t0));
        const scalar_t* xr[kMaxTok];
        for (int t = 0; t < nt; ++t) xr[t] = xp + (sorted[begin + t0 + t] / K) * H;
        float out[kMaxTok][kRows];
        dot4_tokens<scalar_t>(bf16dp, wr, xr, nt, H, out);
        for (int t = 0; t < nt; ++t) {
          scalar_t* prow = prep + int64_t(sorted[begin + t0 + t]) * P;
          for (int r = 0; r < nr; ++r)
            prow[p + r] = bias ? static_cast<scalar_t>(round_to<scalar_t>(out[t][r]) +
                                                       static_cast<float>(bias[p + r]))
                               : static_cast<scalar_t>(out[t][r]);
        }
      }
    }
  };

  // GEMM1 + bias + activation, intermediate columns [c0, c1) of every stream expert.
  auto gemm1 = [&](int64_t c0, int64_t c1) {
    if (c0 >= c1) return;
    for (const int64_t e : experts) {
      const int64_t begin = e ? offs[e - 1] : 0, R = offs[e] - begin;
      if (!gated) {
        gemm1_rows(e, begin, R, c0, c1);
      } else if (inter) {
        gemm1_rows(e, begin, R, 2 * c0, 2 * c1);
      } else {
        gemm1_rows(e, begin, R, c0, c1);
        gemm1_rows(e, begin, R, I + c0, I + c1);
      }
      for (int64_t r = 0; r < R; ++r) {
        const scalar_t* prow = prep + int64_t(sorted[begin + r]) * P;
        scalar_t* arow = ap + (begin + r) * I;
        activate_row(cfg, true, prow, arow, c0, c1);
      }
    }
  };

  // GEMM2 + bias + routing weight into the slot rows, hidden columns [h0, h1), then the
  // combine of those columns for every token.
  auto gemm2 = [&](int64_t h0, int64_t h1) {
    if (h0 >= h1) return;
    for (const int64_t e : experts) {
      const int64_t begin = e ? offs[e - 1] : 0, R = offs[e] - begin;
      const scalar_t* we = w2p + e * s2e;
      const scalar_t* bias = b2p ? b2p + e * H : nullptr;
      for (int64_t h = h0; h < h1; h += kRows) {
        const int nr = static_cast<int>(std::min<int64_t>(kRows, h1 - h));
        const scalar_t* wr[kRows];
        for (int r = 0; r < kRows; ++r) wr[r] = we + (h + std::min(r, nr - 1)) * s2r;
        for (int64_t t0 = 0; t0 < R; t0 += kMaxTok) {
          const int nt = static_cast<int>(std::min<int64_t>(kMaxTok, R - t0));
          const scalar_t* xr[kMaxTok];
          for (int t = 0; t < nt; ++t) xr[t] = ap + (begin + t0 + t) * I;
          float out[kMaxTok][kRows];
          dot4_tokens<scalar_t>(bf16dp, wr, xr, nt, I, out);
          for (int t = 0; t < nt; ++t) {
            const int64_t slot = sorted[begin + t0 + t];
            const float w = wp[slot];
            float* srow = sbuf + slot * H;
            for (int r = 0; r < nr; ++r)
              srow[h + r] = (bias ? round_to<scalar_t>(out[t][r]) + static_cast<float>(bias[h + r])
                                  : round_to<scalar_t>(out[t][r])) *
                            w;
          }
        }
      }
    }
    for (int64_t t = 0; t < T; ++t)
      combine_row_avx512(sbuf + t * K * H, idp + t * K, K, H, h0, h1, yp + t * H);
  };

  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t end) {
    for (int64_t j = b; j < end; ++j) {
      int64_t c0, c1;
      split_columns(I, parts, j, c0, c1);
      gemm1(c0, c1);
    }
  });
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t end) {
    for (int64_t j = b; j < end; ++j) {
      int64_t h0, h1;
      split_columns(H, parts, j, h0, h1);
      gemm2(h0, h1);
    }
  });
}

}  // namespace
#endif

void moe_stream_forward(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                        const at::Tensor& weights, const at::Tensor& ids, const at::Tensor& b13,
                        const at::Tensor& b2, const MoeConfig& cfg, const StreamWork& work,
                        float* sbuf, at::Tensor& y, at::Tensor& pre) {
#if SPARSEOPS_MOE_AVX512_PATH
  switch (x.scalar_type()) {
    case at::kFloat:
      return stream_forward<float>(x, w13, w2, weights, ids, b13, b2, cfg, work, sbuf, y, pre);
    case at::kBFloat16:
      return stream_forward<c10::BFloat16>(x, w13, w2, weights, ids, b13, b2, cfg, work, sbuf, y,
                                           pre);
    case at::kHalf:
      return stream_forward<c10::Half>(x, w13, w2, weights, ids, b13, b2, cfg, work, sbuf, y, pre);
    default:
      break;
  }
#endif
  TORCH_INTERNAL_ASSERT(false, "moe_stream_forward: no stream kernel for ", x.scalar_type(),
                        " on this CPU (stream_supported() is false)");
}

}  // namespace moe_cpu
}  // namespace sparseops
