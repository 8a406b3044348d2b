// moe_mlp op layer: argument parsing (the one owner of the user-facing checks for every
// backend), output allocation and the backend switch (native CPU kernel, or the Python
// kernel of the triton / reference backends, see sparseops/backend.h). The kernels live in
// csrc/cpu/moe.cpp, csrc/cuda/moe.cu (the decode / small-T forward), kernels/moe.py (Triton,
// forward and backward) and python/sparseops/reference/moe.py. The backward has no CUDA C++
// kernel: backend="cuda" (or "auto" on CUDA tensors) is an error there; from Python, auto
// picks "triton".
//
// The autograd formula is registered from Python (sparseops/ops/moe.py): the op returns the
// pre-activation of every slot, which the backward reads with x and the routing metadata.
#include "sparseops/moe.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#ifdef SPARSEOPS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

#include "sparseops/backend.h"
#include "sparseops/checks.h"
#include "sparseops/routing.h"

namespace sparseops {
namespace {

using at::Tensor;

struct ActName {
  const char* name;
  MoeActivation act;
};
constexpr ActName kActs[] = {
    {"swiglu", MoeActivation::kSwiglu},       {"geglu", MoeActivation::kGeglu},
    {"geglu_tanh", MoeActivation::kGegluTanh}, {"reglu", MoeActivation::kReglu},
    {"swiglu_oai", MoeActivation::kSwigluOai}, {"silu", MoeActivation::kSilu},
    {"gelu", MoeActivation::kGelu},           {"gelu_tanh", MoeActivation::kGeluTanh},
    {"relu", MoeActivation::kRelu},           {"relu2", MoeActivation::kRelu2},
};

const char* act_name(MoeActivation a) {
  for (const auto& n : kActs)
    if (n.act == a) return n.name;
  return "?";
}

MoeConfig parse_moe(const Tensor& x, const Tensor& w13, const Tensor& w2, const Tensor& weights,
                    const Tensor& ids, c10::string_view activation,
                    c10::string_view gate_up_layout, const std::optional<Tensor>& b13,
                    const std::optional<Tensor>& b2, double alpha, double limit) {
  MoeConfig cfg;
  bool found = false;
  for (const auto& n : kActs) {
    if (activation == n.name) {
      cfg.act = n.act;
      found = true;
    }
  }
  TORCH_CHECK(found, "activation must be one of swiglu, geglu, geglu_tanh, reglu, swiglu_oai, ",
              "silu, gelu, gelu_tanh, relu, relu2, got \"", std::string(activation), "\"");
  if (gate_up_layout == "concat") {
    cfg.interleaved = false;
  } else if (gate_up_layout == "interleaved") {
    cfg.interleaved = true;
  } else {
    TORCH_CHECK(false, "gate_up_layout must be \"concat\" or \"interleaved\", got \"",
                std::string(gate_up_layout), "\"");
  }
  TORCH_CHECK(std::isfinite(alpha) && std::isfinite(limit), "alpha and limit must be finite, got ",
              "alpha = ", alpha, ", limit = ", limit);
  cfg.alpha = alpha;
  cfg.limit = limit;
  check_dim(x, "x", 2);
  check_dtype(x, "x", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_dim(w13, "w13", 3);
  check_dim(w2, "w2", 3);
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{w13, "w13"}, {w2, "w2"}}) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have the dtype of x (",
                x.scalar_type(), "), got ", describe(t));
    check_same_device(t, name, x, "x");
  }
  cfg.t = x.size(0);
  cfg.h = x.size(1);
  cfg.e = w13.size(0);
  TORCH_CHECK(cfg.e >= 1 && cfg.e <= kMaxExperts, "w13.size(0) (the number of experts) must be ",
              "in [1, ", kMaxExperts, "], got ", describe(w13));
  check_size(w13, "w13", 2, cfg.h, "the hidden size x.size(1)");
  check_size(w2, "w2", 0, cfg.e, "the number of experts w13.size(0)");
  check_size(w2, "w2", 1, cfg.h, "the hidden size x.size(1)");
  cfg.inter = w2.size(2);
  const bool gated = moe_gated(cfg.act);
  cfg.p = gated ? 2 * cfg.inter : cfg.inter;
  TORCH_CHECK(w13.size(1) == cfg.p, "w13.size(1) must equal ", gated ? "2 * " : "",
              "the intermediate size w2.size(2) = ", cfg.p, " for activation \"", act_name(cfg.act),
              "\"", gated ? " (gate and up)" : " (not gated)", ", got ", describe(w13));
  check_dim(ids, "ids", 2);
  check_dtype(ids, "ids", {at::kInt, at::kLong});
  check_same_device(ids, "ids", x, "x");
  check_size(ids, "ids", 0, cfg.t, "the number of tokens x.size(0)");
  cfg.k = ids.size(1);
  TORCH_CHECK(cfg.k >= 1 && cfg.k <= kMaxTopk, "ids.size(1) (top-k) must be in [1, ", kMaxTopk,
              "], got ", describe(ids));
  check_dim(weights, "weights", 2);
  check_dtype(weights, "weights", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_same_device(weights, "weights", x, "x");
  TORCH_CHECK(weights.size(0) == cfg.t && weights.size(1) == cfg.k, "weights must have the shape ",
              "of ids [", cfg.t, ", ", cfg.k, "], got ", describe(weights));
  if (b13.has_value()) {
    const Tensor& b = *b13;
    check_same_device(b, "b13", x, "x");
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "b13 must have the dtype of x (",
                x.scalar_type(), "), got ", describe(b));
    TORCH_CHECK(b.dim() == 2 && b.size(0) == cfg.e && b.size(1) == cfg.p, "b13 must have shape [",
                cfg.e, ", ", cfg.p, "] (w13.shape[:2]), got ", describe(b));
    cfg.has_b13 = true;
  }
  if (b2.has_value()) {
    const Tensor& b = *b2;
    check_same_device(b, "b2", x, "x");
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "b2 must have the dtype of x (",
                x.scalar_type(), "), got ", describe(b));
    TORCH_CHECK(b.dim() == 2 && b.size(0) == cfg.e && b.size(1) == cfg.h, "b2 must have shape [",
                cfg.e, ", ", cfg.h, "] (w2.shape[:2]), got ", describe(b));
    cfg.has_b2 = true;
  }
  if (ids.is_cpu() && ids.numel() > 0) {
    const auto [lo, hi] = at::aminmax(ids);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK(lo_v >= -1 && hi_v < cfg.e, "ids must hold expert indices in [0, num_experts = ",
                cfg.e, ") or -1 for a dropped slot, got values in [", lo_v, ", ", hi_v, "]");
  }
  TORCH_CHECK(cfg.t * cfg.k <= kInt32Max, "moe_mlp needs T * k to fit in int32, got ids ",
              describe(ids));
  return cfg;
}

std::tuple<Tensor, Tensor> moe_mlp(const Tensor& x, const Tensor& w13, const Tensor& w2,
                                   const Tensor& weights, const Tensor& ids,
                                   c10::string_view activation, c10::string_view gate_up_layout,
                                   const std::optional<Tensor>& b13,
                                   const std::optional<Tensor>& b2, double alpha, double limit,
                                   c10::string_view backend) {
  const MoeConfig cfg =
      parse_moe(x, w13, w2, weights, ids, activation, gate_up_layout, b13, b2, alpha, limit);
  const bool native = runs_native("moe_mlp", backend, x);
#ifndef SPARSEOPS_WITH_CUDA
  TORCH_CHECK(!native || x.is_cpu(), "this build of sparseops has no CUDA kernels: use ",
              "backend=\"reference\"");
#endif
  Tensor y = at::empty({cfg.t, cfg.h}, x.options());
  Tensor pre = at::empty({cfg.t * cfg.k, cfg.p}, x.options());
  if (cfg.t == 0) return {y, pre};
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor xc = x.contiguous();
  const Tensor wc = weights.to(acc).contiguous();
  const Tensor ic = ids.to(at::kInt).contiguous();
  const Tensor b13c = b13.has_value() ? b13->contiguous() : Tensor();
  const Tensor b2c = b2.has_value() ? b2->contiguous() : Tensor();
  if (native && x.is_cpu()) {
    moe_mlp_cpu_kernel(xc, w13, w2, wc, ic, b13c, b2c, cfg, y, pre);
#ifdef SPARSEOPS_WITH_CUDA
  } else if (native) {
    c10::cuda::CUDAGuard guard(x.device());
    // The kernel reads weight rows with unit stride: other layouts are copied first.
    const Tensor w13c = w13.stride(2) == 1 ? w13 : w13.contiguous();
    const Tensor w2c = w2.stride(2) == 1 ? w2 : w2.contiguous();
    moe_mlp_cuda_kernel(xc, w13c, w2c, wc, ic, b13c, b2c, cfg, y, pre);
#endif
  } else {
    call_python_kernel("moe_mlp", backend, {xc, w13, w2, wc, ic, b13c, b2c}, {y, pre},
                       {{"activation", std::string(act_name(cfg.act))},
                        {"gate_up_layout", std::string(cfg.interleaved ? "interleaved" : "concat")},
                        {"alpha", cfg.alpha},
                        {"limit", cfg.limit}});
  }
  return {y, pre};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> moe_mlp_backward(
    const Tensor& dy, const Tensor& x, const Tensor& w13, const Tensor& w2, const Tensor& weights,
    const Tensor& ids, const Tensor& pre, const std::optional<Tensor>& b13,
    const std::optional<Tensor>& b2, c10::string_view activation, c10::string_view gate_up_layout,
    double alpha, double limit, c10::string_view backend) {
  const MoeConfig cfg =
      parse_moe(x, w13, w2, weights, ids, activation, gate_up_layout, b13, b2, alpha, limit);
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && dy.dim() == 2 && dy.size(0) == cfg.t &&
                  dy.size(1) == cfg.h,
              "dy must match x (", describe(x), "), got ", describe(dy));
  TORCH_CHECK(pre.scalar_type() == x.scalar_type() && pre.dim() == 2 &&
                  pre.size(0) == cfg.t * cfg.k && pre.size(1) == cfg.p,
              "pre must be the forward's pre-activation [", cfg.t * cfg.k, ", ", cfg.p, "], got ",
              describe(pre));
  const bool native = runs_native("moe_mlp_backward", backend, x);
  TORCH_CHECK(!native || x.is_cpu(), "sparseops.moe_mlp_backward has no CUDA C++ kernel yet: ",
              "use backend=\"triton\" (what \"auto\" picks from Python) or \"reference\"");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto xo = x.options();
  Tensor dx = at::zeros({cfg.t, cfg.h}, xo);
  // dw13 / dw2 are written in full by every backend (the CPU kernel zeroes the experts
  // without rows itself: zeroing the full-size gradients first would be a second pass).
  Tensor dw13 = cfg.t > 0 ? at::empty({cfg.e, cfg.p, cfg.h}, xo) : at::zeros({cfg.e, cfg.p, cfg.h}, xo);
  Tensor dw2 = cfg.t > 0 ? at::empty({cfg.e, cfg.h, cfg.inter}, xo) : at::zeros({cfg.e, cfg.h, cfg.inter}, xo);
  Tensor dweights = at::zeros({cfg.t, cfg.k}, xo.dtype(acc));
  Tensor db13 = cfg.has_b13 ? at::zeros({cfg.e, cfg.p}, xo) : at::empty({0}, xo);
  Tensor db2 = cfg.has_b2 ? at::zeros({cfg.e, cfg.h}, xo) : at::empty({0}, xo);
  if (cfg.t > 0) {
    const Tensor wc = weights.to(acc).contiguous();
    const Tensor ic = ids.to(at::kInt).contiguous();
    const Tensor b13c = b13.has_value() ? b13->contiguous() : Tensor();
    const Tensor b2c = b2.has_value() ? b2->contiguous() : Tensor();
    if (native) {
      moe_mlp_backward_cpu_kernel(dy.contiguous(), x.contiguous(), w13, w2, wc, ic,
                                  pre.contiguous(), b13c, b2c, cfg, dx, dw13, dw2, dweights, db13,
                                  db2);
    } else {
      call_python_kernel(
          "moe_mlp_backward", backend,
          {dy.contiguous(), x.contiguous(), w13, w2, wc, ic, pre.contiguous(), b13c, b2c},
          {dx, dw13, dw2, dweights, db13, db2},
          {{"activation", std::string(act_name(cfg.act))},
           {"gate_up_layout", std::string(cfg.interleaved ? "interleaved" : "concat")},
           {"alpha", cfg.alpha},
           {"limit", cfg.limit}});
    }
  }
  return {dx, dw13, dw2, dweights.to(weights.scalar_type()), db13, db2};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseops, CPU, m) {
  m.impl("moe_mlp", &moe_mlp);
  m.impl("moe_mlp_backward", &moe_mlp_backward);
}

#ifdef SPARSEOPS_WITH_CUDA
TORCH_LIBRARY_IMPL(sparseops, CUDA, m) {
  m.impl("moe_mlp", &moe_mlp);
  m.impl("moe_mlp_backward", &moe_mlp_backward);
}
#endif

}  // namespace sparseops
