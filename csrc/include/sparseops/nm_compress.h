// One thread's work in the fused prune-and-compress CUDA kernel (csrc/cuda/nm_sparse.cu): a
// block of consecutive N:M groups of one weight row whose packed positions fill whole meta
// bytes, ranked, compressed and written in one pass. The CPU emulator (csrc/cpu/nm_sp24.cpp)
// runs these same functions over the whole weight, so the tests check the kernel's algorithm
// bit for bit against the reference on a machine without a GPU.
//
// Ranking (NM_FORMAT, python/sparseops/reference/nm_sparse.py): the n best keys per group,
// a NaN key above every number, larger first, ties (and NaN against NaN) to the lower index.
// Keys are compared in double: |w| and the score dtypes (fp16, bf16, fp32, fp64, a bool keep
// mask as 0 / 1) all convert to double exactly, so the order is the reference's.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SPARSEOPS_NMC_HD __host__ __device__ __forceinline__
#define SPARSEOPS_NMC_UNROLL _Pragma("unroll")
#else
#define SPARSEOPS_NMC_HD inline
#define SPARSEOPS_NMC_UNROLL
#endif

namespace sparseops {
namespace nmc {

// Candidate (a, ia) ranks before (b, ib).
SPARSEOPS_NMC_HD bool rank_before(double a, int ia, double b, int ib) {
  const bool na = a != a, nb = b != b;
  if (na != nb) return na;
  if (na) return ia < ib;
  return a > b || (a == b && ia < ib);
}

// Groups per thread block: the fewest whose n * bits-bit positions fill whole bytes (1, 2, 4
// or 8), so that no two threads write the same meta byte.
SPARSEOPS_NMC_HD int block_groups(int n, int bits) {
  const int nb = n * bits;
  return nb % 8 == 0 ? 1 : nb % 4 == 0 ? 2 : nb % 2 == 0 ? 4 : 8;
}
constexpr int kMaxBlockGroups = 8;

// Compresses `groups` (<= block_groups) consecutive groups of M values that start on a meta
// byte: w / key [groups * M] (weights and ranking keys), writes values [groups * n] (kept
// weights in increasing position order, copied bit for bit), mask [groups * M] and the meta
// bytes [0, ceil(groups * n * bits / 8)); values and meta null: not wanted (nm_mask), nothing
// but the mask is written. kMaxGroups bounds `groups` at compile time (the CUDA kernel unrolls
// over it so its arrays stay in registers).
template <int M, int kMaxGroups, typename T, typename Keys, typename Mask>
SPARSEOPS_NMC_HD void compress_block(const T* w, const Keys& key, int n, int bits, int groups,
                                     T* values, Mask&& mask, uint8_t* meta) {
  uint32_t acc[4] = {0, 0, 0, 0};  // up to 128 meta bits (at most lcm(8, 60) = 120 are used)
  int j = 0;
  SPARSEOPS_NMC_UNROLL
  for (int g = 0; g < kMaxGroups; ++g) {
    if (g >= groups) break;
    SPARSEOPS_NMC_UNROLL
    for (int p = 0; p < M; ++p) {
      const double kp = key(g * M + p);
      int rank = 0;
      SPARSEOPS_NMC_UNROLL
      for (int q = 0; q < M; ++q) rank += (q != p && rank_before(key(g * M + q), q, kp, p)) ? 1 : 0;
      const bool keep = rank < n;
      mask(g * M + p, keep);
      if (keep && values != nullptr) {
        values[j] = w[g * M + p];
        const int bit = j * bits;
        acc[bit >> 5] |= static_cast<uint32_t>(p) << (bit & 31);
        ++j;
      }
    }
  }
  if (meta == nullptr) return;
  const int nbytes = (groups * n * bits + 7) / 8;
  for (int b = 0; b < nbytes; ++b) meta[b] = static_cast<uint8_t>(acc[b >> 2] >> (8 * (b & 3)));
}

}  // namespace nmc
}  // namespace sparseops
