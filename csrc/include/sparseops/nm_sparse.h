// N:M structured sparsity: the parsed arguments shared by the op layer (csrc/ops/nm_sparse.cpp)
// and the CPU kernels (csrc/cpu/nm_sparse.cpp). Format: NM_FORMAT (see
// python/sparseops/reference/nm_sparse.py, the specification).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace sparseops {

// Bits per stored position: 1, 2, 4, 4 for m = 2, 4, 8, 16.
inline int nm_meta_bits(int64_t m) { return m == 2 ? 1 : m == 4 ? 2 : 4; }
inline int64_t nm_meta_bytes(int64_t kept, int64_t m) { return (kept * nm_meta_bits(m) + 7) / 8; }

struct NMConfig {
  int64_t n = 0;
  int64_t m = 0;
  int64_t out = 0;  // weight rows
  int64_t in = 0;   // dense columns (in % m == 0)
  int64_t groups = 0;  // in / m
  int64_t kept = 0;    // groups * n
  int64_t meta_bytes = 0;
  int bits = 0;
};

// Large-batch crossover of the CPU nm_linear: from this many rows of x the kernel decompresses
// the weight into a dense buffer and calls at::mm (see csrc/cpu/nm_sparse.cpp).
constexpr int64_t kNMDenseCrossoverRows = 64;

// Kernel contracts (CPU):
//  nm_linear_cpu_kernel: x2d [R, in] contiguous (R >= 1), values [out, kept] contiguous (dtype of
//    x), meta uint8 [out, meta_bytes] contiguous, bias [out] (dtype of x) or undefined, out [R, out]
//    contiguous, written in full. fp32 accumulation (fp64 for fp64).
//  nm_compress_cpu_kernel: w [out, in] contiguous; select = scores ([out, in] contiguous, any
//    float dtype, or undefined = |w|) ranking (prune), or keep (bool [out, in] contiguous, at most
//    n per group, padded with the lowest unkept positions); values/meta/mask outputs contiguous.
void nm_linear_cpu_kernel(const at::Tensor& x2d, const at::Tensor& values, const at::Tensor& meta,
                          const at::Tensor& bias, const NMConfig& cfg, at::Tensor& out);
void nm_compress_cpu_kernel(const at::Tensor& w, const at::Tensor& scores, const at::Tensor& keep,
                            const NMConfig& cfg, at::Tensor& values, at::Tensor& meta,
                            at::Tensor& mask);

}  // namespace sparseops
