// Internals of the moe_mlp CPU kernels shared by csrc/cpu/moe.cpp (the layer: routing
// metadata, BLAS tiles, backward) and csrc/cpu/moe_stream.cpp (the weight-stream kernel of
// experts with few routed rows): the run-time ISA choice and the AVX-512 elementwise helpers
// (conversions, exp, SwiGLU, the slot combine), defined once.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "sparseops/cpu_vec.h"
#include "sparseops/moe.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 AVX-512 header false positive
#define SPARSEOPS_MOE_AVX512_PATH 1
#define SPARSEOPS_MOE_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2")))
#define SPARSEOPS_MOE_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,bmi,bmi2")))
#else
#define SPARSEOPS_MOE_AVX512_PATH 0
#endif

namespace sparseops {
namespace moe_cpu {

// The instruction set the moe_mlp CPU kernels use, decided once per process from the CPU and
// the variables SPARSEOPS_CPU_NO_AVX512=1 (portable loops and BLAS tiles only) and
// SPARSEOPS_CPU_NO_AVX512BF16=1 (bf16 dot products widen to fp32 and use FMA), so the bits of
// an answer depend on the machine and those variables only.
enum class Isa : int { kPortable = 0, kAvx512 = 1, kAvx512Bf16 = 2 };
Isa isa();
inline bool use_avx512() { return isa() != Isa::kPortable; }

template <typename scalar_t>
constexpr bool kVectorType =
    std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16> ||
    std::is_same_v<scalar_t, c10::Half>;

#if SPARSEOPS_MOE_AVX512_PATH
// out[c] = silu(gate[c]) * up[c], c < n.
template <typename scalar_t>
SPARSEOPS_MOE_AVX512 void swiglu_avx512(const scalar_t* gate, const scalar_t* up, scalar_t* out,
                                        int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = lanes_below(n - c);
    const __m512 g = load16(gate + c, m);
    const __m512 sig =
        _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    store16(out + c, _mm512_mul_ps(_mm512_mul_ps(g, sig), load16(up + c, m)), m);
  }
}

// y[c] = sum over the kept rows j of rows[j][c], in j order (the scalar loop's order), for
// the columns [c0, c1) of rows H apart.
template <typename scalar_t>
SPARSEOPS_MOE_AVX512 void combine_row_avx512(const float* sbp, const int32_t* ids, int64_t K,
                                             int64_t H, int64_t c0, int64_t c1, scalar_t* y) {
  for (int64_t c = c0; c < c1; c += 16) {
    const __mmask16 m = lanes_below(c1 - c);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < K; ++j)
      if (ids[j] >= 0) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, sbp + j * H + c));
    store16(y + c, acc, m);
  }
}
#endif

// The activation of one slot row over intermediate columns [c0, c1): GEMM1's output row prow
// (gate and up concatenated, or interleaved with cfg.interleaved) into arow, computed in the
// op-math type and rounded to scalar_t, as every CPU path (BLAS tiles, weight stream, the
// backward's recompute) does; vec lets swiglu take the AVX-512 loop (the caller checked the CPU).
template <typename scalar_t>
inline void activate_row(const MoeConfig& cfg, bool vec, const scalar_t* prow, scalar_t* arow,
                         int64_t c0, int64_t c1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t I = cfg.inter;
  const bool inter = cfg.interleaved;
#if SPARSEOPS_MOE_AVX512_PATH
  if constexpr (kVectorType<scalar_t>) {
    if (vec && cfg.act == MoeActivation::kSwiglu && !inter) {
      swiglu_avx512(prow + c0, prow + I + c0, arow + c0, c1 - c0);
      return;
    }
  }
#endif
  if (moe_gated(cfg.act)) {
    const acc_t alpha = static_cast<acc_t>(cfg.alpha), limit = static_cast<acc_t>(cfg.limit);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t gi = inter ? 2 * c : c, ui = inter ? 2 * c + 1 : I + c;
      arow[c] = static_cast<scalar_t>(
          act_gated<acc_t>(cfg.act, acc_t(prow[gi]), acc_t(prow[ui]), alpha, limit));
    }
  } else {
    for (int64_t c = c0; c < c1; ++c)
      arow[c] = static_cast<scalar_t>(act_plain<acc_t>(cfg.act, acc_t(prow[c])));
  }
}

// The experts the weight-stream kernel runs, and where their routed rows are.
struct StreamWork {
  const int32_t* offs = nullptr;    // [E] cumulative ends of the expert-sorted slots
  const int32_t* sorted = nullptr;  // [T*k] slot of each expert-sorted row
  const char* stream = nullptr;     // [E] 1: the stream kernel runs this expert
  int64_t num_stream = 0;           // how many experts have stream[e] = 1
};

// Packed copies of expert weights (csrc/cpu/moe_pack.cpp), made for the weight tensors a user
// registered with sparseops.prepack_moe_weights. A weight w [E, N, K] (N output rows, K the
// contraction) is cut per expert into `groups` groups of N / groups rows (gate and up of the
// concat layout are two groups, so a column range of one is block-aligned with the other),
// each group padded to blocks of kPackCols rows. A block holds kPackCols rows x Kp: with vnni
// (bf16 on AVX512_BF16) as [Kp/2][kPackCols][2], K-pairs interleaved for vdpbf16ps (Kp = K
// rounded up to even, zero padded); otherwise as [K][kPackCols] (Kp = K). One 64-byte line
// then holds the same k of 16 output rows: the kernels broadcast x and accumulate 16 outputs
// per instruction, read the block as one sequential stream and need no horizontal sums.
constexpr int64_t kPackCols = 64;

struct PackedWeight {
  at::Tensor data;  // [E, groups * group_pad * kp] in w's dtype; holds the memory alive
  int64_t groups = 0, group_rows = 0, group_pad = 0, kp = 0;
  bool vnni = false;
  // Block b (rows [b*kPackCols, (b+1)*kPackCols) of group g) of expert e.
  const void* block(int64_t e, int64_t g, int64_t b) const {
    return static_cast<const char*>(data.data_ptr()) +
           ((e * groups + g) * group_pad + b * kPackCols) * kp * data.element_size();
  }
};

// The packed copy of w if w was registered (same storage, data pointer, sizes, strides and
// dtype) and is not an inference tensor; the experts in `experts` are packed now when they
// were not yet, or when w's version counter moved (an in-place update: the whole copy is
// then remade, expert by expert as they are used). Returns false if w is not registered.
bool packed_weight(const at::Tensor& w, int64_t groups, bool vnni,
                   const std::vector<int64_t>& experts, PackedWeight& out);
// Whether w is registered (the stream kernel then takes experts of up to 256 rows).
bool pack_registered(const at::Tensor& w);
// Registration, for the Python hooks (csrc/ops/moe_pack_py.cpp).
void pack_register(const at::Tensor& w);
bool pack_unregister(const at::Tensor& w);
void pack_clear();
// Registered tensors (alive) and the bytes of packed experts they hold.
std::pair<int64_t, int64_t> pack_stats();

// Whether the weight-stream kernel can run these weights: a vector ISA, fp32 / bf16 / fp16,
// weight rows of unit stride (w13.stride(2) == w2.stride(2) == 1).
bool stream_supported(const at::Tensor& w13, const at::Tensor& w2);

// The weight-stream forward of the experts with work.stream[e] = 1 (csrc/cpu/moe_stream.cpp),
// then the combine of every token. Contract of moe_mlp_cpu_kernel, plus: the slot buffer sbuf
// [T*k, H] fp32 already holds the rows of every kept slot of the other experts, and the
// pre-activation rows of the dropped slots are written. Writes the stream experts' pre rows,
// their slot rows and all of y.
void moe_stream_forward(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                        const at::Tensor& weights, const at::Tensor& ids, const at::Tensor& b13,
                        const at::Tensor& b2, const MoeConfig& cfg, const StreamWork& work,
                        float* sbuf, at::Tensor& y, at::Tensor& pre);

}  // namespace moe_cpu
}  // namespace sparseops
