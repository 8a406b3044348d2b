// MaxSim CPU kernel. Semantics: python/sparseops/reference/maxsim.py.
//
// Work items are (document, block of up to kQueryBlock queries), split over threads by
// at::parallel_for. For each item the document's tokens are widened to the accumulate type
// and packed dimension-major ([dim][Ld rounded up to kDocTile]) into a per-thread buffer: the
// only pass over its bf16 / fp16 bytes, and the layout that lets the micro-kernel load
// kDocTile consecutive document tokens per embedding coordinate. Each query's tokens are then
// taken kQueryTile at a time: a register tile of kQueryTile x kDocTile dot products
// (kQueryTile x 2 at::vec::Vectorized accumulators, one broadcast query coordinate times two
// document vectors per step), and the running max and argmax of each query token live in
// registers (one vector of lanes per query token) across the document's tiles, reduced to one
// value and the lowest index at the end. The Lq x Ld similarities are never written.
//
// Measured (benchmarks/bench_maxsim.py, 2-core AMD EPYC Zen 4, torch 2.13.0+cpu, 2026-12-02,
// load 2.4-3, interleaved medians, 1 query x 32 tokens x dim 128 vs 1,000 docs x 300):
// 1 thread fp32 45 ms = 74 % of the same-run fp32 GEMM peak, 1.22x faster than torch's
// flat mm + amax + sum (100 docs: 84 %, 1.12x); bf16 0.63x of torch, whose bf16 GEMM uses
// AVX512_BF16 dot products while this kernel widens to fp32 FMAs (vdpbf16ps: not yet).
//
// Every item is computed by the same code whatever the thread split, and each score sums its
// query tokens in index order, so the bits never depend on the thread count.
//
// ISA: at::vec::Vectorized in an extension built with default flags is the generic 8-lane
// (32-byte) implementation; the hot loop is instantiated once more under a function-level
// target attribute (AVX-512 / AVX2 + FMA) and chosen at run time, so GCC vectorises the
// generic loops with the wider instructions while the extension keeps the default ISA.
#include "sparseops/maxsim.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SPARSEOPS_MAXSIM_X86 1
#define SPARSEOPS_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#define SPARSEOPS_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define SPARSEOPS_MAXSIM_X86 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define SPARSEOPS_ALWAYS_INLINE inline __attribute__((always_inline))
#define SPARSEOPS_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))
#else
#define SPARSEOPS_ALWAYS_INLINE_LAMBDA
#define SPARSEOPS_ALWAYS_INLINE inline
#endif

namespace sparseops {
namespace {

using at::Tensor;

constexpr int kQueryTile = 4;       // query tokens per register tile
constexpr int64_t kQueryBlock = 8;  // queries per work item (the packed document is reused)

template <typename acc_t>
struct Problem {
  const acc_t* q;        // [Nq, Lq, dim] widened to acc_t
  const void* d;         // [Nd, Ld, dim] scalar_t
  const bool* q_bool;    // [Nq, Lq] or null
  const int32_t* q_len;  // [Nq] or null
  const bool* d_bool;
  const int32_t* d_len;
  acc_t* scores;    // [Nq, Nd]
  int32_t* argmax;  // [Nq, Nd, Lq]
  int64_t nq, lq, nd, ld, dim;
  bool mean;
};

template <typename acc_t>
acc_t all_ones() {
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  const bits_t b = ~bits_t(0);
  acc_t v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

// Scratch of one thread: the packed document and its per-lane tables.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> packed;  // [dim][lpad]
  std::vector<acc_t> valid;   // [lpad]: all-ones bits where the token is real, else 0
  std::vector<acc_t> index;   // [lpad]: j as acc_t (exact: Ld < 2^24 is checked by the caller)
};

// The running max of one query token, kept per lane (value, index as acc_t, -1 = none),
// reduced to the max and its lowest index.
template <typename acc_t>
SPARSEOPS_ALWAYS_INLINE void reduce_lanes(const acc_t* bv, const acc_t* iv, int lanes,
                                          int64_t first_real, acc_t& best, int32_t& arg) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int64_t a = -1;
  for (int l = 0; l < lanes; ++l) {
    if (iv[l] < 0) continue;
    const int64_t j = static_cast<int64_t>(iv[l]);
    if (bv[l] > m || (bv[l] == m && j < a)) {
      m = bv[l];
      a = j;
    }
  }
  // Every real similarity was -inf (overflow): the first real token holds the max.
  if (a < 0) a = first_real;
  best = m;
  arg = static_cast<int32_t>(a);
}

// The tile loop for TQ query tokens (rows q[0..TQ) of stride dim) against one packed
// document: running max / argmax per query token in registers, reduced at the end.
template <typename acc_t, int TQ>
SPARSEOPS_ALWAYS_INLINE void query_tile(const acc_t* q, int64_t dim, const acc_t* packed,
                                        const acc_t* valid, const acc_t* index, int64_t lpad,
                                        int64_t first_real, acc_t* best_out, int32_t* arg_out) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int VS = Vec::size();
  const Vec ninf(-std::numeric_limits<acc_t>::infinity());
  Vec best[TQ], idx[TQ];
  for (int t = 0; t < TQ; ++t) {
    best[t] = ninf;
    idx[t] = Vec(acc_t(-1));
  }
  for (int64_t j0 = 0; j0 < lpad; j0 += 2 * VS) {
    Vec acc0[TQ], acc1[TQ];
    for (int t = 0; t < TQ; ++t) {
      acc0[t] = Vec(acc_t(0));
      acc1[t] = Vec(acc_t(0));
    }
    const acc_t* col = packed + j0;
    for (int64_t k = 0; k < dim; ++k) {
      const Vec d0 = Vec::loadu(col + k * lpad);
      const Vec d1 = Vec::loadu(col + k * lpad + VS);
      for (int t = 0; t < TQ; ++t) {
        const Vec qb(q[t * dim + k]);
        acc0[t] = at::vec::fmadd(qb, d0, acc0[t]);
        acc1[t] = at::vec::fmadd(qb, d1, acc1[t]);
      }
    }
    const Vec v0 = Vec::loadu(valid + j0), v1 = Vec::loadu(valid + j0 + VS);
    const Vec i0 = Vec::loadu(index + j0), i1 = Vec::loadu(index + j0 + VS);
    for (int t = 0; t < TQ; ++t) {
      // A masked (or padding) token becomes -inf and so never wins: the update is strict.
      // Lanes see increasing j, so a strict > keeps the lowest index of each lane's max.
      const Vec s0 = Vec::blendv(ninf, acc0[t], v0);
      const Vec g0 = s0 > best[t];
      best[t] = Vec::blendv(best[t], s0, g0);
      idx[t] = Vec::blendv(idx[t], i0, g0);
      const Vec s1 = Vec::blendv(ninf, acc1[t], v1);
      const Vec g1 = s1 > best[t];
      best[t] = Vec::blendv(best[t], s1, g1);
      idx[t] = Vec::blendv(idx[t], i1, g1);
    }
  }
  for (int t = 0; t < TQ; ++t) {
    acc_t bv[VS], iv[VS];
    best[t].store(bv);
    idx[t].store(iv);
    reduce_lanes(bv, iv, VS, first_real, best_out[t], arg_out[t]);
  }
}

#if SPARSEOPS_MAXSIM_X86
// The fp32 tile loop in AVX-512 intrinsics: 2 x 16 document tokens per tile. Why not
// at::vec: in an extension built with default flags Vectorized<float> is the generic 8-lane
// class, and GCC did not inline its operators into the target-attributed caller (4 GFLOP/s
// measured on the 2-core Zen 4, 2026-12-02, against ~10x that here). Same algorithm and
// update order as query_tile, so the answers are the same bits.
template <int TQ>
SPARSEOPS_TARGET_AVX512 void query_tile_avx512(const float* q, int64_t dim, const float* packed,
                                               const float* valid, const float* index, int64_t lpad,
                                               int64_t first_real, float* best_out,
                                               int32_t* arg_out) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 best[TQ], idx[TQ];
  for (int t = 0; t < TQ; ++t) {
    best[t] = ninf;
    idx[t] = _mm512_set1_ps(-1.0f);
  }
  for (int64_t j0 = 0; j0 < lpad; j0 += 32) {
    __m512 acc0[TQ], acc1[TQ];
    for (int t = 0; t < TQ; ++t) {
      acc0[t] = _mm512_setzero_ps();
      acc1[t] = _mm512_setzero_ps();
    }
    const float* col = packed + j0;
    for (int64_t k = 0; k < dim; ++k) {
      const __m512 d0 = _mm512_loadu_ps(col + k * lpad);
      const __m512 d1 = _mm512_loadu_ps(col + k * lpad + 16);
      for (int t = 0; t < TQ; ++t) {
        const __m512 qb = _mm512_set1_ps(q[t * dim + k]);
        acc0[t] = _mm512_fmadd_ps(qb, d0, acc0[t]);
        acc1[t] = _mm512_fmadd_ps(qb, d1, acc1[t]);
      }
    }
    // Real-token lanes (the sign bit of the all-ones pattern); padding and masked tokens
    // never take part in the strict update, so they never win.
    const __mmask16 v0 = _mm512_movepi32_mask(_mm512_castps_si512(_mm512_loadu_ps(valid + j0)));
    const __mmask16 v1 =
        _mm512_movepi32_mask(_mm512_castps_si512(_mm512_loadu_ps(valid + j0 + 16)));
    const __m512 i0 = _mm512_loadu_ps(index + j0), i1 = _mm512_loadu_ps(index + j0 + 16);
    for (int t = 0; t < TQ; ++t) {
      const __mmask16 g0 = _mm512_mask_cmp_ps_mask(v0, acc0[t], best[t], _CMP_GT_OQ);
      best[t] = _mm512_mask_blend_ps(g0, best[t], acc0[t]);
      idx[t] = _mm512_mask_blend_ps(g0, idx[t], i0);
      const __mmask16 g1 = _mm512_mask_cmp_ps_mask(v1, acc1[t], best[t], _CMP_GT_OQ);
      best[t] = _mm512_mask_blend_ps(g1, best[t], acc1[t]);
      idx[t] = _mm512_mask_blend_ps(g1, idx[t], i1);
    }
  }
  for (int t = 0; t < TQ; ++t) {
    alignas(64) float bv[16], iv[16];
    _mm512_store_ps(bv, best[t]);
    _mm512_store_ps(iv, idx[t]);
    reduce_lanes(bv, iv, 16, first_real, best_out[t], arg_out[t]);
  }
}
#endif

template <typename scalar_t, typename acc_t, bool kAvx512 = false>
SPARSEOPS_ALWAYS_INLINE void run_items(const Problem<acc_t>& p, int64_t begin, int64_t end) {
  // Documents are padded to whole tiles of the widest path (2 x 16 lanes), which is also a
  // whole number of the generic path's 2 x 8.
  constexpr int64_t tile_j = 32;
  const int64_t nqb = (p.nq + kQueryBlock - 1) / kQueryBlock;
  const int64_t dim = p.dim;
  Scratch<acc_t> s;
  const acc_t ones = all_ones<acc_t>();
  const scalar_t* d_all = static_cast<const scalar_t*>(p.d);
  acc_t best[kQueryTile];
  int32_t arg[kQueryTile];
  const auto tile = [](int tq, const acc_t* qt, int64_t dim, const acc_t* packed,
                       const acc_t* valid, const acc_t* index, int64_t lpad, int64_t first_real,
                       acc_t* best, int32_t* arg) SPARSEOPS_ALWAYS_INLINE_LAMBDA {
#if SPARSEOPS_MAXSIM_X86
    if constexpr (kAvx512 && std::is_same_v<acc_t, float>) {
      switch (tq) {
        case 4:
          return query_tile_avx512<4>(qt, dim, packed, valid, index, lpad, first_real, best, arg);
        case 3:
          return query_tile_avx512<3>(qt, dim, packed, valid, index, lpad, first_real, best, arg);
        case 2:
          return query_tile_avx512<2>(qt, dim, packed, valid, index, lpad, first_real, best, arg);
        default:
          return query_tile_avx512<1>(qt, dim, packed, valid, index, lpad, first_real, best, arg);
      }
    }
#endif
    switch (tq) {
      case 4:
        return query_tile<acc_t, 4>(qt, dim, packed, valid, index, lpad, first_real, best, arg);
      case 3:
        return query_tile<acc_t, 3>(qt, dim, packed, valid, index, lpad, first_real, best, arg);
      case 2:
        return query_tile<acc_t, 2>(qt, dim, packed, valid, index, lpad, first_real, best, arg);
      default:
        return query_tile<acc_t, 1>(qt, dim, packed, valid, index, lpad, first_real, best, arg);
    }
  };
  for (int64_t item = begin; item < end; ++item) {
    const int64_t m = item / nqb, qb = item % nqb;
    // Tokens [0, lp) of document m are looked at (a lengths mask skips the rest).
    const int64_t lp = p.d_len ? p.d_len[m] : p.ld;
    const bool* dmask = p.d_bool ? p.d_bool + m * p.ld : nullptr;
    int64_t first_real = -1;
    for (int64_t j = 0; j < lp && first_real < 0; ++j) {
      if (dmask == nullptr || dmask[j]) first_real = j;
    }
    const int64_t n0 = qb * kQueryBlock, n1 = std::min(p.nq, n0 + kQueryBlock);
    if (first_real < 0) {
      // No real token: 0 for every query token, nothing taken.
      for (int64_t n = n0; n < n1; ++n) {
        p.scores[n * p.nd + m] = acc_t(0);
        std::fill_n(p.argmax + (n * p.nd + m) * p.lq, p.lq, int32_t(-1));
      }
      continue;
    }
    const int64_t lpad = (lp + tile_j - 1) / tile_j * tile_j;
    s.packed.assign(static_cast<size_t>(dim * lpad), acc_t(0));
    s.valid.resize(lpad);
    s.index.resize(lpad);
    const scalar_t* dm = d_all + m * p.ld * dim;
    // Transposed 32 tokens at a time: the block's dim x 32 destination (16 KB at dim 128)
    // stays in L1, where a whole-document pass would miss on every strided store.
    for (int64_t jb = 0; jb < lp; jb += tile_j) {
      const int64_t je = std::min(lp, jb + tile_j);
      for (int64_t j = jb; j < je; ++j) {
        const scalar_t* row = dm + j * dim;
        acc_t* dst = s.packed.data() + j;
        for (int64_t k = 0; k < dim; ++k) dst[k * lpad] = static_cast<acc_t>(row[k]);
      }
    }
    for (int64_t j = 0; j < lpad; ++j) {
      s.valid[j] = (j < lp && (dmask == nullptr || dmask[j])) ? ones : acc_t(0);
      s.index[j] = static_cast<acc_t>(j);
    }
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t lq_eff = p.q_len ? p.q_len[n] : p.lq;
      const bool* qmask = p.q_bool ? p.q_bool + n * p.lq : nullptr;
      int32_t* arg_row = p.argmax + (n * p.nd + m) * p.lq;
      const acc_t* qn = p.q + n * p.lq * dim;
      acc_t total = 0;
      int64_t count = 0;
      for (int64_t i0 = 0; i0 < lq_eff; i0 += kQueryTile) {
        const int tq = static_cast<int>(std::min<int64_t>(kQueryTile, lq_eff - i0));
        const acc_t* qt = qn + i0 * dim;
        tile(tq, qt, dim, s.packed.data(), s.valid.data(), s.index.data(), lpad, first_real, best,
             arg);
        for (int t = 0; t < tq; ++t) {
          const int64_t i = i0 + t;
          if (qmask != nullptr && !qmask[i]) {
            arg_row[i] = -1;
            continue;
          }
          total += best[t];  // query tokens summed in index order: deterministic
          ++count;
          arg_row[i] = arg[t];
        }
      }
      std::fill(arg_row + std::max<int64_t>(lq_eff, 0), arg_row + p.lq, int32_t(-1));
      if (p.mean) total = count > 0 ? total / static_cast<acc_t>(count) : acc_t(0);
      p.scores[n * p.nd + m] = total;
    }
  }
}

template <typename scalar_t, typename acc_t>
void run_items_default(const Problem<acc_t>& p, int64_t b, int64_t e) {
  run_items<scalar_t, acc_t>(p, b, e);
}

#if SPARSEOPS_MAXSIM_X86
template <typename scalar_t, typename acc_t>
SPARSEOPS_TARGET_AVX512 void run_items_avx512(const Problem<acc_t>& p, int64_t b, int64_t e) {
  run_items<scalar_t, acc_t, true>(p, b, e);
}
template <typename scalar_t, typename acc_t>
SPARSEOPS_TARGET_AVX2 void run_items_avx2(const Problem<acc_t>& p, int64_t b, int64_t e) {
  run_items<scalar_t, acc_t>(p, b, e);
}
#endif

// 0: default ISA, 1: AVX2 + FMA, 2: AVX-512. Decided once per process (SPARSEOPS_CPU_NO_AVX512=1
// forces at most AVX2), so the bits of an answer depend on the machine only.
int isa_level() {
#if SPARSEOPS_MAXSIM_X86
  static const int level = [] {
    __builtin_cpu_init();
    const char* off = std::getenv("SPARSEOPS_CPU_NO_AVX512");
    const bool no512 = off != nullptr && *off != '\0' && *off != '0';
    if (!no512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
      return 2;
    }
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
  }();
  return level;
#else
  return 0;
#endif
}

template <typename scalar_t, typename acc_t>
void launch(const Tensor& q, const Tensor& d, const Tensor& q_mask, const Tensor& d_mask,
            const MaxSimConfig& cfg, Tensor& scores, Tensor& argmax) {
  const Tensor qw = q.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  Problem<acc_t> p;
  p.q = qw.data_ptr<acc_t>();
  p.d = d.data_ptr();
  p.q_bool = cfg.q_mask == TokenMask::kBool ? q_mask.data_ptr<bool>() : nullptr;
  p.q_len = cfg.q_mask == TokenMask::kLengths ? q_mask.data_ptr<int32_t>() : nullptr;
  p.d_bool = cfg.d_mask == TokenMask::kBool ? d_mask.data_ptr<bool>() : nullptr;
  p.d_len = cfg.d_mask == TokenMask::kLengths ? d_mask.data_ptr<int32_t>() : nullptr;
  p.scores = scores.data_ptr<acc_t>();
  p.argmax = argmax.data_ptr<int32_t>();
  p.nq = cfg.nq;
  p.lq = cfg.lq;
  p.nd = cfg.nd;
  p.ld = cfg.ld;
  p.dim = cfg.dim;
  p.mean = cfg.reduce == MaxSimReduce::kMean;
  const int64_t items = cfg.nd * ((cfg.nq + kQueryBlock - 1) / kQueryBlock);
  // One item is Lq x Ld x dim multiply-adds per query (~1.2 M at 32 x 300 x 128); split
  // only when there is at least ~256 K of them per thread's share.
  const int64_t per_item =
      std::max<int64_t>(1, std::min(cfg.nq, kQueryBlock) * cfg.lq * cfg.ld * cfg.dim);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / per_item);
  const int level = isa_level();
  at::parallel_for(0, items, grain, [&](int64_t b, int64_t e) {
#if SPARSEOPS_MAXSIM_X86
    if (level == 2) return run_items_avx512<scalar_t, acc_t>(p, b, e);
    if (level == 1) return run_items_avx2<scalar_t, acc_t>(p, b, e);
#endif
    run_items_default<scalar_t, acc_t>(p, b, e);
  });
}

}  // namespace

void maxsim_cpu_kernel(const Tensor& q, const Tensor& d, const Tensor& q_mask, const Tensor& d_mask,
                       const MaxSimConfig& cfg, Tensor& scores, Tensor& argmax) {
  TORCH_INTERNAL_ASSERT(q.is_contiguous() && d.is_contiguous() && scores.is_contiguous() &&
                        argmax.is_contiguous());
  TORCH_INTERNAL_ASSERT(cfg.nq > 0 && cfg.nd > 0 && cfg.lq > 0 && cfg.ld > 0);
  // The argmax travels as acc_t lanes: exact below 2^24 tokens (the op layer checks).
  TORCH_INTERNAL_ASSERT(cfg.ld < (int64_t(1) << 24));
  switch (q.scalar_type()) {
    case at::kFloat:
      return launch<float, float>(q, d, q_mask, d_mask, cfg, scores, argmax);
    case at::kBFloat16:
      return launch<c10::BFloat16, float>(q, d, q_mask, d_mask, cfg, scores, argmax);
    case at::kHalf:
      return launch<c10::Half, float>(q, d, q_mask, d_mask, cfg, scores, argmax);
    case at::kDouble:
      return launch<double, double>(q, d, q_mask, d_mask, cfg, scores, argmax);
    default:
      TORCH_INTERNAL_ASSERT(false, "maxsim_cpu_kernel: unexpected dtype ", q.scalar_type());
  }
}

}  // namespace sparseops
