// MoE routing op layer: argument checks, output allocation, device dispatch, the backward
// formula and the C++ autograd wrapper. Knows nothing of tiles or warps: the kernels live
// in csrc/cpu/routing.cpp and csrc/cuda/routing.cu.
//
// Why C++ autograd instead of torch.library.register_autograd: a Python autograd wrapper
// costs ~9 us per call on an H100 host (torch 2.11, 2026-11), a third of the decode budget.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#ifdef SPARSEOPS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "sparseops/checks.h"
#include "sparseops/routing.h"

namespace sparseops {
namespace {

using at::Tensor;

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

Scoring parse_scoring(c10::string_view s) {
  if (s == "softmax") return Scoring::kSoftmax;
  if (s == "sigmoid") return Scoring::kSigmoid;
  TORCH_CHECK(false, "scoring must be \"softmax\" or \"sigmoid\", got \"", std::string(s), "\"");
}

Order parse_order(c10::string_view s) {
  if (s == "softmax_then_topk") return Order::kSoftmaxThenTopk;
  if (s == "topk_then_softmax") return Order::kTopkThenSoftmax;
  TORCH_CHECK(false, "order must be \"softmax_then_topk\" or \"topk_then_softmax\", got \"",
              std::string(s), "\"");
}

GroupScoring parse_group_scoring(c10::string_view s) {
  if (s == "top2_sum") return GroupScoring::kTop2Sum;
  if (s == "max") return GroupScoring::kMax;
  TORCH_CHECK(false, "group_scoring must be \"top2_sum\" or \"max\", got \"", std::string(s), "\"");
}

void check_expert_mask(const std::optional<Tensor>& expert_mask, const Tensor& logits) {
  if (!expert_mask.has_value()) return;
  const Tensor& m = *expert_mask;
  check_dim(m, "expert_mask", 1);
  check_dtype(m, "expert_mask", {at::kBool});
  check_size(m, "expert_mask", 0, logits.size(1), "the number of experts logits.size(1)");
  check_same_device(m, "expert_mask", logits, "logits");
}

TopkRouteConfig check_topk_route(const Tensor& logits, int64_t k, c10::string_view scoring,
                                 c10::string_view order, bool renormalize,
                                 const std::optional<Tensor>& bias, int64_t n_group,
                                 int64_t topk_group, double scale,
                                 const std::optional<Tensor>& expert_mask,
                                 c10::string_view group_scoring) {
  check_dim(logits, "logits", 2);
  check_dtype(logits, "logits", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TopkRouteConfig cfg;
  cfg.num_tokens = logits.size(0);
  cfg.num_experts = logits.size(1);
  const int64_t E = cfg.num_experts;
  TORCH_CHECK(E >= 1 && E <= kMaxExperts, "logits.size(1) (the number of experts) must be in [1, ",
              kMaxExperts, "], got ", describe(logits));
  TORCH_CHECK(k >= 1 && k <= std::min<int64_t>(E, kMaxTopk), "k must be in [1, min(E, ", kMaxTopk,
              ")] = [1, ", std::min<int64_t>(E, kMaxTopk), "], got k = ", k, " for logits ",
              describe(logits));
  TORCH_CHECK(cfg.num_tokens * k <= kInt32Max, "T * k must fit in int32, got T = ", cfg.num_tokens,
              ", k = ", k);
  cfg.k = k;
  cfg.scoring = parse_scoring(scoring);
  cfg.order = parse_order(order);
  cfg.renormalize = renormalize;
  TORCH_CHECK(n_group >= 1 && E % n_group == 0, "n_group must be >= 1 and divide E = ", E,
              ", got n_group = ", n_group);
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group,
              "topk_group must be in [1, n_group = ", n_group, "], got ", topk_group);
  TORCH_CHECK(k <= topk_group * (E / n_group), "k = ", k,
              " cannot exceed the experts in the chosen groups, topk_group * E / n_group = ",
              topk_group * (E / n_group));
  cfg.n_group = n_group;
  cfg.topk_group = topk_group;
  cfg.group_scoring = parse_group_scoring(group_scoring);
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  cfg.scale = scale;
  if (bias.has_value()) {
    check_dim(*bias, "bias", 1);
    check_dtype(*bias, "bias", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
    check_size(*bias, "bias", 0, E, "the number of experts logits.size(1)");
    check_same_device(*bias, "bias", logits, "logits");
  }
  check_expert_mask(expert_mask, logits);
  cfg.has_bias = bias.has_value();
  cfg.has_mask = expert_mask.has_value();
  return cfg;
}

// Runs a device kernel under the right device guard, or says why it cannot.
template <typename CpuFn, typename CudaFn>
void run_on_device(const Tensor& t, CpuFn cpu, CudaFn cuda) {
  if (t.is_cpu()) {
    cpu();
    return;
  }
#ifdef SPARSEOPS_WITH_CUDA
  if (t.is_cuda()) {
    c10::cuda::CUDAGuard guard(t.device());
    cuda();
    return;
  }
#else
  (void)cuda;
#endif
  TORCH_CHECK(false, "sparseops has no kernel for device ", t.device(),
              " in this build (sparseops.build_info() lists what was compiled)");
}

std::tuple<Tensor, Tensor> topk_route(const Tensor& logits, int64_t k, c10::string_view scoring,
                                      c10::string_view order, bool renormalize,
                                      const std::optional<Tensor>& bias, int64_t n_group,
                                      int64_t topk_group, double scale,
                                      const std::optional<Tensor>& expert_mask,
                                      c10::string_view group_scoring) {
  const TopkRouteConfig cfg = check_topk_route(logits, k, scoring, order, renormalize, bias,
                                               n_group, topk_group, scale, expert_mask,
                                               group_scoring);
  const auto acc = accumulate_type(logits.scalar_type());
  Tensor x = logits.contiguous();
  Tensor b = cfg.has_bias ? bias->to(acc).contiguous() : Tensor();
  Tensor m = cfg.has_mask ? expert_mask->contiguous() : Tensor();
  Tensor weights = at::empty({cfg.num_tokens, k}, x.options().dtype(acc));
  Tensor ids = at::empty({cfg.num_tokens, k}, x.options().dtype(at::kInt));
  if (cfg.num_tokens == 0) return {weights, ids};
  run_on_device(
      x, [&] { topk_route_cpu_kernel(x, b, m, cfg, weights, ids); },
      [&] { topk_route_cuda_kernel(x, b, m, cfg, weights, ids); });
  return {weights, ids};
}

// d(weights)/d(logits) with ids fixed, written with ATen ops so that one body serves CPU,
// CUDA and fake tensors. Matches autograd through route_weights_ref in the reference.
Tensor topk_route_backward(const Tensor& grad_weights, const Tensor& logits, const Tensor& ids,
                           c10::string_view scoring, c10::string_view order, bool renormalize,
                           double scale, const std::optional<Tensor>& expert_mask) {
  check_dim(logits, "logits", 2);
  check_dim(ids, "ids", 2);
  check_dim(grad_weights, "grad_weights", 2);
  TORCH_CHECK(grad_weights.sizes() == ids.sizes(), "grad_weights ", describe(grad_weights),
              " must have the shape of ids ", describe(ids));
  check_expert_mask(expert_mask, logits);
  const Scoring sc = parse_scoring(scoring);
  const Order od = parse_order(order);
  const auto acc = accumulate_type(logits.scalar_type());
  const Tensor x = logits.to(acc);
  const Tensor g = grad_weights.to(acc);
  const Tensor valid = ids.ge(0);
  const Tensor idx = ids.clamp_min(0).to(at::kLong);
  const Tensor validf = valid.to(acc);

  // Given u (the normalised weights) and the incoming gradient, the gradient of a quantity
  // normalised to sum 1 is u * (g - sum(g * u)); below it is applied per scoring mode.
  auto centred = [](const Tensor& grad, const Tensor& u) {
    return grad - (grad * u).sum(-1, /*keepdim=*/true);
  };

  if (sc == Scoring::kSoftmax && od == Order::kTopkThenSoftmax) {
    const Tensor sel = x.gather(1, idx).masked_fill(valid.logical_not(), -INFINITY);
    const Tensor u = at::softmax(sel, -1).nan_to_num(0.0);
    const Tensor dsel = scale * u * centred(g, u) * validf;
    return at::zeros_like(x).scatter_add(1, idx, dsel).to(logits.scalar_type());
  }

  Tensor p_full;  // softmax over enabled experts (softmax_then_topk only)
  Tensor p;       // unbiased score of each chosen expert
  if (sc == Scoring::kSigmoid) {
    p = at::sigmoid(x.gather(1, idx)) * validf;
  } else {
    Tensor xm = x;
    if (expert_mask.has_value()) xm = x.masked_fill(expert_mask->logical_not(), -INFINITY);
    p_full = at::softmax(xm, -1).nan_to_num(0.0);
    p = p_full.gather(1, idx) * validf;
  }
  Tensor dp;  // gradient with respect to p
  if (renormalize) {
    const Tensor total = p.sum(-1, /*keepdim=*/true);
    const Tensor positive = total.gt(0);
    const Tensor safe_total = at::where(positive, total, at::ones_like(total));
    const Tensor u = p / safe_total;
    dp = at::where(positive, scale * centred(g, u) / safe_total, at::zeros_like(g));
  } else {
    dp = scale * g;
  }
  dp = dp * validf;
  if (sc == Scoring::kSigmoid) {
    const Tensor dsel = dp * p * (1 - p);
    return at::zeros_like(x).scatter_add(1, idx, dsel).to(logits.scalar_type());
  }
  // Through the full softmax: dx_e = p_e * (dp_e - sum_j p_j dp_j).
  const Tensor dot = (p * dp).sum(-1, /*keepdim=*/true);
  const Tensor dp_full = at::zeros_like(x).scatter_add(1, idx, dp);
  return (p_full * (dp_full - dot)).to(logits.scalar_type());
}

const c10::TypedOperatorHandle<decltype(topk_route)>& topk_route_handle() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sparseops::topk_route", "")
                             .typed<decltype(topk_route)>();
  return op;
}

class TopkRouteFunction : public torch::autograd::Function<TopkRouteFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const Tensor& logits, int64_t k,
                                                c10::string_view scoring, c10::string_view order,
                                                bool renormalize, const std::optional<Tensor>& bias,
                                                int64_t n_group, int64_t topk_group, double scale,
                                                const std::optional<Tensor>& expert_mask,
                                                c10::string_view group_scoring) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [weights, ids] = topk_route_handle().call(logits, k, scoring, order, renormalize, bias,
                                                   n_group, topk_group, scale, expert_mask,
                                                   group_scoring);
    ctx->save_for_backward({logits, ids});
    ctx->saved_data["scoring"] = std::string(scoring);
    ctx->saved_data["order"] = std::string(order);
    ctx->saved_data["renormalize"] = renormalize;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["expert_mask"] = expert_mask;
    ctx->mark_non_differentiable({ids});
    return {weights, ids};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& logits = saved[0];
    const Tensor& ids = saved[1];
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sparseops::topk_route_backward", "")
                         .typed<decltype(topk_route_backward)>();
    Tensor grad_weights = grads[0].defined() ? grads[0] : at::zeros(ids.sizes(), logits.options());
    const std::string scoring = ctx->saved_data["scoring"].toStringRef();
    const std::string order = ctx->saved_data["order"].toStringRef();
    Tensor grad_logits = op.call(
        grad_weights, logits, ids, scoring, order, ctx->saved_data["renormalize"].toBool(),
        ctx->saved_data["scale"].toDouble(), ctx->saved_data["expert_mask"].toOptional<Tensor>());
    // One gradient per forward input: only logits is differentiable.
    return {grad_logits, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(),    Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> topk_route_autograd(const Tensor& logits, int64_t k,
                                               c10::string_view scoring, c10::string_view order,
                                               bool renormalize, const std::optional<Tensor>& bias,
                                               int64_t n_group, int64_t topk_group, double scale,
                                               const std::optional<Tensor>& expert_mask,
                                               c10::string_view group_scoring) {
  // Inference (no grad wanted) skips the autograd Function and its bookkeeping: a decode
  // step should pay for the dispatcher once, not for a graph node it never uses.
  if (!at::GradMode::is_enabled() || !logits.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return topk_route_handle().call(logits, k, scoring, order, renormalize, bias, n_group,
                                    topk_group, scale, expert_mask, group_scoring);
  }
  auto out = TopkRouteFunction::apply(logits, k, scoring, order, renormalize, bias, n_group,
                                      topk_group, scale, expert_mask, group_scoring);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> route_metadata(
    const Tensor& ids, int64_t num_experts, int64_t block_m) {
  check_dim(ids, "ids", 2);
  check_dtype(ids, "ids", {at::kInt, at::kLong});
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMaxExperts, "num_experts must be in [1, ",
              kMaxExperts, "], got ", num_experts);
  TORCH_CHECK(block_m >= 0 && block_m <= 65536, "block_m must be in [0, 65536], got ", block_m);
  const int64_t n = ids.numel();
  const int64_t padded_rows =
      block_m > 0 ? (n + num_experts * (block_m - 1)) / block_m * block_m : 0;
  TORCH_CHECK(n <= kInt32Max && padded_rows <= kInt32Max,
              "route_metadata needs T * k (and its block-padded bound) to fit in int32, got ids ",
              describe(ids), " with block_m = ", block_m);
  const Tensor flat = ids.to(at::kInt).contiguous();
  const auto opts = flat.options();
  RouteMetadata out;
  out.counts = at::empty({num_experts}, opts);
  out.offs = at::empty({num_experts}, opts);
  out.sorted_slots = at::empty({n}, opts);
  out.inverse = at::empty({n}, opts);
  out.tokens = at::empty({n}, opts);
  out.padded_slots = at::empty({padded_rows}, opts);
  out.block_expert = at::empty({block_m > 0 ? padded_rows / block_m : 0}, opts);
  out.padded_offs = at::empty({block_m > 0 ? num_experts : 0}, opts);
  if (n == 0) {
    // Nothing routed: every expert is empty and every padded row is a sentinel (n = 0).
    out.counts.zero_();
    out.offs.zero_();
    out.padded_slots.zero_();
    out.block_expert.fill_(-1);
    out.padded_offs.zero_();
  } else {
    run_on_device(
        flat, [&] { route_metadata_cpu_kernel(flat, num_experts, block_m, out); },
        [&] { route_metadata_cuda_kernel(flat, num_experts, block_m, out); });
  }
  return {out.counts, out.offs,         out.sorted_slots, out.inverse,
          out.tokens, out.padded_slots, out.block_expert, out.padded_offs};
}

using RouteOutputs =
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Composite of the two ops through the dispatcher, so autograd, fake tensors and every device
// work as they do for the parts; it only saves the Python-to-C++ crossing in between.
RouteOutputs route(const Tensor& logits, int64_t k, c10::string_view scoring,
                   c10::string_view order, bool renormalize, const std::optional<Tensor>& bias,
                   int64_t n_group, int64_t topk_group, double scale,
                   const std::optional<Tensor>& expert_mask, c10::string_view group_scoring,
                   int64_t block_m) {
  static const auto metadata_op = c10::Dispatcher::singleton()
                                      .findSchemaOrThrow("sparseops::route_metadata", "")
                                      .typed<decltype(route_metadata)>();
  auto [weights, ids] = topk_route_handle().call(logits, k, scoring, order, renormalize, bias,
                                                 n_group, topk_group, scale, expert_mask,
                                                 group_scoring);
  auto [counts, offs, sorted_slots, inverse, tokens, padded_slots, block_expert, padded_offs] =
      metadata_op.call(ids, logits.size(1), block_m);
  return {weights, ids,    counts,       offs,         sorted_slots,
          inverse, tokens, padded_slots, block_expert, padded_offs};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseops, CompositeImplicitAutograd, m) { m.impl("route", &route); }

TORCH_LIBRARY_IMPL(sparseops, CPU, m) {
  m.impl("topk_route", &topk_route);
  m.impl("route_metadata", &route_metadata);
}

#ifdef SPARSEOPS_WITH_CUDA
TORCH_LIBRARY_IMPL(sparseops, CUDA, m) {
  m.impl("topk_route", &topk_route);
  m.impl("route_metadata", &route_metadata);
}
#endif

TORCH_LIBRARY_IMPL(sparseops, Autograd, m) { m.impl("topk_route", &topk_route_autograd); }

// The backward is plain ATen, so one registration covers every device and fake tensors.
TORCH_LIBRARY_IMPL(sparseops, CompositeExplicitAutograd, m) {
  m.impl("topk_route_backward", &topk_route_backward);
}

}  // namespace sparseops
