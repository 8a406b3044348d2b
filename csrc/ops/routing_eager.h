// What the routing ops' eager entry (csrc/ops/routing_eager.cpp) shares with their op layer
// (csrc/ops/routing.cpp): the guard that says a call would reach nothing but the native CPU
// kernel, and the very functions the dispatcher calls for such a call, so that the entry can
// call them without the dispatcher and return exactly what the op returns.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "sparseops/routing.h"

namespace sparseops {

// True when a call of a routing op on these tensors would run only its native CPU kernel:
// every tensor is a dense CPU tensor whose dispatch keys, after thread-local include/exclude
// sets, hold nothing above CPU but autograd and autocast, autograd has nothing to record
// (`differentiable`: grad mode on and logits requiring grad means it has), and no profiler
// callback would observe the op. Any mode (torch function/dispatch modes, fake tensors,
// functorch transforms, the JIT tracer, functionalization) adds a key above CPU.
bool eager_cpu_call(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& mask, bool differentiable);

// The CPU kernel of sparseops::topk_route as registered (the dispatcher's target).
std::tuple<at::Tensor, at::Tensor> topk_route_op(
    const at::Tensor& logits, int64_t k, c10::string_view scoring, c10::string_view order,
    bool renormalize, const std::optional<at::Tensor>& bias, int64_t n_group, int64_t topk_group,
    double scale, const std::optional<at::Tensor>& expert_mask, c10::string_view group_scoring,
    c10::string_view backend);

// The CPU kernel of sparseops::route_metadata as registered.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
route_metadata_op(const at::Tensor& ids, int64_t num_experts, int64_t block_m,
                  c10::string_view backend);

// What sparseops::route computes when eager_cpu_call holds and the backend is "auto" or
// "cpu": topk_route and route_metadata fused on CPU (route_cpu_kernel). With block_m == 0 the
// padded three are left undefined (the op returns empty tensors there).
struct RouteResult {
  at::Tensor weights, ids;
  RouteMetadata meta;
};
RouteResult route_fused_cpu(const at::Tensor& logits, int64_t k, c10::string_view scoring,
                            c10::string_view order, bool renormalize,
                            const std::optional<at::Tensor>& bias, int64_t n_group,
                            int64_t topk_group, double scale,
                            const std::optional<at::Tensor>& expert_mask,
                            c10::string_view group_scoring, int64_t block_m);

}  // namespace sparseops
