// AVX-512 building blocks shared by the CPU kernels: 16-lane masks, loads and stores of fp32 /
// bf16 / fp16 as fp32 vectors, and a fast exp. Each kernel file decides at run time whether
// its AVX-512 path runs; these helpers only compile for it (their target is a subset of every
// kernel's, so they inline into any of them).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 AVX-512 header false positive
#define SPARSEOPS_CPU_VEC 1
#define SPARSEOPS_CPU_VEC_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#else
#define SPARSEOPS_CPU_VEC 0
#endif

namespace sparseops {

// Whether this CPU runs the AVX-512 paths (the features of SPARSEOPS_CPU_VEC_TARGET) and
// SPARSEOPS_CPU_NO_AVX512 is unset, empty or "0": decided once per process, so the bits of an
// answer depend on the machine and that variable only. Kernels needing more (bmi2, VBMI2,
// BF16, VNNI) check those on top.
inline bool cpu_avx512_enabled() {
#if SPARSEOPS_CPU_VEC
  static const bool on = [] {
    const char* off = std::getenv("SPARSEOPS_CPU_NO_AVX512");
    if (off != nullptr && *off != '\0' && *off != '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return on;
#else
  return false;
#endif
}

}  // namespace sparseops

#if SPARSEOPS_CPU_VEC
namespace sparseops {

// A vector loaded once for several multiply-adds: GCC otherwise folds the load into each one's
// memory operand (N loads of the same line instead of one; N:M fp32 register blocks, 3 per x
// chunk, ran load-bound at 55 % of the FMA peak).
template <typename V>
inline V in_register(V v) {
  asm("" : "+v"(v));
  return v;
}

// The first min(max(n, 0), 16) lanes.
SPARSEOPS_CPU_VEC_TARGET inline __mmask16 lanes_below(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

SPARSEOPS_CPU_VEC_TARGET inline __m512 load16(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
SPARSEOPS_CPU_VEC_TARGET inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
SPARSEOPS_CPU_VEC_TARGET inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

SPARSEOPS_CPU_VEC_TARGET inline void store16(float* p, __m512 v, __mmask16 m) {
  _mm512_mask_storeu_ps(p, m, v);
}
// Round to nearest even, as c10::BFloat16(float) does; NaN stays a (quiet) NaN.
SPARSEOPS_CPU_VEC_TARGET inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r =
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}
SPARSEOPS_CPU_VEC_TARGET inline void store16(c10::Half* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// fp32 exp: n = round(x / ln2), r = x - n ln2 (two-part ln2), degree-7 Taylor on |r| <= 0.35
// (truncation 5e-9), 2^n by scalef (correct overflow to inf and gradual underflow). About
// 1 ulp: the routing weights and the MoE activations need only the fp32 tolerance.
SPARSEOPS_CPU_VEC_TARGET inline __m512 exp16(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512 y = _mm512_scalef_ps(p, n);
  return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);  // NaN stays NaN
}

}  // namespace sparseops
#endif
