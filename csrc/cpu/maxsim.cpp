// MaxSim CPU kernels: maxsim, maxsim_varlen, maxsim_pairs, maxsim_topk and the shared
// backward. Semantics: python/sparseops/reference/maxsim.py.
//
// One forward engine serves every op (run_range): a work item is one document (a run of
// token rows) scored against up to kQueryBlock query "slots" (runs of query rows with where
// their score and argmax go). The ops differ only in their enumerators (PaddedAllPairs,
// VarlenAllPairs, VarlenPairs, AlignedPairs, TopkEnum), which say what the items and slots
// are, and top-k keeps the scores in per-chunk bounded heaps instead of writing them out.
// Items are split over threads in contiguous ranges of equal document tokens (run_all).
//
// Query-lane paths (AVX-512): the 16 lanes of a vector are 16 query tokens of the slot's
// query, packed once per slot ([dim][qlp] fp32, [dim / 2][qlp] bf16 pairs, [dim / 4][qlp]
// int8 quadruples; qlp = Lq rounded up to 16); the document rows are read in place, never
// packed or widened; each step broadcasts one document coordinate (fp32 FMA), pair
// (vdpbf16ps) or quadruple (vpdpbusd) of a few document tokens against every query vector,
// and the running max of 16 query tokens is one compare per document token. Used for fp32
// documents, bf16 documents of even dim (AVX512_BF16) and int8 documents of dim % 4 == 0
// (AVX512_VNNI; the query is quantised per token on the fly, see sparseops/maxsim.h). At
// Lq = 32 a document is read once per slot and never transposed.
//
// Otherwise (fp16, fp64, odd-dim bf16, int8 without VNNI or with fp64 queries, machines
// without AVX-512) the document's tokens are widened to the accumulate type (int8: times
// their scale) and packed dimension-major ([dim][Ld rounded up to 32]) into a per-thread
// buffer, and each query's tokens are taken kQueryTile at a time: a register tile of
// kQueryTile x 32 dot products (one broadcast query coordinate times two document vectors per
// step), the running max and argmax of each query token in registers across the document's
// tiles, reduced to one value and the lowest index at the end. The Lq x Ld similarities are
// never written. Under pylate_mask a masked token's similarity is exactly 0 and it takes part
// in the max.
//
// Measured (2-core AMD EPYC Zen 4, torch 2.13.0+cpu, 2026-12-07, load 16-19 from seven other
// builds, 1 thread, 1 query x 32 tokens x dim 128): 10 documents x 300 tokens fp32 in 0.24 ms
// = 102 GFLOP/s (the fp32 FMA peak of one core is ~110); 100 documents, best of 40: fp32
// 4.2 ms, bf16 1.24 ms (198 GFLOP/s), int8 documents 0.65 ms (380 GOP/s). Before (document-
// lane fp32 tile, 2026-12-02): 74 % of the fp32 GEMM peak on 1 thread, 57-66 % on 2.
//
// Every item is computed by the same code whatever the thread split, each score sums its
// query tokens in index order, and top-k merges the chunks' heaps under the total order
// (score desc, id asc), so the answers never depend on the thread count.
//
// ISA: at::vec::Vectorized in an extension built with default flags is the generic 8-lane
// (32-byte) implementation; the hot loop is instantiated once more under function-level
// target attributes (AVX-512 + AVX512_BF16 / AVX-512 / AVX2 + FMA) and chosen at run time
// (isa_level), so the extension keeps the default ISA.
#include "sparseops/maxsim.h"
#include "sparseops/cpu_vec.h"

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
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SPARSEOPS_MAXSIM_X86 1
#define SPARSEOPS_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#define SPARSEOPS_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define SPARSEOPS_TARGET_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c")))
#define SPARSEOPS_TARGET_AVX512VNNI \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))
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
  std::vector<uint32_t> packed_bf16;  // [dim / 2][lpad]: bf16 pairs (k even low, k odd high)
  std::vector<uint32_t> qpack;        // query-lane paths: [dim / 2 (bf16) or dim / 4 (int8)][qlp]
  std::vector<float> qpack_f32;       // query-lane fp32 path: [dim][qlp]
  int64_t qpack_start = -1;           // the query rows qpack holds (repacked only on a change)
  int64_t qpack_len = -1;
  std::vector<float> lane_best;  // query-lane paths: [Lq rounded up to 16 = qlp]
  std::vector<int32_t> lane_arg;
  std::vector<int32_t> lane_init;  // int8 path: -128 * sum_k q^_ik per lane (the u8 offset)
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

// bf16 x bf16 with vdpbf16ps (AVX512_BF16): each 32-bit lane of the packed document holds the
// bf16 pair (d[j][2k], d[j][2k + 1]) and one instruction adds both products to the fp32
// accumulator, so a step covers two embedding coordinates of 16 tokens without widening.
// The products of two bf16 values are exact in fp32; only the accumulation order differs from
// the fp32 FMA path (the pair is summed before it joins the accumulator). Same max / argmax
// update as query_tile_avx512.
template <int TQ>
SPARSEOPS_TARGET_AVX512BF16 void query_tile_bf16(const uint32_t* q, int64_t dim2,
                                                 const uint32_t* packed, const float* valid,
                                                 const float* index, int64_t lpad,
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
    const uint32_t* col = packed + j0;
    for (int64_t k = 0; k < dim2; ++k) {
      const __m512i d0 = _mm512_loadu_si512(col + k * lpad);
      const __m512i d1 = _mm512_loadu_si512(col + k * lpad + 16);
      for (int t = 0; t < TQ; ++t) {
        const __m512i qb = _mm512_set1_epi32(static_cast<int>(q[t * dim2 + k]));
        acc0[t] = _mm512_dpbf16_ps(acc0[t], (__m512bh)qb, (__m512bh)d0);
        acc1[t] = _mm512_dpbf16_ps(acc1[t], (__m512bh)qb, (__m512bh)d1);
      }
    }
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

// The bf16 query-lane tile (even dim, AVX512_BF16): the lanes are 16 query tokens and the
// document is read in place, row by row, never packed. Per step each of kLaneDocs document
// tokens broadcasts one bf16 pair (two coordinates) against NV vectors of the query packed
// [dim / 2][qlp]; after the document token's dot products the running max of every query
// token is one vector compare (strict >, tokens in increasing order: the lowest index keeps a
// tie). pylate: masked tokens score 0 and take part; otherwise they are skipped.
inline uint32_t load_u32(const uint32_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

constexpr int kLaneDocs = 4;

template <int NV>
SPARSEOPS_TARGET_AVX512BF16 inline void bf16_lanes_update(int64_t j, const __m512* acc,
                                                          const bool* dmask, bool pylate,
                                                          __m512* best, __m512i* idx) {
  const bool masked = dmask != nullptr && !dmask[j];
  if (masked && !pylate) return;
  const __m512i jv = _mm512_set1_epi32(static_cast<int>(j));
  for (int v = 0; v < NV; ++v) {
    const __m512 x = masked ? _mm512_setzero_ps() : acc[v];
    const __mmask16 g = _mm512_cmp_ps_mask(x, best[v], _CMP_GT_OQ);
    best[v] = _mm512_mask_blend_ps(g, best[v], x);
    idx[v] = _mm512_mask_blend_epi32(g, idx[v], jv);
  }
}

template <int NV>
SPARSEOPS_TARGET_AVX512BF16 void bf16_lanes_block(const uint32_t* qpack, int64_t qlp, int64_t v0,
                                                  int64_t dim2, const uint32_t* drows,
                                                  const bool* dmask, bool pylate, int64_t lp,
                                                  float* best_out, int32_t* arg_out) {
  __m512 best[NV];
  __m512i idx[NV];
  for (int v = 0; v < NV; ++v) {
    best[v] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    idx[v] = _mm512_set1_epi32(-1);
  }
  const auto update = [&](int64_t j, const __m512* acc) SPARSEOPS_ALWAYS_INLINE_LAMBDA {
    bf16_lanes_update<NV>(j, acc, dmask, pylate, best, idx);
  };
  int64_t j = 0;
  for (; j + kLaneDocs <= lp; j += kLaneDocs) {
    __m512 acc[kLaneDocs][NV];
    for (int t = 0; t < kLaneDocs; ++t) {
      for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_setzero_ps();
    }
    const uint32_t* rj = drows + j * dim2;
    for (int64_t k = 0; k < dim2; ++k) {
      __m512i qv[NV];
      for (int v = 0; v < NV; ++v) qv[v] = _mm512_loadu_si512(qpack + k * qlp + (v0 + v) * 16);
      for (int t = 0; t < kLaneDocs; ++t) {
        const __m512i db = _mm512_set1_epi32(static_cast<int>(load_u32(rj + t * dim2 + k)));
        for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], (__m512bh)qv[v], (__m512bh)db);
      }
    }
    for (int t = 0; t < kLaneDocs; ++t) update(j + t, acc[t]);
  }
  for (; j < lp; ++j) {
    __m512 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_setzero_ps();
    const uint32_t* rj = drows + j * dim2;
    for (int64_t k = 0; k < dim2; ++k) {
      const __m512i db = _mm512_set1_epi32(static_cast<int>(load_u32(rj + k)));
      for (int v = 0; v < NV; ++v) {
        acc[v] = _mm512_dpbf16_ps(acc[v], (__m512bh)_mm512_loadu_si512(qpack + k * qlp + (v0 + v) * 16),
                                  (__m512bh)db);
      }
    }
    update(j, acc);
  }
  for (int v = 0; v < NV; ++v) {
    _mm512_storeu_ps(best_out + (v0 + v) * 16, best[v]);
    _mm512_storeu_si512(arg_out + (v0 + v) * 16, idx[v]);
  }
}

// The fp32 query-lane tile (AVX-512): the lanes are 16 query tokens (the slot's query packed
// [dim][qlp]) and the document rows are read in place, never packed: per coordinate k each of
// kLaneDocsF32 document tokens broadcasts d[j][k] against NV query vectors (one FMA each),
// and after a token's dot products the running max of 16 query tokens is one compare. This
// replaced a document-lane tile that first transposed every document into a [dim][Ld] buffer:
// that transpose (one scalar load + store per element) cost about as much as the FMAs at
// Lq = 32 (57-66 % of the fp32 GEMM peak, benchmarks/results/cpu-amd-epyc-2t). Each
// similarity sums k = 0..dim-1 in order with one FMA per step, as the old tile did.
template <int NV>
SPARSEOPS_TARGET_AVX512 inline void f32_lanes_update(int64_t j, const __m512* acc,
                                                     const bool* dmask, bool pylate, __m512* best,
                                                     __m512i* idx) {
  const bool masked = dmask != nullptr && !dmask[j];
  if (masked && !pylate) return;
  const __m512i jv = _mm512_set1_epi32(static_cast<int>(j));
  for (int v = 0; v < NV; ++v) {
    const __m512 x = masked ? _mm512_setzero_ps() : acc[v];
    const __mmask16 g = _mm512_cmp_ps_mask(x, best[v], _CMP_GT_OQ);
    best[v] = _mm512_mask_blend_ps(g, best[v], x);
    idx[v] = _mm512_mask_blend_epi32(g, idx[v], jv);
  }
}

// Software prefetch (fp32 query-lane tile): while a block of TD document rows is scored, the
// same rows of the block kPrefetchBlocksF32 blocks ahead are prefetched, one 64-byte line per
// row per 16 coordinates (past the document's end that is the next document's first rows:
// uniform and packed corpora are contiguous; a prefetch never faults). Without it the tile ran
// at ~70 GFLOP/s on one core once the documents left the cache (100 documents x 300 x 128 =
// 15 MB) against ~105 in cache (10-50 documents); with it 1 query x 32 x 128 against 100 x 300
// fp32 went 4.1 -> 2.4 ms and 1,000 documents 83 -> 46 ms on one thread, best of 6-30,
// interleaved runs, load 5 (2-core Zen 4, 2026-12-07). 1 and 2 blocks ahead measured the same,
// 4 worse at 1,000 documents. The bf16 and int8 tiles read 2-4x fewer bytes per FMA and
// measured no gain from the same prefetch (int8 at 1,000 documents perhaps a loss).
constexpr int64_t kPrefetchBlocksF32 = 2;

template <int NV, int TD>
SPARSEOPS_TARGET_AVX512 void f32_lanes_block(const float* qpack, int64_t qlp, int64_t v0,
                                             int64_t dim, const float* drows, const bool* dmask,
                                             bool pylate, int64_t lp, float* best_out,
                                             int32_t* arg_out) {
  __m512 best[NV];
  __m512i idx[NV];
  for (int v = 0; v < NV; ++v) {
    best[v] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    idx[v] = _mm512_set1_epi32(-1);
  }
  const float* qb = qpack + v0 * 16;
  const int64_t pf_floats = kPrefetchBlocksF32 * TD * dim;
  int64_t j = 0;
  for (; j + TD <= lp; j += TD) {
    __m512 acc[TD][NV];
    for (int t = 0; t < TD; ++t) {
      for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_setzero_ps();
    }
    const float* rj = drows + j * dim;
    const float* pf = rj + pf_floats;
    for (int64_t k0 = 0; k0 < dim; k0 += 16) {
      for (int t = 0; t < TD; ++t) {
        _mm_prefetch(reinterpret_cast<const char*>(pf + t * dim + k0), _MM_HINT_T0);
      }
      const int64_t ke = std::min<int64_t>(dim, k0 + 16);
      for (int64_t k = k0; k < ke; ++k) {
        __m512 qv[NV];
        for (int v = 0; v < NV; ++v) qv[v] = _mm512_loadu_ps(qb + k * qlp + v * 16);
        for (int t = 0; t < TD; ++t) {
          const __m512 db = _mm512_set1_ps(rj[t * dim + k]);
          for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_fmadd_ps(qv[v], db, acc[t][v]);
        }
      }
    }
    for (int t = 0; t < TD; ++t) f32_lanes_update<NV>(j + t, acc[t], dmask, pylate, best, idx);
  }
  for (; j < lp; ++j) {
    __m512 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_setzero_ps();
    const float* rj = drows + j * dim;
    for (int64_t k = 0; k < dim; ++k) {
      const __m512 db = _mm512_set1_ps(rj[k]);
      for (int v = 0; v < NV; ++v)
        acc[v] = _mm512_fmadd_ps(_mm512_loadu_ps(qb + k * qlp + v * 16), db, acc[v]);
    }
    f32_lanes_update<NV>(j, acc, dmask, pylate, best, idx);
  }
  for (int v = 0; v < NV; ++v) {
    _mm512_storeu_ps(best_out + (v0 + v) * 16, best[v]);
    _mm512_storeu_si512(arg_out + (v0 + v) * 16, idx[v]);
  }
}

// The int8 query-lane tile (dim % 4 == 0, AVX512_VNNI): int8 documents read in place, 16
// quantised query tokens per vector. vpdpbusd multiplies unsigned bytes by signed bytes, so
// the document quadruple (d[j][4k..4k+3], signed) is broadcast and flipped to unsigned
// (xor 0x80 = d + 128, one vpxord with an embedded broadcast) and the query quadruples are
// the signed operand; each lane's accumulator starts at -128 * sum_k q^_ik (lane_init), which
// cancels the +128: acc = <q^_i, d_j> exactly (int32; |acc| <= 127 * 127 * dim). The
// similarity float(acc) * d_scale[j] then takes the same strict-> running max as the bf16
// tile; the caller multiplies the winner by the query token's scale a_i (> 0, the same for
// every j, so it does not change the max).
template <int NV>
SPARSEOPS_TARGET_AVX512VNNI void i8_lanes_update(int64_t j, const __m512i* acc, float scale,
                                                 const bool* dmask, bool pylate, __m512* best,
                                                 __m512i* idx) {
  const bool masked = dmask != nullptr && !dmask[j];
  if (masked && !pylate) return;
  const __m512i jv = _mm512_set1_epi32(static_cast<int>(j));
  const __m512 sv = _mm512_set1_ps(scale);
  for (int v = 0; v < NV; ++v) {
    const __m512 x = masked ? _mm512_setzero_ps() : _mm512_mul_ps(_mm512_cvtepi32_ps(acc[v]), sv);
    const __mmask16 g = _mm512_cmp_ps_mask(x, best[v], _CMP_GT_OQ);
    best[v] = _mm512_mask_blend_ps(g, best[v], x);
    idx[v] = _mm512_mask_blend_epi32(g, idx[v], jv);
  }
}

constexpr int kLaneDocsI8 = 4;

template <int NV>
SPARSEOPS_TARGET_AVX512VNNI void i8_lanes_block(const uint32_t* qpack, int64_t qlp, int64_t v0,
                                                int64_t dim4, const int32_t* init,
                                                const int8_t* drows, const float* dscale,
                                                const bool* dmask, bool pylate, int64_t lp,
                                                float* best_out, int32_t* arg_out) {
  __m512 best[NV];
  __m512i idx[NV], start[NV];
  for (int v = 0; v < NV; ++v) {
    best[v] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    idx[v] = _mm512_set1_epi32(-1);
    start[v] = _mm512_loadu_si512(init + (v0 + v) * 16);
  }
  const __m512i flip = _mm512_set1_epi32(static_cast<int>(0x80808080u));
  const int64_t row = dim4 * 4;  // bytes per document token
  int64_t j = 0;
  for (; j + kLaneDocsI8 <= lp; j += kLaneDocsI8) {
    __m512i acc[kLaneDocsI8][NV];
    for (int t = 0; t < kLaneDocsI8; ++t) {
      for (int v = 0; v < NV; ++v) acc[t][v] = start[v];
    }
    const int8_t* rj = drows + j * row;
    for (int64_t k = 0; k < dim4; ++k) {
      __m512i qv[NV];
      for (int v = 0; v < NV; ++v) qv[v] = _mm512_loadu_si512(qpack + k * qlp + (v0 + v) * 16);
      for (int t = 0; t < kLaneDocsI8; ++t) {
        uint32_t w;
        std::memcpy(&w, rj + t * row + 4 * k, sizeof(w));
        const __m512i du = _mm512_xor_si512(_mm512_set1_epi32(static_cast<int>(w)), flip);
        for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_dpbusd_epi32(acc[t][v], du, qv[v]);
      }
    }
    for (int t = 0; t < kLaneDocsI8; ++t) {
      i8_lanes_update<NV>(j + t, acc[t], dscale[j + t], dmask, pylate, best, idx);
    }
  }
  for (; j < lp; ++j) {
    __m512i acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = start[v];
    const int8_t* rj = drows + j * row;
    for (int64_t k = 0; k < dim4; ++k) {
      uint32_t w;
      std::memcpy(&w, rj + 4 * k, sizeof(w));
      const __m512i du = _mm512_xor_si512(_mm512_set1_epi32(static_cast<int>(w)), flip);
      for (int v = 0; v < NV; ++v) {
        acc[v] =
            _mm512_dpbusd_epi32(acc[v], du, _mm512_loadu_si512(qpack + k * qlp + (v0 + v) * 16));
      }
    }
    i8_lanes_update<NV>(j, acc, dscale[j], dmask, pylate, best, idx);
  }
  for (int v = 0; v < NV; ++v) {
    _mm512_storeu_ps(best_out + (v0 + v) * 16, best[v]);
    _mm512_storeu_si512(arg_out + (v0 + v) * 16, idx[v]);
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// The one forward engine every op shares. Token rows are addressed globally: query rows of
// the widened q [Rq, dim], document rows of d [Rd, dim] (scalar_t). A work item is one
// document (a run of rows) scored against a few query "slots" (each a run of query rows plus
// where its score and argmax go); the ops differ only in how they enumerate items and slots
// (the Enumerator classes below) and in what happens to the scores (maxsim_topk keeps them in
// bounded heaps instead of writing them out).

template <typename acc_t>
struct Rows {
  const acc_t* q;        // [Rq, dim] widened to acc_t
  const void* d;         // [Rd, dim] scalar_t
  const bool* q_valid;   // [Rq] or null (every row real)
  const bool* d_valid;   // [Rd] or null
  int64_t dim = 0;
  bool mean = false;
  bool pylate = false;  // masked document tokens score 0 and take part in the max
  const uint32_t* q_bf16 = nullptr;  // [Rq, dim2] bf16 pairs of q (the vdpbf16ps path only)
  int64_t dim2 = 0;                  // ceil(dim / 2)
  const float* d_scale = nullptr;    // [Rd] int8 documents: the scale of each row of d
  const uint32_t* q_i8 = nullptr;    // [Rq, dim / 4] int8 quadruples of q quantised (VNNI path)
  const float* q_i8_scale = nullptr;  // [Rq] a_i: q_ik ~ a_i * q^_ik
};

struct DocRun {
  int64_t start = 0, len = 0;  // rows [start, start + len) of d are looked at
  int64_t slots = 0;           // query slots of this item
};

// A run of argmax entries, int16 or int32 as the op chose (csrc/include/sparseops/maxsim.h:
// argmax_dtype), or none (base null: maxsim_topk keeps no argmax). One branch per query token
// per document, against dim x Ld multiply-adds.
class ArgmaxRun {
 public:
  ArgmaxRun() = default;
  explicit ArgmaxRun(const Tensor& t)
      : base_(t.data_ptr()), narrow_(t.scalar_type() == at::kShort) {
    TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kShort || t.scalar_type() == at::kInt);
  }
  ArgmaxRun operator+(int64_t offset) const {
    ArgmaxRun r = *this;
    if (base_ != nullptr) r.base_ = static_cast<char*>(base_) + offset * (narrow_ ? 2 : 4);
    return r;
  }
  int32_t get(int64_t i) const {
    return narrow_ ? static_cast<const int16_t*>(base_)[i] : static_cast<const int32_t*>(base_)[i];
  }
  void set(int64_t i, int32_t v) const {
    if (base_ == nullptr) return;
    if (narrow_) {
      static_cast<int16_t*>(base_)[i] = static_cast<int16_t>(v);
    } else {
      static_cast<int32_t*>(base_)[i] = v;
    }
  }
  void fill(int64_t from, int64_t to, int32_t v) const {
    for (int64_t i = std::max<int64_t>(from, 0); i < to; ++i) set(i, v);
  }

 private:
  void* base_ = nullptr;
  bool narrow_ = false;
};

template <typename acc_t>
struct QuerySlot {
  int64_t start = 0, len = 0;  // rows [start, start + len) of q are looked at
  int64_t cap = 0;             // argmax entries to write (len..cap-1 get -1)
  acc_t* score = nullptr;
  ArgmaxRun arg;
};

// Widen and pack document rows [start, start + len) dimension-major into s.packed; returns the
// first row that takes part in the max (-1: none) and sets lpad.
template <typename scalar_t, typename acc_t, int kIsa>
SPARSEOPS_ALWAYS_INLINE int64_t pack_doc(const Rows<acc_t>& r, const DocRun& doc, Scratch<acc_t>& s,
                                         int64_t& lpad) {
  constexpr int64_t tile_j = 32;  // whole tiles of the widest path (2 x 16 lanes)
  const int64_t lp = doc.len, dim = r.dim;
  const bool* dmask = r.d_valid ? r.d_valid + doc.start : nullptr;
  int64_t first_real = -1;
  if (r.pylate) {
    first_real = lp > 0 ? 0 : -1;  // every token takes part (masked ones as 0)
  } else {
    for (int64_t j = 0; j < lp && first_real < 0; ++j) {
      if (dmask == nullptr || dmask[j]) first_real = j;
    }
  }
  lpad = 0;
  if (first_real < 0) return -1;
  // The query-lane paths read the document rows in place: nothing to pack.
  if constexpr (kIsa == 3 && std::is_same_v<scalar_t, c10::BFloat16>) {
    if (dim % 2 == 0) return first_real;
  }
  if constexpr (kIsa == 4 && std::is_same_v<scalar_t, int8_t>) {
    if (r.q_i8 != nullptr) return first_real;
  }
  if constexpr (kIsa >= 2 && std::is_same_v<scalar_t, float>) return first_real;
  lpad = (lp + tile_j - 1) / tile_j * tile_j;
  const acc_t ones = all_ones<acc_t>();
  s.valid.resize(lpad);
  s.index.resize(lpad);
  for (int64_t j = 0; j < lpad; ++j) {
    const bool takes_part = j < lp && (r.pylate || dmask == nullptr || dmask[j]);
    s.valid[j] = takes_part ? ones : acc_t(0);
    s.index[j] = static_cast<acc_t>(j);
  }
  const scalar_t* dm = static_cast<const scalar_t*>(r.d) + doc.start * dim;
  if constexpr (kIsa == 3 && std::is_same_v<scalar_t, c10::BFloat16>) {
    // Odd dim: bf16 pairs, no widening: [dim2][lpad] of (d[j][2k] | d[j][2k + 1] << 16).
    const int64_t dim2 = r.dim2;
    s.packed_bf16.assign(static_cast<size_t>(dim2 * lpad), 0u);
    for (int64_t jb = 0; jb < lp; jb += tile_j) {
      const int64_t je = std::min(lp, jb + tile_j);
      for (int64_t j = jb; j < je; ++j) {
        if (r.pylate && dmask != nullptr && !dmask[j]) continue;
        const uint16_t* row = reinterpret_cast<const uint16_t*>(dm + j * dim);
        uint32_t* dst = s.packed_bf16.data() + j;
        // A bf16 pair (2k, 2k + 1) is the little-endian uint32 at 2k: a 32-bit transpose.
        for (int64_t k = 0; k < dim / 2; ++k) {
          uint32_t v;
          std::memcpy(&v, row + 2 * k, sizeof(v));
          dst[k * lpad] = v;
        }
        if (dim % 2) dst[(dim2 - 1) * lpad] = uint32_t(row[dim - 1]);
      }
    }
    return first_real;
  }
  s.packed.assign(static_cast<size_t>(dim * lpad), acc_t(0));
  if constexpr (std::is_same_v<scalar_t, int8_t>) {
    // int8 documents on the float path: each value widened and multiplied by its token's
    // scale (the float form of d_j * s_j; the product rounds once in acc_t).
    const float* sc = r.d_scale + doc.start;
    for (int64_t jb = 0; jb < lp; jb += tile_j) {
      const int64_t je = std::min(lp, jb + tile_j);
      for (int64_t j = jb; j < je; ++j) {
        if (r.pylate && dmask != nullptr && !dmask[j]) continue;
        const int8_t* row = dm + j * dim;
        const acc_t sj = static_cast<acc_t>(sc[j]);
        acc_t* dst = s.packed.data() + j;
        for (int64_t k = 0; k < dim; ++k) dst[k * lpad] = static_cast<acc_t>(row[k]) * sj;
      }
    }
    return first_real;
  }
  // Transposed 32 tokens at a time: the block's dim x 32 destination (16 KB at dim 128)
  // stays in L1, where a whole-document pass would miss on every strided store. Under
  // pylate a masked token's column stays 0, so its similarity is exactly 0.
  for (int64_t jb = 0; jb < lp; jb += tile_j) {
    const int64_t je = std::min(lp, jb + tile_j);
    for (int64_t j = jb; j < je; ++j) {
      if (r.pylate && dmask != nullptr && !dmask[j]) continue;
      const scalar_t* row = dm + j * dim;
      acc_t* dst = s.packed.data() + j;
      for (int64_t k = 0; k < dim; ++k) dst[k * lpad] = static_cast<acc_t>(row[k]);
    }
  }
  return first_real;
}

template <typename acc_t, bool kAvx512>
SPARSEOPS_ALWAYS_INLINE void tile_dispatch(int tq, const acc_t* qt, int64_t dim, const acc_t* packed,
                                           const acc_t* valid, const acc_t* index, int64_t lpad,
                                           int64_t first_real, acc_t* best, int32_t* arg) {
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
}

// The query-lane paths' end: lane i holds query token i's max (times lane_scale[i] when
// given) and argmax; sum the real tokens in index order (deterministic) and write them out.
template <typename acc_t>
SPARSEOPS_ALWAYS_INLINE void finish_lanes(const Rows<acc_t>& r, const bool* qmask,
                                          const bool* dmask, int64_t first_real,
                                          const float* lane_scale, Scratch<acc_t>& s,
                                          const QuerySlot<acc_t>& slot) {
  const ArgmaxRun& arg_row = slot.arg;
  acc_t total = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < slot.len; ++i) {
    if (qmask != nullptr && !qmask[i]) {
      arg_row.set(i, -1);
      continue;
    }
    // Every similarity -inf (overflow): the first token that takes part holds the max.
    const int32_t a = s.lane_arg[i] < 0 ? static_cast<int32_t>(first_real) : s.lane_arg[i];
    total += lane_scale != nullptr ? s.lane_best[i] * lane_scale[i] : s.lane_best[i];
    ++count;
    arg_row.set(i, (r.pylate && dmask != nullptr && !dmask[a]) ? int32_t(-1) : a);
  }
  arg_row.fill(slot.len, slot.cap, -1);
  if (r.mean) total = count > 0 ? total / static_cast<acc_t>(count) : acc_t(0);
  *slot.score = total;
}

// Score one query slot against the packed document (first_real < 0: no token takes part).
// scalar_t is the document's element type.
template <typename scalar_t, typename acc_t, int kIsa>
SPARSEOPS_ALWAYS_INLINE void score_slot(const Rows<acc_t>& r, const DocRun& doc, Scratch<acc_t>& s,
                                        int64_t lpad, int64_t first_real,
                                        const QuerySlot<acc_t>& slot) {
  constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  const int64_t dim = r.dim;
  const bool* qmask = r.q_valid ? r.q_valid + slot.start : nullptr;
  const bool* dmask = r.d_valid ? r.d_valid + doc.start : nullptr;
  const ArgmaxRun& arg_row = slot.arg;
  if (first_real < 0) {
    *slot.score = acc_t(0);
    arg_row.fill(0, slot.cap, -1);
    return;
  }
#if SPARSEOPS_MAXSIM_X86
  if constexpr (kIsa == 3 && kBf16 && std::is_same_v<acc_t, float>) {
    if (dim % 2 == 0) {
      // Query-lane bf16 path: pack this slot's query [dim / 2][qlp] (unless qpack holds it
      // already: a query block scores many documents in a row), score, then sum.
      const int64_t dim2 = r.dim2, ql = slot.len, qlp = (ql + 15) / 16 * 16;
      if (s.qpack_start != slot.start || s.qpack_len != ql) {
        s.qpack.assign(static_cast<size_t>(dim2 * qlp), 0u);
        const uint32_t* qr = r.q_bf16 + slot.start * dim2;
        for (int64_t i = 0; i < ql; ++i) {
          for (int64_t k = 0; k < dim2; ++k) s.qpack[k * qlp + i] = qr[i * dim2 + k];
        }
        s.qpack_start = slot.start;
        s.qpack_len = ql;
      }
      s.lane_best.resize(qlp);
      s.lane_arg.resize(qlp);
      const uint32_t* drows =
          reinterpret_cast<const uint32_t*>(static_cast<const c10::BFloat16*>(r.d) + doc.start * dim);
      int64_t v0 = 0;
      for (; v0 + 2 <= qlp / 16; v0 += 2) {
        bf16_lanes_block<2>(s.qpack.data(), qlp, v0, dim2, drows, dmask, r.pylate, doc.len,
                            s.lane_best.data(), s.lane_arg.data());
      }
      if (v0 < qlp / 16) {
        bf16_lanes_block<1>(s.qpack.data(), qlp, v0, dim2, drows, dmask, r.pylate, doc.len,
                            s.lane_best.data(), s.lane_arg.data());
      }
      return finish_lanes(r, qmask, dmask, first_real, nullptr, s, slot);
    }
  }
  if constexpr (kIsa >= 2 && std::is_same_v<scalar_t, float>) {
    // Query-lane fp32 path: the slot's query [dim][qlp] (repacked only when it changes).
    const int64_t ql = slot.len, qlp = (ql + 15) / 16 * 16;
    if (s.qpack_start != slot.start || s.qpack_len != ql) {
      s.qpack_f32.assign(static_cast<size_t>(dim * qlp), 0.f);
      const float* qr = r.q + slot.start * dim;
      for (int64_t i = 0; i < ql; ++i) {
        for (int64_t k = 0; k < dim; ++k) s.qpack_f32[k * qlp + i] = qr[i * dim + k];
      }
      s.qpack_start = slot.start;
      s.qpack_len = ql;
    }
    s.lane_best.resize(qlp);
    s.lane_arg.resize(qlp);
    const float* drows = static_cast<const float*>(r.d) + doc.start * dim;
    int64_t v0 = 0;
    for (; v0 + 2 <= qlp / 16; v0 += 2) {
      f32_lanes_block<2, 6>(s.qpack_f32.data(), qlp, v0, dim, drows, dmask, r.pylate, doc.len,
                            s.lane_best.data(), s.lane_arg.data());
    }
    if (v0 < qlp / 16) {
      f32_lanes_block<1, 8>(s.qpack_f32.data(), qlp, v0, dim, drows, dmask, r.pylate, doc.len,
                            s.lane_best.data(), s.lane_arg.data());
    }
    return finish_lanes(r, qmask, dmask, first_real, nullptr, s, slot);
  }
  if constexpr (kIsa == 4 && std::is_same_v<scalar_t, int8_t> && std::is_same_v<acc_t, float>) {
    if (r.q_i8 != nullptr) {
      // Query-lane int8 path (VNNI): the slot's quantised query [dim / 4][qlp] quadruples
      // and its per-lane offsets (-128 * sum_k q^_ik), then the integer tile.
      const int64_t dim4 = dim / 4, ql = slot.len, qlp = (ql + 15) / 16 * 16;
      if (s.qpack_start != slot.start || s.qpack_len != ql) {
        s.qpack.assign(static_cast<size_t>(dim4 * qlp), 0u);
        s.lane_init.assign(qlp, 0);
        const uint32_t* qr = r.q_i8 + slot.start * dim4;
        for (int64_t i = 0; i < ql; ++i) {
          int32_t sum = 0;
          for (int64_t k = 0; k < dim4; ++k) {
            const uint32_t w = qr[i * dim4 + k];
            s.qpack[k * qlp + i] = w;
            for (int b = 0; b < 4; ++b)
              sum += static_cast<int8_t>(static_cast<uint8_t>(w >> (8 * b)));
          }
          s.lane_init[i] = -128 * sum;
        }
        s.qpack_start = slot.start;
        s.qpack_len = ql;
      }
      s.lane_best.resize(qlp);
      s.lane_arg.resize(qlp);
      const int8_t* drows = static_cast<const int8_t*>(r.d) + doc.start * dim;
      const float* dsc = r.d_scale + doc.start;
      int64_t v0 = 0;
      for (; v0 + 2 <= qlp / 16; v0 += 2) {
        i8_lanes_block<2>(s.qpack.data(), qlp, v0, dim4, s.lane_init.data(), drows, dsc, dmask,
                          r.pylate, doc.len, s.lane_best.data(), s.lane_arg.data());
      }
      if (v0 < qlp / 16) {
        i8_lanes_block<1>(s.qpack.data(), qlp, v0, dim4, s.lane_init.data(), drows, dsc, dmask,
                          r.pylate, doc.len, s.lane_best.data(), s.lane_arg.data());
      }
      return finish_lanes(r, qmask, dmask, first_real, r.q_i8_scale + slot.start, s, slot);
    }
  }
#endif
  const acc_t* qn = r.q + slot.start * dim;
  acc_t best[kQueryTile];
  int32_t arg[kQueryTile];
  acc_t total = 0;
  int64_t count = 0;
  for (int64_t i0 = 0; i0 < slot.len; i0 += kQueryTile) {
    const int tq = static_cast<int>(std::min<int64_t>(kQueryTile, slot.len - i0));
#if SPARSEOPS_MAXSIM_X86
    if constexpr (kIsa == 3 && kBf16 && std::is_same_v<acc_t, float>) {
      const uint32_t* qt = r.q_bf16 + (slot.start + i0) * r.dim2;
      const uint32_t* pk = s.packed_bf16.data();
      switch (tq) {
        case 4:
          query_tile_bf16<4>(qt, r.dim2, pk, s.valid.data(), s.index.data(), lpad, first_real, best, arg);
          break;
        case 3:
          query_tile_bf16<3>(qt, r.dim2, pk, s.valid.data(), s.index.data(), lpad, first_real, best, arg);
          break;
        case 2:
          query_tile_bf16<2>(qt, r.dim2, pk, s.valid.data(), s.index.data(), lpad, first_real, best, arg);
          break;
        default:
          query_tile_bf16<1>(qt, r.dim2, pk, s.valid.data(), s.index.data(), lpad, first_real, best, arg);
      }
    } else
#endif
    {
      tile_dispatch<acc_t, (kIsa >= 2)>(tq, qn + i0 * dim, dim, s.packed.data(), s.valid.data(),
                                        s.index.data(), lpad, first_real, best, arg);
    }
    for (int t = 0; t < tq; ++t) {
      const int64_t i = i0 + t;
      if (qmask != nullptr && !qmask[i]) {
        arg_row.set(i, -1);
        continue;
      }
      total += best[t];  // query tokens summed in index order: deterministic
      ++count;
      // Under pylate a masked document token that won (similarity 0) takes no gradient.
      arg_row.set(i, (r.pylate && dmask != nullptr && !dmask[arg[t]]) ? int32_t(-1) : arg[t]);
    }
  }
  arg_row.fill(slot.len, slot.cap, -1);
  if (r.mean) total = count > 0 ? total / static_cast<acc_t>(count) : acc_t(0);
  *slot.score = total;
}

// Items [begin, end) of an enumerator E (E::item(it, DocRun&), E::slot(it, k, QuerySlot&),
// E::Local, E::done(it, slots, Local&), E::finish(Local&)).
template <typename scalar_t, typename acc_t, int kIsa, typename E>
SPARSEOPS_ALWAYS_INLINE void run_range(const Rows<acc_t>& r, const E& en, int64_t begin,
                                       int64_t end) {
  Scratch<acc_t> s;
  typename E::Local local = en.make_local();
  QuerySlot<acc_t> slots[kQueryBlock];
  for (int64_t it = begin; it < end; ++it) {
    DocRun doc;
    en.item(it, doc);
    int64_t lpad = 0;
    const int64_t first_real = pack_doc<scalar_t, acc_t, kIsa>(r, doc, s, lpad);
    for (int64_t k = 0; k < doc.slots; ++k) {
      en.slot(it, k, slots[k], local);
      score_slot<scalar_t, acc_t, kIsa>(r, doc, s, lpad, first_real, slots[k]);
    }
    en.done(it, doc, slots, local);
  }
  en.finish(local);
}

template <typename scalar_t, typename acc_t, typename E>
void range_default(const Rows<acc_t>& r, const E& en, int64_t b, int64_t e) {
  run_range<scalar_t, acc_t, 0>(r, en, b, e);
}
#if SPARSEOPS_MAXSIM_X86
template <typename scalar_t, typename acc_t, typename E>
SPARSEOPS_TARGET_AVX512BF16 void range_avx512bf16(const Rows<acc_t>& r, const E& en, int64_t b,
                                                  int64_t e) {
  run_range<scalar_t, acc_t, 3>(r, en, b, e);
}
template <typename scalar_t, typename acc_t, typename E>
SPARSEOPS_TARGET_AVX512VNNI void range_avx512vnni(const Rows<acc_t>& r, const E& en, int64_t b,
                                                  int64_t e) {
  run_range<scalar_t, acc_t, 4>(r, en, b, e);
}
template <typename scalar_t, typename acc_t, typename E>
SPARSEOPS_TARGET_AVX512 void range_avx512(const Rows<acc_t>& r, const E& en, int64_t b, int64_t e) {
  run_range<scalar_t, acc_t, 2>(r, en, b, e);
}
template <typename scalar_t, typename acc_t, typename E>
SPARSEOPS_TARGET_AVX2 void range_avx2(const Rows<acc_t>& r, const E& en, int64_t b, int64_t e) {
  run_range<scalar_t, acc_t, 1>(r, en, b, e);
}
#endif

// 0: default ISA, 1: AVX2 + FMA, 2: AVX-512, 3: AVX-512 with AVX512_BF16 (bf16 inputs take
// vdpbf16ps; every other dtype runs the level-2 code). Decided once per process
// (SPARSEOPS_CPU_NO_AVX512=1 forces at most AVX2, SPARSEOPS_CPU_NO_AVX512BF16=1 at most level
// 2), so the bits of an answer depend on the machine and those variables only.
int isa_level() {
#if SPARSEOPS_MAXSIM_X86
  static const int level = [] {
    __builtin_cpu_init();
    if (cpu_avx512_enabled()) {
      const char* nobf = std::getenv("SPARSEOPS_CPU_NO_AVX512BF16");
      const bool no_bf16 = nobf != nullptr && *nobf != '\0' && *nobf != '0';
      return !no_bf16 && __builtin_cpu_supports("avx512bf16") ? 3 : 2;
    }
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
  }();
  return level;
#else
  return 0;
#endif
}

// AVX512_VNNI on an AVX-512 machine (int8 documents take vpdpbusd with quantised queries);
// SPARSEOPS_CPU_NO_AVX512VNNI=1 turns it off (int8 documents then take the float path).
bool has_vnni() {
#if SPARSEOPS_MAXSIM_X86
  static const bool yes = [] {
    const char* off = std::getenv("SPARSEOPS_CPU_NO_AVX512VNNI");
    const bool no = off != nullptr && *off != '\0' && *off != '0';
    return !no && isa_level() >= 2 && __builtin_cpu_supports("avx512vnni");
  }();
  return yes;
#else
  return false;
#endif
}

// Runs every item of en over the threads. work_per_item: multiply-adds of an average item;
// the run stays on the calling thread below ~256 K of them in all. Otherwise the items are cut
// into one contiguous range per thread of equal document tokens (tokens x query slots, plus a
// little per item), not equal item counts: a ragged or length-sorted corpus splits evenly.
// Every item is computed by the same code whatever the split, so the bits do not depend on
// the thread count.
template <typename scalar_t, typename acc_t, typename E>
void run_all(const Rows<acc_t>& r, const E& en, int64_t items, int64_t work_per_item) {
  const int level = isa_level();
  const auto range = [&](int64_t b, int64_t e) {
#if SPARSEOPS_MAXSIM_X86
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (level == 3) return range_avx512bf16<scalar_t, acc_t, E>(r, en, b, e);
    }
    if constexpr (std::is_same_v<scalar_t, int8_t>) {
      if (r.q_i8 != nullptr) return range_avx512vnni<scalar_t, acc_t, E>(r, en, b, e);
    }
    if (level >= 2) return range_avx512<scalar_t, acc_t, E>(r, en, b, e);
    if (level == 1) return range_avx2<scalar_t, acc_t, E>(r, en, b, e);
#endif
    range_default<scalar_t, acc_t, E>(r, en, b, e);
  };
  const int64_t threads = at::get_num_threads();
  const int64_t total = items * std::max<int64_t>(1, work_per_item);
  const int64_t parts = std::min<int64_t>({threads, items, total >> 18});
  if (parts <= 1 || at::in_parallel_region()) return range(0, items);
  std::vector<int64_t> cost(items + 1, 0);
  for (int64_t it = 0; it < items; ++it) {
    DocRun doc;
    en.item(it, doc);
    cost[it + 1] = cost[it] + doc.len * std::max<int64_t>(doc.slots, 1) + 8;
  }
  std::vector<int64_t> cut(parts + 1, items);
  cut[0] = 0;
  for (int64_t c = 1; c < parts; ++c) {
    const int64_t target = cost[items] / parts * c;
    cut[c] = std::lower_bound(cost.begin(), cost.end(), target) - cost.begin();
    cut[c] = std::max(cut[c - 1], std::min(cut[c], items));
  }
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      if (cut[c] < cut[c + 1]) range(cut[c], cut[c + 1]);
    }
  });
}

struct NoLocal {};

// Writes scores and argmax straight to the outputs: the base of every enumerator but top-k.
template <typename acc_t>
struct WriteOut {
  using Local = NoLocal;
  Local make_local() const { return {}; }
  void done(int64_t, const DocRun&, const QuerySlot<acc_t>*, Local&) const {}
  void finish(Local&) const {}
};

// maxsim: padded q [Nq, Lq] rows x padded d [Nd, Ld] rows; items (document, query block).
template <typename acc_t>
struct PaddedAllPairs : WriteOut<acc_t> {
  int64_t nq, lq, nd, ld, nqb;
  const int32_t* q_len;  // [Nq] or null
  const int32_t* d_len;  // [Nd] or null
  acc_t* scores;         // [Nq, Nd]
  ArgmaxRun argmax;      // [Nq, Nd, Lq]
  void item(int64_t it, DocRun& doc) const {
    const int64_t m = it / nqb, qb = it % nqb;
    doc.start = m * ld;
    doc.len = d_len ? d_len[m] : ld;
    doc.slots = std::min(kQueryBlock, nq - qb * kQueryBlock);
  }
  void slot(int64_t it, int64_t k, QuerySlot<acc_t>& s, NoLocal&) const {
    const int64_t m = it / nqb, n = (it % nqb) * kQueryBlock + k;
    s.start = n * lq;
    s.len = q_len ? q_len[n] : lq;
    s.cap = lq;
    s.score = scores + n * nd + m;
    s.arg = argmax + (n * nd + m) * lq;
  }
};

// maxsim_varlen, all pairs: packed q (cu_q) x packed d (cu_d); argmax [Nd, total_q].
template <typename acc_t>
struct VarlenAllPairs : WriteOut<acc_t> {
  int64_t nq, nd, nqb, total_q;
  const int32_t* cu_q;
  const int32_t* cu_d;
  acc_t* scores;  // [Nq, Nd]
  ArgmaxRun argmax;
  void item(int64_t it, DocRun& doc) const {
    const int64_t m = it / nqb, qb = it % nqb;
    doc.start = cu_d[m];
    doc.len = cu_d[m + 1] - cu_d[m];
    doc.slots = std::min(kQueryBlock, nq - qb * kQueryBlock);
  }
  void slot(int64_t it, int64_t k, QuerySlot<acc_t>& s, NoLocal&) const {
    const int64_t m = it / nqb, n = (it % nqb) * kQueryBlock + k;
    s.start = cu_q[n];
    s.len = cu_q[n + 1] - cu_q[n];
    s.cap = s.len;
    s.score = scores + n * nd + m;
    s.arg = argmax + m * total_q + cu_q[n];
  }
};

// maxsim_varlen with pairs [P, 2]: one item per pair; argmax flat at arg_off[p].
template <typename acc_t>
struct VarlenPairs : WriteOut<acc_t> {
  const int64_t* pairs;  // [P, 2] (query, document)
  const int64_t* arg_off;
  const int32_t* cu_q;
  const int32_t* cu_d;
  acc_t* scores;  // [P]
  ArgmaxRun argmax;
  void item(int64_t p, DocRun& doc) const {
    const int64_t m = pairs[2 * p + 1];
    doc.start = cu_d[m];
    doc.len = cu_d[m + 1] - cu_d[m];
    doc.slots = 1;
  }
  void slot(int64_t p, int64_t, QuerySlot<acc_t>& s, NoLocal&) const {
    const int64_t n = pairs[2 * p];
    s.start = cu_q[n];
    s.len = cu_q[n + 1] - cu_q[n];
    s.cap = s.len;
    s.score = scores + p;
    s.arg = argmax + arg_off[p];
  }
};

// maxsim_pairs: q [B, Lq] rows with d [B * K, Ld] rows; item (b, k) = one pair.
template <typename acc_t>
struct AlignedPairs : WriteOut<acc_t> {
  int64_t k_per, lq, ld;
  const int32_t* q_len;  // [B] or null
  const int32_t* d_len;  // [B * K] or null
  acc_t* scores;         // [B, K]
  ArgmaxRun argmax;      // [B, K, Lq]
  void item(int64_t it, DocRun& doc) const {
    doc.start = it * ld;
    doc.len = d_len ? d_len[it] : ld;
    doc.slots = 1;
  }
  void slot(int64_t it, int64_t, QuerySlot<acc_t>& s, NoLocal&) const {
    const int64_t b = it / k_per;
    s.start = b * lq;
    s.len = q_len ? q_len[b] : lq;
    s.cap = lq;
    s.score = scores + it;
    s.arg = argmax + it * lq;
  }
};

// maxsim_topk: scores go to per-chunk bounded heaps (k best per query), merged at the end.
template <typename acc_t>
struct Cand {
  acc_t score;
  int64_t id;
};
// a is better than b: higher score, then lower id.
template <typename acc_t>
inline bool better(const Cand<acc_t>& a, const Cand<acc_t>& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

template <typename acc_t>
struct TopkState {
  int64_t nq, k;
  std::mutex mu;
  std::vector<std::vector<Cand<acc_t>>> parts;  // per chunk: [Nq * k'] heaps flattened
  std::vector<std::vector<int64_t>> sizes;
};

template <typename acc_t>
struct TopkLocal {
  std::vector<Cand<acc_t>> heap;  // [Nq][k]: min-heaps on "better" (worst on top)
  std::vector<int64_t> size;      // [Nq]
  std::vector<acc_t> score_buf;   // [kQueryBlock]
};

template <typename acc_t>
inline void heap_push(Cand<acc_t>* h, int64_t& n, int64_t k, const Cand<acc_t>& c) {
  const auto worse_first = [](const Cand<acc_t>& a, const Cand<acc_t>& b) { return better(a, b); };
  if (n < k) {
    h[n++] = c;
    std::push_heap(h, h + n, worse_first);
  } else if (better(c, h[0])) {
    std::pop_heap(h, h + n, worse_first);
    h[n - 1] = c;
    std::push_heap(h, h + n, worse_first);
  }
}

// Items: shared documents (all of them, or candidates [C]) x query blocks, or, with
// per-query candidates [Nq, C], one item per (query, candidate). Candidate -1 is skipped.
template <typename acc_t>
struct TopkEnum {
  using Local = TopkLocal<acc_t>;
  int64_t nq, lq, nqb, k;
  const int32_t* q_len;  // [Nq] or null
  const int32_t* cu_d;
  const int64_t* cand;  // null, [C] (shared) or [Nq, C]
  int64_t c;            // candidates per list (or Nd without candidates)
  bool per_query;
  TopkState<acc_t>* state;
  Local make_local() const {
    Local l;
    l.heap.resize(static_cast<size_t>(nq * k));
    l.size.assign(nq, 0);
    l.score_buf.resize(kQueryBlock);
    return l;
  }
  int64_t doc_of(int64_t it) const {
    if (per_query) return cand[it];  // it = n * C + c
    const int64_t j = it / nqb;
    return cand ? cand[j] : j;
  }
  void item(int64_t it, DocRun& doc) const {
    const int64_t m = doc_of(it);
    if (m < 0) {
      doc.start = doc.len = doc.slots = 0;
      return;
    }
    doc.start = cu_d[m];
    doc.len = cu_d[m + 1] - cu_d[m];
    doc.slots = per_query ? 1 : std::min(kQueryBlock, nq - (it % nqb) * kQueryBlock);
  }
  int64_t query_of(int64_t it, int64_t k_) const {
    return per_query ? it / c : (it % nqb) * kQueryBlock + k_;
  }
  void slot(int64_t it, int64_t k_, QuerySlot<acc_t>& s, Local& l) const {
    const int64_t n = query_of(it, k_);
    s.start = n * lq;
    s.len = q_len ? q_len[n] : lq;
    s.cap = lq;
    s.score = l.score_buf.data() + k_;
    s.arg = ArgmaxRun();  // ranking needs no argmax: none is written
  }
  void done(int64_t it, const DocRun& doc, const QuerySlot<acc_t>*, Local& l) const {
    if (doc.slots == 0) return;
    const int64_t m = doc_of(it);
    for (int64_t k_ = 0; k_ < doc.slots; ++k_) {
      const int64_t n = query_of(it, k_);
      const acc_t v = l.score_buf[k_];
      if (v != v) continue;  // NaN never enters the top-k
      heap_push(l.heap.data() + n * k, l.size[n], k, Cand<acc_t>{v, m});
    }
  }
  void finish(Local& l) const {
    std::lock_guard<std::mutex> g(state->mu);
    state->parts.push_back(std::move(l.heap));
    state->sizes.push_back(std::move(l.size));
  }
};

template <typename acc_t>
Rows<acc_t> make_rows(const Tensor& qw, const Tensor& d, const Tensor& q_valid,
                      const Tensor& d_valid, int64_t dim, bool mean, bool pylate) {
  Rows<acc_t> r;
  r.q = qw.data_ptr<acc_t>();
  r.d = d.data_ptr();
  r.q_valid = q_valid.defined() ? q_valid.data_ptr<bool>() : nullptr;
  r.d_valid = d_valid.defined() ? d_valid.data_ptr<bool>() : nullptr;
  r.dim = dim;
  r.mean = mean;
  r.pylate = pylate;
  return r;
}

// The bf16 pairs of the query rows for the vdpbf16ps path (an empty tensor otherwise); keep
// the returned tensor alive while r is used.
template <typename scalar_t, typename acc_t>
Tensor attach_bf16_pairs(Rows<acc_t>& r, const Tensor& q) {
  if constexpr (!std::is_same_v<scalar_t, c10::BFloat16>) {
    return Tensor();
  } else {
    if (isa_level() != 3) return Tensor();
    const int64_t dim = r.dim;
    Tensor rows = q.reshape({-1, dim});
    if (dim % 2) rows = at::constant_pad_nd(rows, {0, 1}, 0);
    rows = rows.contiguous();
    r.dim2 = (dim + 1) / 2;
    r.q_bf16 = reinterpret_cast<const uint32_t*>(rows.data_ptr());
    return rows;
  }
}

// The VNNI int8 path's query (int8 documents, fp32 accumulation, dim % 4 == 0, AVX512_VNNI):
// every query row quantised symmetrically per token, a_i = max_k |q_ik| / 127 and q^_ik =
// round-half-even(q_ik / a_i) in [-127, 127] (0 for a zero row), from the fp32-widened q.
// Returns the [Rq, dim] int8 rows and sets r.q_i8 / r.q_i8_scale (scales kept alive in
// `scales`); an empty tensor otherwise (the float path).
template <typename doc_t, typename acc_t>
Tensor attach_i8_query(Rows<acc_t>& r, const Tensor& qw, Tensor& scales) {
  if constexpr (!std::is_same_v<doc_t, int8_t> || !std::is_same_v<acc_t, float>) {
    return Tensor();
  } else {
    const int64_t dim = r.dim;
    if (!has_vnni() || dim % 4 != 0 || dim == 0) return Tensor();
    const int64_t rows = qw.numel() / dim;
    Tensor out = at::empty({rows, dim}, qw.options().dtype(at::kChar));
    scales = at::empty({rows}, qw.options().dtype(at::kFloat));
    const float* src = qw.data_ptr<float>();
    int8_t* dst = out.data_ptr<int8_t>();
    float* sc = scales.data_ptr<float>();
    at::parallel_for(0, rows, 256, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const float* x = src + i * dim;
        float amax = 0.f;
        for (int64_t k = 0; k < dim; ++k) amax = std::max(amax, std::fabs(x[k]));
        const float a = amax / 127.f;
        sc[i] = a;
        for (int64_t k = 0; k < dim; ++k) {
          const float v = a > 0.f ? std::nearbyint(x[k] / a) : 0.f;
          dst[i * dim + k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
        }
      }
    });
    r.q_i8 = reinterpret_cast<const uint32_t*>(out.data_ptr<int8_t>());
    r.q_i8_scale = sc;
    return out;
  }
}

template <typename acc_t>
Tensor widen(const Tensor& q) {
  return q.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

// Calls f.template operator()<scalar_t, acc_t>() for the dtype of x.
template <typename F>
void dispatch_dtype(const Tensor& x, F&& f) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return f.template operator()<float, float>();
    case at::kBFloat16:
      return f.template operator()<c10::BFloat16, float>();
    case at::kHalf:
      return f.template operator()<c10::Half, float>();
    case at::kDouble:
      return f.template operator()<double, double>();
    default:
      TORCH_INTERNAL_ASSERT(false, "maxsim CPU kernel: unexpected dtype ", x.scalar_type());
  }
}

// Calls f.template operator()<doc_t, acc_t>() with doc_t the element type of the documents:
// q's, or int8_t for int8 documents.
template <typename F>
void dispatch_doc(const Tensor& q, bool d_int8, F&& f) {
  dispatch_dtype(q, [&]<typename scalar_t, typename acc_t>() {
    if (d_int8) {
      f.template operator()<int8_t, acc_t>();
    } else {
      f.template operator()<scalar_t, acc_t>();
    }
  });
}

}  // namespace

// The rows of every op: widened query, document rows, masks, and the int8 extras (scales,
// the quantised query of the VNNI path); keep `keep` alive while r is used.
template <typename doc_t, typename acc_t>
Rows<acc_t> prepare_rows(const Tensor& q, const Tensor& d, const Tensor& d_scale,
                         const Tensor& q_valid, const Tensor& d_valid, int64_t dim, bool mean,
                         bool pylate, std::vector<Tensor>& keep) {
  const Tensor qw = widen<acc_t>(q);
  Rows<acc_t> r = make_rows<acc_t>(qw, d, q_valid, d_valid, dim, mean, pylate);
  keep.push_back(qw);
  keep.push_back(attach_bf16_pairs<doc_t, acc_t>(r, q));
  if constexpr (std::is_same_v<doc_t, int8_t>) {
    TORCH_INTERNAL_ASSERT(d_scale.defined() && d_scale.is_contiguous() &&
                          d_scale.scalar_type() == at::kFloat &&
                          d_scale.numel() * dim == d.numel());
    r.d_scale = d_scale.data_ptr<float>();
    Tensor scales;
    keep.push_back(attach_i8_query<doc_t, acc_t>(r, qw, scales));
    keep.push_back(scales);
  }
  return r;
}

void maxsim_cpu_kernel(const Tensor& q, const Tensor& d, const Tensor& d_scale,
                       const Tensor& q_mask, const Tensor& d_mask, const MaxSimConfig& cfg,
                       Tensor& scores, Tensor& argmax) {
  TORCH_INTERNAL_ASSERT(q.is_contiguous() && d.is_contiguous() && scores.is_contiguous() &&
                        argmax.is_contiguous());
  TORCH_INTERNAL_ASSERT(cfg.nq > 0 && cfg.nd > 0 && cfg.lq > 0 && cfg.ld > 0);
  // The argmax travels as acc_t lanes: exact below 2^24 tokens (the op layer checks).
  TORCH_INTERNAL_ASSERT(cfg.ld < (int64_t(1) << 24));
  // Under pylate the op layer has turned lengths masks into bool masks.
  TORCH_INTERNAL_ASSERT(!cfg.pylate || (cfg.q_mask != TokenMask::kLengths &&
                                        cfg.d_mask != TokenMask::kLengths));
  dispatch_doc(q, cfg.d_int8, [&]<typename doc_t, typename acc_t>() {
    const Tensor qv = cfg.q_mask == TokenMask::kBool ? q_mask : Tensor();
    const Tensor dv = cfg.d_mask == TokenMask::kBool ? d_mask : Tensor();
    std::vector<Tensor> keep;
    const Rows<acc_t> r = prepare_rows<doc_t, acc_t>(
        q, d, d_scale, qv, dv, cfg.dim, cfg.reduce == MaxSimReduce::kMean, cfg.pylate, keep);
    PaddedAllPairs<acc_t> en;
    en.nq = cfg.nq;
    en.lq = cfg.lq;
    en.nd = cfg.nd;
    en.ld = cfg.ld;
    en.nqb = (cfg.nq + kQueryBlock - 1) / kQueryBlock;
    en.q_len = cfg.q_mask == TokenMask::kLengths ? q_mask.data_ptr<int32_t>() : nullptr;
    en.d_len = cfg.d_mask == TokenMask::kLengths ? d_mask.data_ptr<int32_t>() : nullptr;
    en.scores = scores.data_ptr<acc_t>();
    en.argmax = ArgmaxRun(argmax);
    run_all<doc_t, acc_t>(r, en, cfg.nd * en.nqb,
                          std::min(cfg.nq, kQueryBlock) * cfg.lq * cfg.ld * cfg.dim);
  });
}

void maxsim_varlen_cpu_kernel(const Tensor& q, const Tensor& cu_q, const Tensor& d,
                              const Tensor& cu_d, const Tensor& d_scale, const Tensor& pairs,
                              const Tensor& arg_off, const MaxSimVarlenConfig& cfg, Tensor& scores,
                              Tensor& argmax) {
  TORCH_INTERNAL_ASSERT(q.is_contiguous() && d.is_contiguous() && cu_q.is_contiguous() &&
                        cu_d.is_contiguous() && scores.is_contiguous() && argmax.is_contiguous());
  dispatch_doc(q, cfg.d_int8, [&]<typename doc_t, typename acc_t>() {
    std::vector<Tensor> keep;
    const Rows<acc_t> r = prepare_rows<doc_t, acc_t>(
        q, d, d_scale, Tensor(), Tensor(), cfg.dim, cfg.reduce == MaxSimReduce::kMean, false, keep);
    const int64_t avg_lq = std::max<int64_t>(1, cfg.total_q / std::max<int64_t>(1, cfg.nq));
    const int64_t avg_ld = std::max<int64_t>(1, cfg.total_d / std::max<int64_t>(1, cfg.nd));
    if (pairs.defined()) {
      VarlenPairs<acc_t> en;
      en.pairs = pairs.data_ptr<int64_t>();
      en.arg_off = arg_off.data_ptr<int64_t>();
      en.cu_q = cu_q.data_ptr<int32_t>();
      en.cu_d = cu_d.data_ptr<int32_t>();
      en.scores = scores.data_ptr<acc_t>();
      en.argmax = ArgmaxRun(argmax);
      run_all<doc_t, acc_t>(r, en, cfg.np, avg_lq * avg_ld * cfg.dim);
    } else {
      VarlenAllPairs<acc_t> en;
      en.nq = cfg.nq;
      en.nd = cfg.nd;
      en.nqb = (cfg.nq + kQueryBlock - 1) / kQueryBlock;
      en.total_q = cfg.total_q;
      en.cu_q = cu_q.data_ptr<int32_t>();
      en.cu_d = cu_d.data_ptr<int32_t>();
      en.scores = scores.data_ptr<acc_t>();
      en.argmax = ArgmaxRun(argmax);
      run_all<doc_t, acc_t>(r, en, cfg.nd * en.nqb,
                            std::min(cfg.nq, kQueryBlock) * avg_lq * avg_ld * cfg.dim);
    }
  });
}

void maxsim_pairs_cpu_kernel(const Tensor& q, const Tensor& d, const Tensor& d_scale,
                             const Tensor& q_mask, const Tensor& d_mask,
                             const MaxSimPairsConfig& cfg, Tensor& scores, Tensor& argmax) {
  TORCH_INTERNAL_ASSERT(q.is_contiguous() && d.is_contiguous() && scores.is_contiguous() &&
                        argmax.is_contiguous());
  TORCH_INTERNAL_ASSERT(cfg.b > 0 && cfg.k > 0 && cfg.lq > 0 && cfg.ld > 0);
  TORCH_INTERNAL_ASSERT(!cfg.pylate || (cfg.q_mask != TokenMask::kLengths &&
                                        cfg.d_mask != TokenMask::kLengths));
  dispatch_doc(q, cfg.d_int8, [&]<typename doc_t, typename acc_t>() {
    const Tensor qv = cfg.q_mask == TokenMask::kBool ? q_mask : Tensor();
    const Tensor dv = cfg.d_mask == TokenMask::kBool ? d_mask : Tensor();
    std::vector<Tensor> keep;
    const Rows<acc_t> r = prepare_rows<doc_t, acc_t>(
        q, d, d_scale, qv, dv, cfg.dim, cfg.reduce == MaxSimReduce::kMean, cfg.pylate, keep);
    AlignedPairs<acc_t> en;
    en.k_per = cfg.k;
    en.lq = cfg.lq;
    en.ld = cfg.ld;
    en.q_len = cfg.q_mask == TokenMask::kLengths ? q_mask.data_ptr<int32_t>() : nullptr;
    en.d_len = cfg.d_mask == TokenMask::kLengths ? d_mask.data_ptr<int32_t>() : nullptr;
    en.scores = scores.data_ptr<acc_t>();
    en.argmax = ArgmaxRun(argmax);
    run_all<doc_t, acc_t>(r, en, cfg.b * cfg.k, cfg.lq * cfg.ld * cfg.dim);
  });
}

void maxsim_topk_cpu_kernel(const Tensor& q, const Tensor& q_mask, const Tensor& d,
                            const Tensor& d_scale, const Tensor& cu_d, const Tensor& candidates,
                            const MaxSimTopkConfig& cfg, Tensor& scores, Tensor& ids) {
  TORCH_INTERNAL_ASSERT(q.is_contiguous() && d.is_contiguous() && cu_d.is_contiguous() &&
                        scores.is_contiguous() && ids.is_contiguous());
  TORCH_INTERNAL_ASSERT(cfg.nq > 0 && cfg.lq > 0 && cfg.k > 0);
  dispatch_doc(q, cfg.d_int8, [&]<typename doc_t, typename acc_t>() {
    const Tensor qv = cfg.q_mask == TokenMask::kBool ? q_mask : Tensor();
    std::vector<Tensor> keep;
    const Rows<acc_t> r = prepare_rows<doc_t, acc_t>(
        q, d, d_scale, qv, Tensor(), cfg.dim, cfg.reduce == MaxSimReduce::kMean, false, keep);
    TopkState<acc_t> state;
    TopkEnum<acc_t> en;
    en.nq = cfg.nq;
    en.lq = cfg.lq;
    en.nqb = (cfg.nq + kQueryBlock - 1) / kQueryBlock;
    en.k = cfg.k;
    en.q_len = cfg.q_mask == TokenMask::kLengths ? q_mask.data_ptr<int32_t>() : nullptr;
    en.cu_d = cu_d.data_ptr<int32_t>();
    en.cand = candidates.defined() ? candidates.data_ptr<int64_t>() : nullptr;
    en.per_query = candidates.defined() && candidates.dim() == 2;
    en.c = candidates.defined() ? candidates.size(-1) : cfg.nd;
    en.state = &state;
    const int64_t avg_ld = std::max<int64_t>(1, cfg.total_d / std::max<int64_t>(1, cfg.nd));
    const int64_t items = en.per_query ? cfg.nq * en.c : en.c * en.nqb;
    const int64_t per_item =
        (en.per_query ? 1 : std::min(cfg.nq, kQueryBlock)) * cfg.lq * avg_ld * cfg.dim;
    if (items > 0) run_all<doc_t, acc_t>(r, en, items, per_item);
    // Deterministic merge: the union of the chunks' k best holds the k best under the total
    // order (score desc, id asc), which does not depend on how the items were split.
    acc_t* out_s = scores.data_ptr<acc_t>();
    int64_t* out_i = ids.data_ptr<int64_t>();
    std::vector<Cand<acc_t>> all;
    for (int64_t n = 0; n < cfg.nq; ++n) {
      all.clear();
      for (size_t c = 0; c < state.parts.size(); ++c) {
        const Cand<acc_t>* h = state.parts[c].data() + n * cfg.k;
        all.insert(all.end(), h, h + state.sizes[c][n]);
      }
      const int64_t take = std::min<int64_t>(cfg.k, static_cast<int64_t>(all.size()));
      std::partial_sort(all.begin(), all.begin() + take, all.end(),
                        [](const Cand<acc_t>& a, const Cand<acc_t>& b) { return better(a, b); });
      for (int64_t i = 0; i < cfg.k; ++i) {
        out_s[n * cfg.k + i] = i < take ? all[i].score : -std::numeric_limits<acc_t>::infinity();
        out_i[n * cfg.k + i] = i < take ? all[i].id : -1;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward from the saved argmax, shared by every op. meta [P, 6] int64 per pair: query group,
// first query row, query rows, document group, first document row, argmax offset. dq rows are
// owned by query groups and dd rows by document groups; each group walks its pairs in index
// order, so every output row is summed in a fixed order (deterministic, no atomics) and the
// Lq x Ld similarities never exist.
namespace {

// dst[0..dim) += g * src[0..dim) (src widened from scalar_t).
template <typename scalar_t, typename acc_t>
SPARSEOPS_ALWAYS_INLINE void axpy(acc_t* dst, const scalar_t* src, acc_t g, int64_t dim) {
  for (int64_t k = 0; k < dim; ++k) dst[k] += g * static_cast<acc_t>(src[k]);
}

// Pairs grouped by column col of meta (stable counting sort): offsets [groups + 1], order [P].
void group_pairs(const int64_t* meta, int64_t np, int col, int64_t groups,
                 std::vector<int64_t>& off, std::vector<int64_t>& order) {
  off.assign(groups + 1, 0);
  for (int64_t p = 0; p < np; ++p) ++off[meta[p * 6 + col] + 1];
  for (int64_t g = 0; g < groups; ++g) off[g + 1] += off[g];
  order.resize(np);
  std::vector<int64_t> pos(off.begin(), off.end() - 1);
  for (int64_t p = 0; p < np; ++p) order[pos[meta[p * 6 + col]]++] = p;
}

// doc_t: d's element type (q's, or int8_t with d_scale [Rd]; int8 d only ever has for_dq).
template <typename scalar_t, typename doc_t, typename acc_t, bool kWide>
SPARSEOPS_ALWAYS_INLINE void backward_groups(const acc_t* grad, const scalar_t* q, const doc_t* d,
                                             const float* d_scale, const ArgmaxRun& argmax,
                                             const int64_t* meta, const int64_t* off,
                                             const int64_t* order, int64_t dim, bool for_dq,
                                             acc_t* out, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t o = off[g]; o < off[g + 1]; ++o) {
      const int64_t p = order[o];
      const int64_t* mt = meta + p * 6;
      const acc_t c = grad[p];
      if (c == acc_t(0)) continue;
      const int64_t qs = mt[1], ql = mt[2], ds = mt[4];
      const ArgmaxRun arg = argmax + mt[5];
      for (int64_t t = 0; t < ql; ++t) {
        const int32_t a = arg.get(t);
        if (a < 0) continue;
        if (for_dq) {
          const acc_t cs = d_scale != nullptr ? c * static_cast<acc_t>(d_scale[ds + a]) : c;
          axpy<doc_t, acc_t>(out + (qs + t) * dim, d + (ds + a) * dim, cs, dim);
        } else {
          axpy<scalar_t, acc_t>(out + (ds + a) * dim, q + (qs + t) * dim, c, dim);
        }
      }
    }
  }
}

#if SPARSEOPS_MAXSIM_X86
template <typename scalar_t, typename doc_t, typename acc_t>
SPARSEOPS_TARGET_AVX512 void backward_groups_avx512(const acc_t* grad, const scalar_t* q,
                                                    const doc_t* d, const float* d_scale,
                                                    const ArgmaxRun& argmax, const int64_t* meta,
                                                    const int64_t* off, const int64_t* order,
                                                    int64_t dim, bool for_dq, acc_t* out,
                                                    int64_t g0, int64_t g1) {
  backward_groups<scalar_t, doc_t, acc_t, true>(grad, q, d, d_scale, argmax, meta, off, order, dim,
                                                for_dq, out, g0, g1);
}
#endif

}  // namespace

void maxsim_backward_cpu_kernel(const Tensor& grad, const Tensor& q, const Tensor& d,
                                const Tensor& d_scale, const Tensor& argmax, const Tensor& meta,
                                int64_t num_q, int64_t num_d, Tensor& dq, Tensor& dd) {
  TORCH_INTERNAL_ASSERT(grad.is_contiguous() && q.is_contiguous() && d.is_contiguous() &&
                        argmax.is_contiguous() && meta.is_contiguous());
  const bool d_int8 = d.scalar_type() == at::kChar;
  TORCH_INTERNAL_ASSERT(!d_int8 || (d_scale.defined() && d_scale.is_contiguous() && !dd.defined()));
  const int64_t np = meta.size(0), dim = q.size(1);
  const int64_t* mt = meta.data_ptr<int64_t>();
  const int level = isa_level();
  const float* sc = d_int8 ? d_scale.data_ptr<float>() : nullptr;
  dispatch_dtype(q, [&]<typename scalar_t, typename acc_t>() {
    const auto body = [&]<typename doc_t>() {
      const acc_t* g = grad.data_ptr<acc_t>();
      const scalar_t* qp = q.data_ptr<scalar_t>();
      const doc_t* dp = static_cast<const doc_t*>(d.data_ptr());
      const ArgmaxRun ap(argmax);
      for (int pass = 0; pass < 2; ++pass) {
        Tensor& out = pass == 0 ? dq : dd;
        if (!out.defined()) continue;
        out.zero_();
        const int col = pass == 0 ? 0 : 3;
        const int64_t groups = pass == 0 ? num_q : num_d;
        std::vector<int64_t> off, order;
        group_pairs(mt, np, col, groups, off, order);
        acc_t* o = out.data_ptr<acc_t>();
        const int64_t work = std::max<int64_t>(1, np / std::max<int64_t>(1, groups)) * dim * 32;
        const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / work);
        at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
#if SPARSEOPS_MAXSIM_X86
          if (level >= 2) {
            return backward_groups_avx512<scalar_t, doc_t, acc_t>(
                g, qp, dp, sc, ap, mt, off.data(), order.data(), dim, pass == 0, o, g0, g1);
          }
#endif
          backward_groups<scalar_t, doc_t, acc_t, false>(g, qp, dp, sc, ap, mt, off.data(),
                                                         order.data(), dim, pass == 0, o, g0, g1);
        });
      }
    };
    if (d_int8) {
      body.template operator()<int8_t>();
    } else {
      body.template operator()<scalar_t>();
    }
  });
}

}  // namespace sparseops
