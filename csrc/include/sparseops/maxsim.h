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

// The argmax every forward writes (and the backward reads) holds document-local token
// indices, -1 for none: int16 when every document has fewer than 2^15 tokens (half the memory
// a training step keeps per query token and document), int32 otherwise. The bound comes from
// shapes only (Ld; for packed documents the total token count), so the fake kernels and
// torch.compile know the dtype without looking at the data. Mirrored by
// python/sparseops/ops/maxsim.py (_argmax_dtype).
constexpr int64_t kArgmaxInt16Tokens = int64_t(1) << 15;
inline at::ScalarType argmax_dtype(int64_t doc_tokens_bound) {
  return doc_tokens_bound < kArgmaxInt16Tokens ? at::kShort : at::kInt;
}

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
  // PyLate's multiplicative masking: masked document tokens score 0 and take part in the max
  // (a masked winner is reported as -1 and takes no gradient). The op layer turns lengths
  // masks into bool masks first, so the kernels only see kNone / kBool under it.
  bool pylate = false;
  bool d_int8 = false;  // d is int8 with fp32 per-token scales (see "int8 documents" below)
};

// maxsim_varlen: packed q [total_q, dim] with cu_q int32 [Nq + 1], packed d [total_d, dim]
// with cu_d int32 [Nd + 1]; np pairs when a pairs list is given (np = -1: all pairs).
struct MaxSimVarlenConfig {
  int64_t nq = 0, nd = 0, total_q = 0, total_d = 0, dim = 0;
  int64_t np = -1;
  MaxSimReduce reduce = MaxSimReduce::kSum;
  bool d_int8 = false;
};

// maxsim_pairs: q [B, Lq, dim] with d [B, K, Ld, dim] (K = 1 for a 3-D d).
struct MaxSimPairsConfig {
  int64_t b = 0, k = 0, lq = 0, ld = 0, dim = 0;
  TokenMask q_mask = TokenMask::kNone;
  TokenMask d_mask = TokenMask::kNone;
  MaxSimReduce reduce = MaxSimReduce::kSum;
  bool pylate = false;
  bool d_int8 = false;
};

// maxsim_topk: q [Nq, Lq, dim] against a packed corpus d [total_d, dim], cu_d [Nd + 1].
struct MaxSimTopkConfig {
  int64_t nq = 0, lq = 0, nd = 0, total_d = 0, dim = 0, k = 0;
  TokenMask q_mask = TokenMask::kNone;
  MaxSimReduce reduce = MaxSimReduce::kSum;
  bool d_int8 = false;
};

// int8 documents (every op): d is int8 and d_scale fp32 holds one scale per document token
// (contiguous, one per row of d in the kernels' flattened row order). The similarity is
// <q_i, d_j> * d_scale[j] in the accumulate dtype. On CPUs with AVX512_VNNI the kernels
// quantise each query token to int8 on the fly (symmetric, per token: a_i = max_k |q_ik| /
// 127, q^_ik = round-half-even(q_ik / a_i)) and take integer dot products (vpdpbusd): the
// similarity is a_i * float(<q^_i, d_j>) * d_scale[j], within (a_i / 2) * ||d_j||_1 *
// d_scale[j] (plus fp32 rounding) of the exact one. fp64 queries, and CPUs without VNNI, take
// the float path (d_j widened and scaled while packed). Documented in sparseops.maxsim.

// Kernel contract for maxsim (CPU):
//   q      [Nq, Lq, dim] contiguous, fp32 / fp16 / bf16 / fp64
//   d      [Nd, Ld, dim] contiguous, same dtype (int8 when cfg.d_int8)
//   d_scale fp32 [Nd * Ld] contiguous when cfg.d_int8, else undefined
//   q_mask bool [Nq, Lq] or int32 [Nq] lengths in [0, Lq] (per cfg.q_mask), contiguous, or
//          undefined; d_mask likewise with [Nd, Ld] / [Nd]
//   scores [Nq, Nd] contiguous, fp32 (fp64 for fp64 inputs), written in full
//   argmax [Nq, Nd, Lq] contiguous, argmax_dtype(Ld), written in full (-1: masked query
//          token or a document without real tokens)
// Nq, Nd, Lq >= 1 (the op layer handles empty shapes); Ld, dim >= 0.
void maxsim_cpu_kernel(const at::Tensor& q, const at::Tensor& d, const at::Tensor& d_scale,
                       const at::Tensor& q_mask, const at::Tensor& d_mask, const MaxSimConfig& cfg,
                       at::Tensor& scores, at::Tensor& argmax);

// maxsim_varlen (CPU): q [total_q, dim], d [total_d, dim] contiguous (same dtype), cu_q /
// cu_d contiguous int32 validated by the op layer; pairs undefined (all pairs: scores
// [Nq, Nd], argmax [Nd, total_q] with the argmax of query n against document m at
// m * total_q + cu_q[n]) or int64 [P, 2] with arg_off int64 [P] (scores [P], argmax flat:
// pair p's query tokens at arg_off[p]). Argmax entries are document-local token indices
// (argmax_dtype(total_d)).
// d_scale fp32 [total_d] when cfg.d_int8.
void maxsim_varlen_cpu_kernel(const at::Tensor& q, const at::Tensor& cu_q, const at::Tensor& d,
                              const at::Tensor& cu_d, const at::Tensor& d_scale,
                              const at::Tensor& pairs, const at::Tensor& arg_off,
                              const MaxSimVarlenConfig& cfg, at::Tensor& scores,
                              at::Tensor& argmax);

// maxsim_pairs (CPU): q [B, Lq, dim], d [B * K, Ld, dim] contiguous; masks bool [B, Lq] /
// [B * K, Ld] or int32 lengths [B] / [B * K]; scores [B, K], argmax [B, K, Lq]; d_scale fp32
// [B * K * Ld] when cfg.d_int8.
void maxsim_pairs_cpu_kernel(const at::Tensor& q, const at::Tensor& d, const at::Tensor& d_scale,
                             const at::Tensor& q_mask, const at::Tensor& d_mask,
                             const MaxSimPairsConfig& cfg, at::Tensor& scores, at::Tensor& ids);

// maxsim_topk (CPU): q [Nq, Lq, dim] contiguous with q_mask (bool [Nq, Lq] / int32 [Nq] /
// undefined), d [total_d, dim], cu_d int32 [Nd + 1]; candidates undefined, int64 [C] or
// [Nq, C] (ids in [0, Nd) or -1 = skip). scores [Nq, k] (-inf padding), ids [Nq, k] int64
// (-1 padding), best first, ties to the lower document id. d_scale fp32 [total_d] when
// cfg.d_int8.
void maxsim_topk_cpu_kernel(const at::Tensor& q, const at::Tensor& q_mask, const at::Tensor& d,
                            const at::Tensor& d_scale, const at::Tensor& cu_d,
                            const at::Tensor& candidates, const MaxSimTopkConfig& cfg,
                            at::Tensor& scores, at::Tensor& ids);

// Backward of every MaxSim op from the saved argmax (CPU). grad [P] acc dtype, q [Rq, dim],
// d [Rd, dim] contiguous (same dtype), argmax int16 / int32 flat, meta int64 [P, 6] = (query
// group, first query row, query rows, document group, first document row, argmax offset); dq
// [Rq, dim] / dd [Rd, dim] in the acc dtype (either may be undefined = not wanted), written
// in full. Deterministic (fixed order per output row, no atomics). int8 d: d_scale fp32 [Rd]
// (dq[row] += g * d_scale[a] * d[a]; dd must be undefined).
void maxsim_backward_cpu_kernel(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& d,
                                const at::Tensor& d_scale, const at::Tensor& argmax,
                                const at::Tensor& meta, int64_t num_q, int64_t num_d,
                                at::Tensor& dq, at::Tensor& dd);

// ---- CUDA (csrc/cuda/maxsim.cu; the block body is sparseops/maxsim_fused.cuh) ----------
// The fused forward of the "cuda" backend. Same contracts as maxsim_cpu_kernel and the
// all-pairs form of maxsim_varlen_cpu_kernel, on CUDA tensors, for fp32 / bf16 / fp16 and
// dim <= 256 (the op layer checks both); scores fp32, argmax int16 / int32 (as allocated),
// written in full by one launch (no host synchronisation).
void maxsim_cuda_kernel(const at::Tensor& q, const at::Tensor& d, const at::Tensor& q_mask,
                        const at::Tensor& d_mask, const MaxSimConfig& cfg, at::Tensor& scores,
                        at::Tensor& argmax);
void maxsim_varlen_cuda_kernel(const at::Tensor& q, const at::Tensor& cu_q, const at::Tensor& d,
                               const at::Tensor& cu_d, const MaxSimVarlenConfig& cfg,
                               at::Tensor& scores, at::Tensor& argmax);

}  // namespace sparseops
