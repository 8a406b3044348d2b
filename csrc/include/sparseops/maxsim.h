// MaxSim late interaction: the parsed arguments shared by the op layer (csrc/ops/maxsim.cpp)
// and the CPU kernel (csrc/cpu/maxsim.cpp). The semantics are those of
// python/sparseops/reference/maxsim.py, which is the specification.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace sparseops {

// How a q_mask / d_mask argument marks the real tokens of each row.
enum class TokenMask : int {
  kNone = 0,     // every token is real
  kBool = 1,     // bool [N, L], True = real token
  kLengths = 2,  // int32 [N]: the first lengths[n] tokens are real, 0 <= lengths[n] <= L
};

enum class MaxSimReduce : int { kSum = 0, kMean = 1 };

// Everything a maxsim kernel needs besides the tensors, already validated.
struct MaxSimConfig {
  int64_t nq = 0;   // queries
  int64_t lq = 0;   // tokens per query (padded length)
  int64_t nd = 0;   // documents
  int64_t ld = 0;   // tokens per document (padded length)
  int64_t dim = 0;  // embedding size
  TokenMask q_mask = TokenMask::kNone;
  TokenMask d_mask = TokenMask::kNone;
  MaxSimReduce reduce = MaxSimReduce::kSum;
};

// Kernel contract for maxsim (CPU):
//   q      [Nq, Lq, dim] contiguous, fp32 / fp16 / bf16 / fp64
//   d      [Nd, Ld, dim] contiguous, same dtype
//   q_mask bool [Nq, Lq] or int32 [Nq] lengths in [0, Lq] (per cfg.q_mask), contiguous, or
//          undefined; d_mask likewise with [Nd, Ld] / [Nd]
//   scores [Nq, Nd] contiguous, fp32 (fp64 for fp64 inputs), written in full
//   argmax [Nq, Nd, Lq] contiguous int32, written in full (-1: masked query token or a
//          document without real tokens)
// Nq, Nd, Lq >= 1 (the op layer handles empty shapes); Ld, dim >= 0.
void maxsim_cpu_kernel(const at::Tensor& q, const at::Tensor& d, const at::Tensor& q_mask,
                       const at::Tensor& d_mask, const MaxSimConfig& cfg, at::Tensor& scores,
                       at::Tensor& argmax);

}  // namespace sparseops
