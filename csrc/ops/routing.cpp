// MoE routing op layer: argument parsing (the one owner of the user-facing checks for every
// backend), output allocation, the backend switch (native kernel or Python kernel, see
// sparseops/backend.h), the backward formula and the C++ autograd node. Knows nothing of
// tiles or warps: the kernels live in csrc/cpu/routing.cpp, csrc/cuda/routing.cu and
// kernels/routing.py.
//
// Why C++ autograd instead of torch.library.register_autograd: a Python autograd wrapper
// costs ~9 us per call on an H100 host (torch 2.11, 2026-11), a third of the decode budget.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/FuncTorchTLS.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#ifdef SPARSEOPS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "routing_eager.h"
#include "sparseops/backend.h"
#include "sparseops/checks.h"
#include "sparseops/routing.h"

namespace sparseops {
namespace {

using at::Tensor;

// An output tensor: on CPU straight from the CPU allocator (at::empty's dispatcher round
// trip was ~0.1 us of a ~1 us decode call, 2-core EPYC, 2026-12-07), elsewhere at::empty.
Tensor new_output(at::IntArrayRef sizes, at::ScalarType dtype, const Tensor& like) {
  if (like.is_cpu()) return at::detail::empty_cpu(sizes, dtype);
  return at::empty(sizes, like.options().dtype(dtype));
}

// t itself when already contiguous (Tensor::contiguous() costs a dispatcher call even then).
Tensor contiguous(const Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// The spelling of each enum value in the schema, written once for parsing and for handing
// the options to the Python kernels.
template <typename Enum, size_t N>
using Names = std::array<std::pair<const char*, Enum>, N>;
constexpr Names<Scoring, 2> kScoringNames{{{"softmax", Scoring::kSoftmax},
                                           {"sigmoid", Scoring::kSigmoid}}};
constexpr Names<Order, 2> kOrderNames{{{"softmax_then_topk", Order::kSoftmaxThenTopk},
                                       {"topk_then_softmax", Order::kTopkThenSoftmax}}};
constexpr Names<GroupScoring, 2> kGroupScoringNames{{{"top2_sum", GroupScoring::kTop2Sum},
                                                     {"max", GroupScoring::kMax}}};

template <typename Enum, size_t N>
Enum parse_name(const char* arg, c10::string_view s, const Names<Enum, N>& names) {
  for (const auto& [name, value] : names) {
    if (s == name) return value;
  }
  std::string choices;
  for (const auto& [name, value] : names) choices += std::string(choices.empty() ? "" : " or ") +
                                                      "\"" + name + "\"";
  TORCH_CHECK(false, arg, " must be ", choices, ", got \"", std::string(s), "\"");
}

template <typename Enum, size_t N>
const char* name_of(Enum v, const Names<Enum, N>& names) {
  for (const auto& [name, value] : names) {
    if (v == value) return name;
  }
  return "?";
}

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_expert_mask(const std::optional<Tensor>& expert_mask, const Tensor& logits) {
  if (!expert_mask.has_value()) return;
  const Tensor& m = *expert_mask;
  check_dim(m, "expert_mask", 1);
  check_dtype(m, "expert_mask", {at::kBool});
  check_size(m, "expert_mask", 0, logits.size(1), "the number of experts logits.size(1)");
  check_same_device(m, "expert_mask", logits, "logits");
}

// The scalar options of topk_route, parsed without reading any tensor: the autograd node
// parses only these, because reading sizes there would specialise torch.compile on T.
TopkRouteConfig parse_topk_route_options(int64_t k, c10::string_view scoring,
                                         c10::string_view order, bool renormalize,
                                         int64_t n_group, int64_t topk_group, double scale,
                                         c10::string_view group_scoring) {
  TopkRouteConfig cfg;
  cfg.k = k;
  cfg.scoring = parse_name("scoring", scoring, kScoringNames);
  cfg.order = parse_name("order", order, kOrderNames);
  cfg.group_scoring = parse_name("group_scoring", group_scoring, kGroupScoringNames);
  cfg.renormalize = renormalize;
  cfg.n_group = n_group;
  cfg.topk_group = topk_group;
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  cfg.scale = scale;
  return cfg;
}

// Every user-facing check of topk_route, for every backend; the kernels only assert.
TopkRouteConfig parse_topk_route(const Tensor& logits, int64_t k, c10::string_view scoring,
                                 c10::string_view order, bool renormalize,
                                 const std::optional<Tensor>& bias, int64_t n_group,
                                 int64_t topk_group, double scale,
                                 const std::optional<Tensor>& expert_mask,
                                 c10::string_view group_scoring) {
  TopkRouteConfig cfg = parse_topk_route_options(k, scoring, order, renormalize, n_group,
                                                 topk_group, scale, group_scoring);
  check_dim(logits, "logits", 2);
  check_dtype(logits, "logits", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
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
  TORCH_CHECK(n_group >= 1 && E % n_group == 0, "n_group must be >= 1 and divide E = ", E,
              ", got n_group = ", n_group);
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group,
              "topk_group must be in [1, n_group = ", n_group, "], got ", topk_group);
  TORCH_CHECK(k <= topk_group * (E / n_group), "k = ", k,
              " cannot exceed the experts in the chosen groups, topk_group * E / n_group = ",
              topk_group * (E / n_group));
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

// The options a Python kernel of topk_route receives (sparseops.ops.routing.TopkRouteOptions).
std::vector<KernelOption> python_options(const TopkRouteConfig& cfg) {
  return {{"k", cfg.k},
          {"scoring", std::string(name_of(cfg.scoring, kScoringNames))},
          {"order", std::string(name_of(cfg.order, kOrderNames))},
          {"renormalize", cfg.renormalize},
          {"n_group", cfg.n_group},
          {"topk_group", cfg.topk_group},
          {"group_scoring", std::string(name_of(cfg.group_scoring, kGroupScoringNames))},
          {"scale", cfg.scale}};
}

// The kernels' inputs: logits contiguous, bias contiguous in the accumulate dtype, the mask
// contiguous (undefined tensors for absent options).
std::tuple<Tensor, Tensor, Tensor> prepare_topk_route_inputs(
    const Tensor& logits, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& expert_mask, const TopkRouteConfig& cfg) {
  const auto acc = accumulate_type(logits.scalar_type());
  Tensor b;
  if (cfg.has_bias) b = contiguous(bias->scalar_type() == acc ? *bias : bias->to(acc));
  return {contiguous(logits), b, cfg.has_mask ? contiguous(*expert_mask) : Tensor()};
}

// Runs a native kernel under the right device guard, or says why it cannot.
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
                                      c10::string_view group_scoring, c10::string_view backend) {
  const TopkRouteConfig cfg = parse_topk_route(logits, k, scoring, order, renormalize, bias,
                                               n_group, topk_group, scale, expert_mask,
                                               group_scoring);
  const bool native = runs_native("topk_route", backend, logits);
  const auto acc = accumulate_type(logits.scalar_type());
  const auto [x, b, m] = prepare_topk_route_inputs(logits, bias, expert_mask, cfg);
  Tensor weights = new_output({cfg.num_tokens, k}, acc, x);
  Tensor ids = new_output({cfg.num_tokens, k}, at::kInt, x);
  if (cfg.num_tokens == 0) return {weights, ids};
  if (native) {
    run_on_device(
        x, [&] { topk_route_cpu_kernel(x, b, m, cfg, weights, ids); },
        [&] { topk_route_cuda_kernel(x, b, m, cfg, weights, ids); });
  } else {
    call_python_kernel("topk_route", backend, {x, b, m}, {weights, ids}, python_options(cfg));
  }
  return {weights, ids};
}

// d(weights)/d(logits) with ids fixed: the gradient of route_weights_ref in the reference.
// Plain ATen ops, so one body serves every device and fake tensors, and autograd records it
// when the backward itself is differentiated (double backward).
Tensor topk_route_logits_grad(const Tensor& grad_weights, const Tensor& logits, const Tensor& ids,
                              const Tensor& expert_mask, const TopkRouteConfig& cfg) {
  const auto acc = accumulate_type(logits.scalar_type());
  const Tensor x = logits.to(acc);
  const Tensor g = grad_weights.to(acc);
  const Tensor valid = ids.ge(0);
  const Tensor idx = ids.clamp_min(0).to(at::kLong);
  const Tensor validf = valid.to(acc);
  const double scale = cfg.scale;

  // Given u (the normalised weights) and the incoming gradient, the gradient of a quantity
  // normalised to sum 1 is u * (g - sum(g * u)); below it is applied per scoring mode.
  auto centred = [](const Tensor& grad, const Tensor& u) {
    return grad - (grad * u).sum(-1, /*keepdim=*/true);
  };

  if (cfg.scoring == Scoring::kSoftmax && cfg.order == Order::kTopkThenSoftmax) {
    const Tensor sel = x.gather(1, idx).masked_fill(valid.logical_not(), -INFINITY);
    const Tensor u = at::softmax(sel, -1).nan_to_num(0.0);
    const Tensor dsel = scale * u * centred(g, u) * validf;
    return at::zeros_like(x).scatter_add(1, idx, dsel).to(logits.scalar_type());
  }

  Tensor p_full;  // softmax over enabled experts (softmax_then_topk only)
  Tensor p;       // unbiased score of each chosen expert
  if (cfg.scoring == Scoring::kSigmoid) {
    p = at::sigmoid(x.gather(1, idx)) * validf;
  } else {
    Tensor xm = x;
    if (expert_mask.defined()) xm = x.masked_fill(expert_mask.logical_not(), -INFINITY);
    p_full = at::softmax(xm, -1).nan_to_num(0.0);
    p = p_full.gather(1, idx) * validf;
  }
  Tensor dp;  // gradient with respect to p
  if (cfg.renormalize) {
    const Tensor total = p.sum(-1, /*keepdim=*/true);
    const Tensor positive = total.gt(0);
    const Tensor safe_total = at::where(positive, total, at::ones_like(total));
    const Tensor u = p / safe_total;
    dp = at::where(positive, scale * centred(g, u) / safe_total, at::zeros_like(g));
  } else {
    dp = scale * g;
  }
  dp = dp * validf;
  if (cfg.scoring == Scoring::kSigmoid) {
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

// The parsed config, saved on the autograd node so the backward never re-parses strings.
struct SavedTopkRouteConfig : torch::CustomClassHolder {
  explicit SavedTopkRouteConfig(const TopkRouteConfig& c) : cfg(c) {}
  TopkRouteConfig cfg;
};

class TopkRouteFunction : public torch::autograd::Function<TopkRouteFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& logits, int64_t k,
      c10::string_view scoring, c10::string_view order, bool renormalize,
      const std::optional<Tensor>& bias, int64_t n_group, int64_t topk_group, double scale,
      const std::optional<Tensor>& expert_mask, c10::string_view group_scoring,
      c10::string_view backend) {
    const TopkRouteConfig cfg = parse_topk_route_options(k, scoring, order, renormalize, n_group,
                                                         topk_group, scale, group_scoring);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [weights, ids] = topk_route_handle().call(logits, k, scoring, order, renormalize, bias,
                                                   n_group, topk_group, scale, expert_mask,
                                                   group_scoring, backend);
    ctx->save_for_backward({logits, ids, expert_mask.value_or(Tensor())});
    ctx->saved_data["cfg"] = c10::IValue::make_capsule(c10::make_intrusive<SavedTopkRouteConfig>(cfg));
    ctx->mark_non_differentiable({ids});
    return {weights, ids};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& logits = saved[0];
    const Tensor& ids = saved[1];
    const auto holder = ctx->saved_data["cfg"].toCapsule();
    const TopkRouteConfig& cfg = static_cast<SavedTopkRouteConfig*>(holder.get())->cfg;
    const Tensor grad_weights =
        grads[0].defined()
            ? grads[0]
            : at::zeros_like(ids, ids.options().dtype(accumulate_type(logits.scalar_type())));
    Tensor grad_logits = topk_route_logits_grad(grad_weights, logits, ids, saved[2], cfg);
    // One gradient per forward input: only logits is differentiable.
    torch::autograd::variable_list out(12);
    out[0] = grad_logits;
    return out;
  }
};

// The weights of chosen experts ``ids`` in plain ATen ops (route_weights_ref in the
// reference): what torch.func transforms differentiate, since they refuse C++ autograd
// Functions ("cannot use C++ torch::autograd::Function with functorch transforms").
Tensor topk_route_weights_aten(const Tensor& logits, const Tensor& ids,
                               const std::optional<Tensor>& expert_mask,
                               const TopkRouteConfig& cfg) {
  Tensor x = logits.to(accumulate_type(logits.scalar_type()));
  const Tensor valid = ids.ge(0);
  const Tensor idx = ids.clamp_min(0).to(at::kLong);
  Tensor w;
  if (cfg.scoring == Scoring::kSoftmax && cfg.order == Order::kTopkThenSoftmax) {
    const Tensor sel = x.gather(1, idx).masked_fill(valid.logical_not(), -INFINITY);
    w = at::softmax(sel, -1).nan_to_num(0.0);
  } else {
    Tensor p;
    if (cfg.scoring == Scoring::kSigmoid) {
      p = at::sigmoid(x);
    } else {
      if (expert_mask.has_value()) x = x.masked_fill(expert_mask->logical_not(), -INFINITY);
      p = at::softmax(x, -1).nan_to_num(0.0);
    }
    w = at::where(valid, p.gather(1, idx), 0.0);  // not gather * valid: NaN * 0 is NaN
    if (cfg.renormalize) {
      const Tensor total = w.sum(-1, /*keepdim=*/true);
      const Tensor positive = total.gt(0);
      w = at::where(positive, w / at::where(positive, total, 1.0), 0.0);
    }
  }
  return w * cfg.scale;
}

// True inside torch.func.grad / vjp / jacrev ...: exactly the test that
// torch::autograd::Function::apply makes before refusing to run (ATen/functorch/DynamicLayer.h,
// which has a direct query, needs nlohmann/json headers that a torch install may lack). The
// throw happens only under a transform; elsewhere this is one thread-local read.
bool under_functorch_transform() {
  const auto& tls = at::functorch::functorchTLSAccessor();
  if (!tls) return false;
  try {
    tls->checkSupportsCppAutogradFunction();
    return false;
  } catch (const c10::Error&) {
    return true;
  }
}

std::tuple<Tensor, Tensor> topk_route_autograd(const Tensor& logits, int64_t k,
                                               c10::string_view scoring, c10::string_view order,
                                               bool renormalize, const std::optional<Tensor>& bias,
                                               int64_t n_group, int64_t topk_group, double scale,
                                               const std::optional<Tensor>& expert_mask,
                                               c10::string_view group_scoring,
                                               c10::string_view backend) {
  // Inference (no grad wanted) skips the autograd Function and its bookkeeping: a decode
  // step should pay for the dispatcher once, not for a graph node it never uses.
  if (!at::GradMode::is_enabled() || !logits.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return topk_route_handle().call(logits, k, scoring, order, renormalize, bias, n_group,
                                    topk_group, scale, expert_mask, group_scoring, backend);
  }
  if (under_functorch_transform()) {
    // Under torch.func (grad, vjp, jacrev ...): ids from the kernel, weights recomputed in
    // ATen ops that functorch can differentiate (equal to the kernel's within tolerance).
    Tensor ids;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      ids = std::get<1>(topk_route_handle().call(logits, k, scoring, order, renormalize, bias,
                                                 n_group, topk_group, scale, expert_mask,
                                                 group_scoring, backend));
    }
    const TopkRouteConfig cfg = parse_topk_route_options(k, scoring, order, renormalize, n_group,
                                                         topk_group, scale, group_scoring);
    return {topk_route_weights_aten(logits, ids, expert_mask, cfg), ids};
  }
  auto out = TopkRouteFunction::apply(logits, k, scoring, order, renormalize, bias, n_group,
                                      topk_group, scale, expert_mask, group_scoring, backend);
  return {out[0], out[1]};
}

// Ids as the int32 the kernels take, range-checked on CPU. int64 values outside [-1, E) must
// not wrap into valid ids when narrowed (2^32 + 1 would become expert 1): on CPU they are an
// error whatever the backend (the native CPU kernel checks int32 ids itself; the Python
// kernels get them checked here), on CUDA (which cannot raise without a host sync) they
// become -2, which every kernel drops.
Tensor ids_as_int32(const Tensor& ids, int64_t num_experts, bool native) {
  if (ids.is_cpu()) {
    if (ids.numel() > 0 && (ids.scalar_type() == at::kLong || !native)) {
      const auto [lo, hi] = at::aminmax(ids);
      const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
      TORCH_CHECK(lo_v >= -1 && hi_v < num_experts,
                  "ids must hold expert indices in [0, num_experts = ", num_experts,
                  ") or -1 for a dropped slot, got values in [", lo_v, ", ", hi_v, "] in ids ",
                  describe(ids));
    }
    return ids.scalar_type() == at::kInt ? contiguous(ids) : ids.to(at::kInt).contiguous();
  }
  if (ids.scalar_type() == at::kInt) return ids.contiguous();
  const Tensor bad = ids.lt(-1).logical_or_(ids.ge(num_experts));
  return ids.masked_fill(bad, -2).to(at::kInt).contiguous();
}

using MetadataOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// route_metadata's outputs for n slots (int32, like's device). With block_m == 0 the padded
// three are empty tensors when padded_always (the op's outputs), else left undefined.
RouteMetadata new_metadata(int64_t n, int64_t num_experts, int64_t block_m, const Tensor& like,
                           bool padded_always) {
  RouteMetadata out;
  out.counts = new_output({num_experts}, at::kInt, like);
  out.offs = new_output({num_experts}, at::kInt, like);
  out.sorted_slots = new_output({n}, at::kInt, like);
  out.inverse = new_output({n}, at::kInt, like);
  out.tokens = new_output({n}, at::kInt, like);
  if (block_m > 0 || padded_always) {
    const int64_t padded_rows = padded_route_rows(n, num_experts, block_m);
    out.padded_slots = new_output({padded_rows}, at::kInt, like);
    out.block_expert = new_output({block_m > 0 ? padded_rows / block_m : 0}, at::kInt, like);
    out.padded_offs = new_output({block_m > 0 ? num_experts : 0}, at::kInt, like);
  }
  return out;
}

// Nothing routed (n = 0): every expert is empty and every padded row is a sentinel (n = 0).
void zero_metadata(RouteMetadata& out) {
  out.counts.zero_();
  out.offs.zero_();
  if (out.padded_slots.defined()) {
    out.padded_slots.zero_();
    out.block_expert.fill_(-1);
    out.padded_offs.zero_();
  }
}

MetadataOutputs route_metadata(const Tensor& ids, int64_t num_experts, int64_t block_m,
                               c10::string_view backend) {
  check_dim(ids, "ids", 2);
  check_dtype(ids, "ids", {at::kInt, at::kLong});
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMaxExperts, "num_experts must be in [1, ",
              kMaxExperts, "], got ", num_experts);
  TORCH_CHECK(block_m >= 0 && block_m <= 65536, "block_m must be in [0, 65536], got ", block_m);
  const bool native = runs_native("route_metadata", backend, ids);
  const int64_t n = ids.numel();
  const int64_t padded_rows = padded_route_rows(n, num_experts, block_m);
  TORCH_CHECK(n <= kInt32Max && padded_rows <= kInt32Max,
              "route_metadata needs T * k (and its block-padded bound) to fit in int32, got ids ",
              describe(ids), " with block_m = ", block_m);
  const Tensor flat = ids_as_int32(ids, num_experts, native);
  RouteMetadata out = new_metadata(n, num_experts, block_m, flat, /*padded_always=*/true);
  if (n == 0) {
    zero_metadata(out);
  } else if (native) {
    run_on_device(
        flat, [&] { route_metadata_cpu_kernel(flat, num_experts, block_m, out); },
        [&] { route_metadata_cuda_kernel(flat, num_experts, block_m, out); });
  } else {
    call_python_kernel("route_metadata", backend, {flat},
                       {out.counts, out.offs, out.sorted_slots, out.inverse, out.tokens,
                        out.padded_slots, out.block_expert, out.padded_offs},
                       {{"num_experts", num_experts}, {"block_m", block_m}});
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
                   int64_t block_m, c10::string_view backend) {
  // SymInt num_experts: logits.size(1) on a fake tensor would guard every dim of logits
  // to a constant, so torch.ops.sparseops.route under torch.compile(dynamic=True)
  // recompiled for every token count.
  if ((backend == "auto" || backend == "cpu") && eager_cpu_call(logits, bias, expert_mask, true)) {
    // Nothing but the CPU kernels would run: one fused pass structure instead of two ops
    // (same bits; tests/test_routing_eager.py compares them).
    RouteResult r = route_fused_cpu(logits, k, scoring, order, renormalize, bias, n_group,
                                    topk_group, scale, expert_mask, group_scoring, block_m);
    RouteMetadata& m = r.meta;
    if (!m.padded_slots.defined()) {
      m.padded_slots = new_output({0}, at::kInt, logits);
      m.block_expert = new_output({0}, at::kInt, logits);
      m.padded_offs = new_output({0}, at::kInt, logits);
    }
    return {r.weights, r.ids,    m.counts,       m.offs,         m.sorted_slots,
            m.inverse, m.tokens, m.padded_slots, m.block_expert, m.padded_offs};
  }
  static const auto metadata_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sparseops::route_metadata", "")
          .typed<MetadataOutputs(const Tensor&, c10::SymInt, int64_t, c10::string_view)>();
  auto [weights, ids] = topk_route_handle().call(logits, k, scoring, order, renormalize, bias,
                                                 n_group, topk_group, scale, expert_mask,
                                                 group_scoring, backend);
  auto [counts, offs, sorted_slots, inverse, tokens, padded_slots, block_expert, padded_offs] =
      metadata_op.call(ids, logits.sym_size(1), block_m, backend);
  return {weights, ids,    counts,       offs,         sorted_slots,
          inverse, tokens, padded_slots, block_expert, padded_offs};
}

}  // namespace

bool eager_cpu_call(const Tensor& logits, const std::optional<Tensor>& bias,
                    const std::optional<Tensor>& mask, bool differentiable) {
  if (!logits.is_cpu()) return false;
  if (differentiable && at::GradMode::is_enabled() && logits.requires_grad()) return false;
  c10::DispatchKeySet ks = logits.key_set();
  if (bias.has_value()) ks = ks | bias->key_set();
  if (mask.has_value()) ks = ks | mask->key_set();
  const c10::impl::LocalDispatchKeySet local = c10::impl::tls_local_dispatch_key_set();
  ks = (ks | local.included_) - local.excluded_;
  // Autograd has nothing to record (checked above), autocast falls through for these ops and
  // BackendSelect (always in the thread-local include set) only serves factory functions.
  ks = ks - c10::autograd_dispatch_keyset_with_ADInplaceOrView - c10::autocast_dispatch_keyset -
       c10::DispatchKeySet(c10::DispatchKey::BackendSelect);
  if (ks.highestPriorityTypeId() != c10::DispatchKey::CPU) return false;
  // The profiler records every op the dispatcher runs: let it see this one.
  return !at::getStepCallbacksUnlessEmpty(at::RecordScope::FUNCTION).has_value();
}

std::tuple<Tensor, Tensor> topk_route_op(const Tensor& logits, int64_t k, c10::string_view scoring,
                                         c10::string_view order, bool renormalize,
                                         const std::optional<Tensor>& bias, int64_t n_group,
                                         int64_t topk_group, double scale,
                                         const std::optional<Tensor>& expert_mask,
                                         c10::string_view group_scoring, c10::string_view backend) {
  return topk_route(logits, k, scoring, order, renormalize, bias, n_group, topk_group, scale,
                    expert_mask, group_scoring, backend);
}

MetadataOutputs route_metadata_op(const Tensor& ids, int64_t num_experts, int64_t block_m,
                                  c10::string_view backend) {
  return route_metadata(ids, num_experts, block_m, backend);
}

RouteResult route_fused_cpu(const Tensor& logits, int64_t k, c10::string_view scoring,
                            c10::string_view order, bool renormalize,
                            const std::optional<Tensor>& bias, int64_t n_group, int64_t topk_group,
                            double scale, const std::optional<Tensor>& expert_mask,
                            c10::string_view group_scoring, int64_t block_m) {
  // The checks of topk_route then route_metadata, in that order (so the first error is the
  // one the two ops would raise).
  const TopkRouteConfig cfg =
      parse_topk_route(logits, k, scoring, order, renormalize, bias, n_group, topk_group, scale,
                       expert_mask, group_scoring);
  const int64_t E = cfg.num_experts, n = cfg.num_tokens * k;
  TORCH_CHECK(block_m >= 0 && block_m <= 65536, "block_m must be in [0, 65536], got ", block_m);
  TORCH_CHECK(padded_route_rows(n, E, block_m) <= kInt32Max,
              "route_metadata needs T * k (and its block-padded bound) to fit in int32, got ids ",
              "shape [", cfg.num_tokens, ", ", k,
              "], dtype Int, device cpu with block_m = ", block_m);
  const auto [x, b, m] = prepare_topk_route_inputs(logits, bias, expert_mask, cfg);
  RouteResult r;
  r.weights = new_output({cfg.num_tokens, k}, accumulate_type(logits.scalar_type()), x);
  r.ids = new_output({cfg.num_tokens, k}, at::kInt, x);
  r.meta = new_metadata(n, E, block_m, x, /*padded_always=*/false);
  if (n == 0) {
    zero_metadata(r.meta);
  } else {
    route_cpu_kernel(x, b, m, cfg, block_m, r.weights, r.ids, r.meta);
  }
  return r;
}

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

}  // namespace sparseops
