// N:M sparse CPU kernels. Semantics: python/sparseops/reference/nm_sparse.py.
//
// nm_linear, small batch (R < kNMDenseCrossoverRows): the weight is streamed once. Output rows
// are split over threads in blocks of kRowBlock (at::parallel_for); for each weight row the
// dense columns of its kept values are decoded once from meta and reused for all R rows of x
// (x is widened to the accumulate type once, up front). Each output is one dot product summed
// in index order by one thread, so the bits never depend on the thread count.
// Large batch (R >= kNMDenseCrossoverRows): the weight is decompressed to a dense buffer and
// at::mm does the GEMM (the crossover is a guess from the byte/flop balance; not measured yet).
//
// ISA: the hot loop is instantiated under an AVX-512 target attribute and chosen at run time
// (SPARSEOPS_CPU_NO_AVX512=1 forces the portable instantiation), as in csrc/cpu/maxsim.cpp.
#include "sparseops/nm_sparse.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPARSEOPS_NM_X86 1
#define SPARSEOPS_NM_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#else
#define SPARSEOPS_NM_X86 0
#endif

namespace sparseops {
namespace {

using at::Tensor;

constexpr int64_t kRowBlock = 16;

bool use_avx512() {
#if SPARSEOPS_NM_X86
  static const bool v = [] {
    const char* e = std::getenv("SPARSEOPS_CPU_NO_AVX512");
    if (e != nullptr && e[0] == '1') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  }();
  return v;
#else
  return false;
#endif
}

inline void decode_columns(const uint8_t* meta, const NMConfig& c, int32_t* cols) {
  const int b = c.bits;
  const int mask = (1 << b) - 1;
  for (int64_t j = 0; j < c.kept; ++j) {
    const int64_t bit = j * b;
    const int p = (meta[bit >> 3] >> (bit & 7)) & mask;
    cols[j] = static_cast<int32_t>((j / c.n) * c.m + p);
  }
}

template <typename scalar_t, typename acc_t>
inline void row_block(const acc_t* x, const scalar_t* values, const uint8_t* meta,
                      const scalar_t* bias, const NMConfig& c, int64_t R, int64_t r0, int64_t r1,
                      scalar_t* out, int32_t* cols, acc_t* vals) {
  for (int64_t o = r0; o < r1; ++o) {
    decode_columns(meta + o * c.meta_bytes, c, cols);
    const scalar_t* v = values + o * c.kept;
    for (int64_t j = 0; j < c.kept; ++j) vals[j] = static_cast<acc_t>(v[j]);
    const acc_t bo = bias ? static_cast<acc_t>(bias[o]) : acc_t(0);
    for (int64_t r = 0; r < R; ++r) {
      const acc_t* xr = x + r * c.in;
      acc_t s = 0;
      for (int64_t j = 0; j < c.kept; ++j) s += vals[j] * xr[cols[j]];
      out[r * c.out + o] = static_cast<scalar_t>(s + bo);
    }
  }
}

#if SPARSEOPS_NM_X86
template <typename scalar_t, typename acc_t>
SPARSEOPS_NM_AVX512 void row_block_avx512(const acc_t* x, const scalar_t* values,
                                          const uint8_t* meta, const scalar_t* bias,
                                          const NMConfig& c, int64_t R, int64_t r0, int64_t r1,
                                          scalar_t* out, int32_t* cols, acc_t* vals) {
  row_block<scalar_t, acc_t>(x, values, meta, bias, c, R, r0, r1, out, cols, vals);
}
#endif

template <typename scalar_t>
void linear_small(const Tensor& x2d, const Tensor& values, const Tensor& meta, const Tensor& bias,
                  const NMConfig& c, Tensor& out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t R = x2d.size(0);
  const Tensor xa = x2d.to(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat).contiguous();
  const acc_t* xp = xa.data_ptr<acc_t>();
  const scalar_t* vp = values.data_ptr<scalar_t>();
  const uint8_t* mp = meta.data_ptr<uint8_t>();
  const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  const bool wide = use_avx512();
  at::parallel_for(0, c.out, kRowBlock, [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> cols(c.kept);
    std::vector<acc_t> vals(c.kept);
#if SPARSEOPS_NM_X86
    if (wide) {
      row_block_avx512<scalar_t, acc_t>(xp, vp, mp, bp, c, R, b0, b1, op, cols.data(), vals.data());
      return;
    }
#endif
    (void)wide;
    row_block<scalar_t, acc_t>(xp, vp, mp, bp, c, R, b0, b1, op, cols.data(), vals.data());
  });
}

template <typename scalar_t>
void decompress(const Tensor& values, const Tensor& meta, const NMConfig& c, Tensor& dense) {
  const scalar_t* vp = values.data_ptr<scalar_t>();
  const uint8_t* mp = meta.data_ptr<uint8_t>();
  scalar_t* dp = dense.data_ptr<scalar_t>();
  at::parallel_for(0, c.out, kRowBlock, [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> cols(c.kept);
    for (int64_t o = b0; o < b1; ++o) {
      decode_columns(mp + o * c.meta_bytes, c, cols.data());
      scalar_t* d = dp + o * c.in;
      for (int64_t k = 0; k < c.in; ++k) d[k] = scalar_t(0);
      for (int64_t j = 0; j < c.kept; ++j) d[cols[j]] = vp[o * c.kept + j];
    }
  });
}

// Rank of score a over b: NaN above every number, larger first (ties resolved by the caller).
template <typename T>
inline bool better(T a, T b) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na || nb) return na && !nb;
  return a > b;
}

template <typename scalar_t, typename score_t>
void compress(const Tensor& w, const score_t* scores, const bool* keep, const NMConfig& c,
              Tensor& values, Tensor& meta, Tensor& mask) {
  const scalar_t* wp = w.data_ptr<scalar_t>();
  scalar_t* vp = values.data_ptr<scalar_t>();
  uint8_t* mp = meta.data_ptr<uint8_t>();
  bool* kp = mask.data_ptr<bool>();
  const int64_t n = c.n, m = c.m;
  at::parallel_for(0, c.out, kRowBlock, [&](int64_t b0, int64_t b1) {
    for (int64_t o = b0; o < b1; ++o) {
      uint8_t* mrow = mp + o * c.meta_bytes;
      for (int64_t i = 0; i < c.meta_bytes; ++i) mrow[i] = 0;
      for (int64_t g = 0; g < c.groups; ++g) {
        const int64_t base = o * c.in + g * m;
        bool sel[16];
        if (keep != nullptr) {
          int64_t cnt = 0;
          for (int64_t p = 0; p < m; ++p) cnt += (sel[p] = keep[base + p]);
          for (int64_t p = 0; p < m && cnt < n; ++p) {
            if (!sel[p]) {
              sel[p] = true;
              ++cnt;
            }
          }
        } else {
          double s[16];
          for (int64_t p = 0; p < m; ++p) {
            sel[p] = false;
            s[p] = scores ? static_cast<double>(scores[base + p])
                          : std::abs(static_cast<double>(wp[base + p]));
          }
          // n rounds of argmax over the unselected (ties: the lower index wins).
          for (int64_t t = 0; t < n; ++t) {
            int64_t best = -1;
            for (int64_t p = 0; p < m; ++p) {
              if (sel[p]) continue;
              if (best < 0 || better(s[p], s[best])) best = p;
            }
            sel[best] = true;
          }
        }
        int64_t j = g * n;
        for (int64_t p = 0; p < m; ++p) {
          kp[base + p] = sel[p];
          if (!sel[p]) continue;
          vp[o * c.kept + j] = wp[base + p];
          const int64_t bit = j * c.bits;
          mrow[bit >> 3] |= static_cast<uint8_t>(p << (bit & 7));
          ++j;
        }
      }
    }
  });
}

}  // namespace

void nm_linear_cpu_kernel(const Tensor& x2d, const Tensor& values, const Tensor& meta,
                          const Tensor& bias, const NMConfig& cfg, Tensor& out) {
  if (x2d.size(0) >= kNMDenseCrossoverRows) {
    Tensor dense = at::empty({cfg.out, cfg.in}, values.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "nm_decompress",
                                    [&] { decompress<scalar_t>(values, meta, cfg, dense); });
    const auto acc = x2d.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    Tensor y = at::mm(x2d.to(acc), dense.to(acc).t());
    if (bias.defined()) y.add_(bias.to(acc));
    out.copy_(y);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2d.scalar_type(), "nm_linear_cpu",
                                  [&] { linear_small<scalar_t>(x2d, values, meta, bias, cfg, out); });
}

void nm_compress_cpu_kernel(const Tensor& w, const Tensor& scores, const Tensor& keep,
                            const NMConfig& cfg, Tensor& values, Tensor& meta, Tensor& mask) {
  const Tensor s = scores.defined() ? scores.to(at::kDouble).contiguous() : scores;
  const double* sp = s.defined() ? s.data_ptr<double>() : nullptr;
  const bool* kp = keep.defined() ? keep.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "nm_compress_cpu", [&] {
    compress<scalar_t, double>(w, sp, kp, cfg, values, meta, mask);
  });
}

}  // namespace sparseops
