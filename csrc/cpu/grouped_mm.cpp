// CPU kernels of grouped_mm and its fusion helpers.
//
// grouped_mm: every layout becomes a list of per-group GEMMs C_g[m, n] = A_g[m, k] B_g[k, n]
// over strided views of a, b and out (sparseops/grouped_mm.h). Each group is cut into work
// items (M-tile x N-tile) whose sizes depend on the shapes only, never on the thread count,
// and at::parallel_for runs the items. An item with at most kSmallRows rows (decode: 1-4
// tokens per expert), or with k <= kSmallK (the ragged-K weight gradient of a few rows per
// expert), runs our own kernel: the A tile converted once to a
// local fp32 (fp64) buffer, then an AVX-512 AXPY over B rows with 6 x 64 sums in registers
// when b has unit column stride (b [G, K, N] contiguous) or AVX-512 dot products along K when
// b has unit row stride (the usual transposed view of [G, N, K] weights), accumulating at fp32
// (fp64 for fp64) and rounding once, 16 lanes at a time. A ragged-K group with no rows is one
// item, one memset. A larger item is one ATen BLAS call (at::mm_out / at::addmm_out on the
// views; single-threaded inside the parallel region, threaded when the call is one item).
// Outputs above 32 MB get transparent huge pages (sparseops/cpu_memory.h).
// SPARSEOPS_CPU_NO_AVX512=1 (or a CPU without AVX-512) runs the portable loops instead.
//
// gather_rows / scatter_rows / row_scale: parallel over rows; scatter_rows first sorts the
// sources by destination (stable counting sort), then sums each destination's sources in
// source order at the accumulation dtype: deterministic, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "sparseops/cpu_memory.h"
#include "sparseops/cpu_vec.h"
#include "sparseops/grouped_mm.h"

namespace sparseops {
namespace {

using at::Tensor;

constexpr int64_t kSmallRows = 16;   // items with at most this many rows run our kernel
// ... and so do groups with at most this contraction length: the ragged-K weight gradient at
// decode sizes (a handful of rows per expert), where a BLAS call per item costs more than its
// arithmetic and oneDNN's bf16 GEMM builds a primitive for every new K (measured 0.05-0.8x
// torch._grouped_mm's speed on the 2d2d rows of bench_grouped_mm, T = 1 and 8, 1 thread).
constexpr int64_t kSmallK = 32;
constexpr int64_t kSmallNTile = 256;  // columns per item of our kernel
constexpr int64_t kBlasMTile = 128;   // rows per BLAS item
constexpr int64_t kBlasNTile = 1024;  // columns per BLAS item when N is larger than 2048

// One group's GEMM: element offsets into a, b, out, bias and its sizes.
struct GroupDesc {
  int64_t a_off, b_off, c_off, bias_off, m, n, k;
};

// Strides shared by every group (elements): A rows / cols, B along K / along N, C rows.
struct Strides {
  int64_t a_rs, a_cs, b_ks, b_ns, c_rs;
};

struct Item {
  int32_t g;
  int64_t m0, m1, n0, n1;
};

#if SPARSEOPS_CPU_VEC
// acc[r][0:64] (masks mk) = sum over kk of A[r][kk] * B[kk][0:64] for R rows, the R x 4
// vectors of sums in registers for the whole k loop: the store-per-step AXPY it replaced paid
// an L1 load + store per FMA and ran the bf16 2d2d weight gradient at T = 64 at 0.29-0.56x
// torch._grouped_mm's speed (bench_grouped_mm, 2 threads, 2026-12-07). Each lane still sums
// in kk order from zero, so the bits are those of the plain loop.
template <int R, typename T>
SPARSEOPS_CPU_VEC_TARGET inline void axpy_tile(const float* A, int64_t k, const T* B, int64_t b_ks,
                                          const __mmask16* mk, float* acc) {
  __m512 c[R][4];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    c[r][0] = c[r][1] = c[r][2] = c[r][3] = _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    const T* brow = B + kk * b_ks;
    const __m512 b0 = load16(brow, mk[0]), b1 = load16(brow + 16, mk[1]);
    const __m512 b2 = load16(brow + 32, mk[2]), b3 = load16(brow + 48, mk[3]);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(A[r * k + kk]);
      c[r][0] = _mm512_fmadd_ps(av, b0, c[r][0]);
      c[r][1] = _mm512_fmadd_ps(av, b1, c[r][1]);
      c[r][2] = _mm512_fmadd_ps(av, b2, c[r][2]);
      c[r][3] = _mm512_fmadd_ps(av, b3, c[r][3]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(acc + r * kSmallNTile + 16 * v, mk[v], c[r][v]);
  }
}

// acc[i][0:nn] = sum over kk of A[i][kk] * B[kk][0:nn], B rows of unit stride: tiles of up to
// 6 rows x 64 columns (24 accumulators, 4 B vectors and the broadcast A value: 29 of the 32
// registers).
template <typename T>
SPARSEOPS_CPU_VEC_TARGET void small_axpy_avx512(const float* A, int64_t mm, int64_t k, const T* B,
                                           int64_t b_ks, int64_t nn, float* acc) {
  for (int64_t j = 0; j < nn; j += 64) {
    __mmask16 mk[4];
    for (int v = 0; v < 4; ++v) mk[v] = lanes_below(nn - j - 16 * v);
    for (int64_t i = 0; i < mm; i += 6) {
      const float* a = A + i * k;
      float* o = acc + i * kSmallNTile + j;
      switch (std::min<int64_t>(6, mm - i)) {
        case 6: axpy_tile<6>(a, k, B + j, b_ks, mk, o); break;
        case 5: axpy_tile<5>(a, k, B + j, b_ks, mk, o); break;
        case 4: axpy_tile<4>(a, k, B + j, b_ks, mk, o); break;
        case 3: axpy_tile<3>(a, k, B + j, b_ks, mk, o); break;
        case 2: axpy_tile<2>(a, k, B + j, b_ks, mk, o); break;
        default: axpy_tile<1>(a, k, B + j, b_ks, mk, o); break;
      }
    }
  }
}

// acc[i][j] = dot(A[i][0:k], B[0:k][j]) for B columns of unit stride (b_ns apart).
template <typename T>
SPARSEOPS_CPU_VEC_TARGET void small_dot_avx512(const float* A, int64_t mm, int64_t k, const T* B,
                                          int64_t b_ns, int64_t nn, float* acc) {
  for (int64_t j = 0; j < nn; ++j) {
    const T* bcol = B + j * b_ns;
    for (int64_t i0 = 0; i0 < mm; i0 += 4) {
      const int64_t r = std::min<int64_t>(4, mm - i0);
      __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      const float* a0 = A + i0 * k;
      for (int64_t kk = 0; kk < k; kk += 16) {
        const __mmask16 mask = lanes_below(k - kk);
        const __m512 bv = load16(bcol + kk, mask);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a0 + kk), bv, s0);
        if (r > 1) s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a0 + k + kk), bv, s1);
        if (r > 2) s2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a0 + 2 * k + kk), bv, s2);
        if (r > 3) s3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a0 + 3 * k + kk), bv, s3);
      }
      acc[i0 * kSmallNTile + j] = _mm512_reduce_add_ps(s0);
      if (r > 1) acc[(i0 + 1) * kSmallNTile + j] = _mm512_reduce_add_ps(s1);
      if (r > 2) acc[(i0 + 2) * kSmallNTile + j] = _mm512_reduce_add_ps(s2);
      if (r > 3) acc[(i0 + 3) * kSmallNTile + j] = _mm512_reduce_add_ps(s3);
    }
  }
}

// out rows [0, mm) (c_rs apart), columns [0, nn) = the fp32 sums (+ bias), rounded once as
// static_cast<out_t> does (round to nearest even, NaN kept), 16 values per step.
template <typename out_t>
SPARSEOPS_CPU_VEC_TARGET void store_tile_avx512(const float* acc, int64_t mm, int64_t nn,
                                           const out_t* bias, out_t* c, int64_t c_rs) {
  for (int64_t i = 0; i < mm; ++i) {
    const float* ap = acc + i * kSmallNTile;
    out_t* cr = c + i * c_rs;
    for (int64_t j = 0; j < nn; j += 16) {
      const __mmask16 m = lanes_below(nn - j);
      __m512 v = _mm512_maskz_loadu_ps(m, ap + j);
      if (bias != nullptr) v = _mm512_add_ps(v, load16(bias + j, m));
      store16(cr + j, v, m);
    }
  }
}
#endif

// Our kernel on one item: out rows m0..m1, columns n0..n1 of group d.
template <typename scalar_t, typename out_t>
void small_item(const scalar_t* a, const scalar_t* b, const out_t* bias, out_t* c,
                const GroupDesc& d, const Strides& st, int64_t m0, int64_t m1, int64_t n0,
                int64_t n1, bool avx512) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t mm = m1 - m0, nn = n1 - n0, k = d.k;
  if (k == 0) {  // an empty ragged-K group: zeros (+ bias), without the accumulator tile
    if (bias == nullptr && nn == st.c_rs) {  // whole rows: one memset
      std::memset(static_cast<void*>(c + d.c_off + m0 * st.c_rs), 0,
                  static_cast<size_t>(mm * nn) * sizeof(out_t));
      return;
    }
    for (int64_t i = 0; i < mm; ++i) {
      out_t* cr = c + d.c_off + (m0 + i) * st.c_rs + n0;
      if (bias != nullptr) {
        std::memcpy(cr, bias + d.bias_off + n0, static_cast<size_t>(nn) * sizeof(out_t));
      } else {
        std::memset(static_cast<void*>(cr), 0, static_cast<size_t>(nn) * sizeof(out_t));
      }
    }
    return;
  }
  // The A tile, converted once, rows contiguous.
  std::vector<acc_t> A(static_cast<size_t>(mm * k));
  for (int64_t i = 0; i < mm; ++i) {
    const scalar_t* ar = a + d.a_off + (m0 + i) * st.a_rs;
    for (int64_t kk = 0; kk < k; ++kk) A[i * k + kk] = static_cast<acc_t>(ar[kk * st.a_cs]);
  }
  // Up to kSmallRows x kSmallNTile sums on the stack (16 KB fp32), not a zero-filled heap tile
  // per item (the vector paths write every sum they read back).
  alignas(64) acc_t acc[kSmallRows * kSmallNTile];
  const scalar_t* B = b + d.b_off + n0 * st.b_ns;
  bool done = false;
#if SPARSEOPS_CPU_VEC
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (avx512 && st.b_ns == 1) {
      small_axpy_avx512(A.data(), mm, k, B, st.b_ks, nn, acc);
      done = true;
    } else if (avx512 && st.b_ks == 1) {
      small_dot_avx512(A.data(), mm, k, B, st.b_ns, nn, acc);
      done = true;
    }
  }
#endif
  if (!done) {
    if (st.b_ns == 1) {  // portable AXPY (the compiler vectorises the inner loop)
      std::fill(acc, acc + mm * kSmallNTile, acc_t(0));
      for (int64_t kk = 0; kk < k; ++kk) {
        const scalar_t* brow = B + kk * st.b_ks;
        for (int64_t i = 0; i < mm; ++i) {
          const acc_t av = A[i * k + kk];
          acc_t* ap = acc + i * kSmallNTile;
          for (int64_t j = 0; j < nn; ++j) ap[j] += av * static_cast<acc_t>(brow[j]);
        }
      }
    } else {  // portable dot products over strided B columns
      for (int64_t i = 0; i < mm; ++i) {
        for (int64_t j = 0; j < nn; ++j) {
          const scalar_t* bcol = B + j * st.b_ns;
          acc_t s = 0;
          for (int64_t kk = 0; kk < k; ++kk) s += A[i * k + kk] * static_cast<acc_t>(bcol[kk * st.b_ks]);
          acc[i * kSmallNTile + j] = s;
        }
      }
    }
  }
#if SPARSEOPS_CPU_VEC
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx512) {
      store_tile_avx512(acc, mm, nn, bias ? bias + d.bias_off + n0 : nullptr,
                        c + d.c_off + m0 * st.c_rs + n0, st.c_rs);
      return;
    }
  }
#endif
  for (int64_t i = 0; i < mm; ++i) {
    out_t* cr = c + d.c_off + (m0 + i) * st.c_rs + n0;
    const acc_t* ap = acc + i * kSmallNTile;
    if (bias != nullptr) {
      const out_t* br = bias + d.bias_off + n0;
      for (int64_t j = 0; j < nn; ++j) cr[j] = static_cast<out_t>(ap[j] + static_cast<acc_t>(br[j]));
    } else {
      for (int64_t j = 0; j < nn; ++j) cr[j] = static_cast<out_t>(ap[j]);
    }
  }
}

// One BLAS call on one item.
void blas_item(const Tensor& a, const Tensor& b, const Tensor& bias, Tensor& out,
               const GroupDesc& d, const Strides& st, int64_t m0, int64_t m1, int64_t n0,
               int64_t n1) {
  // The op runs below autograd, but a backward's inputs may require grad, and grad and
  // inference mode are thread-local: on a worker thread the views and BLAS calls must neither
  // record a graph nor refuse to write an output made under the caller's inference mode.
  // InferenceMode covers both (it also permits in-place writes to normal tensors).
  c10::InferenceMode inference_mode;
  const int64_t mm = m1 - m0, nn = n1 - n0;
  Tensor av = a.as_strided({mm, d.k}, {st.a_rs, st.a_cs}, a.storage_offset() + d.a_off + m0 * st.a_rs);
  Tensor bv = b.as_strided({d.k, nn}, {st.b_ks, st.b_ns}, b.storage_offset() + d.b_off + n0 * st.b_ns);
  Tensor cv = out.as_strided({mm, nn}, {st.c_rs, 1}, d.c_off + m0 * st.c_rs + n0);
  if (out.scalar_type() != a.scalar_type()) {  // bf16 / fp16 in, fp32 out: GEMM at fp32
    av = av.to(out.scalar_type());
    bv = bv.to(out.scalar_type());
  }
  if (bias.defined()) {
    const Tensor biasv = bias.as_strided({mm, nn}, {0, 1}, d.bias_off + n0);
    at::addmm_out(cv, biasv, av, bv);
  } else {
    at::mm_out(cv, av, bv);
  }
}

}  // namespace

void grouped_mm_cpu_kernel(const Tensor& a, const Tensor& b, const Tensor& offs, const Tensor& bias,
                           const GroupedMmConfig& cfg, Tensor& out) {
  const int64_t G = cfg.g;
  std::vector<GroupDesc> groups(static_cast<size_t>(G));
  Strides st{};
  const int32_t* o = offs.defined() ? offs.data_ptr<int32_t>() : nullptr;
  auto span = [&](int64_t g, int64_t& s0, int64_t& s1) {
    s0 = g == 0 ? 0 : o[g - 1];
    s1 = o[g];
  };
  int64_t end = 0;  // offs[-1]
  if (o != nullptr && G > 0) end = o[G - 1];
  switch (cfg.layout) {
    case GroupedLayout::k2d3d:
      st = {a.stride(0), a.stride(1), b.stride(1), b.stride(2), cfg.n};
      for (int64_t g = 0; g < G; ++g) {
        int64_t s0, s1;
        span(g, s0, s1);
        groups[g] = {s0 * st.a_rs, g * b.stride(0), s0 * cfg.n, g * cfg.n, s1 - s0, cfg.n, cfg.k};
      }
      if (end < cfg.s) out.narrow(0, end, cfg.s - end).zero_();
      break;
    case GroupedLayout::k2d2d:
      st = {a.stride(0), a.stride(1), b.stride(0), b.stride(1), cfg.n};
      for (int64_t g = 0; g < G; ++g) {
        int64_t s0, s1;
        span(g, s0, s1);
        groups[g] = {s0 * st.a_cs, s0 * st.b_ks, g * cfg.m * cfg.n, g * cfg.n, cfg.m, cfg.n, s1 - s0};
      }
      break;
    case GroupedLayout::k3d3d:
      st = {a.stride(1), a.stride(2), b.stride(1), b.stride(2), cfg.n};
      for (int64_t g = 0; g < G; ++g) {
        groups[g] = {g * a.stride(0), g * b.stride(0), g * cfg.m * cfg.n, g * cfg.n, cfg.m, cfg.n, cfg.k};
      }
      break;
    case GroupedLayout::k3d2d:
      st = {a.stride(1), a.stride(2), b.stride(0), b.stride(1), cfg.s};
      for (int64_t g = 0; g < G; ++g) {
        int64_t s0, s1;
        span(g, s0, s1);
        groups[g] = {g * a.stride(0), s0 * st.b_ns, s0, s0, cfg.m, s1 - s0, cfg.k};
      }
      if (end < cfg.s) out.narrow(1, end, cfg.s - end).zero_();
      break;
  }
  advise_huge_pages(out);  // the weight gradient's [G, M, N] is written in full, often 100+ MB
  // Work items, fixed by the shapes alone.
  std::vector<Item> items;
  std::vector<char> small;
  for (int64_t g = 0; g < G; ++g) {
    const GroupDesc& d = groups[g];
    if (d.m == 0 || d.n == 0) continue;
    const bool ours = d.m <= kSmallRows || d.k <= kSmallK;
    // An empty ragged-K group is one item of zeros (one memset: a Qwen3/4 weight gradient at
    // T = 1 spent 2.3x torch.zeros' time zeroing 16 x 256 tiles one at a time).
    const int64_t mt = d.k == 0 ? d.m : ours ? kSmallRows : kBlasMTile;
    const int64_t nt = d.k == 0 ? d.n : ours ? kSmallNTile : (d.n > 2048 ? kBlasNTile : d.n);
    for (int64_t m0 = 0; m0 < d.m; m0 += mt) {
      for (int64_t n0 = 0; n0 < d.n; n0 += nt) {
        items.push_back({static_cast<int32_t>(g), m0, std::min(d.m, m0 + mt), n0, std::min(d.n, n0 + nt)});
        small.push_back(ours ? 1 : 0);
      }
    }
  }
  const bool avx512 = cpu_avx512_enabled();
  const int64_t n_items = static_cast<int64_t>(items.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "grouped_mm_cpu", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    auto run = [&](int64_t i) {
      const Item& it = items[i];
      const GroupDesc& d = groups[it.g];
      if (small[i]) {
        if (out.scalar_type() == a.scalar_type()) {
          small_item<scalar_t, scalar_t>(ap, bp, bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                                         out.data_ptr<scalar_t>(), d, st, it.m0, it.m1, it.n0, it.n1,
                                         avx512);
        } else {
          small_item<scalar_t, float>(ap, bp, bias.defined() ? bias.data_ptr<float>() : nullptr,
                                      out.data_ptr<float>(), d, st, it.m0, it.m1, it.n0, it.n1, avx512);
        }
      } else {
        blas_item(a, b, bias, out, d, st, it.m0, it.m1, it.n0, it.n1);
      }
    };
    if (n_items == 1) {
      run(0);  // one item: the BLAS may thread
    } else if (n_items > 1) {
      at::parallel_for(0, n_items, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) run(i);
      });
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Fusion helpers.

void gather_rows_cpu_kernel(const Tensor& a, const Tensor& index, Tensor& out) {
  const int64_t n = index.numel(), D = a.size(1);
  if (n == 0 || D == 0) return;
  const int32_t* idx = index.data_ptr<int32_t>();
  const int64_t rs = a.stride(0);
  const int64_t item = a.element_size();
  const char* src = static_cast<const char*>(a.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, D));
  at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      char* o = dst + i * D * item;
      if (idx[i] < 0) {
        std::memset(o, 0, static_cast<size_t>(D * item));
      } else {
        std::memcpy(o, src + idx[i] * rs * item, static_cast<size_t>(D * item));
      }
    }
  });
}

void scatter_rows_cpu_kernel(const Tensor& src, const Tensor& index, Tensor& out) {
  const int64_t n = index.numel(), R = out.size(0), D = out.size(1);
  if (R == 0 || D == 0) return;
  const int32_t* idx = index.data_ptr<int32_t>();
  // Stable counting sort of the sources by destination.
  std::vector<int64_t> start(static_cast<size_t>(R + 1), 0);
  for (int64_t i = 0; i < n; ++i)
    if (idx[i] >= 0) ++start[idx[i] + 1];
  for (int64_t r = 0; r < R; ++r) start[r + 1] += start[r];
  std::vector<int64_t> order(static_cast<size_t>(start[R]));
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i)
      if (idx[i] >= 0) order[fill[idx[i]]++] = i;
  }
  const int64_t rs = src.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "scatter_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = src.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / D);
    at::parallel_for(0, R, grain, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> acc(static_cast<size_t>(D));
      for (int64_t r = lo; r < hi; ++r) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t p = start[r]; p < start[r + 1]; ++p) {
          const scalar_t* row = sp + order[p] * rs;
          for (int64_t j = 0; j < D; ++j) acc[j] += static_cast<acc_t>(row[j]);
        }
        scalar_t* o = op + r * D;
        for (int64_t j = 0; j < D; ++j) o[j] = static_cast<scalar_t>(acc[j]);
      }
    });
  });
}

void row_scale_cpu_kernel(const Tensor& x, const Tensor& scale, Tensor& out) {
  const int64_t n = x.size(0), D = x.size(1);
  if (n == 0 || D == 0) return;
  const int64_t rs = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "row_scale_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc_t* sp = scale.data_ptr<acc_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / D);
    at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const acc_t s = sp[i];
        const scalar_t* xr = xp + i * rs;
        scalar_t* o = op + i * D;
        for (int64_t j = 0; j < D; ++j) o[j] = static_cast<scalar_t>(static_cast<acc_t>(xr[j]) * s);
      }
    });
  });
}

}  // namespace sparseops
