// MoE routing: the parsed arguments shared by the op layer (csrc/ops/routing.cpp) and the
// device kernels (csrc/cpu/routing.cpp, csrc/cuda/routing.cu). The semantics are those of
// python/sparseops/reference/routing.py, which is the specification.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace sparseops {

enum class Scoring : int { kSoftmax = 0, kSigmoid = 1 };
enum class Order : int { kSoftmaxThenTopk = 0, kTopkThenSoftmax = 1 };
// How a group of experts is scored for the group stage (n_group > 1):
//   kTop2Sum: the sum of its two best biased scores (DeepSeek-V3, vLLM grouped_topk);
//   kMax: its best biased score (DeepSeek-V2 group_limited_greedy).
enum class GroupScoring : int { kTop2Sum = 0, kMax = 1 };

constexpr int64_t kMaxExperts = 1024;
constexpr int64_t kMaxTopk = 32;

// Everything a topk_route kernel needs besides the tensors, already validated.
struct TopkRouteConfig {
  int64_t num_tokens = 0;   // T
  int64_t num_experts = 0;  // E, 1..1024
  int64_t k = 1;            // 1..min(E, 32)
  Scoring scoring = Scoring::kSoftmax;
  Order order = Order::kSoftmaxThenTopk;
  bool renormalize = true;
  int64_t n_group = 1;     // divides E
  int64_t topk_group = 1;  // 1..n_group
  GroupScoring group_scoring = GroupScoring::kTop2Sum;
  double scale = 1.0;
  bool has_bias = false;
  bool has_mask = false;

  // The rank of an expert needs the fp64-computed score (not just the logit) only when a
  // bias shifts it; group scores always need it.
  bool needs_score() const { return has_bias || n_group > 1; }
  int64_t group_size() const { return num_experts / n_group; }
};

// Kernel contract for topk_route (both devices):
//   logits  [T, E] contiguous, fp32 / fp16 / bf16 / fp64, T >= 1
//   bias    [E] contiguous in the accumulate dtype (fp64 for fp64 logits, else fp32), or undefined
//   mask    [E] contiguous bool (true = enabled), or undefined
//   weights [T, k] contiguous, accumulate dtype, written in full
//   ids     [T, k] contiguous int32, written in full (-1 for slots no expert could fill)
void topk_route_cpu_kernel(const at::Tensor& logits, const at::Tensor& bias, const at::Tensor& mask,
                           const TopkRouteConfig& cfg, at::Tensor& weights, at::Tensor& ids);
void topk_route_cuda_kernel(const at::Tensor& logits, const at::Tensor& bias,
                            const at::Tensor& mask, const TopkRouteConfig& cfg, at::Tensor& weights,
                            at::Tensor& ids);

// Rows of the block-padded layout: each expert's rows rounded up to a multiple of block_m
// bound the total by n + E*(block_m-1), rounded down to whole blocks; 0 without padding.
constexpr int64_t padded_route_rows(int64_t n, int64_t num_experts, int64_t block_m) {
  return block_m > 0 ? (n + num_experts * (block_m - 1)) / block_m * block_m : 0;
}

// Outputs of route_metadata, all int32 and contiguous, allocated by the op layer:
//   counts [E], offs [E], sorted_slots [n], inverse [n], tokens [n] with n = T*k;
//   with block_m > 0: padded_slots [P], block_expert [P / block_m], padded_offs [E] where
//   P = (n + E*(block_m-1)) / block_m * block_m; with block_m == 0 those three are empty.
struct RouteMetadata {
  at::Tensor counts, offs, sorted_slots, inverse, tokens, padded_slots, block_expert, padded_offs;
};

// Kernel contract for route_metadata (both devices): ids [T, k] contiguous int32 with
// values in [-1, E) (-1 = dropped slot; the CPU op layer rejects other values, the CUDA
// kernel treats them as dropped and never reads or writes out of bounds), n = T*k >= 0.
// Every output element is written.
void route_metadata_cpu_kernel(const at::Tensor& ids, int64_t num_experts, int64_t block_m,
                               RouteMetadata& out);
void route_metadata_cuda_kernel(const at::Tensor& ids, int64_t num_experts, int64_t block_m,
                                RouteMetadata& out);

// topk_route followed by route_metadata(ids, E, block_m) in one CPU pass structure (`route`
// with the native CPU backend): each chunk of rows is routed and its ids counted at once, so
// the metadata needs one placement pass. Same contracts as the two kernels above; the
// outputs are bitwise those of calling them one after the other.
void route_cpu_kernel(const at::Tensor& logits, const at::Tensor& bias, const at::Tensor& mask,
                      const TopkRouteConfig& cfg, int64_t block_m, at::Tensor& weights,
                      at::Tensor& ids, RouteMetadata& out);

}  // namespace sparseops
