// MoE routing CPU kernels. Semantics: python/sparseops/reference/routing.py.
//
// topk_route: one fused pass per row (load the row once, score, select, write), rows split
// over threads by at::parallel_for at multiples of 16 rows. Every row is computed by code
// that depends on the row alone, so the bits never depend on the thread count (the old
// per-block choice between a scalar and an ATen path did: 1-ulp weight differences between
// 1 and 2 threads at small T). What each choice bought, as the ratio of our time to the
// torch composite (softmax -> topk -> renormalise; DeepSeek-V3 as vLLM's plain-torch
// grouped_topk), bf16 logits, 1 thread, AMD EPYC Zen 4 KVM guest, torch 2.13.0+cpu,
// 2026-12-02, load 3-7 (shared machine; interleaved medians, ratios only):
//   * Order-preserving int32 keys of the fp32 rank (NaN -> -inf, -0 -> +0, INT32_MIN for
//     experts that cannot be chosen), one threshold compare per 16 experts, and a vectorised
//     fp64 exp (Cody-Waite, degree-13 Taylor, scalef; ~1 ulp) for the exact scores: first
//     fused version 0.40 (Mixtral, Qwen3) and 0.13 (DeepSeek-V3) at T = 16384, from the ATen
//     per-block version's 0.68-0.70 and 0.20-0.71 (2 threads, 2026-12-01).
//   * E <= 16 without bias/groups (Mixtral): 16 rows at once, a lane per row, no horizontal
//     reductions, arithmetic mirrored bit for bit with the row path: 0.40 -> 0.074.
//   * A floor for the top-k from the k-th largest lane-wise maximum (bitonic sort of 16
//     lanes), then a branch-free rank-and-scatter of the <= 16 keys above it (insertions
//     mispredicted about once each and were 60% of a Qwen3 row): Qwen3 0.40 -> 0.17.
//   * softmax_then_topk + renormalise ranked by logits: the softmax denominator cancels, so
//     its E exps are skipped: Qwen3 row -10%.
//   * bf16/fp16 sigmoid scores from a 65536-entry table built with the fp64 path (same bits):
//     DeepSeek-V3 T = 1024 905 -> 542 us (fp32 vs bf16 logits, same run).
//   * No ATen calls, heap allocations or parallel regions for small T; T below one grain
//     (16384 logits) runs on the calling thread. At T = 1 the call (4-5 us) is the op layer
//     and dispatcher, not this kernel (< 0.2 us).
//   * The AVX-512 code is compiled with function target attributes and chosen once per
//     process (__builtin_cpu_supports); without AVX-512 (or with SPARSEOPS_CPU_NO_AVX512=1)
//     a scalar path with std::exp runs the same algorithm; fp64 logits always take it.
//   * Branch-free group choice (ranks by broadcast compares) for n_group <= 16: DeepSeek-V3
//     T = 1024 0.121 -> 0.070.
// Result, 2 threads, load 2.2, bf16 (fp32): Mixtral 0.074-0.075 (0.081-0.087) at T >= 4096,
// Qwen3 0.14-0.17 (0.15-0.16), DeepSeek-V3 (T >= 128) 0.057-0.113 (0.072-0.126); T = 1-16
// 0.18-0.74, where a torch.ops call alone (3.5 us) exceeds what the ratio asks for. T = 2M,
// E = 128, k = 8 route: 0.24-0.26 s (was 3.5 s).
// Then (per-thread CPU time, 1 thread, same machine at load 15-20, 2026-12-07):
//   * The top-k of 4 rows interleaved (scan_topk16_rows): a row's bitonic floor, compress
//     positions and rank sums are latency chains that left the core idle. Qwen3 row 173 ->
//     105 ns, gpt-oss 174 -> 101, DeepSeek-V3 fp32 626 -> 549, bf16 482 -> 397.
//   * Small-E blocks of 16 rows also for the block holding the last row (its last expert
//     read without over-reading): Mixtral T = 16 1.5 -> 0.7 us.
//   * route_cpu_kernel (`route` on CPU): each chunk's ids counted right after its rows, so
//     the metadata is one placement pass. Pair at T = 16384, 1 thread: Qwen3 3.9 -> 2.3 ms,
//     gpt-oss 3.6 -> 2.2, DeepSeek-V3 11.8 -> 10.4 (fp32), Mixtral 326 -> 283 us.
//   * DeepSeek-V3 (route_row_sig16): exact scores only for the experts a cheap fp32 sigmoid
//     cannot rule out (~19 of 256 a row), the group choice from approximate group scores
//     when the gap at the cut exceeds the proven bound (~9 rows in 10), groups' best two by
//     packed 128-bit shuffles, the top-k over the chosen groups' relevant experts only. Pair
//     x byte floor at T = 4096 / 16384 (1 thread, per-thread CPU time, floor from a 128 MB
//     copy in the same process, load ~6, alternating processes against main's build): fp32
//     9.6 / 10.5 -> 6.7-6.9 / 7.2-7.4, bf16 11.9 / 12.7 -> 11.5-11.8 / 11.9-12.2.
// Then (2026-12-07, load ~5, 1 thread; pair = route, wall medians of the bench harness):
//   * bf16 routers ranked by their logits (Qwen3, gpt-oss): 16-bit keys from the raw bf16
//     patterns, the <= 16 keys at the floor sorted as (key << 16) | (0xffff - e) by the
//     bitonic network (route_rows_bf16_keys): pair T = 4096 Qwen3 601 -> 329 us, gpt-oss
//     597 -> 291 us (against main's build in the next process).
//   * Mixtral: E = 8, k = 2 at compile time and blocks of 16 rows loaded whole and
//     transposed (load_block16_e8), placement by per-bucket compress (metadata_place_small):
//     pair T = 4096 65-66 -> 39 us (fp32 and bf16), T = 16384 bf16 299 -> 175 us.
//   Not changed: DeepSeek-V3 (pair 5.7-9x its floor at 1 thread; bf16 topk_route 5.9 ms
//   against fp32's 6.3 at T = 16384, so its table is not what costs: the per-row chain of
//   route_row_sig16 is, for the 2-4-row interleaving still to be written).
//   Tried and dropped: metadata placement 16 slots at once (vpconflictd + vpopcntd for the
//   in-bucket ranks, gather / scatter of next[] and of the slots): Mixtral pair T = 16384
//   266 -> 281 us (Zen 4's scatters cost more than the scalar load-increment-store chain).
//   Tried and dropped (no gain in the same bench): candidates gathered in registers by
//   compress + expand instead of stores; per-candidate scalar rank stores instead of a
//   rank vector + scatter; 1 / d by rcp14 + two Newton steps instead of vdivpd in the fp64
//   sigmoid (slower); a block of 16 Mixtral rows loaded whole and transposed in registers
//   (24 permutes) instead of 8 gathers (same speed).
// Ids match the reference bitwise: the fp64 scores round to the same fp32 as torch's except
// within an fp64 ulp of an fp32 rounding boundary (selection_scores_ref's note).
//
// route_metadata: a parallel stable counting sort (per-chunk histograms, a scan, then
// per-chunk placement in slot order) over chunks of whole rows fixed by the shape, so the
// output never depends on the thread count or timing; int32 counters and no division per
// slot. MADV_HUGEPAGE on the fresh outputs: T*k = 16M, E = 128 went from 314 to 106 ms
// (1 thread, same machine), most of it first-touch page faults.
#include "sparseops/routing.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "sparseops/checks.h"
#include "sparseops/cpu_memory.h"
#include "sparseops/cpu_vec.h"
#include "sparseops/ranking.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_*()
// pass-through operands (a known false positive); keep the build log clean.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define SPARSEOPS_HAVE_AVX512_PATH 1
#define SPARSEOPS_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2")))
#define SPARSEOPS_AVX512_VBMI2                                                            \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx2,fma,f16c,bmi," \
                        "bmi2")))
#else
#define SPARSEOPS_HAVE_AVX512_PATH 0
#endif

namespace sparseops {
namespace {

using at::Tensor;

// Whether the AVX-512 path runs: decided once per process, so the bits of an answer depend
// on the machine only, never on the call.
bool use_avx512() {
#if SPARSEOPS_HAVE_AVX512_PATH
  static const bool on = cpu_avx512_enabled() && __builtin_cpu_supports("bmi2");
  return on;
#else
  return false;
#endif
}

// Whether the 16-bit compresses (AVX512_VBMI2: Ice Lake, Zen 4 and later) of the bf16 path
// run; decided once per process, on top of use_avx512().
bool use_avx512_vbmi2() {
#if SPARSEOPS_HAVE_AVX512_PATH
  static const bool on = use_avx512() && __builtin_cpu_supports("avx512vbmi2");
  return on;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------
// Order-preserving integer keys: a > b as floats (NaN mapped to -inf, -0 == +0) iff
// key(a) > key(b) as integers. The integer minimum sits below key(-inf) and marks experts
// that can never be chosen (disabled, or outside the chosen groups): a candidate whose rank
// is -inf can still fill a slot, a non-candidate cannot.
template <typename acc_t>
using key_type = std::conditional_t<std::is_same_v<acc_t, double>, int64_t, int32_t>;

inline int32_t rank_key(float v) {
  if (std::isnan(v)) v = -std::numeric_limits<float>::infinity();
  v += 0.0f;  // -0 -> +0: the reference compares floats, where they tie
  int32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b ^ ((b >> 31) & 0x7fffffff);
}

inline int64_t rank_key(double v) {
  if (std::isnan(v)) v = -std::numeric_limits<double>::infinity();
  v += 0.0;
  int64_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b ^ ((b >> 63) & 0x7fffffffffffffffLL);
}

// The k best (key, index) pairs seen so far, best first. Starts full of non-candidates
// (key minimum, index -1), so slots nobody can fill keep id -1.
template <typename Key>
struct TopK {
  Key v[kMaxTopk];
  int32_t e[kMaxTopk];
  int k;

  TopK() = default;
  explicit TopK(int64_t k_) { reset(k_); }
  void reset(int64_t k_) {
    k = static_cast<int>(k_);
    for (int j = 0; j < k; ++j) {
      v[j] = std::numeric_limits<Key>::min();
      e[j] = -1;
    }
  }
  Key kth() const { return v[k - 1]; }
  // Raises the placeholder keys to `floor`, for a floor below the k-th best key of the row:
  // keys at or under it can never be chosen, so they are skipped without changing the answer.
  void set_floor(Key floor) {
    for (int j = 0; j < k; ++j) v[j] = floor;
  }
  // Precondition: key > kth(), and idx above every index already inserted (callers visit
  // in index order), so ranks_before reduces to a key compare and equal keys already in the
  // list (lower indices) stay ahead.
  void insert(Key key, int32_t idx) {
    int j = k - 1;
    while (j > 0 && key > v[j - 1]) {
      v[j] = v[j - 1];
      e[j] = e[j - 1];
      --j;
    }
    v[j] = key;
    e[j] = idx;
  }
};

// Chooses the topk_group best groups (score desc, lower group first on ties); sets chosen[g].
template <typename Key>
void choose_groups(const Key* gkey, int64_t G, int64_t topk_group, char* chosen) {
  std::fill(chosen, chosen + G, 0);
  if (topk_group >= G) {
    std::fill(chosen, chosen + G, 1);
    return;
  }
  if (topk_group <= kMaxTopk) {
    TopK<Key> top(topk_group);
    for (int64_t g = 0; g < G; ++g) {
      if (gkey[g] > top.kth()) top.insert(gkey[g], static_cast<int32_t>(g));
    }
    for (int j = 0; j < top.k; ++j) chosen[top.e[j]] = 1;
    return;
  }
  int32_t order[kMaxExperts];
  for (int64_t g = 0; g < G; ++g) order[g] = static_cast<int32_t>(g);
  std::nth_element(order, order + topk_group - 1, order + G,
                   [&](int32_t a, int32_t b) { return ranks_before(gkey[a], a, gkey[b], b); });
  for (int64_t j = 0; j < topk_group; ++j) chosen[order[j]] = 1;
}

// Per-thread scratch, on the stack (no allocation per call).
template <typename acc_t>
struct Workspace {
  alignas(64) acc_t xf[kMaxExperts];     // the row in the accumulate type
  alignas(64) acc_t score[kMaxExperts];  // selection score (+ bias) in the accumulate type
  alignas(64) double tmp[kMaxExperts];   // fp64 exp(x - max) of the softmax score
  alignas(64) key_type<acc_t> key[kMaxExperts];
  key_type<acc_t> gkey[kMaxExperts];
  char chosen[kMaxExperts];
};

// softmax_then_topk, renormalised, ranked by the logits alone: w = p[id] / sum p[ids] equals
// exp(x[id] - max) / sum exp(x[ids] - max), the softmax denominator cancels, and the best
// expert (the row's max) keeps the total >= 1, so nothing underflows where the reference
// would not. Skipping the E exps of the denominator saved a third of a Qwen3 row (E = 128).
inline bool softmax_sum_cancels(const TopkRouteConfig& cfg) {
  return cfg.scoring == Scoring::kSoftmax && cfg.order == Order::kSoftmaxThenTopk &&
         cfg.renormalize && !cfg.needs_score();
}

template <typename scalar_t, typename acc_t>
struct RouteArgs {
  const scalar_t* x;
  const acc_t* bias;    // nullptr without a bias
  const bool* enabled;  // nullptr without a mask
  acc_t* w;
  int32_t* ids;
  const TopkRouteConfig* cfg;
};

// Weights of the selected experts, from the row's logits xf and (softmax_then_topk) the
// row's softmax statistics, exactly as route_weights_ref composes them:
//   topk_then_softmax: softmax over the k selected logits (invalid slots -inf), NaN -> 0;
//   otherwise p[id] (sigmoid, or softmax with NaN -> 0), then w / total when renormalising
//   (a total that is not > 0 -- zero or NaN -- gives zeros), then * scale.
template <typename acc_t>
void finish_weights_scalar(const TopkRouteConfig& cfg, const acc_t* xf, const int32_t* sel,
                           bool zero_softmax, acc_t row_max, acc_t row_sum, acc_t* w) {
  const int64_t k = cfg.k;
  const acc_t scale = static_cast<acc_t>(cfg.scale);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  if (cfg.scoring == Scoring::kSoftmax && cfg.order == Order::kTopkThenSoftmax) {
    acc_t m = kNegInf;
    bool nan = false;
    for (int64_t j = 0; j < k; ++j) {
      const acc_t v = sel[j] >= 0 ? xf[sel[j]] : kNegInf;
      nan |= std::isnan(v);
      m = std::max(m, v);
    }
    if (nan || !std::isfinite(m)) {  // NaN, or inf - inf: the reference's nan_to_num gives 0
      for (int64_t j = 0; j < k; ++j) w[j] = acc_t(0) * scale;
      return;
    }
    acc_t sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      w[j] = sel[j] >= 0 ? std::exp(xf[sel[j]] - m) : acc_t(0);
      sum += w[j];
    }
    for (int64_t j = 0; j < k; ++j) w[j] = w[j] / sum * scale;
    return;
  }
  acc_t total = 0;
  for (int64_t j = 0; j < k; ++j) {
    acc_t p = 0;
    if (sel[j] >= 0) {
      const acc_t xe = xf[sel[j]];
      if (cfg.scoring == Scoring::kSigmoid) {
        p = acc_t(1) / (acc_t(1) + std::exp(-xe));  // NaN stays NaN, as in the reference
      } else {
        p = zero_softmax ? acc_t(0) : std::exp(xe - row_max) / row_sum;
      }
    }
    w[j] = p;
    total += p;
  }
  if (cfg.renormalize) {
    const bool positive = total > 0;
    for (int64_t j = 0; j < k; ++j) w[j] = positive ? w[j] / total : acc_t(0);
  }
  for (int64_t j = 0; j < k; ++j) w[j] *= scale;
}

// One row, portable scalar code (fp64 logits everywhere; other dtypes without AVX-512).
template <typename scalar_t, typename acc_t>
void route_row_scalar(const RouteArgs<scalar_t, acc_t>& a, int64_t t, Workspace<acc_t>& ws) {
  using Key = key_type<acc_t>;
  const TopkRouteConfig& cfg = *a.cfg;
  const int64_t E = cfg.num_experts, G = cfg.n_group, gs = cfg.group_size();
  const scalar_t* xr = a.x + t * E;
  const bool* en = a.enabled;
  auto on = [&](int64_t e) { return en == nullptr || en[e]; };
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const bool softmax_first =
      cfg.scoring == Scoring::kSoftmax && cfg.order == Order::kSoftmaxThenTopk;

  acc_t* xf = ws.xf;
  acc_t row_max = kNegInf;
  bool nan = false;
  for (int64_t e = 0; e < E; ++e) {
    xf[e] = static_cast<acc_t>(xr[e]);
    if (on(e)) {
      nan |= std::isnan(xf[e]);
      row_max = std::max(row_max, xf[e]);
    }
  }
  // A NaN among the enabled logits, or an infinite max (inf - inf, or no finite expert),
  // makes torch's softmax NaN, which the reference maps to 0.
  const bool zero_softmax = nan || !std::isfinite(row_max);

  const acc_t* score = xf;
  if (cfg.needs_score()) {
    acc_t* s = ws.score;
    if (cfg.scoring == Scoring::kSigmoid) {
      for (int64_t e = 0; e < E; ++e) {
        s[e] = static_cast<acc_t>(1.0 / (1.0 + std::exp(-static_cast<double>(xf[e]))));
      }
    } else if (cfg.order == Order::kSoftmaxThenTopk) {
      if (zero_softmax) {
        std::fill(s, s + E, acc_t(0));
      } else {
        const double m = static_cast<double>(row_max);
        double sum = 0;
        for (int64_t e = 0; e < E; ++e) {
          ws.tmp[e] = on(e) ? std::exp(static_cast<double>(xf[e]) - m) : 0.0;
          sum += ws.tmp[e];
        }
        for (int64_t e = 0; e < E; ++e) s[e] = static_cast<acc_t>(ws.tmp[e] / sum);
      }
    } else {
      std::copy(xf, xf + E, s);
    }
    if (a.bias != nullptr) {
      for (int64_t e = 0; e < E; ++e) s[e] += a.bias[e];
    }
    score = s;
  }
  const acc_t* rank = a.bias != nullptr ? score : xf;
  Key* key = ws.key;
  for (int64_t e = 0; e < E; ++e)
    key[e] = on(e) ? rank_key(rank[e]) : std::numeric_limits<Key>::min();

  if (G > 1) {
    constexpr acc_t kLowest = std::numeric_limits<acc_t>::lowest();
    constexpr acc_t kMax = std::numeric_limits<acc_t>::max();
    const bool top2 = cfg.group_scoring == GroupScoring::kTop2Sum && gs >= 2;
    for (int64_t g = 0; g < G; ++g) {
      acc_t best = kNegInf, second = kNegInf;
      for (int64_t e = g * gs; e < (g + 1) * gs; ++e) {
        // As the reference's nan_to_num(nan=-inf): NaN counts as -inf, an infinite score as
        // the largest finite value, a disabled expert as -inf.
        const acc_t v =
            !on(e) || std::isnan(score[e]) ? kNegInf : std::clamp(score[e], kLowest, kMax);
        if (v > best) {
          second = best;
          best = v;
        } else if (v > second) {
          second = v;
        }
      }
      ws.gkey[g] = rank_key(top2 ? best + second : best);
    }
    choose_groups(ws.gkey, G, cfg.topk_group, ws.chosen);
    for (int64_t g = 0; g < G; ++g) {
      if (!ws.chosen[g])
        std::fill(key + g * gs, key + (g + 1) * gs, std::numeric_limits<Key>::min());
    }
  }

  TopK<Key> top(cfg.k);
  for (int64_t e = 0; e < E; ++e) {
    if (key[e] > top.kth()) top.insert(key[e], static_cast<int32_t>(e));
  }
  int32_t* ir = a.ids + t * cfg.k;
  for (int64_t j = 0; j < cfg.k; ++j) ir[j] = top.e[j];
  acc_t row_sum = 1;
  if (softmax_first && !zero_softmax && !softmax_sum_cancels(cfg)) {
    row_sum = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (on(e)) row_sum += std::exp(xf[e] - row_max);
    }
  }
  finish_weights_scalar(cfg, xf, top.e, zero_softmax, row_max, row_sum, a.w + t * cfg.k);
}

#if SPARSEOPS_HAVE_AVX512_PATH
// ---------------------------------------------------------------------------------------
// AVX-512 path (fp32 accumulation: fp32, bf16 and fp16 logits).

// lanes_below, load16 and exp16: sparseops/cpu_vec.h.

// fp64 exp for the selection scores: fdlibm's two-part ln2 (n * hi exact), degree-13 Taylor
// on |r| <= 0.35 (truncation 4e-18 relative), scalef. Within about 1 ulp, so the fp32
// rounding of the score equals torch's except within an ulp of a rounding boundary.
SPARSEOPS_AVX512 inline __m512d exp8d(__m512d x) {
  const __m512d xc = _mm512_min_pd(_mm512_max_pd(x, _mm512_set1_pd(-746.0)), _mm512_set1_pd(710.0));
  const __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(xc, _mm512_set1_pd(1.4426950408889634)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(6.93147180369123816490e-01), xc);
  r = _mm512_fnmadd_pd(n, _mm512_set1_pd(1.90821492927058770002e-10), r);
  __m512d p = _mm512_set1_pd(1.0 / 6227020800.0);  // 1/13!
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 479001600.0));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 39916800.0));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 3628800.0));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 362880.0));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 40320.0));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 5040.0));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 720.0));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 120.0));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 24.0));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 6.0));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(0.5));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0));
  const __m512d y = _mm512_scalef_pd(p, n);
  return _mm512_mask_mov_pd(y, _mm512_cmp_pd_mask(x, x, _CMP_UNORD_Q), x);
}

// fp32(sigmoid(x)) computed in fp64, as selection_scores_ref: s[0, round_up(n, 8)).
SPARSEOPS_AVX512 inline void sigmoid_scores(const float* x, float* s, int64_t n) {
  const __m512d one = _mm512_set1_pd(1.0);
  for (int64_t e = 0; e < n; e += 8) {
    const __m512d xd = _mm512_cvtps_pd(_mm256_loadu_ps(x + e));
    const __m512d sd =
        _mm512_div_pd(one, _mm512_add_pd(one, exp8d(_mm512_sub_pd(_mm512_setzero_pd(), xd))));
    _mm256_storeu_ps(s + e, _mm512_cvtpd_ps(sd));
  }
}

// sigmoid_scores of every bf16 / fp16 bit pattern (256 KB, built on first use, ~0.1 ms).
template <typename scalar_t>
SPARSEOPS_AVX512 const float* sigmoid_table() {
  static const std::vector<float> table = [] {
    std::vector<float> x(65536), t(65536);
    for (uint32_t i = 0; i < 65536; ++i) {
      x[i] = static_cast<float>(scalar_t(static_cast<uint16_t>(i), scalar_t::from_bits()));
    }
    sigmoid_scores(x.data(), t.data(), 65536);
    return t;
  }();
  return table.data();
}

// rank_key for 16 lanes; lanes outside `candidate` get INT32_MIN.
SPARSEOPS_AVX512 inline __m512i key16(__m512 r, __mmask16 candidate) {
  const __mmask16 nan = _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q);
  r = _mm512_mask_mov_ps(r, nan, _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
  r = _mm512_add_ps(r, _mm512_setzero_ps());  // -0 -> +0
  const __m512i b = _mm512_castps_si512(r);
  const __m512i k = _mm512_xor_si512(b, _mm512_srli_epi32(_mm512_srai_epi32(b, 31), 1));
  return _mm512_mask_mov_epi32(_mm512_set1_epi32(std::numeric_limits<int32_t>::min()), candidate,
                               k);
}

SPARSEOPS_AVX512 inline __mmask16 enabled16(const bool* en, int64_t e, __mmask16 lanes) {
  if (en == nullptr) return lanes;
  const __m128i b = _mm_maskz_loadu_epi8(lanes, en + e);
  return _mm_mask_cmpneq_epi8_mask(lanes, b, _mm_setzero_si128());
}

// Horizontal sum in a fixed tree order (lanes i + i+8, then i + i+4, i + i+2, 0 + 1), spelled
// out so that the 16-rows-at-once path below can mirror it bit for bit.
SPARSEOPS_AVX512 inline float hsum16(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}

// Lane masks of a descending bitonic sort of 16 lanes: at stage (size, stride) lane i keeps
// the max of itself and lane i ^ stride when (i & stride) == 0 matches the block direction.
constexpr uint16_t bitonic_max_lanes(int size, int stride) {
  uint16_t m = 0;
  for (int i = 0; i < 16; ++i) {
    const bool low = (i & stride) == 0;
    const bool descending = (i & size) == 0;
    if (low == descending) m |= static_cast<uint16_t>(1u << i);
  }
  return m;
}

// Sorts the 16 int32 lanes of each of R registers descending by a bitonic network, the R sorts
// interleaved step by step so that their latency chains overlap.
template <int R>
SPARSEOPS_AVX512 inline void bitonic_sort16_rows(__m512i* v) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#define SPARSEOPS_BITONIC_STAGE(size, stride)                                                  \
  {                                                                                            \
    const __m512i idx = _mm512_xor_si512(lane, _mm512_set1_epi32(stride));                     \
    for (int r = 0; r < R; ++r) {                                                              \
      const __m512i p = _mm512_permutexvar_epi32(idx, v[r]);                                   \
      v[r] = _mm512_mask_max_epi32(_mm512_min_epi32(v[r], p), bitonic_max_lanes(size, stride), \
                                   v[r], p);                                                   \
    }                                                                                          \
  }
  SPARSEOPS_BITONIC_STAGE(2, 1)
  SPARSEOPS_BITONIC_STAGE(4, 2)
  SPARSEOPS_BITONIC_STAGE(4, 1)
  SPARSEOPS_BITONIC_STAGE(8, 4)
  SPARSEOPS_BITONIC_STAGE(8, 2)
  SPARSEOPS_BITONIC_STAGE(8, 1)
  SPARSEOPS_BITONIC_STAGE(16, 8)
  SPARSEOPS_BITONIC_STAGE(16, 4)
  SPARSEOPS_BITONIC_STAGE(16, 2)
  SPARSEOPS_BITONIC_STAGE(16, 1)
#undef SPARSEOPS_BITONIC_STAGE
}

// The k-th largest (1 <= k <= 16) of 16 int32 lanes, by a bitonic sort.
SPARSEOPS_AVX512 inline int32_t kth_largest16(__m512i v, int k) {
  bitonic_sort16_rows<1>(&v);
  alignas(64) int32_t out[16];
  _mm512_store_si512(out, v);
  return out[k - 1];
}

// Threshold insertion over int32 keys: one compare per 16 experts against the k-th best;
// only lanes above it (rare after the first few dozen experts) pay for an insertion.
SPARSEOPS_AVX512 inline void scan_topk16(const int32_t* key, int64_t E, TopK<int32_t>& top) {
  // Floor first: the k-th largest of the 16 lane-wise maxima is at most the k-th largest key
  // (they are 16 distinct experts), so only keys at or above it need an insertion -- about
  // 11 instead of 30 for E = 128, k = 8 on random rows, and insertions (unpredictable
  // branches) were 60% of the row (perf, Zen 4).
  if (E >= 32 && top.k <= 16) {
    const __m512i lowest = _mm512_set1_epi32(std::numeric_limits<int32_t>::min());
    __m512i mx = lowest;
    for (int64_t e = 0; e < E; e += 16) {
      mx = _mm512_max_epi32(mx, _mm512_mask_loadu_epi32(lowest, lanes_below(E - e), key + e));
    }
    const int32_t floor = kth_largest16(mx, top.k);
    if (floor != std::numeric_limits<int32_t>::min()) {
      // The keys at or above the floor (at least k of them), compressed in index order. When
      // they fit one register, each one's rank (larger key first, then lower index) comes
      // from 16 broadcast compares and the k best are scattered to their slots: no branch
      // depends on the data, where the insertions mispredicted about once each.
      alignas(64) int32_t ck[kMaxExperts + 16], ci[kMaxExperts + 16];
      const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512i vfloor = _mm512_set1_epi32(floor);
      int n = 0;
      for (int64_t e = 0; e < E; e += 16) {
        const __mmask16 lanes = lanes_below(E - e);
        const __m512i v = _mm512_maskz_loadu_epi32(lanes, key + e);
        const __mmask16 m = _mm512_mask_cmpge_epi32_mask(lanes, v, vfloor);
        _mm512_storeu_si512(ck + n, _mm512_maskz_compress_epi32(m, v));
        _mm512_storeu_si512(
            ci + n, _mm512_maskz_compress_epi32(
                        m, _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(e)))));
        n += __builtin_popcount(m);
      }
      if (n <= 16) {
        const __mmask16 real = lanes_below(n);
        const __m512i K = _mm512_mask_loadu_epi32(lowest, real, ck);
        const __m512i I = _mm512_maskz_loadu_epi32(real, ci);
        __m512i rank = _mm512_setzero_si512();
        const __m512i one = _mm512_set1_epi32(1);
        for (int j = 0; j < 16; ++j) {
          const __m512i b = _mm512_permutexvar_epi32(_mm512_set1_epi32(j), K);
          const __mmask16 before =
              _mm512_cmpgt_epi32_mask(b, K) |
              (_mm512_cmpeq_epi32_mask(b, K) & static_cast<__mmask16>(0xfffeu << j));
          rank = _mm512_mask_add_epi32(rank, before, rank, one);
        }
        const __mmask16 chosen = _mm512_mask_cmplt_epi32_mask(real, rank, _mm512_set1_epi32(top.k));
        _mm512_mask_i32scatter_epi32(top.e, chosen, rank, I, 4);
        return;
      }
      top.set_floor(floor - 1);
    }
  }
  __m512i kth = _mm512_set1_epi32(top.kth());
  for (int64_t e = 0; e < E; e += 16) {
    const __mmask16 lanes = lanes_below(E - e);
    const __m512i v = _mm512_maskz_loadu_epi32(lanes, key + e);
    __mmask16 m = _mm512_mask_cmpgt_epi32_mask(lanes, v, kth);
    if (m == 0) continue;
    while (m) {
      const int j = __builtin_ctz(m);
      m &= m - 1;
      const int32_t kv = key[e + j];
      if (kv > top.kth()) top.insert(kv, static_cast<int32_t>(e + j));
    }
    kth = _mm512_set1_epi32(top.kth());
  }
}

// The rank of each of 16 int32 keys in each of R registers (larger key first, then lower
// lane), from 16 broadcast compares; the R chains interleaved.
template <int R>
SPARSEOPS_AVX512 inline void ranks16_rows(const __m512i* K, __m512i* rank) {
  for (int r = 0; r < R; ++r) rank[r] = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi32(1);
  for (int j = 0; j < 16; ++j) {
    const __m512i jj = _mm512_set1_epi32(j);
    const __mmask16 later = static_cast<__mmask16>(0xfffeu << j);
    for (int r = 0; r < R; ++r) {
      const __m512i b = _mm512_permutexvar_epi32(jj, K[r]);
      const __mmask16 before =
          _mm512_cmpgt_epi32_mask(b, K[r]) | (_mm512_cmpeq_epi32_mask(b, K[r]) & later);
      rank[r] = _mm512_mask_add_epi32(rank[r], before, rank[r], one);
    }
  }
}

// scan_topk16 for R rows at once, step by step, so that their dependency chains (the bitonic
// sort, the compress positions, the rank sums: latency, not throughput, bound a row) overlap.
// Each row gets exactly what scan_topk16 gives it. Rows in groups of 4 (1 thread, per-thread
// CPU time, Zen 4 at load ~19, 2026-12-07): Qwen3 (E = 128, k = 8) 173 -> 105 ns a row,
// gpt-oss 174 -> 101, DeepSeek-V3 fp32 626 -> 549, bf16 482 -> 397 (groups of 2: 120 ns,
// of 3: 112 ns for Qwen3).
template <int R>
SPARSEOPS_AVX512 inline void scan_topk16_rows(const int32_t* const* key, int64_t E,
                                              TopK<int32_t>* top) {
  const int k = top[0].k;
  if (E < 32 || k > 16) {
    for (int r = 0; r < R; ++r) scan_topk16(key[r], E, top[r]);
    return;
  }
  constexpr int32_t kLowest = std::numeric_limits<int32_t>::min();
  const __m512i lowest = _mm512_set1_epi32(kLowest);
  __m512i v[R];
  for (int r = 0; r < R; ++r) v[r] = lowest;
  for (int64_t e = 0; e < E; e += 16) {
    const __mmask16 lanes = lanes_below(E - e);
    for (int r = 0; r < R; ++r) {
      v[r] = _mm512_max_epi32(v[r], _mm512_mask_loadu_epi32(lowest, lanes, key[r] + e));
    }
  }
  bitonic_sort16_rows<R>(v);
  // The k-th largest lane maximum of each row: its floor (see scan_topk16).
  __m512i vfloor[R];
  int32_t floor[R];
  for (int r = 0; r < R; ++r) {
    vfloor[r] = _mm512_permutexvar_epi32(_mm512_set1_epi32(k - 1), v[r]);
    floor[r] = _mm_cvtsi128_si32(_mm512_castsi512_si128(vfloor[r]));
  }
  alignas(64) int32_t ck[R][kMaxExperts + 16], ci[R][kMaxExperts + 16];
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int n[R];
  for (int r = 0; r < R; ++r) n[r] = 0;
  for (int64_t e = 0; e < E; e += 16) {
    const __mmask16 lanes = lanes_below(E - e);
    const __m512i ids = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(e)));
    for (int r = 0; r < R; ++r) {
      const __m512i x = _mm512_maskz_loadu_epi32(lanes, key[r] + e);
      const __mmask16 m = _mm512_mask_cmpge_epi32_mask(lanes, x, vfloor[r]);
      _mm512_storeu_si512(ck[r] + n[r], _mm512_maskz_compress_epi32(m, x));
      _mm512_storeu_si512(ci[r] + n[r], _mm512_maskz_compress_epi32(m, ids));
      n[r] += __builtin_popcount(m);
    }
  }
  bool fits[R];
  __m512i K[R], I[R], rank[R];
  for (int r = 0; r < R; ++r) {
    fits[r] = floor[r] != kLowest && n[r] <= 16;
    const __mmask16 real = fits[r] ? lanes_below(n[r]) : __mmask16(0);
    K[r] = _mm512_mask_loadu_epi32(lowest, real, ck[r]);
    I[r] = _mm512_maskz_loadu_epi32(real, ci[r]);
  }
  ranks16_rows<R>(K, rank);
  for (int r = 0; r < R; ++r) {
    if (!fits[r]) {
      scan_topk16(key[r], E, top[r]);  // no floor, or more than 16 keys at or above it
      continue;
    }
    const __mmask16 chosen =
        _mm512_mask_cmplt_epi32_mask(lanes_below(n[r]), rank[r], _mm512_set1_epi32(k));
    _mm512_mask_i32scatter_epi32(top[r].e, chosen, rank[r], I[r], 4);
  }
}

// finish_weights_scalar for k <= 32 in two 16-lane vectors, from the selected logits xs
// (slot order; lanes outside valid hold -inf) in `chunks` vectors.
SPARSEOPS_AVX512 inline void finish_weights16_selected(const TopkRouteConfig& cfg, const __m512* xs,
                                                       const __mmask16* valid, int chunks,
                                                       bool zero_softmax, float row_max,
                                                       float row_sum, float* w_out) {
  const int64_t k = cfg.k;
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 scale = _mm512_set1_ps(static_cast<float>(cfg.scale));
  __m512 w[2];
  __mmask16 lanes[2];
  for (int c = 0; c < chunks; ++c) lanes[c] = lanes_below(k - 16 * c);
  if (cfg.scoring == Scoring::kSoftmax && cfg.order == Order::kTopkThenSoftmax) {
    __mmask16 nan = 0;
    __m512 m = ninf;
    for (int c = 0; c < chunks; ++c) {
      nan |= _mm512_cmp_ps_mask(xs[c], xs[c], _CMP_UNORD_Q);
      m = _mm512_max_ps(m, xs[c]);
    }
    const float mx = _mm512_reduce_max_ps(m);
    if (nan != 0 || !std::isfinite(mx)) {  // softmax NaN -> 0, then * scale (-0 if negative)
      for (int c = 0; c < chunks; ++c) {
        _mm512_mask_storeu_ps(w_out + 16 * c, lanes[c], _mm512_mul_ps(_mm512_setzero_ps(), scale));
      }
      return;
    }
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < chunks; ++c) {
      w[c] = _mm512_maskz_mov_ps(valid[c], exp16(_mm512_sub_ps(xs[c], _mm512_set1_ps(mx))));
      sum = _mm512_add_ps(sum, w[c]);
    }
    const __m512 total = _mm512_set1_ps(hsum16(sum));
    for (int c = 0; c < chunks; ++c) {
      _mm512_mask_storeu_ps(w_out + 16 * c, lanes[c],
                            _mm512_mul_ps(_mm512_div_ps(w[c], total), scale));
    }
    return;
  }
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < chunks; ++c) {
    __m512 p;
    if (cfg.scoring == Scoring::kSigmoid) {
      const __m512 one = _mm512_set1_ps(1.0f);
      p = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), xs[c]))));
    } else if (zero_softmax) {
      p = _mm512_setzero_ps();
    } else {
      p = _mm512_div_ps(exp16(_mm512_sub_ps(xs[c], _mm512_set1_ps(row_max))),
                        _mm512_set1_ps(row_sum));
    }
    w[c] = _mm512_maskz_mov_ps(valid[c], p);
    sum = _mm512_add_ps(sum, w[c]);
  }
  if (cfg.renormalize) {
    const float total = hsum16(sum);
    if (total > 0) {  // not for 0 or NaN: the reference's where(total > 0, ..., 0)
      for (int c = 0; c < chunks; ++c) w[c] = _mm512_div_ps(w[c], _mm512_set1_ps(total));
    } else {
      for (int c = 0; c < chunks; ++c) w[c] = _mm512_setzero_ps();
    }
  }
  for (int c = 0; c < chunks; ++c)
    _mm512_mask_storeu_ps(w_out + 16 * c, lanes[c], _mm512_mul_ps(w[c], scale));
}

// finish_weights16_selected of the logits xf[sel[j]] (sel[j] = -1: an empty slot).
SPARSEOPS_AVX512 inline void finish_weights16(const TopkRouteConfig& cfg, const float* xf,
                                              const int32_t* sel, bool zero_softmax, float row_max,
                                              float row_sum, float* w_out) {
  const int64_t k = cfg.k;
  const int chunks = k > 16 ? 2 : 1;
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 valid[2];
  __m512 xs[2];
  for (int c = 0; c < chunks; ++c) {
    const __mmask16 lanes = lanes_below(k - 16 * c);
    const __m512i idx = _mm512_maskz_loadu_epi32(lanes, sel + 16 * c);
    valid[c] = _mm512_mask_cmpge_epi32_mask(lanes, idx, _mm512_setzero_si512());
    xs[c] = _mm512_mask_i32gather_ps(ninf, valid[c], idx, xf, 4);
  }
  finish_weights16_selected(cfg, xs, valid, chunks, zero_softmax, row_max, row_sum, w_out);
}

// choose_groups for G <= 16 without a branch on the data: each group's rank (larger key
// first, then lower group) from 16 broadcast compares; the insertion version mispredicted
// and took 13% of a DeepSeek-V3 row (perf, Zen 4).
SPARSEOPS_AVX512 inline void choose_groups16(const int32_t* gkey, int64_t G, int64_t topk_group,
                                             char* chosen) {
  if (G > 16) {
    choose_groups(gkey, G, topk_group, chosen);
    return;
  }
  const __mmask16 real = lanes_below(G);
  const __m512i K =
      _mm512_mask_loadu_epi32(_mm512_set1_epi32(std::numeric_limits<int32_t>::min()), real, gkey);
  __m512i rank = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi32(1);
  for (int j = 0; j < 16; ++j) {
    const __m512i b = _mm512_permutexvar_epi32(_mm512_set1_epi32(j), K);
    const __mmask16 before = _mm512_cmpgt_epi32_mask(b, K) |
                             (_mm512_cmpeq_epi32_mask(b, K) & static_cast<__mmask16>(0xfffeu << j));
    rank = _mm512_mask_add_epi32(rank, before, rank, one);
  }
  const __mmask16 pick =
      _mm512_mask_cmplt_epi32_mask(real, rank, _mm512_set1_epi32(static_cast<int32_t>(topk_group)));
  for (int64_t g = 0; g < G; ++g) chosen[g] = (pick >> g) & 1;
}

// Top-2 (or max) of one group's clamped biased scores in 16-lane vectors: lane-wise best and
// second, then the best lane's second stands in for it in a second reduction.
SPARSEOPS_AVX512 inline float group_score16(const float* s, const bool* en, int64_t begin,
                                            int64_t end, bool top2) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 lo = _mm512_set1_ps(std::numeric_limits<float>::lowest());
  const __m512 hi = _mm512_set1_ps(std::numeric_limits<float>::max());
  __m512 best = ninf, second = ninf;
  for (int64_t e = begin; e < end; e += 16) {
    const __mmask16 lanes = enabled16(en, e, lanes_below(end - e));
    __m512 v = _mm512_maskz_loadu_ps(lanes, s + e);
    const __mmask16 ok = _mm512_mask_cmp_ps_mask(lanes, v, v, _CMP_ORD_Q);
    v = _mm512_mask_mov_ps(ninf, ok, _mm512_min_ps(_mm512_max_ps(v, lo), hi));
    second = _mm512_max_ps(second, _mm512_min_ps(best, v));
    best = _mm512_max_ps(best, v);
  }
  const float m1 = _mm512_reduce_max_ps(best);
  if (!top2) return m1;
  const __mmask16 at = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m1), _CMP_EQ_OQ);
  const __mmask16 first = at & static_cast<__mmask16>(-static_cast<int>(at));  // lowest set lane
  const float m2 = _mm512_reduce_max_ps(_mm512_mask_mov_ps(best, first, second));
  return m1 + m2;
}

// A row's softmax statistics, from route_row_prepare to route_row_finish.
struct RowStats {
  float row_max = -std::numeric_limits<float>::infinity();
  bool zero_softmax = false;
};

// Everything of a row before its top-k: its fp32 copy, scores and keys in ws.
template <typename scalar_t>
SPARSEOPS_AVX512 inline RowStats route_row_prepare(const RouteArgs<scalar_t, float>& a, int64_t t,
                                                   Workspace<float>& ws) {
  const TopkRouteConfig& cfg = *a.cfg;
  const int64_t E = cfg.num_experts, G = cfg.n_group, gs = cfg.group_size();
  const scalar_t* xr = a.x + t * E;
  const bool* en = a.enabled;
  const bool softmax_first =
      cfg.scoring == Scoring::kSoftmax && cfg.order == Order::kSoftmaxThenTopk;
  const bool need_score = cfg.needs_score();
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  float* xf = ws.xf;

  // The row two ahead into L1: a row's work (hundreds of cycles) hides the miss, where the
  // first load of each row stalled for 30% of a Qwen3 row at T = 16384 (perf, Zen 4); rows
  // 4-10% faster in alternating runs (noisy, shared machine).
  if (t + 2 < cfg.num_tokens) {
    const char* next = reinterpret_cast<const char*>(xr + 2 * E);
    for (int64_t b = 0; b < E * static_cast<int64_t>(sizeof(scalar_t)); b += 64) {
      _mm_prefetch(next + b, _MM_HINT_T0);
    }
  }
  // Pass 1: the row in fp32; without a score to compute, its keys and softmax max too.
  __m512 vmax = ninf;
  __mmask16 nan = 0;
  for (int64_t e = 0; e < E; e += 16) {
    const __mmask16 lanes = lanes_below(E - e);
    const __m512 v = load16(xr + e, lanes);
    _mm512_store_ps(xf + e, v);
    const __mmask16 on = enabled16(en, e, lanes);
    if (softmax_first) {
      nan |= _mm512_mask_cmp_ps_mask(on, v, v, _CMP_UNORD_Q);
      vmax = _mm512_mask_max_ps(vmax, on, vmax, v);
    }
    if (a.bias == nullptr) _mm512_store_si512(ws.key + e, key16(v, on));
  }
  float row_max = -std::numeric_limits<float>::infinity();
  bool zero_softmax = false;
  if (softmax_first) {
    row_max = _mm512_reduce_max_ps(vmax);
    zero_softmax = nan != 0 || !std::isfinite(row_max);
  }

  // Pass 2 (bias or groups): fp64 scores rounded to fp32, plus the bias; then the keys.
  if (need_score) {
    float* s = ws.score;
    if (cfg.scoring == Scoring::kSigmoid) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        sigmoid_scores(xf, s, E);
      } else {
        // 16-bit logits take only 65536 values: their fp32 scores come from a table built
        // once with sigmoid_scores itself (same bits, one gather instead of an fp64 exp
        // and divide per expert).
        const float* table = sigmoid_table<scalar_t>();
        for (int64_t e = 0; e < E; e += 16) {
          const __mmask16 lanes = lanes_below(E - e);
          const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, xr + e));
          _mm512_store_ps(s + e,
                          _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, bits, table, 4));
        }
      }
    } else if (cfg.order == Order::kSoftmaxThenTopk) {
      if (zero_softmax) {
        for (int64_t e = 0; e < E; e += 16) _mm512_store_ps(s + e, _mm512_setzero_ps());
      } else {
        const __m512d m = _mm512_set1_pd(static_cast<double>(row_max));
        __m512d sum = _mm512_setzero_pd();
        for (int64_t e = 0; e < E; e += 8) {
          const __mmask8 on =
              static_cast<__mmask8>(enabled16(en, e, lanes_below(std::min<int64_t>(E - e, 8))));
          const __m512d xd = _mm512_cvtps_pd(_mm256_load_ps(xf + e));
          const __m512d ex = _mm512_maskz_mov_pd(on, exp8d(_mm512_sub_pd(xd, m)));
          _mm512_store_pd(ws.tmp + e, ex);
          sum = _mm512_add_pd(sum, ex);
        }
        const __m512d total = _mm512_set1_pd(_mm512_reduce_add_pd(sum));
        for (int64_t e = 0; e < E; e += 8) {
          _mm256_store_ps(s + e, _mm512_cvtpd_ps(_mm512_div_pd(_mm512_load_pd(ws.tmp + e), total)));
        }
      }
    } else {
      std::memcpy(s, xf, sizeof(float) * ((E + 15) / 16 * 16));
    }
    if (a.bias != nullptr) {
      for (int64_t e = 0; e < E; e += 16) {
        const __mmask16 lanes = lanes_below(E - e);
        const __m512 v =
            _mm512_add_ps(_mm512_load_ps(s + e), _mm512_maskz_loadu_ps(lanes, a.bias + e));
        _mm512_store_ps(s + e, v);
        _mm512_store_si512(ws.key + e, key16(v, enabled16(en, e, lanes)));
      }
    }
    if (G > 1) {
      const bool top2 = cfg.group_scoring == GroupScoring::kTop2Sum && gs >= 2;
      for (int64_t g = 0; g < G; ++g) {
        ws.gkey[g] = rank_key(group_score16(s, en, g * gs, (g + 1) * gs, top2));
      }
      choose_groups16(ws.gkey, G, cfg.topk_group, ws.chosen);
      for (int64_t g = 0; g < G; ++g) {
        if (!ws.chosen[g]) {
          std::fill(ws.key + g * gs, ws.key + (g + 1) * gs, std::numeric_limits<int32_t>::min());
        }
      }
    }
  }

  return {row_max, zero_softmax};
}

// Everything of a row after its top-k: ids, then weights.
template <typename scalar_t>
SPARSEOPS_AVX512 inline void route_row_finish(const RouteArgs<scalar_t, float>& a, int64_t t,
                                              const Workspace<float>& ws, const RowStats& st,
                                              const TopK<int32_t>& top) {
  const TopkRouteConfig& cfg = *a.cfg;
  const int64_t E = cfg.num_experts;
  const bool* en = a.enabled;
  const bool softmax_first =
      cfg.scoring == Scoring::kSoftmax && cfg.order == Order::kSoftmaxThenTopk;
  const float* xf = ws.xf;
  const float row_max = st.row_max;
  const bool zero_softmax = st.zero_softmax;
  std::memcpy(a.ids + t * cfg.k, top.e, sizeof(int32_t) * cfg.k);

  float row_sum = 1;
  if (softmax_first && !zero_softmax && !softmax_sum_cancels(cfg)) {
    __m512 sum = _mm512_setzero_ps();
    const __m512 m = _mm512_set1_ps(row_max);
    for (int64_t e = 0; e < E; e += 16) {
      const __mmask16 on = enabled16(en, e, lanes_below(E - e));
      sum = _mm512_add_ps(sum,
                          _mm512_maskz_mov_ps(on, exp16(_mm512_sub_ps(_mm512_load_ps(xf + e), m))));
    }
    row_sum = hsum16(sum);
  }
  finish_weights16(cfg, xf, top.e, zero_softmax, row_max, row_sum, a.w + t * cfg.k);
}

template <typename scalar_t>
SPARSEOPS_AVX512 inline void route_row_avx512(const RouteArgs<scalar_t, float>& a, int64_t t,
                                              Workspace<float>& ws) {
  const RowStats st = route_row_prepare(a, t, ws);
  TopK<int32_t> top(a.cfg->k);
  scan_topk16(ws.key, a.cfg->num_experts, top);
  route_row_finish(a, t, ws, st, top);
}

// R rows, their top-k interleaved (scan_topk16_rows); each gets route_row_avx512's bits.
template <int R, typename scalar_t>
SPARSEOPS_AVX512 inline void route_row_group_avx512(const RouteArgs<scalar_t, float>& a, int64_t t,
                                                    Workspace<float>* ws) {
  RowStats st[R];
  TopK<int32_t> top[R];
  const int32_t* keys[R];
  for (int r = 0; r < R; ++r) {
    st[r] = route_row_prepare(a, t + r, ws[r]);
    top[r].reset(a.cfg->k);
    keys[r] = ws[r].key;
  }
  scan_topk16_rows<R>(keys, a.cfg->num_experts, top);
  for (int r = 0; r < R; ++r) route_row_finish(a, t + r, ws[r], st[r], top[r]);
}

// Sigmoid routers with a selection bias (DeepSeek-V3: E = 256, 8 groups of 32, top-4 groups,
// k = 8), no expert mask, groups of whole 16-lane vectors: the ids of route_row_avx512 from
// exact scores of a few experts only. Every decision (each group's best two scores, the
// group choice, the top-k) is taken on exact scores, as route_row_avx512 takes it, but an
// expert's exact score (fp64 sigmoid rounded to fp32, or its table, + bias) is computed only
// where a cheap fp32 approximation a cannot rule the expert out:
//   |a - s| <= delta for every expert (s its exact score), so an expert whose a lies more
//   than 2 delta below the m-th largest a of a set cannot be among the set's m best exact
//   scores (the m experts of the m largest a have s >= a - delta), nor tie with the m-th;
//   every expert that can be is "relevant" and gets its exact score. The group's best two
//   (sum or max) then come from exact scores of relevant experts, others counting -inf; the
//   top-k ranks the relevant experts of the chosen groups by their exact keys, others never
//   chosen. Both give the answer of all-exact scores: the m best of the relevant experts are
//   the m best of all, with the same ties (tests: ids bitwise equal to the reference on
//   millions of random and near-tie rows, the old 2M-value DeepSeek runs among them).
// delta: the approximation below is within 1e-4 of fp32(sigmoid) (degree-4 Taylor of 2^f,
// 6e-5 relative -> <= 1.8e-5 absolute on sigmoid; rcp14 <= 2^-14 relative -> 6.1e-5), and
// both sides add the same bias with |score| < 1024 (|bias| <= 1000 checked per call), two
// half-ulp roundings <= 6.1e-5: delta <= 1.7e-4. The rule uses a margin kSigSlack = 2^-10
// >= 2 delta + the rounding of (m-th largest a) - slack, with a 2.8x reserve. Rows with a NaN
// logit take route_row_avx512 (its NaN rules in one place). DeepSeek-V3 rows computed ~16-24
// exact scores instead of 256.
constexpr float kSigSlack = 1.0f / 1024;
constexpr float kSigGroupGap = 1.0f / 512;  // >= 4 delta + 2^-12, with a 2x reserve
constexpr float kSigMaxBias = 1000.0f;

// fp32 sigmoid within 1e-4 (absolute) of the exact one, finite for every non-NaN x.
SPARSEOPS_AVX512 inline __m512 sigmoid16_approx(__m512 x) {
  __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(-1.44269504f));  // e^-x = 2^y
  y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(126.0f));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_mul_ps(_mm512_sub_ps(y, n), _mm512_set1_ps(0.693147181f));
  __m512 p = _mm512_set1_ps(1.0f / 24);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_rcp14_ps(_mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_scalef_ps(p, n)));
}

SPARSEOPS_AVX512 inline bool sig16_applies(const TopkRouteConfig& cfg, const float* bias,
                                           const bool* enabled) {
  const int64_t E = cfg.num_experts, G = cfg.n_group;
  if (cfg.scoring != Scoring::kSigmoid || bias == nullptr || enabled != nullptr) return false;
  if (E % 16 != 0 || E / 16 > 16 || (E / G) % 16 != 0 || G > 16 || cfg.k > 16) return false;
  const int64_t vg = E / G / 16;
  if ((vg & (vg - 1)) != 0) return false;
  for (int64_t e = 0; e < E; ++e) {
    if (!(std::fabs(bias[e]) <= kSigMaxBias)) return false;  // also NaN
  }
  return true;
}

// Exact scores (fp32(sigmoid) by the fp64 path or its table, + bias) of the experts idx[0, n)
// into ex[expert].
template <typename scalar_t>
SPARSEOPS_AVX512 inline void sig16_exact(const RouteArgs<scalar_t, float>& a, const scalar_t* xr,
                                         const float* xf, const int32_t* idx, int n, float* ex) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    const __m512d one = _mm512_set1_pd(1.0);
    for (int i = 0; i < n; i += 8) {
      const __mmask8 m = static_cast<__mmask8>(lanes_below(n - i));
      const __m256i id = _mm256_maskz_loadu_epi32(m, idx + i);
      const __m256 x = _mm256_mmask_i32gather_ps(_mm256_setzero_ps(), m, id, xf, 4);
      // sigmoid_scores' arithmetic, lane for lane
      const __m512d xd = _mm512_cvtps_pd(x);
      const __m512d sd =
          _mm512_div_pd(one, _mm512_add_pd(one, exp8d(_mm512_sub_pd(_mm512_setzero_pd(), xd))));
      const __m256 b = _mm256_mmask_i32gather_ps(_mm256_setzero_ps(), m, id, a.bias, 4);
      _mm256_mask_i32scatter_ps(ex, m, id, _mm256_add_ps(_mm512_cvtpd_ps(sd), b), 4);
    }
  } else {
    (void)xf;
    const float* table = sigmoid_table<scalar_t>();
    for (int i = 0; i < n; ++i) {
      const int32_t e = idx[i];
      ex[e] = table[xr[e].x] + a.bias[e];
    }
  }
}

// Appends the experts of vector v in mask m to idx (in expert order); returns the new count.
SPARSEOPS_AVX512 inline int append_lanes(int32_t* idx, int n, int v, __mmask16 m) {
  const __m512i ids =
      _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                       _mm512_set1_epi32(16 * v));
  _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(m, ids));
  return n + __builtin_popcount(m);
}

// Merges two (best, second) sets lane by lane: the best two of their union, as a multiset.
SPARSEOPS_AVX512 inline void merge_best2(__m512& b, __m512& c, __m512 b2, __m512 c2) {
  c = _mm512_max_ps(_mm512_max_ps(c, c2), _mm512_min_ps(b, b2));
  b = _mm512_max_ps(b, b2);
}

// Each group's best and second score (as a multiset, as group_score16's m1 and m2) in lane g
// of best / second; s holds vg vectors per group. Eight groups of two vectors (DeepSeek-V3)
// pack two, then four groups per register between the merge steps (128-bit shuffles), so
// the 8 x 4 butterfly steps of the general version become 4 + 2 + 2 + 2: a DeepSeek-V3 row
// fp32 7.9 -> 7.3 ms at T = 16384 (1 thread, alternating runs).
template <int G, int vg>
SPARSEOPS_AVX512 inline void group_best2(const __m512* s, __m512& best, __m512& second) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  if constexpr (G == 8 && vg == 2) {
    __m512 b[8], c[8];
    for (int g = 0; g < 8; ++g) {
      b[g] = _mm512_max_ps(s[2 * g], s[2 * g + 1]);
      c[g] = _mm512_min_ps(s[2 * g], s[2 * g + 1]);
    }
    __m512 pb[4], pc[4];  // pair p: lanes 0-7 group 2p, lanes 8-15 group 2p + 1
    for (int p = 0; p < 4; ++p) {
      pb[p] = _mm512_shuffle_f32x4(b[2 * p], b[2 * p + 1], 0x44);
      pc[p] = _mm512_shuffle_f32x4(c[2 * p], c[2 * p + 1], 0x44);
      merge_best2(pb[p], pc[p], _mm512_shuffle_f32x4(b[2 * p], b[2 * p + 1], 0xee),
                  _mm512_shuffle_f32x4(c[2 * p], c[2 * p + 1], 0xee));
    }
    __m512 qb[2], qc[2];  // quad q: 128-bit lane j holds group 4q + j
    for (int q = 0; q < 2; ++q) {
      qb[q] = _mm512_shuffle_f32x4(pb[2 * q], pb[2 * q + 1], 0x88);
      qc[q] = _mm512_shuffle_f32x4(pc[2 * q], pc[2 * q + 1], 0x88);
      merge_best2(qb[q], qc[q], _mm512_shuffle_f32x4(pb[2 * q], pb[2 * q + 1], 0xdd),
                  _mm512_shuffle_f32x4(pc[2 * q], pc[2 * q + 1], 0xdd));
      merge_best2(qb[q], qc[q], _mm512_shuffle_ps(qb[q], qb[q], _MM_SHUFFLE(1, 0, 3, 2)),
                  _mm512_shuffle_ps(qc[q], qc[q], _MM_SHUFFLE(1, 0, 3, 2)));
      merge_best2(qb[q], qc[q], _mm512_shuffle_ps(qb[q], qb[q], _MM_SHUFFLE(2, 3, 0, 1)),
                  _mm512_shuffle_ps(qc[q], qc[q], _MM_SHUFFLE(2, 3, 0, 1)));
    }
    const __m512i pick = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0);
    best = _mm512_mask_mov_ps(ninf, 0xff, _mm512_permutex2var_ps(qb[0], pick, qb[1]));
    second = _mm512_mask_mov_ps(ninf, 0xff, _mm512_permutex2var_ps(qc[0], pick, qc[1]));
    return;
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 b[G], c[G];
  for (int g = 0; g < G; ++g) {
    b[g] = ninf;
    c[g] = ninf;
    for (int v = g * vg; v < (g + 1) * vg; ++v) merge_best2(b[g], c[g], s[v], ninf);
  }
  for (int stride = 8; stride >= 1; stride >>= 1) {
    const __m512i idx = _mm512_xor_si512(lane, _mm512_set1_epi32(stride));
    for (int g = 0; g < G; ++g) {
      merge_best2(b[g], c[g], _mm512_permutexvar_ps(idx, b[g]), _mm512_permutexvar_ps(idx, c[g]));
    }
  }
  best = ninf;
  second = ninf;
  for (int g = 0; g < G; ++g) {
    best = _mm512_mask_mov_ps(best, static_cast<__mmask16>(1u << g), b[g]);
    second = _mm512_mask_mov_ps(second, static_cast<__mmask16>(1u << g), c[g]);
  }
}

template <int G>
SPARSEOPS_AVX512 inline uint32_t sig16_choose_groups(__m512 best, __m512 second, bool top2,
                                                     int64_t topk_group, __m512& gscore) {
  gscore = top2 ? _mm512_add_ps(best, second) : best;
  const __mmask16 real = lanes_below(G);
  const __m512i K = key16(gscore, real);
  __m512i rank = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi32(1);
  for (int j = 0; j < G; ++j) {
    const __m512i b = _mm512_permutexvar_epi32(_mm512_set1_epi32(j), K);
    const __mmask16 before = _mm512_cmpgt_epi32_mask(b, K) |
                             (_mm512_cmpeq_epi32_mask(b, K) & static_cast<__mmask16>(0xfffeu << j));
    rank = _mm512_mask_add_epi32(rank, before, rank, one);
  }
  return _mm512_mask_cmplt_epi32_mask(real, rank,
                                      _mm512_set1_epi32(static_cast<int32_t>(topk_group)));
}

// V vectors of 16 experts, G groups: compile-time, so the row's vectors stay in registers
// (with runtime sizes they went through memory: 650-720 instead of ~410-450 ns a row).
template <int V, int G, typename scalar_t>
SPARSEOPS_AVX512 inline void route_row_sig16(const RouteArgs<scalar_t, float>& a, int64_t t,
                                             Workspace<float>& ws) {
  static_assert(V <= 16 && G <= 16 && V % G == 0);
  const TopkRouteConfig& cfg = *a.cfg;
  constexpr int64_t E = 16 * V;
  constexpr int vg = V / G;
  static_assert((vg & (vg - 1)) == 0);
  constexpr int vg_shift = __builtin_ctz(static_cast<unsigned>(vg));
  const int64_t k = cfg.k;
  const scalar_t* xr = a.x + t * E;
  if (t + 2 < cfg.num_tokens) {  // the row two ahead into L1 (route_row_prepare's note)
    const char* next = reinterpret_cast<const char*>(xr + 2 * E);
    for (int64_t b = 0; b < E * static_cast<int64_t>(sizeof(scalar_t)); b += 64) {
      _mm_prefetch(next + b, _MM_HINT_T0);
    }
  }
  float* xf = ws.xf;
  float* ex = ws.score;  // exact scores, of the relevant experts only
  __m512 approx[16];
  __mmask16 nan = 0;
  for (int v = 0; v < V; ++v) {
    const __m512 x = load16(xr + 16 * v, 0xffff);
    _mm512_store_ps(xf + 16 * v, x);
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    approx[v] = _mm512_add_ps(sigmoid16_approx(x), _mm512_loadu_ps(a.bias + 16 * v));
  }
  if (nan != 0) {
    route_row_avx512(a, t, ws);
    return;
  }
  const __m512 slack = _mm512_set1_ps(kSigSlack);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  alignas(64) int32_t idx[kMaxExperts + 16];
  __mmask16 known[16];  // lanes whose exact score is in ex
  for (int v = 0; v < V; ++v) known[v] = 0;
  uint32_t chosen = (1u << G) - 1;
  if (G > 1 && cfg.topk_group < G) {
    const bool top2 = cfg.group_scoring == GroupScoring::kTop2Sum;
    const __mmask16 real = lanes_below(G);
    __m512 best, second, gscore;
    group_best2<G, vg>(approx, best, second);
    chosen = sig16_choose_groups<G>(best, second, top2, cfg.topk_group, gscore);
    // The approximate group scores are within 2 delta + 2^-13 (their sum's rounding, |sum| <
    // 2048) of the exact ones, so a gap above twice that between the worst chosen and the
    // best other group decides the same groups (about 9 rows in 10 on random logits); only
    // the other rows compute the exact best two of each group.
    const float worst_in = _mm512_mask_reduce_min_ps(static_cast<__mmask16>(chosen), gscore);
    const float best_out =
        _mm512_mask_reduce_max_ps(static_cast<__mmask16>(real & ~chosen), gscore);
    if (!(worst_in - best_out > kSigGroupGap)) {
      int n = 0;
      for (int v = 0; v < V; ++v) {
        const __m512 thr = _mm512_sub_ps(
            _mm512_permutexvar_ps(_mm512_set1_epi32(v >> vg_shift), top2 ? second : best), slack);
        known[v] = _mm512_cmp_ps_mask(approx[v], thr, _CMP_GE_OQ);
        n = append_lanes(idx, n, v, known[v]);
      }
      sig16_exact(a, xr, xf, idx, n, ex);
      __m512 exact[V];
      for (int v = 0; v < V; ++v) exact[v] = _mm512_mask_load_ps(ninf, known[v], ex + 16 * v);
      group_best2<G, vg>(exact, best, second);
      chosen = sig16_choose_groups<G>(best, second, top2, cfg.topk_group, gscore);
    }
  }
  // Top-k: the floor F = k-th largest lane maximum of a over the chosen groups is at most
  // their k-th largest a; relevant: a >= F - slack; exact scores for those not yet known.
  __m512 mx = ninf;
  for (int v = 0; v < V; ++v) {
    if ((chosen >> (v >> vg_shift)) & 1u) mx = _mm512_max_ps(mx, approx[v]);
  }
  const int32_t fkey = kth_largest16(key16(mx, 0xffff), static_cast<int>(k));
  const int32_t fbits = fkey ^ ((fkey >> 31) & 0x7fffffff);  // rank_key is an involution
  float floor;
  std::memcpy(&floor, &fbits, sizeof(floor));
  const __m512 thr = _mm512_sub_ps(_mm512_set1_ps(floor), slack);
  __mmask16 rel[16];
  int n = 0;
  for (int v = 0; v < V; ++v) {
    rel[v] = ((chosen >> (v >> vg_shift)) & 1u) ? _mm512_cmp_ps_mask(approx[v], thr, _CMP_GE_OQ)
                                                : __mmask16(0);
    n = append_lanes(idx, n, v, rel[v] & static_cast<__mmask16>(~known[v]));
  }
  sig16_exact(a, xr, xf, idx, n, ex);
  // The relevant experts' exact keys, compressed in expert order; ranks by broadcast
  // compares (larger key first, then lower expert), the k best scattered to their slots.
  alignas(64) int32_t ck[kMaxExperts + 16];
  int m = 0;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int v = 0; v < V; ++v) {
    if (rel[v] == 0) continue;
    const __m512i key = key16(_mm512_maskz_load_ps(rel[v], ex + 16 * v), 0xffff);
    _mm512_storeu_si512(ck + m, _mm512_maskz_compress_epi32(rel[v], key));
    _mm512_storeu_si512(idx + m, _mm512_maskz_compress_epi32(
                                     rel[v], _mm512_add_epi32(iota, _mm512_set1_epi32(16 * v))));
    m += __builtin_popcount(rel[v]);
  }
  if (m > 16) {  // many near-ties at the floor: the all-exact row
    route_row_avx512(a, t, ws);
    return;
  }
  const __m512i lowest = _mm512_set1_epi32(std::numeric_limits<int32_t>::min());
  const __mmask16 real = lanes_below(m);
  const __m512i K = _mm512_mask_loadu_epi32(lowest, real, ck);
  const __m512i I = _mm512_maskz_loadu_epi32(real, idx);
  __m512i rank = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi32(1);
  for (int j = 0; j < m; ++j) {
    const __m512i b = _mm512_permutexvar_epi32(_mm512_set1_epi32(j), K);
    const __mmask16 before = _mm512_cmpgt_epi32_mask(b, K) |
                             (_mm512_cmpeq_epi32_mask(b, K) & static_cast<__mmask16>(0xfffeu << j));
    rank = _mm512_mask_add_epi32(rank, before, rank, one);
  }
  TopK<int32_t> top(k);
  const __mmask16 pick =
      _mm512_mask_cmplt_epi32_mask(real, rank, _mm512_set1_epi32(static_cast<int32_t>(k)));
  _mm512_mask_i32scatter_epi32(top.e, pick, rank, I, 4);
  route_row_finish(a, t, ws, RowStats{}, top);
}

// Logit e of 16 consecutive rows (row stride E) as fp32, one lane per row. bf16 / fp16 gather
// 32 bits at a 2-byte stride and keep the low half: 2 bytes past the value are read, inside
// the tensor for every expert but the last (route_block16_avx512 uses gather_rows16_last
// there).
SPARSEOPS_AVX512 inline __m512 gather_rows16(const float* x, __m512i offs) {
  return _mm512_i32gather_ps(offs, x, 4);
}
SPARSEOPS_AVX512 inline __m512 gather_rows16(const c10::BFloat16* x, __m512i offs) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_i32gather_epi32(offs, x, 2), 16));
}
SPARSEOPS_AVX512 inline __m512 gather_rows16(const c10::Half* x, __m512i offs) {
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_i32gather_epi32(offs, x, 2)));
}

// gather_rows16 for the last expert of a block that holds the tensor's last row: 16-bit
// values are read as the high half of the 32 bits that end at them (offs - 1 >= 0 for E >= 2),
// so nothing past the tensor is read.
SPARSEOPS_AVX512 inline __m512 gather_rows16_last(const float* x, __m512i offs) {
  return gather_rows16(x, offs);
}
SPARSEOPS_AVX512 inline __m512 gather_rows16_last(const c10::BFloat16* x, __m512i offs) {
  const __m512i w = _mm512_i32gather_epi32(_mm512_sub_epi32(offs, _mm512_set1_epi32(1)), x, 2);
  return _mm512_castsi512_ps(
      _mm512_and_si512(w, _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u))));
}
SPARSEOPS_AVX512 inline __m512 gather_rows16_last(const c10::Half* x, __m512i offs) {
  const __m512i w = _mm512_i32gather_epi32(_mm512_sub_epi32(offs, _mm512_set1_epi32(1)), x, 2);
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(w, 16)));
}

// Word indices of the two permutes that transpose 16 rows x 8 experts of bf16 (4 registers
// of 4 rows each) into experts x rows: step 1 takes 8 rows (two registers, word row * 8 + e)
// to 4 experts x 8 rows (half h: experts 4h..4h+3); step 2 takes step 1's results for rows
// 0-7 and 8-15 to 2 experts x 16 rows (pair p: experts 2p, 2p + 1 of the half).
struct Bf16E8Transpose {
  alignas(64) int16_t step1[2][32];
  alignas(64) int16_t step2[2][32];
  constexpr Bf16E8Transpose() : step1(), step2() {
    for (int h = 0; h < 2; ++h) {
      for (int j = 0; j < 32; ++j) step1[h][j] = static_cast<int16_t>((j % 8) * 8 + 4 * h + j / 8);
    }
    for (int p = 0; p < 2; ++p) {
      for (int j = 0; j < 32; ++j) {
        const int e = 2 * p + j / 16, row = j % 16;
        step2[p][j] = static_cast<int16_t>(row < 8 ? e * 8 + row : 32 + e * 8 + row - 8);
      }
    }
  }
};
constexpr Bf16E8Transpose kBf16E8Transpose{};

// x[e] = logit e of 16 consecutive rows of 8 bf16 logits, as fp32 (lane = row): the block
// loaded whole (4 loads) and transposed by 8 word permutes, where 8 gathers of 16 were the
// hottest instructions of a Mixtral row (perf). With route_block16_avx512<8, 2>: Mixtral bf16
// topk_route T = 16384, 1 thread, mean CPU time of 1000 calls: 186-193 us (main's build) ->
// 85-88 us (load ~5, 2026-12-07); fp32 (still gathers, <8, 2> only) 180 -> 151 us.
SPARSEOPS_AVX512 inline void load_block16_e8(const c10::BFloat16* xb, __m512* x) {
  const Bf16E8Transpose& t = kBf16E8Transpose;
  __m512i r[4], a[2][2];
  for (int q = 0; q < 4; ++q) r[q] = _mm512_loadu_si512(xb + 32 * q);
  for (int h = 0; h < 2; ++h) {
    const __m512i idx = _mm512_load_si512(t.step1[h]);
    a[0][h] = _mm512_permutex2var_epi16(r[0], idx, r[1]);  // rows 0-7
    a[1][h] = _mm512_permutex2var_epi16(r[2], idx, r[3]);  // rows 8-15
  }
  for (int h = 0; h < 2; ++h) {
    for (int p = 0; p < 2; ++p) {
      const __m512i c = _mm512_permutex2var_epi16(a[0][h], _mm512_load_si512(t.step2[p]), a[1][h]);
      const int e = 4 * h + 2 * p;
      x[e] = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(c)), 16));
      x[e + 1] = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(c, 1)), 16));
    }
  }
}

// The fp32 version of Bf16E8Transpose: 8 registers of 2 rows each; step 1 takes 4 rows to
// 4 experts x 4 rows (half h), step 2 two of those to 2 experts x 8 rows (pair p of the half),
// step 3 two of those to one expert x 16 rows (s: the pair's first or second expert).
struct F32E8Transpose {
  alignas(64) int32_t step1[2][16];
  alignas(64) int32_t step2[2][16];
  alignas(64) int32_t step3[2][16];
  constexpr F32E8Transpose() : step1(), step2(), step3() {
    for (int h = 0; h < 2; ++h) {
      for (int j = 0; j < 16; ++j) step1[h][j] = (j % 4) * 8 + 4 * h + j / 4;
    }
    for (int p = 0; p < 2; ++p) {
      for (int j = 0; j < 16; ++j) {
        const int e = 2 * p + j / 8, row = j % 8;
        step2[p][j] = row < 4 ? e * 4 + row : 16 + e * 4 + row - 4;
      }
    }
    for (int t = 0; t < 2; ++t) {
      for (int j = 0; j < 16; ++j) step3[t][j] = j < 8 ? t * 8 + j : 16 + t * 8 + j - 8;
    }
  }
};
constexpr F32E8Transpose kF32E8Transpose{};

// load_block16_e8 for fp32 logits: 8 loads and 24 permutes instead of 8 gathers. Mixtral fp32
// topk_route T = 16384, 1 thread, mean CPU time of 1000 calls (load ~5, 2026-12-07): 199-211
// us (main's build) -> 100-115 us; pair T = 4096 (wall, median of 2000): 65-66 -> 39 us, both
// dtypes. (Tried before the <8, 2> specialisation, this transpose gained nothing: the stack
// chain of the runtime-k insertion hid it.)
SPARSEOPS_AVX512 inline void load_block16_e8(const float* xb, __m512* x) {
  const F32E8Transpose& t = kF32E8Transpose;
  __m512 r[8], a[4][2], b[2][2][2];
  for (int q = 0; q < 8; ++q) r[q] = _mm512_loadu_ps(xb + 16 * q);
  for (int h = 0; h < 2; ++h) {
    const __m512i idx = _mm512_load_si512(t.step1[h]);
    for (int u = 0; u < 4; ++u) a[u][h] = _mm512_permutex2var_ps(r[2 * u], idx, r[2 * u + 1]);
  }
  for (int p = 0; p < 2; ++p) {
    const __m512i idx = _mm512_load_si512(t.step2[p]);
    for (int v = 0; v < 2; ++v) {
      for (int h = 0; h < 2; ++h) {
        b[v][h][p] = _mm512_permutex2var_ps(a[2 * v][h], idx, a[2 * v + 1][h]);
      }
    }
  }
  for (int s = 0; s < 2; ++s) {
    const __m512i idx = _mm512_load_si512(t.step3[s]);
    for (int h = 0; h < 2; ++h) {
      for (int p = 0; p < 2; ++p) {
        x[4 * h + 2 * p + s] = _mm512_permutex2var_ps(b[0][h][p], idx, b[1][h][p]);
      }
    }
  }
}

// Stores slot j of 16 rows (one lane per row) to out[r * k + j].
SPARSEOPS_AVX512 inline void scatter_slots16(int32_t* out, int64_t k, int j, __m512i v) {
  const __m512i rows = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i offs = _mm512_add_epi32(
      _mm512_mullo_epi32(rows, _mm512_set1_epi32(static_cast<int32_t>(k))), _mm512_set1_epi32(j));
  _mm512_i32scatter_epi32(out, offs, v, 4);
}

// Sums 16 per-lane terms (t[0..15], one register each) in hsum16's tree order, so a row
// routed here gets the bits it gets in route_row_avx512.
SPARSEOPS_AVX512 inline __m512 tree_sum16(const __m512* t) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i) a[i] = _mm512_add_ps(t[i], t[i + 8]);
  for (int i = 0; i < 4; ++i) b[i] = _mm512_add_ps(a[i], a[i + 4]);
  return _mm512_add_ps(_mm512_add_ps(b[0], b[2]), _mm512_add_ps(b[1], b[3]));
}

// 16 rows at once, one lane per row, for E <= 16 without a bias or groups (Mixtral): no
// horizontal reductions, a branch-free insertion top-k over the E experts, and the same
// arithmetic in the same order as route_row_avx512 (so which path a row takes never shows
// in its bits).
// EC, KC: E and k fixed at compile time (Mixtral: 8, 2), or 0 for the runtime values. With
// runtime sizes the top-k slots and logits live on the stack and each expert's insertion
// waits on the previous one's stores (perf: 60% of a Mixtral row on those loads / blends).
template <int EC, int KC, typename scalar_t>
SPARSEOPS_AVX512 void route_block16_avx512(const RouteArgs<scalar_t, float>& a, int64_t row0) {
  const TopkRouteConfig& cfg = *a.cfg;
  const int64_t E = EC > 0 ? EC : cfg.num_experts, k = KC > 0 ? KC : cfg.k;
  const scalar_t* xb = a.x + row0 * E;
  const bool softmax_first =
      cfg.scoring == Scoring::kSoftmax && cfg.order == Order::kSoftmaxThenTopk;
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 zero = _mm512_setzero_ps();
  const __m512i row_offs =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(static_cast<int32_t>(E)));

  __m512 x[16];
  __m512 m = ninf;
  __mmask16 nan = 0;
  // Top-k slots: key, expert and logit per lane, best first.
  __m512i top_key[16], top_id[16];
  __m512 top_x[16];
  for (int j = 0; j < k; ++j) {
    top_key[j] = _mm512_set1_epi32(std::numeric_limits<int32_t>::min());
    top_id[j] = _mm512_set1_epi32(-1);
    top_x[j] = ninf;
  }
  constexpr bool whole_block =
      EC == 8 && (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, float>);
  if constexpr (whole_block) load_block16_e8(xb, x);
  for (int e = 0; e < E; ++e) {
    if constexpr (!whole_block) {
      const __m512i offs = _mm512_add_epi32(row_offs, _mm512_set1_epi32(e));
      x[e] = e == E - 1 ? gather_rows16_last(xb, offs) : gather_rows16(xb, offs);
    }
    const bool on = a.enabled == nullptr || a.enabled[e];
    if (softmax_first && on) {
      nan |= _mm512_cmp_ps_mask(x[e], x[e], _CMP_UNORD_Q);
      m = _mm512_max_ps(m, x[e]);
    }
    if (!on) continue;
    __m512i ck = key16(x[e], 0xffff);
    __m512i ci = _mm512_set1_epi32(e);
    __m512 cx = x[e];
    for (int j = 0; j < k; ++j) {
      // ranks_before: a larger key, or an equal key of a lower expert (a displaced entry
      // moving down can tie with a later expert below it).
      const __mmask16 gt =
          _mm512_cmpgt_epi32_mask(ck, top_key[j]) |
          (_mm512_cmpeq_epi32_mask(ck, top_key[j]) & _mm512_cmplt_epi32_mask(ci, top_id[j]));
      const __m512i nk = _mm512_mask_mov_epi32(top_key[j], gt, ck);
      const __m512i ni = _mm512_mask_mov_epi32(top_id[j], gt, ci);
      const __m512 nx = _mm512_mask_mov_ps(top_x[j], gt, cx);
      ck = _mm512_mask_mov_epi32(ck, gt, top_key[j]);
      ci = _mm512_mask_mov_epi32(ci, gt, top_id[j]);
      cx = _mm512_mask_mov_ps(cx, gt, top_x[j]);
      top_key[j] = nk;
      top_id[j] = ni;
      top_x[j] = nx;
    }
  }
  if (k == 1) {
    _mm512_storeu_si512(a.ids + row0, top_id[0]);
  } else if (k == 2) {
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi =
        _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    _mm512_storeu_si512(a.ids + row0 * 2, _mm512_permutex2var_epi32(top_id[0], lo, top_id[1]));
    _mm512_storeu_si512(a.ids + row0 * 2 + 16, _mm512_permutex2var_epi32(top_id[0], hi, top_id[1]));
  } else {
    for (int j = 0; j < k; ++j) scatter_slots16(a.ids + row0 * k, k, j, top_id[j]);
  }

  // Weights, lane-wise exactly as finish_weights16 computes them for one row.
  __m512 w[16];
  __mmask16 valid[16];
  for (int j = 0; j < k; ++j) valid[j] = _mm512_cmpge_epi32_mask(top_id[j], _mm512_setzero_si512());
  __m512 t[16];
  if (cfg.scoring == Scoring::kSoftmax && cfg.order == Order::kTopkThenSoftmax) {
    __m512 mx = ninf;
    __mmask16 bad = 0;
    for (int j = 0; j < k; ++j) {
      const __m512 xs = _mm512_mask_mov_ps(ninf, valid[j], top_x[j]);
      bad |= _mm512_cmp_ps_mask(xs, xs, _CMP_UNORD_Q);
      mx = _mm512_max_ps(mx, xs);
    }
    bad |= _mm512_cmp_ps_mask(mx, mx, _CMP_UNORD_Q) |
           _mm512_cmp_ps_mask(_mm512_abs_ps(mx),
                              _mm512_set1_ps(std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
    for (int j = 0; j < 16; ++j) {
      t[j] = j < k ? _mm512_maskz_mov_ps(valid[j], exp16(_mm512_sub_ps(top_x[j], mx))) : zero;
      w[j] = t[j];
    }
    const __m512 total = tree_sum16(t);
    for (int j = 0; j < k; ++j)
      w[j] = _mm512_maskz_mov_ps(static_cast<__mmask16>(~bad), _mm512_div_ps(w[j], total));
  } else {
    __m512 sum = _mm512_set1_ps(1.0f);
    __mmask16 zero_softmax = 0;
    if (softmax_first) {
      zero_softmax = nan | _mm512_cmp_ps_mask(
                               _mm512_abs_ps(m),
                               _mm512_set1_ps(std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
    }
    if (softmax_first && !softmax_sum_cancels(cfg)) {
      for (int e = 0; e < 16; ++e) {
        const bool on = e < E && (a.enabled == nullptr || a.enabled[e]);
        t[e] = on ? exp16(_mm512_sub_ps(x[e], m)) : zero;
      }
      sum = tree_sum16(t);
    }
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int j = 0; j < 16; ++j) {
      if (j >= k) {
        t[j] = zero;
        continue;
      }
      __m512 p;
      if (cfg.scoring == Scoring::kSigmoid) {
        p = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(zero, top_x[j]))));
      } else {
        p = _mm512_maskz_mov_ps(static_cast<__mmask16>(~zero_softmax),
                                _mm512_div_ps(exp16(_mm512_sub_ps(top_x[j], m)), sum));
      }
      w[j] = _mm512_maskz_mov_ps(valid[j], p);
      t[j] = w[j];
    }
    if (cfg.renormalize) {
      const __m512 total = tree_sum16(t);
      const __mmask16 positive = _mm512_cmp_ps_mask(total, zero, _CMP_GT_OQ);
      for (int j = 0; j < k; ++j) w[j] = _mm512_maskz_mov_ps(positive, _mm512_div_ps(w[j], total));
    }
  }
  const __m512 scale = _mm512_set1_ps(static_cast<float>(cfg.scale));
  for (int j = 0; j < k; ++j) w[j] = _mm512_mul_ps(w[j], scale);
  float* wo = a.w + row0 * k;
  if (k == 1) {
    _mm512_storeu_ps(wo, w[0]);
  } else if (k == 2) {
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi =
        _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    _mm512_storeu_ps(wo, _mm512_permutex2var_ps(w[0], lo, w[1]));
    _mm512_storeu_ps(wo + 16, _mm512_permutex2var_ps(w[0], hi, w[1]));
  } else {
    for (int j = 0; j < k; ++j) {
      scatter_slots16(reinterpret_cast<int32_t*>(wo), k, j, _mm512_castps_si512(w[j]));
    }
  }
}

// bf16 logits ranked by the logits themselves (no bias, no groups, no mask; weights that
// need only the k selected logits: Qwen3, gpt-oss): the rank keys come straight from the
// 16-bit patterns, 32 experts a register, without the fp32 copy of the row nor its 32-bit
// keys. Sign-magnitude to two's complement (key = sign ? -mag : mag) orders bf16 values as
// floats with -0 == +0; NaN rows (mag > 0x7f80) take route_row_avx512. The floor is the k-th
// largest of 16 lane maxima (32 lane-wise maxima folded in pairs: 16 distinct experts, so at
// most the k-th best key, as scan_topk16's); the keys at or above it are compressed 32 at a
// time (vpcompressw) and, as (key << 16) | (0xffff - expert), sorted by the bitonic network:
// rows with more than 16 keys at the floor (many ties) also take route_row_avx512. The
// selected logits come back from their keys, so finish_weights16_selected sees the values
// route_row_avx512 gives it (row_max = the best logit: x - (+-0) and exp are the same for +0
// and -0) and every row gets its bits exactly. topk_route Qwen3 bf16 T = 16384, 1 thread,
// mean CPU time of 300 calls, alternating processes against main's build (load ~5,
// 2026-12-07): 1775-1872 -> 851-985 us.
constexpr int kBf16KeyRows = 4;

SPARSEOPS_AVX512 inline bool bf16_keys_apply(const TopkRouteConfig& cfg, const void* bias,
                                             const bool* enabled) {
  const int64_t E = cfg.num_experts;
  if (bias != nullptr || enabled != nullptr || cfg.needs_score()) return false;
  if (E % 32 != 0 || E < 32 || E > 256 || cfg.k > 16) return false;
  return cfg.scoring == Scoring::kSigmoid || cfg.order == Order::kTopkThenSoftmax ||
         softmax_sum_cancels(cfg);
}

template <int R>
SPARSEOPS_AVX512_VBMI2 void route_rows_bf16_keys(const RouteArgs<c10::BFloat16, float>& a,
                                                 int64_t t, Workspace<float>& ws) {
  const TopkRouteConfig& cfg = *a.cfg;
  const int64_t E = cfg.num_experts, k = cfg.k;
  const int V = static_cast<int>(E / 32);
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(a.x) + t * E;
  // The next group of rows into L1 (route_row_prepare's note).
  const int64_t ahead = std::min<int64_t>(R, cfg.num_tokens - t - R);
  for (int64_t b = 0; b < ahead * E * 2; b += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(xb + R * E) + b, _MM_HINT_T0);
  }
  const __m512i mag_bits = _mm512_set1_epi16(0x7fff);
  const __m512i inf_bits = _mm512_set1_epi16(0x7f80);
  __m512i key[R][8], v[R];
  __mmask32 nan[R];
  for (int r = 0; r < R; ++r) {
    __m512i mx = _mm512_set1_epi16(std::numeric_limits<int16_t>::min());
    nan[r] = 0;
    for (int i = 0; i < V; ++i) {
      const __m512i b = _mm512_loadu_si512(xb + r * E + 32 * i);
      const __m512i mag = _mm512_and_si512(b, mag_bits);
      const __m512i sign = _mm512_srai_epi16(b, 15);
      nan[r] |= _mm512_cmpgt_epi16_mask(mag, inf_bits);
      key[r][i] = _mm512_sub_epi16(_mm512_xor_si512(mag, sign), sign);
      mx = _mm512_max_epi16(mx, key[r][i]);
    }
    v[r] = _mm512_cvtepi16_epi32(
        _mm256_max_epi16(_mm512_castsi512_si256(mx), _mm512_extracti64x4_epi64(mx, 1)));
  }
  bitonic_sort16_rows<R>(v);
  __m512i vfloor[R];
  for (int r = 0; r < R; ++r) {
    vfloor[r] = _mm512_set1_epi16(static_cast<int16_t>(
        _mm_cvtsi128_si32(_mm512_castsi512_si128(_mm512_permutexvar_epi32(
            _mm512_set1_epi32(static_cast<int32_t>(k - 1)), v[r])))));
  }
  // The keys at or above the floor and their experts as 0xffff - e, compressed in expert
  // order.
  alignas(64) int16_t ck[R][kMaxExperts + 32], ci[R][kMaxExperts + 32];
  const __m512i down = _mm512_set_epi16(
      -32, -31, -30, -29, -28, -27, -26, -25, -24, -23, -22, -21, -20, -19, -18, -17, -16, -15,
      -14, -13, -12, -11, -10, -9, -8, -7, -6, -5, -4, -3, -2, -1);  // 0xffff - lane, as int16
  int n[R];
  for (int r = 0; r < R; ++r) n[r] = 0;
  for (int i = 0; i < V; ++i) {
    const __m512i nid = _mm512_sub_epi16(down, _mm512_set1_epi16(static_cast<int16_t>(32 * i)));
    for (int r = 0; r < R; ++r) {
      const __mmask32 m = _mm512_cmpge_epi16_mask(key[r][i], vfloor[r]);
      _mm512_storeu_si512(ck[r] + n[r], _mm512_maskz_compress_epi16(m, key[r][i]));
      _mm512_storeu_si512(ci[r] + n[r], _mm512_maskz_compress_epi16(m, nid));
      n[r] += __builtin_popcount(m);
    }
  }
  // (key << 16) | (0xffff - e): one int32 per expert, larger exactly when the expert ranks
  // first (larger key, then lower index), all distinct. Sorted descending, lanes 0..k-1 are
  // the slots: no rank sums, no scatters (a rank-and-scatter version of this path spent
  // two thirds of its time in the weights' gather and its scatters, perf).
  __m512i c[R];
  for (int r = 0; r < R; ++r) {
    const __mmask16 real = nan[r] == 0 && n[r] <= 16 ? lanes_below(n[r]) : __mmask16(0);
    const __m512i kk = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(real, ck[r]));
    const __m512i ii = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(real, ci[r]));
    c[r] = _mm512_mask_mov_epi32(_mm512_set1_epi32(std::numeric_limits<int32_t>::min()), real,
                                 _mm512_or_si512(_mm512_slli_epi32(kk, 16), ii));
  }
  bitonic_sort16_rows<R>(c);
  const __mmask16 slots = lanes_below(k);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int r = 0; r < R; ++r) {
    if (nan[r] != 0 || n[r] > 16) {
      route_row_avx512(a, t + r, ws);
      continue;
    }
    const __m512i lo = _mm512_and_si512(c[r], _mm512_set1_epi32(0xffff));
    _mm512_mask_storeu_epi32(a.ids + (t + r) * k, slots,
                             _mm512_sub_epi32(_mm512_set1_epi32(0xffff), lo));
    // The key back to its bf16 pattern (|key|, the sign from key < 0), then to fp32.
    const __m512i kk = _mm512_srai_epi32(c[r], 16);
    const __m512i sign = _mm512_and_si512(_mm512_srai_epi32(kk, 31), _mm512_set1_epi32(0x8000));
    const __m512 x = _mm512_mask_mov_ps(
        ninf, slots,
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_or_si512(_mm512_abs_epi32(kk), sign), 16)));
    const float row_max = _mm_cvtss_f32(_mm512_castps512_ps128(x));
    finish_weights16_selected(cfg, &x, &slots, 1, !std::isfinite(row_max), row_max, 1.0f,
                              a.w + (t + r) * k);
  }
}

// Rows whose top-k runs interleaved (route_row_group_avx512).
constexpr int kRowGroup = 4;

template <typename scalar_t>
SPARSEOPS_AVX512 void route_rows_avx512(const RouteArgs<scalar_t, float>& a, int64_t begin,
                                        int64_t end) {
  Workspace<float> ws[kRowGroup];
  int64_t t = begin;
  const TopkRouteConfig& cfg = *a.cfg;
  if (cfg.num_experts <= 16 && cfg.num_experts >= 2 && !cfg.needs_score()) {
    // Whole blocks of 16 rows aligned to row 0 (the last expert of each row read by
    // gather_rows16_last: nothing past the tensor): which rows take this path depends on T
    // only, not on the thread split. T = 16 Mixtral rows went from 1.2 to ~0.2 us.
    for (; t < end && t % 16 != 0; ++t) route_row_avx512(a, t, ws[0]);
    if (cfg.num_experts == 8 && cfg.k == 2) {
      for (; t + 16 <= end; t += 16) route_block16_avx512<8, 2>(a, t);
    }
    for (; t + 16 <= end; t += 16) route_block16_avx512<0, 0>(a, t);
  }
  // DeepSeek-V3 (topk_route T = 16384, 1 thread, alternating processes, load ~4: fp32
  // 9.6-10.2 -> 6.7-6.8 ms; bf16, whose exact scores come from the table, 6.8-7.1 -> 5.9-6.7).
  if (cfg.num_experts == 256 && cfg.n_group == 8 && sig16_applies(cfg, a.bias, a.enabled)) {
    for (; t < end; ++t) route_row_sig16<16, 8>(a, t, ws[0]);
  }
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (use_avx512_vbmi2() && bf16_keys_apply(cfg, a.bias, a.enabled)) {
      for (; t + kBf16KeyRows <= end; t += kBf16KeyRows) {
        route_rows_bf16_keys<kBf16KeyRows>(a, t, ws[0]);
      }
    }
  }
  if (cfg.num_experts >= 32 && cfg.k <= 16) {
    for (; t + kRowGroup <= end; t += kRowGroup) route_row_group_avx512<kRowGroup>(a, t, ws);
  }
  for (; t < end; ++t) route_row_avx512(a, t, ws[0]);
}
#endif  // SPARSEOPS_HAVE_AVX512_PATH

template <typename scalar_t, typename acc_t>
void route_rows(const RouteArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
#if SPARSEOPS_HAVE_AVX512_PATH
  if constexpr (std::is_same_v<acc_t, float>) {
    if (use_avx512()) {
      route_rows_avx512(a, begin, end);
      return;
    }
  }
#endif
  Workspace<acc_t> ws;
  for (int64_t t = begin; t < end; ++t) route_row_scalar(a, t, ws);
}

// ---------------------------------------------------------------------------------------
// route_metadata's stable counting sort, in three steps shared by route_metadata_cpu_kernel
// and route_cpu_kernel: per-chunk histograms, a scan, a per-chunk placement. Chunks are whole
// rows; the output never depends on the chunking (a stable sort by expert has one answer),
// only the speed does.

// Bucket E collects dropped slots (id -1) so they land after every expert: as unsigned, -1 is
// the largest value, so min(v, E) maps it there without a branch.
inline uint32_t bucket_of(int32_t v, uint32_t E) { return std::min(static_cast<uint32_t>(v), E); }

// Counts slots [i0, i1) of id into h[0..E]; returns whether a value lies outside [-1, E)
// (such values are counted in bucket E, and the caller throws).
inline bool count_ids(const int32_t* id, int64_t i0, int64_t i1, int64_t E, int32_t* h) {
  const uint32_t ue = static_cast<uint32_t>(E);
  bool bad = false;
  for (int64_t i = i0; i < i1; ++i) {
    const int32_t v = id[i];
    bad |= static_cast<uint32_t>(v + 1) > ue;  // v in [-1, E) iff v + 1 in [0, E]
    ++h[bucket_of(v, ue)];
  }
  return bad;
}

// Exclusive scan of hist [chunks][E + 1] in (bucket, chunk) order: each chunk's first
// position per bucket replaces its count; counts and offs (cumulative ends) are written.
void metadata_scan(int32_t* hist, int64_t chunks, int64_t E, RouteMetadata& out) {
  int32_t* counts = out.counts.mutable_data_ptr<int32_t>();
  int32_t* offs = out.offs.mutable_data_ptr<int32_t>();
  int32_t running = 0;
  for (int64_t e = 0; e <= E; ++e) {
    const int32_t start = running;
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t h = hist[c * (E + 1) + e];
      hist[c * (E + 1) + e] = running;
      running += h;
    }
    if (e < E) {
      counts[e] = running - start;
      offs[e] = running;
    }
  }
}

#if SPARSEOPS_HAVE_AVX512_PATH
// metadata_place for E <= 16 and k a power of two (Mixtral): 16 slots at a time, each bucket
// taking its slots by one compress (slot and token, stored contiguously at its next position
// under a mask) and their positions by one expand into the inverse. The scalar placement's
// load-increment-store of next[] is a store-forwarding chain whenever neighbouring slots
// share a bucket, which with 8 experts is most of the time. Mixtral bf16 pair T = 4096,
// 1 thread (perf cpu-clock samples, load ~5, 2026-12-07): count + placement 11.0% -> 8.9%
// of the samples against the rows' 25%, about 7% off the pair. (Unlike the 16-slots-at-once
// placement tried for all E, no gather / scatter: Zen 4's scatters were what lost there.)
// The slots of one bucket (lanes m of slot / tok) at its next positions; their positions
// into inv's lanes m.
SPARSEOPS_AVX512 inline void place_bucket16(__mmask16 m, __m512i slot, __m512i tok, int32_t* next,
                                            int32_t* sorted_slots, int32_t* tokens, __m512i& inv) {
  const int32_t at = *next;
  const int c = __builtin_popcount(m);
  const __mmask16 head = lanes_below(c);
  _mm512_mask_storeu_epi32(sorted_slots + at, head, _mm512_maskz_compress_epi32(m, slot));
  _mm512_mask_storeu_epi32(tokens + at, head, _mm512_maskz_compress_epi32(m, tok));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  inv = _mm512_mask_expand_epi32(inv, m, _mm512_add_epi32(iota, _mm512_set1_epi32(at)));
  *next = at + c;
}

SPARSEOPS_AVX512 void metadata_place_small(const int32_t* id, int64_t k, int64_t E, int64_t t0,
                                           int64_t t1, int32_t* next, int32_t* sorted_slots,
                                           int32_t* inverse, int32_t* tokens) {
  const int kshift = __builtin_ctzll(static_cast<unsigned long long>(k));
  const int64_t i1 = t1 * k;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i ue = _mm512_set1_epi32(static_cast<int32_t>(E));
  for (int64_t i = t0 * k; i < i1; i += 16) {
    const __mmask16 lanes = lanes_below(i1 - i);
    const __m512i slot = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(i)));
    const __m512i tok = _mm512_srli_epi32(slot, kshift);
    const __m512i b = _mm512_min_epu32(_mm512_maskz_loadu_epi32(lanes, id + i), ue);
    __m512i inv = _mm512_setzero_si512();
    for (int32_t e = 0; e < static_cast<int32_t>(E); ++e) {
      place_bucket16(_mm512_mask_cmpeq_epi32_mask(lanes, b, _mm512_set1_epi32(e)), slot, tok,
                     next + e, sorted_slots, tokens, inv);
    }
    const __mmask16 dropped = _mm512_mask_cmpeq_epi32_mask(lanes, b, ue);
    if (dropped != 0) place_bucket16(dropped, slot, tok, next + E, sorted_slots, tokens, inv);
    _mm512_mask_storeu_epi32(inverse + i, lanes, inv);
  }
}
#endif

// Places the slots of rows [t0, t1) (next: the chunk's scanned positions per bucket).
inline void metadata_place(const int32_t* id, int64_t k, int64_t E, int64_t t0, int64_t t1,
                           int32_t* next, int32_t* sorted_slots, int32_t* inverse,
                           int32_t* tokens) {
#if SPARSEOPS_HAVE_AVX512_PATH
  if (E <= 16 && k <= 16 && (k & (k - 1)) == 0 && use_avx512()) {
    metadata_place_small(id, k, E, t0, t1, next, sorted_slots, inverse, tokens);
    return;
  }
#endif
  const uint32_t ue = static_cast<uint32_t>(E);
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = t * k + j;
      const int32_t pos = next[bucket_of(id[i], ue)]++;
      sorted_slots[pos] = static_cast<int32_t>(i);
      inverse[i] = pos;
      tokens[pos] = static_cast<int32_t>(t);
    }
  }
}

// The block-padded layout from counts, offs and sorted_slots (block_m > 0).
void metadata_padded(int64_t n, int64_t E, int64_t block_m, RouteMetadata& out) {
  const int32_t* counts = out.counts.const_data_ptr<int32_t>();
  const int32_t* offs = out.offs.const_data_ptr<int32_t>();
  const int32_t* sorted_slots = out.sorted_slots.const_data_ptr<int32_t>();
  int32_t* padded_slots = out.padded_slots.mutable_data_ptr<int32_t>();
  int32_t* block_expert = out.block_expert.mutable_data_ptr<int32_t>();
  int32_t* padded_offs = out.padded_offs.mutable_data_ptr<int32_t>();
  const int64_t padded_rows = out.padded_slots.numel();
  std::fill(padded_slots, padded_slots + padded_rows, static_cast<int32_t>(n));
  std::fill(block_expert, block_expert + out.block_expert.numel(), -1);
  int64_t padded_end = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t start = offs[e] - counts[e];
    std::copy(sorted_slots + start, sorted_slots + offs[e], padded_slots + padded_end);
    const int64_t padded_count = (counts[e] + block_m - 1) / block_m * block_m;
    std::fill(block_expert + padded_end / block_m,
              block_expert + (padded_end + padded_count) / block_m, static_cast<int32_t>(e));
    padded_end += padded_count;
    padded_offs[e] = static_cast<int32_t>(padded_end);
  }
}

void advise_metadata_pages(RouteMetadata& out) {
  for (const Tensor* t : {&out.sorted_slots, &out.inverse, &out.tokens, &out.padded_slots}) {
    if (t->defined()) advise_huge_pages(*t);
  }
}

// The chunk histograms: on the stack for one chunk (every decode call), else on the heap.
struct ChunkHistograms {
  ChunkHistograms(int64_t chunks, int64_t E) {
    const int64_t n = chunks * (E + 1);
    if (chunks == 1) {
      data = local;
      std::fill(local, local + n, 0);
    } else {
      heap.assign(n, 0);
      data = heap.data();
    }
  }
  int32_t* data;
  int32_t local[kMaxExperts + 1];
  std::vector<int32_t> heap;
};

// Builds the RouteArgs of these tensors for their logits dtype and calls fn(args).
template <typename Fn>
void with_route_args(const Tensor& logits, const Tensor& bias, const Tensor& mask,
                     const TopkRouteConfig& cfg, Tensor& weights, Tensor& ids, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_route_cpu", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        RouteArgs<scalar_t, acc_t> a;
        a.x = logits.const_data_ptr<scalar_t>();
        a.bias = cfg.has_bias ? bias.const_data_ptr<acc_t>() : nullptr;
        a.enabled = cfg.has_mask ? mask.const_data_ptr<bool>() : nullptr;
        a.w = weights.mutable_data_ptr<acc_t>();
        a.ids = ids.mutable_data_ptr<int32_t>();
        a.cfg = &cfg;
        fn(a);
      });
}

}  // namespace

void topk_route_cpu_kernel(const Tensor& logits, const Tensor& bias, const Tensor& mask,
                           const TopkRouteConfig& cfg, Tensor& weights, Tensor& ids) {
  advise_huge_pages(weights);
  advise_huge_pages(ids);
  with_route_args(logits, bias, mask, cfg, weights, ids, [&](const auto& a) {
    // Rows per task: about 16K logits (tens of microseconds of work) amortise a parallel
    // region's start-up; smaller T runs on the calling thread. The split never changes the
    // answer (every row is computed alone). Tasks split at multiples of 16 rows, so the
    // 16-row blocks of small-E routers are the same whatever the thread count.
    const int64_t T = cfg.num_tokens;
    const int64_t grain = std::max<int64_t>(16, 16384 / cfg.num_experts);
    if (T <= grain) {
      route_rows(a, 0, T);
    } else {
      at::parallel_for(0, (T + 15) / 16, grain / 16, [&](int64_t b0, int64_t b1) {
        route_rows(a, b0 * 16, std::min(T, b1 * 16));
      });
    }
  });
}

void route_metadata_cpu_kernel(const Tensor& ids, int64_t num_experts, int64_t block_m,
                               RouteMetadata& out) {
  const int64_t E = num_experts;
  const int64_t n = ids.numel();
  const int64_t k = ids.size(1);
  const int64_t T = n / k;
  const int32_t* id = ids.const_data_ptr<int32_t>();

  // Chunks of whole rows fixed by the shape alone: n / 16 slots, at least 16K (so two
  // threads share T*k = 32K, Mixtral at T = 16K) and at most 256K (long runs per bucket keep
  // the scattered writes in whole cache lines). Whole rows keep token = row without a
  // division per slot; int32 counters halve the histogram traffic.
  const int64_t chunk_slots = std::clamp<int64_t>(n / 16, 16384, 262144);
  const int64_t rows_per_chunk = std::max<int64_t>(1, chunk_slots / k);
  const int64_t chunks = (T + rows_per_chunk - 1) / rows_per_chunk;
  // Below 64K slots the sort stays on the calling thread: waking the second thread for the
  // two parallel phases cost more than it saved (E = 8, T*k = 32K: 66 us on one thread, 135 us
  // on two; T*k = 128K: 226 vs 120 us; 2-core EPYC, 2026-12-02).
  const int64_t grain = n < 65536 ? chunks : 1;
  ChunkHistograms hist(chunks, E);
  std::atomic<bool> bad{false};
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    bool local_bad = false;
    for (int64_t c = c0; c < c1; ++c) {
      local_bad |= count_ids(id, c * rows_per_chunk * k, std::min(T, (c + 1) * rows_per_chunk) * k,
                             E, hist.data + c * (E + 1));
    }
    if (local_bad) bad = true;
  });
  TORCH_CHECK(!bad, "ids must hold expert indices in [0, num_experts = ", E,
              ") or -1 for a dropped slot, got a value outside that range in ids ", describe(ids));
  metadata_scan(hist.data, chunks, E, out);
  advise_metadata_pages(out);
  int32_t* sorted_slots = out.sorted_slots.mutable_data_ptr<int32_t>();
  int32_t* inverse = out.inverse.mutable_data_ptr<int32_t>();
  int32_t* tokens = out.tokens.mutable_data_ptr<int32_t>();
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      metadata_place(id, k, E, c * rows_per_chunk, std::min(T, (c + 1) * rows_per_chunk),
                     hist.data + c * (E + 1), sorted_slots, inverse, tokens);
    }
  });
  if (block_m > 0) metadata_padded(n, E, block_m, out);
}

void route_cpu_kernel(const Tensor& logits, const Tensor& bias, const Tensor& mask,
                      const TopkRouteConfig& cfg, int64_t block_m, Tensor& weights, Tensor& ids,
                      RouteMetadata& out) {
  const int64_t T = cfg.num_tokens, k = cfg.k, E = cfg.num_experts, n = T * k;
  advise_huge_pages(weights);
  advise_huge_pages(ids);
  advise_metadata_pages(out);
  // Chunks of whole 16-row blocks (the small-E path's blocks stay aligned to row 0), about
  // 32K logits each, at most 256 of them (a bounded histogram and scan). Each chunk's ids are
  // counted right after its rows are routed, while they are still in L1/L2, so the
  // metadata costs one more pass (the placement) instead of two. Mixtral at T = 4096 is one
  // chunk, so one thread: two chunks of 2048 rows on two threads took 82-92 us against 63-66
  // on one (wall medians of 2000 calls, load ~5.8 on 2 cores, 2026-12-07, before the
  // transposed block loads), the second thread often descheduled; the crossover on a quiet
  // machine is not measured yet.
  const int64_t rows = std::max<int64_t>(std::max<int64_t>(16, 32768 / E), (T + 255) / 256);
  const int64_t rows_per_chunk = (rows + 15) / 16 * 16;
  const int64_t chunks = (T + rows_per_chunk - 1) / rows_per_chunk;
  // One thread below ~64K units of work (a logit, or an eighth of a slot's sort): the second
  // thread's wake-up cost more than it saved at decode sizes.
  const int64_t grain = T * E + 8 * n < 65536 ? chunks : 1;
  ChunkHistograms hist(chunks, E);
  const int32_t* id = ids.const_data_ptr<int32_t>();
  with_route_args(logits, bias, mask, cfg, weights, ids, [&](const auto& a) {
    at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t t0 = c * rows_per_chunk, t1 = std::min(T, t0 + rows_per_chunk);
        route_rows(a, t0, t1);
        count_ids(id, t0 * k, t1 * k, E,
                  hist.data + c * (E + 1));  // ids in [-1, E) by construction
      }
    });
  });
  metadata_scan(hist.data, chunks, E, out);
  int32_t* sorted_slots = out.sorted_slots.mutable_data_ptr<int32_t>();
  int32_t* inverse = out.inverse.mutable_data_ptr<int32_t>();
  int32_t* tokens = out.tokens.mutable_data_ptr<int32_t>();
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      metadata_place(id, k, E, c * rows_per_chunk, std::min(T, (c + 1) * rows_per_chunk),
                     hist.data + c * (E + 1), sorted_slots, inverse, tokens);
    }
  });
  if (block_m > 0) metadata_padded(n, E, block_m, out);
}

}  // namespace sparseops
